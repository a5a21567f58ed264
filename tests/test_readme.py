"""The README: short, and its test command is the one CI runs. (Its examples run in tests/test_docs.py.)"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_short():
    """What it is, the two commands, one example per job and links: the rest lives in docs/."""
    assert len(README.splitlines()) <= 200


def test_readme_test_command_is_ci():
    """CI runs the README's test command as written, before anything else that runs tests (the
    lowest-supported-transformers run follows it)."""
    lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    ci = next(line for line in lines if "pytest" in line)
    assert f"\n{ci}\n" in README
