"""Config files, the safetensors round trip, strict loading and the parameter report."""

from __future__ import annotations

import pytest
import torch
from conftest import FEATURE_DIM, build_tiny, randomize_gates, tiny_config
from test_model import PROMPT, encode, features

from flamingo import ConfigError, FlamingoConfig, LanguageModelConfig
from flamingo.errors import UserError
from flamingo.model.params import format_parameter_report, parameter_report
from flamingo.model.weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_trainable_weights,
    load_weights_file,
    save_pretrained,
)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_round_trip(tmp_path, suffix):
    config = FlamingoConfig.openflamingo(LanguageModelConfig(name_or_path="some/lm"), cross_attn_every_n_layers=4)
    config.save(tmp_path / f"c{suffix}")
    loaded = FlamingoConfig.load(tmp_path / f"c{suffix}")
    assert loaded == config
    assert loaded.cross_attention_layers(32) == list(range(3, 32, 4))  # OpenFlamingo's convention
    assert FlamingoConfig().cross_attention_layers(8) == list(range(8))  # the paper: from the first


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("perceiver:\n  depht: 3\n")
    with pytest.raises(ConfigError, match=r"perceiver: unknown field\(s\) \['depht'\]"):
        FlamingoConfig.load(bad)
    bad.write_text("activation: relu\n")
    with pytest.raises(ConfigError, match="activation: expected one of 'sqrelu', 'gelu', 'silu', got 'relu'"):
        FlamingoConfig.load(bad)
    bad.write_text("cross_attention:\n  every: 0\n")
    with pytest.raises(ConfigError, match="cross_attention.every: expected an integer >= 1, got 0"):
        FlamingoConfig.load(bad)
    bad.write_text("lm: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:1: invalid YAML: expected ',' or '\]', but got '<stream end>'$"):
        FlamingoConfig.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        FlamingoConfig.load(tmp_path / "missing.yaml")


def test_save_load_round_trip_is_bit_exact(lm_dir, tmp_path):
    path = lm_dir("llama")
    model = build_tiny(path, seed=1)
    randomize_gates(model, 0.3)
    save_pretrained(model, tmp_path)
    assert (tmp_path / CONFIG_FILE).is_file() and (tmp_path / WEIGHTS_FILE).is_file()
    assert FlamingoConfig.load(tmp_path / CONFIG_FILE) == model.config

    fresh = build_tiny(path, seed=2)
    ids, feats = encode(model, PROMPT), features(3)
    with torch.no_grad():
        assert not torch.equal(fresh(ids, vision_features=feats).logits, model(ids, vision_features=feats).logits)
        load_trainable_weights(fresh, load_weights_file(tmp_path / WEIGHTS_FILE))
        for key, value in model.trainable_state_dict().items():
            assert torch.equal(fresh.trainable_state_dict()[key], value), key
        assert torch.equal(fresh(ids, vision_features=feats).logits, model(ids, vision_features=feats).logits)


