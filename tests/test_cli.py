"""The command line: help that teaches by example, the configs we ship, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from flamingo import FlamingoConfig
from flamingo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "flamingo demo" in out and "convert-openflamingo" in out and "params" in out


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = FlamingoConfig.load(path)
    assert config.cross_attention_layers(32)


def test_params_on_a_bad_config_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("perceiver: {depth: -1}\n")
    assert main(["params", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flamingo params: error: config field perceiver.depth: expected an integer >= 1, got -1"
    assert main(["params", str(tmp_path)]) == 2
    assert "not a saved Flamingo model directory" in capsys.readouterr().err
