"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_inference_example_runs(capsys):
    block = re.search(r"<!-- readme-example: inference -->\n```python\n(.*?)```", README, re.S)
    assert block, "the README's inference example is missing"
    exec(compile(block.group(1), "README.md", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3  # text; answers; order and scores


def test_readme_test_command_is_ci():
    """CI runs the README's test command as written, before anything else that runs tests (the
    lowest-supported-transformers run follows it)."""
    lines = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().strip().splitlines()
    ci = next(line for line in lines if "pytest" in line)
    assert f"\n{ci}\n" in README