def test_loading_is_strict_and_lists_the_mismatch(lm_dir, tmp_path):
    model = build_tiny(lm_dir("llama"))
    tensors = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    tensors.pop("perceiver.latents")
    tensors["perceiver.extra"] = torch.zeros(1)
    tensors["cross_attn.0.attn_gate"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as err:
        load_trainable_weights(model, tensors, source="ckpt")
    message = str(err.value)
    assert "missing keys: perceiver.latents" in message
    assert "unexpected keys: perceiver.extra" in message
    assert "cross_attn.0.attn_gate: expected (), got (2,)" in message
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights_file(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights_file(tmp_path / "none.safetensors")


@pytest.mark.parametrize("unfrozen_blocks", [[], [1, 2]])
def test_parameter_report_counts_each_component_once(lm_dir, unfrozen_blocks):
    model = build_tiny(lm_dir("llama"), **{"unfreeze.lm_blocks": unfrozen_blocks})
    rows = {r.name: r for r in parameter_report(model)}
    if unfrozen_blocks:  # fine-tuning: the unfrozen blocks (block 2 behind an xattn layer) are trainable
        assert rows["language model blocks 1, 2 (unfrozen)"].trainable
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(r.parameters for r in rows.values() if r.trainable) == trainable
    assert sum(r.parameters for r in rows.values() if not r.trainable) == frozen
    assert rows["perceiver resampler"].parameters == sum(p.numel() for p in model.perceiver.parameters())
    assert rows["new token embeddings"].parameters == 2 * 2 * 32  # 2 tokens, input + output rows, width 32
    text = format_parameter_report(list(rows.values()))
    assert "gated xattn-dense layers" in text and "trainable" in text


def test_tiny_config_sizes(lm_dir):
    config = tiny_config(lm_dir("llama"))
    assert config.perceiver.num_latents == 4 and config.activation == "sqrelu"


def test_build_save_load_from_config_with_pixels(lm_dir, tmp_path, capsys):
    """The whole path a user takes: a config naming backbones on disk -> build -> save -> load in
    a fresh model -> identical outputs on image pixels; and `flamingo params` on the saved dir."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from flamingo.cli import main
    from flamingo.model.weights import build_flamingo, load_pretrained

    torch.manual_seed(0)
    vision_dir = tmp_path / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(vision_dir)
    config = tiny_config(lm_dir("llama"))
    config.vision.name_or_path = str(vision_dir)
    model = build_flamingo(config)
    randomize_gates(model, 0.5)
    save_pretrained(model, tmp_path / "model")
    loaded = load_pretrained(tmp_path / "model")

    pixels = torch.rand(1, 3, 1, 3, 32, 32)
    ids = encode(model, PROMPT)
    with torch.no_grad():
        expected = model(ids, pixels).logits
        assert torch.equal(loaded(ids, pixels).logits, expected)
        assert not torch.equal(loaded(ids, pixels.flip(1)).logits, expected)  # the images matter

    assert main(["params", str(tmp_path / "model")]) == 0
    report = capsys.readouterr().out
    assert "vision encoder (frozen)" in report and "perceiver resampler" in report


def test_a_language_model_runs_its_own_code_only_when_the_caller_allows_it(remote_code_lm_dir, clip_dir, tmp_path,
                                                                          monkeypatch):
    """A config (or a saved model fetched from anywhere) that asks for `lm.trust_remote_code` gets
    an error naming the flag; the code runs only with trust_remote_code=True from the caller."""
    from flamingo.model.language_model import RemoteCodeError
    from flamingo.model.weights import build_flamingo, load_model

    ran = tmp_path / "code-ran"
    monkeypatch.setenv("FLAMINGO_TEST_CODE_RAN", str(ran))
    config = tiny_config(remote_code_lm_dir, **{"lm.trust_remote_code": True})
    config.vision.name_or_path = str(clip_dir)
    saved = tmp_path / "model"
    saved.mkdir()
    config.save(saved / CONFIG_FILE)
    config.save(tmp_path / "config.yaml")
    for load in (lambda: build_flamingo(config), lambda: load_model(saved), lambda: load_model(tmp_path / "config.yaml")):
        with pytest.raises(RemoteCodeError, match="lm.trust_remote_code.*--trust-remote-code"):
            load()
    assert not ran.exists()

    model = build_flamingo(config, trust_remote_code=True)
    assert ran.exists() and type(model.lm).__name__ == "MarkedForCausalLM"


def test_save_pretrained_writes_a_whole_folder_or_nothing_and_overwrites_only_when_asked(lm_dir, tmp_path,
                                                                                          monkeypatch):
    from flamingo.outputs import OutputExistsError

    model = build_tiny(lm_dir("llama"), seed=1)
    out = tmp_path / "model"
    save_pretrained(model, out)
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_pretrained(model, out)
    randomize_gates(model, 0.2)
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("flamingo.model.tensor_files.save_file", disk_full)
    with pytest.raises(UserError, match="model cannot be written: No space left"):  # a failed save: the old model is left as it was
        save_pretrained(model, out, overwrite=True)
    with pytest.raises(UserError, match="cannot be written: No space left"):  # ... and a new one leaves nothing
        save_pretrained(model, tmp_path / "new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    monkeypatch.undo()
    save_pretrained(model, out, overwrite=True)
    assert (out / WEIGHTS_FILE).read_bytes() != saved[WEIGHTS_FILE]

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds none of config.yaml, bridge.safetensors"):
        save_pretrained(model, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_a_features_fed_model_saves_and_loads_from_its_config(lm_dir, tmp_path):
    """`vision.kind: features` with a feature width: a model without an encoder (a converted
    OpenFlamingo checkpoint, training on cached features) is built, saved and reloaded from its
    config alone, bit-exact."""
    from flamingo.model.weights import build_flamingo, load_pretrained

    config = tiny_config(lm_dir("llama"), **{"vision.kind": "features", "vision.feature_dim": FEATURE_DIM})
    torch.manual_seed(0)
    model = build_flamingo(config)
    assert model.vision_encoder is None
    randomize_gates(model, 0.5)
    save_pretrained(model, tmp_path / "model")
    assert "kind: features" in (tmp_path / "model" / CONFIG_FILE).read_text()
    loaded = load_pretrained(tmp_path / "model")
    assert loaded.vision_encoder is None and loaded.config == config
    ids, feats = encode(model, PROMPT), features(3)
    with torch.no_grad():
        assert torch.equal(loaded(ids, vision_features=feats).logits, model(ids, vision_features=feats).logits)


@pytest.mark.parametrize("vision, message", [
    ({"kind": "features"}, "vision.feature_dim: expected an integer >= 1 with kind features"),
    ({"kind": "features", "feature_dim": 0}, "vision.feature_dim"),
    ({"kind": "clip", "feature_dim": 24}, "vision.feature_dim"),
])
def test_feature_dim_goes_with_kind_features(vision, message):
    with pytest.raises(ConfigError, match=message):
        FlamingoConfig.from_dict({"vision": vision})


def test_the_tokenizer_location_is_in_the_config(lm_dir, tmp_path):
    """`lm.tokenizer` names where the tokenizer is (default: with the LM); a missing one is a
    clear error naming the field and the place, not a hint to install a tokenizer library."""
    import shutil

    from flamingo.model.language_model import TokenizerNotFound, load_language_model

    source = lm_dir("llama")
    weights_only = tmp_path / "lm"
    weights_only.mkdir()
    for f in source.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, weights_only / f.name)
    with pytest.raises(TokenizerNotFound, match=rf"lm.name_or_path \(no lm.tokenizer given\): no readable "
                                                 rf"tokenizer at '{weights_only}'.*set lm.tokenizer"):
        load_language_model(LanguageModelConfig(name_or_path=str(weights_only)))
    with pytest.raises(TokenizerNotFound, match=rf"lm.tokenizer: no readable tokenizer at '{tmp_path / 'none'}'"):
        load_language_model(LanguageModelConfig(name_or_path=str(weights_only), tokenizer=str(tmp_path / "none")))
    _, tokenizer = load_language_model(LanguageModelConfig(name_or_path=str(weights_only), tokenizer=str(source)))
    _, reference = load_language_model(LanguageModelConfig(name_or_path=str(source)))
    assert tokenizer.get_vocab() == reference.get_vocab()
    with pytest.raises(ConfigError, match="lm.tokenizer"):
        FlamingoConfig.from_dict({"lm": {"tokenizer": ""}})
