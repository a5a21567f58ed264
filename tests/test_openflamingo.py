"""OpenFlamingo checkpoints: conversion, and logit equivalence with OpenFlamingo's own code.

OpenFlamingo (`open_flamingo` 2.0.1) is built exactly as its factory builds it, from the same tiny
random LM as ours, with a stand-in vision encoder that returns chosen features (so no open_clip
and no download is needed). All of its trainable weights are randomised, including non-zero
gates and the new token rows, converted with our converter, and the logits are compared.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

import pytest
import torch
from torch import nn

from conftest import FAMILIES, FEATURE_DIM
from flamingo import FlamingoConfig, LanguageModelConfig
from flamingo.model.convert_openflamingo import (
    convert_openflamingo,
    convert_openflamingo_state_dict,
    load_openflamingo_checkpoint,
)
from flamingo.model.flamingo import Flamingo
from flamingo.model.language_model import load_language_model
from flamingo.model.weights import CheckpointError, load_pretrained, load_trainable_weights, load_weights_file

NUM_IMAGES, PATCHES, EVERY = 3, 5, 2
PROMPTS = [  # text before the first image, three images, <|endofchunk|>
    "Question: what colour<image>a red circle<|endofchunk|><image>two green squares<|endofchunk|><image>This is a",
    "An image of<image>a cat<|endofchunk|><image>the quick brown fox jumps<|endofchunk|><image>Output: a",
]
TOLERANCE = 1e-5
# OpenFlamingo's own code passes the LM the deprecated `past_key_values` keyword (ours passes the
# LM's current one: the same warning from our code fails the other test modules).
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
# OpenFlamingo's factory infers the decoder path only for the LMs it knows; others are given (as
# its decoder_layers_attr_name argument allows).
UNKNOWN_TO_OPENFLAMINGO = {"gemma3": "model.layers"}

# ----------------------------------------------------------------------------- OpenFlamingo side
@pytest.fixture(scope="module")
def open_flamingo():
    """OpenFlamingo's modules; its package imports open_clip (only its factory uses it): stub it."""
    pytest.importorskip("einops")
    pytest.importorskip("einops_exts")
    stubbed = "open_clip" not in sys.modules and importlib.util.find_spec("open_clip") is None
    if stubbed:
        sys.modules["open_clip"] = types.ModuleType("open_clip")
    try:
        flamingo = importlib.import_module("open_flamingo.src.flamingo")
        flamingo_lm = importlib.import_module("open_flamingo.src.flamingo_lm")
        utils = importlib.import_module("open_flamingo.src.utils")
        factory = importlib.import_module("open_flamingo.src.factory")
    except ImportError as err:
        pytest.skip(f"open_flamingo is not importable: {err}")
    finally:
        if stubbed:
            sys.modules.pop("open_clip", None)
    return types.SimpleNamespace(Flamingo=flamingo.Flamingo, FlamingoLMMixin=flamingo_lm.FlamingoLMMixin,
                                 extend_instance=utils.extend_instance,
                                 infer_decoder_layers=factory._infer_decoder_layers_attr_name)


class FeatureLookup(nn.Module):
    """Stands in for open_clip's visual tower: a dummy image whose pixels all equal k gives the
    fixed features of image k ([S, D]); OpenFlamingo takes element [1] of the output."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("features", features)  # ends up as vision_encoder.* (frozen) keys

    def forward(self, pixels: torch.Tensor):
        return None, self.features[pixels[:, 0, 0, 0].long()]


class VisionStub(nn.Module):
    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.visual = FeatureLookup(features)


def build_openflamingo(api, lm_path, features: torch.Tensor, seed: int = 0, decoder_layers_attr_name=None):
    """OpenFlamingo's factory (create_model_and_transforms) minus open_clip, then every trainable
    weight randomised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_path, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    lang_encoder = AutoModelForCausalLM.from_pretrained(lm_path, local_files_only=True)
    api.extend_instance(lang_encoder, api.FlamingoLMMixin)
    lang_encoder.set_decoder_layers_attr_name(decoder_layers_attr_name or api.infer_decoder_layers(lang_encoder))
    torch.manual_seed(seed)
    lang_encoder.resize_token_embeddings(len(tokenizer))
    eoc_id, media_id = tokenizer.encode("<|endofchunk|>")[-1], tokenizer.encode("<image>")[-1]
    model = api.Flamingo(VisionStub(features), lang_encoder, eoc_id, media_id, vis_dim=FEATURE_DIM,
                         cross_attn_every_n_layers=EVERY)
    model.requires_grad_(False)
    model.eval()
    randomize_openflamingo(model, seed)
    return model, tokenizer


