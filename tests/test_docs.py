"""The README's and the documentation's examples run as written.

A code block marked `<!-- docs-example: NAME -->` is extracted and run: Python in this process, shell
with bash in a fresh folder. The serving examples run against a real `flamingo serve` (the embedded
model) on a free port, which replaces the documented 127.0.0.1:8000. Blocks that cannot run offline or
in seconds (a hub model, official benchmark files, a long training run) are left unmarked.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"<!-- docs-example: ([\w-]+) -->\n")
FENCE = re.compile(r"```(python|bash)\n(.*?)^```", re.S | re.M)
DOCUMENTED_ADDRESS = "127.0.0.1:8000"


def _examples() -> dict[str, tuple[str, str, str]]:
    """name -> (page, language, code)."""
    found: dict[str, tuple[str, str, str]] = {}
    for page in PAGES:
        text = page.read_text()
        for marker in MARKER.finditer(text):
            fence = FENCE.match(text, marker.end())
            assert fence, f"{page.name}: the docs-example {marker.group(1)!r} is not followed by a python or bash block"
            assert marker.group(1) not in found, f"two docs-examples are called {marker.group(1)!r}"
            found[marker.group(1)] = (str(page.relative_to(ROOT)), fence.group(1), fence.group(2))
    return found


EXAMPLES = _examples()
# A block repeated word for word (README and guide) runs once.
_FIRST: dict[str, str] = {}
for _name, (_, _, _code) in EXAMPLES.items():  # the README first
    _FIRST.setdefault(_code, _name)
UNIQUE = sorted(_FIRST.values())
SERVER_EXAMPLES = [name for name in UNIQUE if DOCUMENTED_ADDRESS in EXAMPLES[name][2]]
OFFLINE_EXAMPLES = [name for name in UNIQUE if name not in SERVER_EXAMPLES]


def run_example(name: str, folder: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                port: int | None = None) -> str:
    """Run one example in `folder` and return what it printed (stdout)."""
    page, language, code = EXAMPLES[name]
    if port is not None:
        code = code.replace(DOCUMENTED_ADDRESS, f"127.0.0.1:{port}")
    monkeypatch.chdir(folder)
    if language == "python":
        exec(compile(code, f"{page}:{name}", "exec"), {"__name__": "__docs_example__"})
        return capsys.readouterr().out
    # The scripts of this interpreter's environment first: `flamingo` as installed with it.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{page}:{name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_examples_are_found():
    assert {"readme-few-shot", "readme-serve-curl", "readme-serve-openai", "readme-eval-offline", "few-shot",
            "serve-curl", "serve-openai", "data", "dedup"} <= set(EXAMPLES)
    assert "readme-few-shot" in UNIQUE and "few-shot" not in UNIQUE  # the same block, run once


@pytest.mark.parametrize("name", OFFLINE_EXAMPLES)
def test_offline_example_runs(name, tmp_path, capsys, monkeypatch):
    out = run_example(name, tmp_path, capsys, monkeypatch)
    if name == "readme-few-shot":
        assert len(out.strip().splitlines()) == 3  # text; answers; order and scores
    elif name == "dedup":
        # The numbers the page states are the numbers the command gives.
        page = (ROOT / EXAMPLES[name][0]).read_text()
        kept, records = map(int, re.search(r"keeps (\d+) of the (\d+) records", page).groups())
        summary = json.loads((tmp_path / "dedup" / "report" / "summary.json").read_text())
        assert (summary["kept"], summary["records"]) == (kept, records)
    elif name == "data":
        assert list((tmp_path / "shards").glob("*.tar"))
    else:
        assert out.strip(), f"{name} printed nothing"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`flamingo serve` as the guide starts it (the embedded model), on a free port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "flamingo.cli", "serve", "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, f"flamingo serve exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"flamingo serve did not start:\n{log.read_text()}"
                time.sleep(0.5)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.parametrize("name", SERVER_EXAMPLES)
def test_serving_example_runs_against_flamingo_serve(name, served, tmp_path, capsys, monkeypatch):
    pytest.importorskip("openai")
    out = run_example(name, tmp_path, capsys, monkeypatch, port=served)
    if EXAMPLES[name][1] == "bash":  # curl prints the response
        response = json.loads(out)
        assert response["object"] == "chat.completion" and response["choices"][0]["message"]["content"] is not None
    else:
        assert out.strip(), f"{name} printed nothing"


# Files the pages name: repository paths anywhere (commands included), package paths in backticks.
REPO_PATH = re.compile(r"(?<![\w/.])((?:src/flamingo|configs|benchmarks|scripts|tests)/[\w/.-]*\w\.(?:py|yaml))")
PACKAGE_PATH = re.compile(r"`((?:model|data|training|inference|serving|evaluation)/[\w/]+\.py)`")


def test_the_files_the_pages_name_exist():
    missing = []
    for page in PAGES:
        text = page.read_text()
        missing += [f"{page.name}: {path}" for path in REPO_PATH.findall(text) if not (ROOT / path).exists()]
        missing += [f"{page.name}: {path}" for path in PACKAGE_PATH.findall(text)
                    if not (ROOT / "src" / "flamingo" / path).exists()]
    assert not missing, "the docs name files that are not there (moved?): " + ", ".join(missing)
