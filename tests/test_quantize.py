"""Weight-only quantization (flamingo.model.quantize, torchao): close logits, only the frozen backbones'
linear layers quantized, generation, the command-line option and the refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import build_tiny, build_with_vision, randomize_gates
from flamingo.errors import MissingExtra, UserError
from flamingo.model.quantize import QuantizeError, frozen_linears, quantize_model

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Largest |logit difference| to fp32 allowed, on the tiny model (its logits have std ~0.1; measured:
# int8 6e-4, int4 9e-3).
TOLERANCE = {"int8": 5e-3, "int4": 3e-2}


def tiny(lm_dir):
    model = build_tiny(lm_dir("llama"))
    randomize_gates(model)
    return model.eval()


def tiny_with_vision(lm_dir, clip_dir):
    model = build_with_vision(lm_dir("llama"), clip_dir)
    randomize_gates(model)
    return model.eval()


def is_plain(param: torch.Tensor) -> bool:
    return type(param.data) is torch.Tensor


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_logits_are_close_to_fp32(lm_dir, mode):
    model = tiny(lm_dir)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    features = torch.randn(2, 1, 1, 4, 24, generator=torch.Generator().manual_seed(1))
    ids[:, 0] = model.media_token_id
    with torch.no_grad():
        reference = model(ids, vision_features=features).logits
        report = quantize_model(model, mode)
        quantized = model(ids, vision_features=features).logits
    assert report and all(how.startswith(mode) for how in report.values()), report
    difference = (quantized - reference).abs().max().item()
    assert 0 < difference <= TOLERANCE[mode], difference  # 0 would mean nothing was quantized


def test_only_the_frozen_backbone_linears_are_quantized(lm_dir, clip_dir):
    """The LM's attention/MLP projections and the vision tower's linears become int8 tensors; the
    cross-attention blocks, the resampler, the new-token rows, an unfrozen LM block and the output
    head keep their float weights, unchanged."""
    model = build_with_vision(lm_dir("llama"), clip_dir, **{"unfreeze.lm_blocks": [1]}).eval()
    trained = {name: param.detach().clone() for name, param in model.trainable_state_dict().items()}
    head = model.lm.get_output_embeddings().base.weight.detach().clone()
    report = quantize_model(model, "int8")

    names = dict(model.named_modules())
    quantized = {name for name, module in names.items()
                 if isinstance(module, nn.Linear) and not is_plain(module.weight)}
    assert quantized == set(report) and quantized
    assert any(name.startswith("vision_encoder.") for name in quantized)
    assert any(".self_attn.q_proj" in name for name in quantized) and any(".mlp.down_proj" in name for name in quantized)
    block_1 = f"lm.{model.decoder_layers_path}.1."
    assert not any(name.startswith(block_1) for name in quantized)  # the unfrozen block trains
    assert not any("cross_attn" in name or "perceiver" in name for name in quantized)
    for name in quantized:
        assert type(names[name].weight.data).__name__ == "Int8Tensor", name
        assert names[name].weight.data.qdata.dtype == torch.int8 and not names[name].weight.requires_grad
    after = model.trainable_state_dict()
    assert after.keys() == trained.keys()
    for name, param in after.items():
        assert is_plain(param) and param.dtype == torch.float32 and param.requires_grad, name
        assert torch.equal(param, trained[name]), name
    assert torch.equal(model.lm.get_output_embeddings().base.weight, head)
    assert frozen_linears(model) == {}  # quantized layers are not candidates again


def test_int4_keeps_layers_whose_width_has_no_group_size(lm_dir, clip_dir):
    """int4 quantizes in groups of 32/64/128 inputs: the tiny CLIP tower (width 24) is kept in float
    and the report says why; the LM (width 32, 64) is quantized."""
    model = build_with_vision(lm_dir("llama"), clip_dir).eval()
    report = quantize_model(model, "int4")
    kept = {name for name, how in report.items() if how.startswith("kept")}
    assert kept and all(name.startswith("vision_encoder.") for name in kept)
    assert all("not a multiple of 32" in report[name] for name in kept)
    lm_layers = [name for name in report if name.startswith("lm.")]
    assert lm_layers and all(report[name].startswith("int4 (group size") for name in lm_layers)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_generates(lm_dir, clip_dir, mode):
    from flamingo.inference.generation import GenerationConfig, generate
    from flamingo.inference.prompt import text_prompt
    from flamingo.inference.state import encode_prompts

    model = tiny_with_vision(lm_dir, clip_dir)
    quantize_model(model, mode)
    state = encode_prompts(model, [text_prompt("<image>An image of a", [Image.new("RGB", (40, 30), "red")])],
                           max_new_tokens=5)
    result = generate(model, state, GenerationConfig(max_new_tokens=5, stop_at_end_of_chunk=False))[0]
    assert len(result.token_ids) == 5 and result.finish_reason == "length"


def test_load_model_quantizes_and_checks_the_mode_before_loading(lm_dir, clip_dir, tmp_path):
    from flamingo.model.weights import load_model, save_pretrained

    directory = save_pretrained(tiny_with_vision(lm_dir, clip_dir), tmp_path / "model")
    model = load_model(directory, quantize="int8")
    assert type(model.lm.model.layers[1].self_attn.q_proj.weight.data).__name__ == "Int8Tensor"
    with pytest.raises(UserError, match="quantize='int3': expected one of int8, int4"):
        load_model(tmp_path / "no-such-model", quantize="int3")  # the mode is checked first


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_backend_without_a_kernel_is_refused_before_anything_changes(lm_dir, mode):
    """The meta device has no torchao kernel for either mode: a UserError naming the backend and the
    mode, and the model is left as it was."""
    model = tiny(lm_dir).to("meta")
    with pytest.raises(QuantizeError) as caught:
        quantize_model(model, mode)
    message = str(caught.value)
    assert f"quantize {mode}" in message and "meta float32" in message and "torchao" in message, message
    assert all(is_plain(module.weight) for module in frozen_linears(model).values())
    assert frozen_linears(model)


def test_without_torchao_the_message_names_the_extra(lm_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"needs the quantize extra: pip install 'flamingo\[quantize\]'"):
        quantize_model(tiny(lm_dir), "int8")


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat"], ["serve"], ["eval-offline"],
                                     ["eval", "--model", "m", "--task", "coco", "--data", "d.yaml", "--out", "o"]])
def test_every_inference_command_takes_quantize(command, capsys):
    from flamingo.cli import build_parser

    parser = build_parser()
    for mode in ("int8", "int4"):
        assert parser.parse_args(command + ["--quantize", mode]).quantize == mode
    assert parser.parse_args(command).quantize is None
    with pytest.raises(SystemExit):
        parser.parse_args(command + ["--quantize", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_generate_quantize_runs_from_the_command_line(lm_dir, clip_dir, tmp_path, capsys):
    import json

    from flamingo.cli import main
    from flamingo.model.weights import save_pretrained

    directory = save_pretrained(tiny_with_vision(lm_dir, clip_dir), tmp_path / "model")
    assert main(["generate", "--model", str(directory), "--prompt", "An image of", "--max-new-tokens", "3",
                 "--no-stop-at-eoc", "--json", "--quantize", "int8"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 3



def safetensors_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of .safetensors files (Linux)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[-1].endswith(".safetensors"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def test_the_remaining_frozen_tensors_leave_the_checkpoint_mapping(lm_dir):
    """Loaded from safetensors, the LM's tensors are views into the memory-mapped file, which stays
    resident while any of them lives (the replaced float weights' pages included): after quantizing,
    the float tensors left (embeddings, norms, head) live in memory of their own, tied ones still tied."""
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc/self/maps (Linux)")
    model = build_tiny(lm_dir("qwen2")).eval()  # a tied LM: the head is the input table

    def mapped() -> list[str]:
        ranges = safetensors_mappings()
        return [name for name, t in [*model.lm.named_parameters(), *model.lm.named_buffers()]
                if is_plain(t) and any(start <= t.data_ptr() < end for start, end in ranges)]

    assert mapped(), "precondition: the LM is loaded memory-mapped"
    quantize_model(model, "int8")
    assert mapped() == []
    assert model.lm.get_output_embeddings().base.weight is model.input_embeddings.base.weight