@torch.no_grad()
def randomize_openflamingo(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    trainable = [*model.perceiver.named_parameters(), *model.lang_encoder.gated_cross_attn_layers.named_parameters()]
    for name, p in trainable:
        if name.endswith("_gate"):  # non-zero, both signs
            sign = 1.0 if torch.rand((), generator=g) < 0.5 else -1.0
            p.copy_(sign * (0.3 + 0.7 * torch.rand(p.shape, generator=g)))
        elif p.ndim == 1:  # LayerNorm
            base = 1.0 if name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
        elif p.ndim == 2 and "latents" not in name:  # Linear
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g))
    ids = [model.eoc_token_id, model.media_token_id]
    inputs = model.lang_encoder.get_input_embeddings().weight
    scale = inputs[: min(ids)].std()
    inputs[ids] = torch.randn(len(ids), inputs.shape[1], generator=g) * scale
    outputs = model.lang_encoder.get_output_embeddings().weight
    if outputs is not inputs:
        outputs[ids] = torch.randn(len(ids), outputs.shape[1], generator=g) * outputs[: min(ids)].std()


# ------------------------------------------------------------------------------------ our side
def openflamingo_config(lm_path, every: int = EVERY, **changes) -> FlamingoConfig:
    config = FlamingoConfig.openflamingo(lm=LanguageModelConfig(name_or_path=str(lm_path)),
                                         cross_attn_every_n_layers=every)
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        setattr(getattr(config, section) if section else config, name, value)
    config.validate()
    return config


def build_ours(lm_path, every: int = EVERY, **changes) -> Flamingo:
    config = openflamingo_config(lm_path, every, **changes)
    lm, tokenizer = load_language_model(config.lm)
    torch.manual_seed(123)
    return Flamingo(config, lm, tokenizer, vision_feature_dim=FEATURE_DIM).eval()


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pair(open_flamingo, lm_dir):
    """pair(family) -> (OpenFlamingo model, its tokenizer, features [K, S, D]), cached."""
    made = {}

    def make(family: str):
        if family not in made:
            g = torch.Generator().manual_seed(7)
            features = torch.randn(len(PROMPTS) * NUM_IMAGES, PATCHES, FEATURE_DIM, generator=g)
            of_model, of_tokenizer = build_openflamingo(open_flamingo, lm_dir(family), features,
                                                        decoder_layers_attr_name=UNKNOWN_TO_OPENFLAMINGO.get(family))
            made[family] = (of_model, of_tokenizer, features)
        return made[family]

    return make


def batch_inputs(of_tokenizer, pad_id: int):
    """Right-padded ids [B, L], mask [B, L]; dummy pixels for OpenFlamingo and the matching
    features index: image j of sample b is image b * NUM_IMAGES + j."""
    rows = [of_tokenizer(p)["input_ids"] for p in PROMPTS]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    index = torch.arange(len(rows) * NUM_IMAGES).view(len(rows), NUM_IMAGES)
    pixels = index[:, :, None, None, None, None].float().expand(-1, -1, 1, 3, 2, 2).contiguous()
    return ids, mask, pixels, index


