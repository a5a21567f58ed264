"""Bad-input corpus, command line: every case must end with exit code 2 and one line naming the
option, field or file, no traceback, and nothing written outside the output folder.
See tests/bad_input.py for the contract."""

from __future__ import annotations

import pytest
from bad_input import changes, run_cli, snapshot

# ------------------------------------------------------------------------------- harness
def test_snapshot_sees_created_changed_and_deleted_files(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / "out").mkdir()
    before = snapshot([tmp_path])
    (tmp_path / "a").write_text("2")
    (tmp_path / "b").write_text("")
    (tmp_path / "out" / "c").write_text("")
    diff = changes(before, snapshot([tmp_path]), allowed=[tmp_path / "out"])
    assert diff == [f"changed: {tmp_path / 'a'}", f"created: {tmp_path / 'b'}"]


# -------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("text, field", [
    ("perceiver: {depth: -1}\n", "perceiver.depth"),
    ("perceiver: {depth: 0}\n", "perceiver.depth"),
])
def test_params_bad_config(tmp_path, text, field):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    run_cli(["params", str(bad)], expect=field, watch=[tmp_path])
