"""LoRA on the frozen LM with PEFT (flamingo.model.lora): identity at initialisation, what trains,
save/load in PEFT's format, merging, and the settings' refusals."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import FEATURE_DIM, build_tiny, randomize_gates
from flamingo.errors import MissingExtra
from flamingo.model.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LoraError,
    LoraSettings,
    apply_lora,
    load_adapters,
    lora_state_dict,
    merge_lora,
    save_adapters,
)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(lm_dir):
    # Fed features (no vision tower to fetch): a saved directory of it loads offline.
    model = build_tiny(lm_dir("llama"), **{"vision.kind": "features", "vision.feature_dim": FEATURE_DIM})
    randomize_gates(model)
    return model.eval()


def batch():
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    return ids


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def perturb_adapters(model, seed: int = 0) -> None:
    """Give the B matrices (zero at initialisation) values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def test_at_initialisation_the_lora_model_equals_the_base_bit_for_bit(lm_dir):
    model = tiny(lm_dir)
    ids = batch()
    base = logits(model, ids)
    targets = apply_lora(model, LoraSettings(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    assert len(targets) == 3 * 4  # three projections in each of the four blocks, wrapped blocks included
    assert any(".decoder_layer." in name for name in targets)  # the blocks holding cross-attention too
    assert torch.equal(logits(model, ids), base)


def test_only_the_adapters_and_the_bridge_train(lm_dir):
    model = tiny(lm_dir)
    bridge = set(model.trainable_state_dict())
    apply_lora(model, LoraSettings(rank=4, targets=["q_proj", "up_proj"]))
    assert set(model.trainable_state_dict()) == bridge  # the saved bridge is unchanged by LoRA
    bridge_ids = {id(p) for p in model.trainable_state_dict().values()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    assert lora and trainable - lora == {n for n, p in model.named_parameters() if id(p) in bridge_ids}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    ids = batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert any(".lora_B." in n for n in changed) and any("cross_attn" in n for n in changed)
    assert not any(".base_layer." in n or n.endswith("proj.weight") for n in changed)


def test_merged_equals_unmerged_and_leaves_plain_layers(lm_dir):
    model = tiny(lm_dir)
    apply_lora(model, LoraSettings(rank=4, alpha=8, targets=["*_proj"]))
    perturb_adapters(model)
    ids = batch()
    adapted = logits(model, ids)
    assert len(merge_lora(model)) == 7 * 4
    assert (logits(model, ids) - adapted).abs().max().item() <= 1e-5
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert type(model.lm.model.layers[1].self_attn.q_proj) is torch.nn.Linear


def test_adapters_round_trip_in_peft_format(lm_dir, tmp_path):
    model = tiny(lm_dir)
    apply_lora(model, LoraSettings(rank=2, alpha=4, dropout=0.1, targets=["k_proj", "o_proj"]))
    perturb_adapters(model)
    ids = batch()
    adapted = logits(model, ids)
    save_adapters(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE}
    config = peft.LoraConfig.from_pretrained(str(tmp_path))  # PEFT reads it back
    assert (config.r, config.lora_alpha, config.lora_dropout) == (2, 4, 0.1)

    fresh = tiny(lm_dir)
    assert not torch.equal(logits(fresh, ids), adapted)
    load_adapters(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), adapted)
    assert lora_state_dict(fresh).keys() == lora_state_dict(model).keys()


def test_adapters_of_other_layers_are_refused(lm_dir, tmp_path):
    model = tiny(lm_dir)
    apply_lora(model, LoraSettings(rank=2, targets=["q_proj"]))
    save_adapters(model, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS_FILE))
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS_FILE))
    with pytest.raises(LoraError, match="does not match the model's adapters: missing"):
        load_adapters(tiny(lm_dir), tmp_path)
    with pytest.raises(LoraError, match="holds no LoRA adapters"):
        load_adapters(tiny(lm_dir), tmp_path / "nothing")


@pytest.mark.parametrize("data, message", [
    ({"rank": 0}, "lora field rank: expected an integer in [1, 4096], got 0"),
    ({"alpha": -1}, "lora field alpha: expected a finite number > 0"),
    ({"dropout": 1.0}, "lora field dropout: expected a number in [0, 1)"),
    ({"targets": []}, "lora field targets: expected a non-empty list"),
    ({"rnak": 4}, "unknown field(s) ['rnak']"),
])
def test_bad_settings_are_one_clear_error(data, message):
    with pytest.raises(LoraError) as caught:
        LoraSettings.from_dict(data)
    assert message in str(caught.value)