# ------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("family", [
    "llama",  # untied embeddings, SDPA
    "mpt",  # OpenFlamingo v2's LM family: tied, padded embedding table, ALiBi, eager attention
    "gpt_neox",  # untied, padded table (OpenFlamingo's tokenizer shrinks it)
    # tied, and its embedding scales rows by sqrt(d): the new rows must be scaled alike
    pytest.param("gemma3", marks=pytest.mark.skipif("gemma3" not in FAMILIES, reason="no Gemma 3 in this transformers")),
])
def test_logits_match_openflamingo(family, pair, lm_dir):
    of_model, of_tokenizer, features = pair(family)
    ours = build_ours(lm_dir(family))
    assert sorted(ours.cross_attn_layers) == [i for i in range(4) if (i + 1) % EVERY == 0]  # OF's rule
    assert (ours.eoc_token_id, ours.media_token_id) == (of_model.eoc_token_id, of_model.media_token_id)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tensors = convert_openflamingo_state_dict(of_model.state_dict(), ours)
    load_trainable_weights(ours, tensors, source="converted")
    assert all(block.attn_gate.item() != 0 and block.ffw_gate.item() != 0 for block in ours.cross_attn_layers.values())

    ids, mask, pixels, index = batch_inputs(of_tokenizer, pad_id=of_tokenizer.eos_token_id)
    assert ids.max() < len(ours.tokenizer)
    for b, prompt in enumerate(PROMPTS):  # both tokenizers split the prompts alike
        assert ours.tokenizer(prompt)["input_ids"] == ids[b, : int(mask[b].sum())].tolist()
    assert (ids[:, 0] != of_model.media_token_id).all()  # text before the first image

    with torch.no_grad():
        theirs = of_model(pixels, ids, attention_mask=mask).logits
        mine = ours(ids, vision_features=features[index][:, :, None], attention_mask=mask).logits
        plain = ours.lm(input_ids=ids, attention_mask=mask).logits  # the bare LM (no media context)
    width = min(theirs.shape[-1], mine.shape[-1])
    assert width >= max(ours.eoc_token_id, ours.media_token_id) + 1  # the new tokens' logits are compared
    real = mask.bool()
    diff = (theirs[..., :width] - mine[..., :width])[real].abs()
    new = [ours.eoc_token_id, ours.media_token_id]
    old = torch.ones(width, dtype=torch.bool)
    old[new] = False
    print(f"\n{family}: max abs logit difference vs OpenFlamingo = {diff.max().item():.3g} "
          f"over {int(real.sum())} tokens x {width} columns")
    assert diff[:, old].max() < TOLERANCE, f"{family}: logits differ from OpenFlamingo's by {diff[:, old].max()}"
    assert diff[:, new].max() < TOLERANCE, (
        f"{family}: the logits of <|endofchunk|> and <image> differ from OpenFlamingo's by {diff[:, new].max():.3g} "
        f"(all others agree to {diff[:, old].max():.3g}); converter warnings: {[str(w.message) for w in caught]}")
    assert not caught, f"nothing is lossy about this checkpoint, yet: {[str(w.message) for w in caught]}"

    # The comparison is meaningful: the bridge changes the output everywhere (OpenFlamingo's
    # dense gate also acts before the first image), and the images matter after it.
    assert (mine - plain)[real].abs().max() > 1e-2
    before_first = real & (ids.eq(of_model.media_token_id).cumsum(1) == 0)
    assert (mine - plain)[before_first].abs().max() > 1e-3
    with torch.no_grad():
        other = ours(ids, vision_features=features[index.flip(1)][:, :, None], attention_mask=mask).logits
    assert (other - mine)[real & ~before_first].abs().max() > 1e-3
    assert torch.equal(other[before_first], mine[before_first])


# ----------------------------------------------------------------------------- error handling
def test_wrong_cross_attention_layers_are_refused(pair, lm_dir):
    of_model, _, _ = pair("llama")
    state = of_model.state_dict()
    paper_style = build_ours(lm_dir("llama"), cross_attention__first_layer=0)  # before blocks 0, 2
    with pytest.raises(CheckpointError, match=r"checkpoint has cross-attention before blocks \[1, 3\] but the config "
                                              r"puts them before \[0, 2\]; set cross_attention.every=2 and "
                                              r"cross_attention.first_layer=1"):
        convert_openflamingo_state_dict(state, paper_style)
    every_block = build_ours(lm_dir("llama"), every=1)
    with pytest.raises(CheckpointError, match=r"before blocks \[1, 3\] but the config puts them before \[0, 1, 2, 3\]"):
        convert_openflamingo_state_dict(state, every_block)


class _Payload:
    """Unpickling this would call `_record_unpickled`; the safe loader must refuse it."""

    def __reduce__(self):
        return (_record_unpickled, ())


