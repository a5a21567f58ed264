"""The CI script's environments: the lowest-supported-transformers venv (.ci/lowest-venv) sees the
packages of the environment that runs CI, a virtualenv included, behind its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _purelib(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_lowest_transformers_venv_sees_the_packages_of_the_virtualenv_running_ci(tmp_path):
    """CI run from inside a virtualenv: the second venv used to see the base interpreter's
    packages instead (venv --system-site-packages), so its tests could not import them."""
    outer = tmp_path / "outer"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(outer)], check=True)
    outer_packages = _purelib(outer / "bin" / "python")
    (outer_packages / "only_in_outer.py").write_text("")
    (outer_packages / "shadowed.py").write_text("")
    editable = tmp_path / "src"  # an editable install: a .pth naming a source folder
    editable.mkdir()
    (editable / "editable_package.py").write_text("")
    (outer_packages / "__editable__.x.pth").write_text(f"{editable}\n")
    env = dict(os.environ, PATH=f"{outer / 'bin'}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(outer))
    env.pop("PYTHONPATH", None)
    subprocess.run([str(ROOT / ".ci" / "lowest-venv"), str(tmp_path / "inner"), "--without-pip"], env=env,
                   check=True, capture_output=True, timeout=120)
    inner_python = tmp_path / "inner" / "bin" / "python"
    inner_packages = _purelib(inner_python)
    (inner_packages / "shadowed.py").write_text("SHADOW = True\n")  # the inner venv's own install wins
    done = subprocess.run([str(inner_python), "-c", "import only_in_outer, editable_package, shadowed; "
                           "print(getattr(shadowed, 'SHADOW', False)); print(editable_package.__file__)"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", str(editable / "editable_package.py")]