@pytest.mark.parametrize("pattern", ["qproj", "lm_head"])  # a typo; the output head (not adaptable)
def test_a_target_matching_no_adaptable_layer_is_refused(lm_dir, pattern):
    model = tiny(lm_dir)
    with pytest.raises(LoraError) as caught:
        apply_lora(model, LoraSettings(targets=[pattern]))
    assert f"{pattern!r} matches none of the linear layers LoRA can adapt" in str(caught.value)
    assert "q_proj" in str(caught.value) and "to_q" in str(caught.value)  # the names it could have used


def test_cross_attention_layers_take_adapters_and_keep_their_saved_names(lm_dir):
    model = tiny(lm_dir)
    ids = batch()
    base = logits(model, ids)
    bridge = model.trainable_state_dict()
    targets = apply_lora(model, LoraSettings(rank=2, targets=["*cross_attn*"]))
    assert len(targets) == 5 * 2  # to_q, to_kv, to_out, fc1, fc2 in each of the two blocks
    assert all(".cross_attn." in t for t in targets)
    assert torch.equal(logits(model, ids), base)
    saved = model.trainable_state_dict()
    assert saved.keys() == bridge.keys()  # PEFT's base_layer level is not in the saved names
    assert all(saved[k] is bridge[k] for k in bridge)  # the same parameters, still trained
    perturb_adapters(model)
    adapted = logits(model, ids)
    before = {k: v.detach().clone() for k, v in saved.items()}
    merge_lora(model)
    assert (logits(model, ids) - adapted).abs().max().item() <= 1e-5
    changed = {k for k, v in model.trainable_state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".attn.to_" in k or ".ffw.fc" in k for k in changed)  # folded into the bridge


def test_without_peft_the_message_names_the_extra(lm_dir, monkeypatch):
    model = tiny(lm_dir)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"needs the lora extra: pip install 'flamingo\[lora\]'"):
        apply_lora(model, LoraSettings())


def adapted_directory(lm_dir, tmp_path):
    """A saved model directory with adapters on LM and cross-attention layers, and its logits."""
    from flamingo.model.weights import save_pretrained

    model = tiny(lm_dir)
    apply_lora(model, LoraSettings(rank=2, alpha=4, targets=["q_proj", "down_proj", "to_kv"]))
    perturb_adapters(model)
    directory = save_pretrained(model, tmp_path / "adapted")
    save_adapters(model, directory)
    return directory, logits(model, batch())


def test_a_model_directory_with_adapters_loads_them(lm_dir, tmp_path):
    from flamingo.model.weights import load_model, load_pretrained

    directory, adapted = adapted_directory(lm_dir, tmp_path)
    kept = load_pretrained(directory, merge_adapters=False).eval()
    assert torch.equal(logits(kept, batch()), adapted)
    merged = load_model(directory).eval()  # what generate, chat, serve and eval load: merged, no extra work per token
    assert not any(".lora_" in name for name, _ in merged.named_parameters())
    assert (logits(merged, batch()) - adapted).abs().max().item() <= 1e-5


def test_merge_lora_writes_a_plain_model_directory(lm_dir, tmp_path, monkeypatch, capsys):
    from flamingo.cli import main
    from flamingo.model.lora import has_adapters
    from flamingo.model.weights import load_pretrained

    directory, adapted = adapted_directory(lm_dir, tmp_path)
    out = tmp_path / "merged"
    assert main(["merge-lora", str(directory), str(out)]) == 0
    assert not has_adapters(out) and (out / "lm" / "config.json").is_file()  # the merged LM, saved beside
    moved = tmp_path / "moved"
    out.rename(moved)  # self-contained: the LM path is relative to the directory
    monkeypatch.setitem(sys.modules, "peft", None)  # and loading it needs no PEFT
    model = load_pretrained(moved).eval()
    assert (logits(model, batch()) - adapted).abs().max().item() <= 1e-5

    capsys.readouterr()
    assert main(["merge-lora", str(moved), str(tmp_path / "again")]) != 0
    assert "holds no LoRA adapters (no adapter_config.json): there is nothing to merge" in capsys.readouterr().err
