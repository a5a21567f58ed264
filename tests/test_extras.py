"""Lean installs: the core package imports and runs without the optional stacks, and a feature whose
extra is missing says, in one line, which `pip install` brings it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flamingo.errors import MissingExtra, import_extra

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Each extra's packages as imported (the distribution names are in pyproject.toml).
EXTRA_MODULES = {
    "serve": ["fastapi", "uvicorn", "prometheus_client", "httpx", "starlette"],
    "eval": ["pycocoevalcap", "nltk", "wn", "matplotlib"],
    "video": ["av"],
    "dedup": ["imagehash", "faiss"],
    "demo": ["skimage"],
    "quantize": ["torchao"],
    "lora": ["peft"],
    "lmms-eval": ["lmms_eval"],  # only lmms-eval imports the plugin's lmms subclass
}
BLOCKED = sorted({module for modules in EXTRA_MODULES.values() for module in modules})


def run_without_extras(code: str) -> subprocess.CompletedProcess:
    """Run Python `code` in a fresh interpreter in which none of the extras' packages can be imported
    (as after `pip install flamingo`)."""
    prelude = f"import sys\nsys.modules.update(dict.fromkeys({BLOCKED!r}))\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def run_cli_without_extras(*argv: str) -> subprocess.CompletedProcess:
    return run_without_extras(f"import runpy\nsys.argv = ['flamingo', *{list(argv)!r}]\n"
                              "runpy.run_module('flamingo.cli', run_name='__main__')")


def test_the_core_dependencies_leave_the_optional_stacks_to_extras():
    core = {req.split(">")[0].split("=")[0].split("[")[0].strip().lower()
            for req in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name in ["fastapi", "uvicorn", "prometheus-client", "httpx", "pycocoevalcap", "nltk", "wn", "av",
                 "matplotlib", "scikit-image", "imagehash", "faiss-cpu"]:
        assert name not in core, f"{name} is a core dependency"
    # The tests exercise every feature, so their extra pulls in every feature's extra.
    features = {"serve", "eval", "plot", "video", "dedup", "demo", "quantize", "lora"}
    assert all(any(req.startswith("flamingo[") and feature in req for req in extras["test"]) for feature in features)
    assert all(any(feature in req for req in extras["all"]) for feature in features | {"docs", "timm", "train"})


def test_the_core_imports_and_the_command_line_starts_without_the_extras():
    """Every module but the server's imports without the extras: their packages are imported where a
    feature needs them, not at module level."""
    done = run_without_extras(
        "import importlib, pkgutil\n"
        "import flamingo\n"
        "from flamingo import load_model, save_pretrained\n"
        "for module in pkgutil.walk_packages(flamingo.__path__, 'flamingo.'):\n"
        "    if not module.name.startswith('flamingo.serving.') and not module.name.endswith('__main__'):\n"
        "        importlib.import_module(module.name)\n"
        "from flamingo.cli import build_parser\n"
        "build_parser()\n"
        "print('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("argv, extra, feature", [
    (["serve"], "serve", "flamingo serve"),
    (["eval", "--model", "embedded", "--task", "coco", "--data", "missing.yaml", "--out", "runs/x"], "eval",
     "flamingo eval"),
    (["plot", "runs/missing"], "plot", "flamingo plot"),
    (["data", "dedup", "x/*.tar", "--eval", "coco=x", "--out", "runs/x"], "dedup", "flamingo data dedup"),
    (["generate", "--prompt", "x", "--quantize", "int8"], "quantize", "--quantize (weight-only quantization)"),
])
def test_a_command_without_its_extra_says_which_to_install(argv, extra, feature):
    done = run_cli_without_extras(*argv)
    assert done.returncode == 1
    assert done.stderr == f"{feature} needs the {extra} extra: pip install 'flamingo[{extra}]'\n"


def test_a_library_feature_without_its_extra_raises_missing_extra():
    done = run_without_extras(
        "from flamingo.evaluation.metrics import cider\n"
        "from flamingo.errors import MissingExtra\n"
        "try:\n"
        "    cider({'a': 'a cat'}, {'a': ['a cat']})\n"
        "except MissingExtra as err:\n"
        "    print(err)\n")
    assert done.stdout == "CIDEr needs the eval extra: pip install 'flamingo[eval]'\n", done.stderr


def test_a_broken_package_is_not_reported_as_a_missing_extra(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as caught:
        import_extra("brokenpkg", "serve", "flamingo serve")
    assert not isinstance(caught.value, MissingExtra) and caught.value.name == "a_module_that_does_not_exist"
    with pytest.raises(MissingExtra, match=r"^flamingo serve needs the serve extra: pip install 'flamingo\[serve\]'$"):
        import_extra("not_installed_anywhere", "serve", "flamingo serve")