UNPICKLED: list[bool] = []


def _record_unpickled():
    UNPICKLED.append(True)
    return "unpickled"


def test_pt_checkpoint_round_trip_and_unsafe_files(pair, lm_dir, tmp_path):
    of_model, _, _ = pair("llama")
    ours = build_ours(lm_dir("llama"))
    reference = convert_openflamingo_state_dict(of_model.state_dict(), ours)

    # OpenFlamingo's training script: {"model_state_dict": ...}, DDP "module." prefix, extra entries.
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in of_model.state_dict().items()}}, path)
    loaded = load_openflamingo_checkpoint(path)
    converted = convert_openflamingo_state_dict(loaded, ours)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)

    from safetensors.torch import save_file
    st = tmp_path / "checkpoint.safetensors"
    save_file({k: v.contiguous().clone() for k, v in of_model.state_dict().items()}, str(st))
    converted = convert_openflamingo_state_dict(load_openflamingo_checkpoint(st), ours)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)

    evil = tmp_path / "evil.pt"
    torch.save({"perceiver.latents": torch.zeros(2), "payload": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        load_openflamingo_checkpoint(evil)
    assert not UNPICKLED, "the checkpoint loader executed pickled code"

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a loadable PyTorch checkpoint"):
        load_openflamingo_checkpoint(garbage)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_openflamingo_checkpoint(bad_st)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_openflamingo_checkpoint(tmp_path / "missing.pt")
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_openflamingo_checkpoint(tensor_only)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown file type"):
        load_openflamingo_checkpoint(other)


def test_convert_openflamingo_writes_a_loadable_model(pair, lm_dir, tmp_path):
    of_model, _, _ = pair("llama")
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_state_dict": of_model.state_dict()}, path)
    # A features-fed model (vision.kind: features): no vision encoder to build or download.
    config = openflamingo_config(lm_dir("llama"), vision__kind="features", vision__feature_dim=FEATURE_DIM)
    out = convert_openflamingo(path, config, tmp_path / "converted")
    saved = load_weights_file(out / "bridge.safetensors")
    reference = convert_openflamingo_state_dict(of_model.state_dict(), build_ours(lm_dir("llama")))
    assert saved.keys() == reference.keys()
    assert all(torch.allclose(saved[k], reference[k].float()) for k in reference)
    assert FlamingoConfig.load(out / "config.yaml") == config
    loaded = load_pretrained(out)
    assert loaded.vision_encoder is None and loaded.perceiver.dim == FEATURE_DIM


@pytest.mark.parametrize("key, shape, message", [
    ("perceiver.layers.0.2.weight", (3,), "cannot take: perceiver.layers.0.2.weight"),
    ("lang_encoder.model.layers.1.gated_cross_attn_layer.attn.to_q.bias", (512,),
     "cannot take: lang_encoder.model.layers.1.gated_cross_attn_layer.attn.to_q.bias"),
    ("lang_encoder.model.layers.1.gated_cross_attn_layer.extra_gate", (1,), "cannot take"),
    ("lang_encoder.gated_cross_attn_layers.1.ff.2.weight", (4,), "cannot take"),
    ("text_projection.weight", (4, 4), "cannot take: text_projection.weight"),
    ("perceiver.media_time_embs", (4, 1, FEATURE_DIM), "per-image-position embeddings"),
])
def test_unmappable_trainable_keys_raise(pair, lm_dir, key, shape, message):
    of_model, _, _ = pair("llama")
    ours = build_ours(lm_dir("llama"))
    state = dict(of_model.state_dict())
    state[key] = torch.zeros(shape)
    with pytest.raises(CheckpointError, match=message):
        convert_openflamingo_state_dict(state, ours)


def test_mirrored_cross_attention_keys(pair, lm_dir):
    of_model, _, _ = pair("llama")
    ours = build_ours(lm_dir("llama"))
    full = of_model.state_dict()
    reference = convert_openflamingo_state_dict(full, ours)
    for drop in (".gated_cross_attn_layer.", "lang_encoder.gated_cross_attn_layers."):  # either copy suffices
        kept = {k: v for k, v in full.items() if drop not in k}
        assert len(kept) < len(full)
        converted = convert_openflamingo_state_dict(kept, ours)
        assert all(torch.equal(converted[k], reference[k]) for k in reference)
    # old_decoder_blocks (frozen mirror) are ignored; a disagreeing mirror is an error
    inconsistent = dict(full)
    inconsistent["lang_encoder.gated_cross_attn_layers.1.attn_gate"] = torch.tensor([0.123])
    with pytest.raises(CheckpointError, match="inconsistent"):
        convert_openflamingo_state_dict(inconsistent, ours)


def test_token_rows_gates_and_overrides(pair, lm_dir):
    of_model, _, _ = pair("llama")
    ours = build_ours(lm_dir("llama"))
    state = of_model.state_dict()
    out = convert_openflamingo_state_dict(state, ours)
    table, head = state["lang_encoder.model.embed_tokens.weight"], state["lang_encoder.lm_head.weight"]
    first = ours.input_embeddings.first_new_id
    assert torch.equal(out["new_token_embeddings.new_rows"][ours.eoc_token_id - first], table[of_model.eoc_token_id])
    assert torch.equal(out["new_token_embeddings.new_rows"][ours.media_token_id - first], table[of_model.media_token_id])
    assert torch.equal(out["new_token_logits.new_rows"][ours.media_token_id - first], head[of_model.media_token_id])
    gate = out["cross_attn.1.attn_gate"]
    assert gate.shape == () and gate == state["lang_encoder.model.layers.1.gated_cross_attn_layer.attn_gate"][0]

    swapped = convert_openflamingo_state_dict(state, ours, media_token_id=of_model.eoc_token_id,
                                              eoc_token_id=of_model.media_token_id)
    assert torch.equal(swapped["new_token_embeddings.new_rows"], out["new_token_embeddings.new_rows"].flip(0))
    with pytest.raises(CheckpointError, match="no rows for ids"):
        convert_openflamingo_state_dict(state, ours, media_token_id=10_000)


def test_lossy_checkpoints_warn(pair, lm_dir):
    of_model, _, _ = pair("llama")
    ours = build_ours(lm_dir("llama"))
    state = dict(of_model.state_dict())
    # OpenFlamingo's training script keeps the input embeddings but drops the (frozen) lm_head.
    no_head = {k: v for k, v in state.items() if k != "lang_encoder.lm_head.weight"}
    with pytest.warns(UserWarning, match="no output embedding"):
        out = convert_openflamingo_state_dict(no_head, ours)
    assert torch.equal(out["new_token_logits.new_rows"], ours.output_head.new_rows.detach())
    # OpenFlamingo trains the whole input table; we only take the two new rows.
    trained = dict(state)
    trained["lang_encoder.model.embed_tokens.weight"] = state["lang_encoder.model.embed_tokens.weight"].clone()
    trained["lang_encoder.model.embed_tokens.weight"][5] += 0.01
    with pytest.warns(UserWarning, match="1 of the 320 rows of the LM's own vocabulary differ"):
        convert_openflamingo_state_dict(trained, ours)
    missing = {k: v for k, v in state.items() if "embed_tokens" not in k}
    with pytest.raises(CheckpointError, match="no input embedding table 'lang_encoder.model.embed_tokens.weight'"):
        convert_openflamingo_state_dict(missing, ours)


def test_non_openflamingo_architecture_is_refused(pair, lm_dir):
    of_model, _, _ = pair("llama")
    state = of_model.state_dict()
    for changes, message in [({"activation": "sqrelu"}, r"activation='sqrelu' \(OpenFlamingo: 'gelu'\)"),
                             ({"cross_attention__heads": 4, "cross_attention__head_dim": 128},
                              r"cross_attention.heads=4 \(OpenFlamingo: 8\)"),
                             ({"perceiver__dim": 16}, r"perceiver.dim=16"),
                             ({"perceiver__depth": 2}, r"2 layers|6 layers"),
                             ({"perceiver__max_frames": 4}, r"set perceiver.max_frames=0")]:
        ours = build_ours(lm_dir("llama"), **changes)
        with pytest.raises(CheckpointError, match=message):
            convert_openflamingo_state_dict(state, ours)
