"""The model is the paper's model: exact identity at init, per-image masking, batching, freezing,
video, and the bad-input errors."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import FAMILIES, FEATURE_DIM, build_tiny, randomize_gates
from packaging.version import Version
from transformers import AutoModelForCausalLM

import flamingo.model.flamingo as flamingo_model
from flamingo.errors import UserError
from flamingo.model.cross_attention import token_media_index
from flamingo.model.flamingo import FlamingoInputError

PROMPT = "a red circle<image> two green squares<|endofchunk|><image> This is a dax.<|endofchunk|><image> a wug"


def encode(model, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"]])


def features(num_media: int, frames: int = 1, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_media, frames, 5, FEATURE_DIM, generator=g)


def media_index_of(model, ids: torch.Tensor) -> torch.Tensor:
    is_media = ids == model.media_token_id
    batch = ids.shape[0]
    zeros = torch.zeros(batch, dtype=torch.long)
    return token_media_index(is_media, is_media.sum(1), torch.zeros(batch, dtype=torch.bool), zeros)


# ------------------------------------------------------------------------------ init identity
@pytest.mark.parametrize("family", FAMILIES)
def test_init_logits_equal_frozen_lm(lm_dir, family):
    """tanh(0) gates: Flamingo's logits are the frozen LM's, bit for bit, with and without images,
    over any decoder stack (found without name special cases)."""
    path = lm_dir(family)
    model = build_tiny(path)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = encode(model, PROMPT)
    vocab = reference.get_output_embeddings().weight.shape[0]
    old_ids = [i for i in range(vocab) if i not in (model.eoc_token_id, model.media_token_id)]
    with torch.no_grad():
        ours = model(ids, vision_features=features(3)).logits
        # The reference sees the same input vectors (the added tokens' rows are ours).
        ref = reference(inputs_embeds=model.input_embeddings(ids)).logits
        text_ids = encode(model, "a red circle on a blue background")
        ours_text = model(text_ids).logits
        ref_text = reference(text_ids).logits
    assert torch.equal(ours[..., old_ids], ref[..., old_ids])
    assert torch.equal(ours_text[..., old_ids], ref_text[..., old_ids])
    assert ours.shape[-1] >= model.media_token_id + 1  # the added tokens have logits
    assert len(model.cross_attn_layers) == 2  # every=2 over 4 blocks, starting at the first


@pytest.mark.parametrize("family", FAMILIES)
def test_media_reach_the_layers_as_chosen_when_built(lm_dir, family, monkeypatch):
    """The media travel as an argument of the LM's forward where its decoder stack passes keyword
    arguments on to its blocks (nothing is then set on the layers), else set on our layers for
    the call; either way they reach the layers, in the logits and in the training loss."""
    model = build_tiny(lm_dir(family))
    if Version(transformers.__version__) >= Version("5"):
        assert model.media_passing == ("layers" if family == "mpt" else "argument")
    if model.media_passing == "argument":
        monkeypatch.setattr(flamingo_model, "media_on_layers", None)  # any use would fail
    randomize_gates(model)
    ids = encode(model, PROMPT)
    labels = ids.masked_fill(ids == model.media_token_id, -100)
    with torch.no_grad():
        logits = [model(ids, vision_features=features(3, seed=s)).logits for s in (0, 1)]
        losses = [model(ids, vision_features=features(3, seed=s), labels=labels).loss for s in (0, 1)]
    assert not torch.allclose(*logits) and not torch.allclose(*losses)


def test_media_set_on_layers_are_taken_back_after_the_call(lm_dir):
    """For a decoder stack that drops keyword arguments (MPT's) the media are set on our layers for
    the call only: gone afterwards, also when the call fails, so a later call of the LM on its own
    is the frozen LM's."""
    model = build_tiny(lm_dir("mpt"))
    model.media_passing = "layers"  # also where transformers passes MPT's keyword arguments on
    randomize_gates(model)
    ids = encode(model, PROMPT)
    seen = []
    for layer in model._media_layers:
        layer.register_forward_pre_hook(lambda module, _args: seen.append(module.media is not None))
    with torch.no_grad():
        with_images = model(ids, vision_features=features(3)).logits
    assert seen and all(seen)
    assert all(layer.media is None for layer in model._media_layers)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        hook = model._media_layers[-1].register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
        model(ids, vision_features=features(3))
    hook.remove()
    assert all(layer.media is None for layer in model._media_layers)
    with torch.no_grad():
        assert not torch.allclose(model.lm(ids).logits[..., :with_images.shape[-1]], with_images)


def test_no_context_variable_carries_media():
    """One channel for the media: arguments (or our layers' attribute for the call), never a
    module-level context variable."""
    from pathlib import Path

    sources = Path(flamingo_model.__file__).parent.rglob("*.py")
    assert not [p.name for p in sources if "ContextVar" in p.read_text()]


def test_cross_attention_layers_follow_the_config(lm_dir):
    model = build_tiny(lm_dir("gpt2"), **{"cross_attention.every": 3, "cross_attention.first_layer": 1})
    assert sorted(model.cross_attn_layers) == [1]
    model = build_tiny(lm_dir("gpt2"), **{"cross_attention.every": 1})
    assert sorted(model.cross_attn_layers) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="first_layer"):
        build_tiny(lm_dir("gpt2"), **{"cross_attention.first_layer": 4})


# ---------------------------------------------------------------------------------- masking
def capture_first_xattn(model):
    """Record the cross-attention output (before gating) of the first GATED XATTN-DENSE layer.
    Its input is the token embedding, so differences come from the mask alone."""
    first = model.cross_attn_layers[min(model.cross_attn_layers)]
    seen = []
    handle = first.attn.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    return seen, handle


@pytest.mark.parametrize("mode", ["previous", "all_previous", "next"])
def test_changing_one_image_changes_only_the_tokens_that_see_it(lm_dir, mode):
    model = build_tiny(lm_dir("llama"), **{"cross_attention.media_attention": mode})
    randomize_gates(model)
    ids = encode(model, PROMPT)
    phi = media_index_of(model, ids)[0]
    if mode == "next":
        phi = token_media_index(ids == model.media_token_id, torch.tensor([3]), torch.tensor([True]),
                                torch.tensor([0]))[0]
    seen, handle = capture_first_xattn(model)
    feats = features(3)
    with torch.no_grad():
        model(ids, vision_features=feats)
        for j in range(3):
            changed = feats.clone()
            changed[0, j] += 1.0
            model(ids, vision_features=changed)
    handle.remove()
    base = seen[0][0]
    no_image = phi == 0
    assert no_image.any()
    assert torch.equal(base[no_image], torch.zeros_like(base[no_image]))  # exactly zero output
    for j in range(3):
        differs = (seen[j + 1][0] - base).abs().amax(-1) > 0
        sees_j = (phi >= j + 1) & (phi > 0) if mode == "all_previous" else phi == j + 1
        assert torch.equal(differs, sees_j), f"image {j + 1}: {differs.tolist()} vs {sees_j.tolist()}"


def test_media_index_semantics():
    # tokens: t <img1> t t <img2> t
    is_media = torch.tensor([[0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    n, zero = torch.tensor([2]), torch.tensor([0])
    previous = token_media_index(is_media, n, torch.tensor([False]), zero)
    nxt = token_media_index(is_media, n, torch.tensor([True]), zero)
    assert previous.tolist() == [[0, 1, 1, 1, 2, 2]]
    assert nxt.tolist() == [[1, 1, 2, 2, 2, 0]]  # after the last image: nothing
    # cached decoding: 2 images already consumed, new tokens see image 2
    assert token_media_index(torch.zeros(1, 3, dtype=torch.bool), n, torch.tensor([False]),
                             torch.tensor([2])).tolist() == [[2, 2, 2]]


@pytest.mark.parametrize("skip", [False, True])
def test_text_before_first_image_does_not_depend_on_images(lm_dir, skip):
    """Tokens before any image see no visual token: their logits are the same whatever the
    images. With skip_tokens_without_media they are exactly the frozen LM's, even with open gates."""
    path = lm_dir("llama")
    model = build_tiny(path, **{"cross_attention.skip_tokens_without_media": skip})
    randomize_gates(model)
    ids = encode(model, PROMPT)
    prefix = int((ids[0] == model.media_token_id).nonzero()[0, 0])
    with torch.no_grad():
        a = model(ids, vision_features=features(3, seed=1)).logits[:, :prefix]
        b = model(ids, vision_features=features(3, seed=2)).logits[:, :prefix]
        after_a = model(ids, vision_features=features(3, seed=1)).logits[:, prefix:]
        after_b = model(ids, vision_features=features(3, seed=2)).logits[:, prefix:]
    assert torch.equal(a, b)
    assert not torch.allclose(after_a, after_b)
    if skip:
        reference = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            ref = reference(ids[:, :prefix]).logits
        vocab = ref.shape[-1]
        assert torch.allclose(a[..., :vocab], ref, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("family", ["llama", "gpt2", "mpt"])
def test_batch_with_different_image_counts_equals_each_sample_alone(lm_dir, family):
    model = build_tiny(lm_dir(family))
    randomize_gates(model)
    texts = ["<image> a red circle<|endofchunk|><image> two green squares",
             "This is a dax.<|endofchunk|><image> This is a",
             "only text here"]
    counts = [2, 1, 0]
    feats = features(2, batch=3, seed=3)
    singles = []
    with torch.no_grad():
        for b, text in enumerate(texts):
            ids = encode(model, text)
            f = feats[b:b + 1, :counts[b]] if counts[b] else None
            singles.append(model(ids, vision_features=f).logits[0])
        rows = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        pad = model.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        batched = model(ids, vision_features=feats, attention_mask=mask, num_media=torch.tensor(counts)).logits
    for b, single in enumerate(singles):
        assert torch.allclose(batched[b, :len(rows[b])], single, atol=1e-5, rtol=1e-5), b


def test_cached_decoding_equals_full_forward(lm_dir):
    """Feeding a prompt in two calls with the LM's KV cache (the public steps of forward) gives
    the full call's logits: the media index of the second call continues from `media_offset`."""
    model = build_tiny(lm_dir("llama"))
    randomize_gates(model)
    ids = encode(model, PROMPT)
    feats = features(3)
    split = int((ids[0] == model.media_token_id).nonzero()[1, 0]) + 2  # after the second image
    with torch.no_grad():
        full = model(ids, vision_features=feats).logits
        tokens, kv = model.encode_media(vision_features=feats), {}
        # media_offset given: the images of later calls may already be in `tokens`
        media = model.media_context(ids[:, :split], tokens, media_offset=torch.tensor([0]), kv_cache=kv)
        first = model.logits_and_cache(ids[:, :split], media, use_cache=True)
        offset = (ids[:, :split] == model.media_token_id).sum(1)
        media = model.media_context(ids[:, split:], tokens, media_offset=offset, kv_cache=kv)
        second = model.logits_and_cache(ids[:, split:], media, past_key_values=first.past_key_values,
                                        use_cache=True)
    assert torch.allclose(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- training
def test_only_the_bridge_receives_gradients(lm_dir):
    model = build_tiny(lm_dir("llama"))
    model.train()
    assert not model.lm.training  # frozen backbone stays in eval mode
    ids = encode(model, PROMPT)
    out = model(ids, vision_features=features(3), labels=ids)
    out.loss.backward()
    trainable = {id(p) for p in model.trainable_state_dict().values()}
    assert trainable
    for name, param in model.named_parameters():
        if id(param) in trainable:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    # at init only the gates get a signal through tanh'(0) = 1; they do get one
    gates = [b.attn_gate.grad for b in model.cross_attn_layers.values()]
    assert all(g is not None and g.abs() > 0 for g in gates)
    # the new token rows are the only trainable embedding rows, and they do learn
    assert model.input_embeddings.new_rows.grad.abs().sum() > 0
    assert model.input_embeddings.base.weight.grad is None


def test_trainable_parameters_are_the_bridge(lm_dir):
    model = build_tiny(lm_dir("gpt2"))  # tied embeddings: added rows tied too
    keys = model.trainable_state_dict().keys()
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"perceiver", "cross_attn", "new_token_embeddings"}
    untied = build_tiny(lm_dir("llama"))
    assert {k.split(".")[0] for k in untied.trainable_state_dict()} == {
        "perceiver", "cross_attn", "new_token_embeddings", "new_token_logits"}


# ------------------------------------------------------------------------------------ video
def test_video_frames_and_temporal_interpolation(lm_dir):
    model = build_tiny(lm_dir("llama"))  # 4 trained temporal embeddings
    randomize_gates(model)
    perceiver = model.perceiver
    trained = perceiver.temporal_embeddings.detach()
    assert torch.equal(perceiver.temporal_embedding(3), trained[:3])
    stretched = perceiver.temporal_embedding(7).detach()  # 4 -> 7: step 0.5
    assert torch.allclose(stretched[0], trained[0]) and torch.allclose(stretched[-1], trained[-1])
    assert torch.allclose(stretched[1], (trained[0] + trained[1]) / 2, atol=1e-6)
    assert torch.allclose(stretched[2], trained[1], atol=1e-6)
    ids = encode(model, "<image> a video of a red ball<|endofchunk|>")
    with torch.no_grad():
        for frames in (4, 7):
            out = model(ids, vision_features=features(1, frames=frames))
            assert out.visual_tokens.shape == (1, 1, 4, FEATURE_DIM)
            assert torch.isfinite(out.logits).all()
        # frame order matters (temporal embeddings), so a video is not a bag of frames
        video = features(1, frames=4)
        a = model(ids, vision_features=video).logits
        b = model(ids, vision_features=video.flip(2)).logits
    assert not torch.allclose(a, b)


# -------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(lm_dir):
    model = build_tiny(lm_dir("llama"))
    ids = encode(model, PROMPT)  # 3 <image> tokens
    with pytest.raises(FlamingoInputError, match=r"3 <image> token\(s\) in the text but 2 image\(s\)"):
        model(ids, vision_features=features(2))
    with pytest.raises(FlamingoInputError, match=r"3 <image> token\(s\) in the text but 4 image\(s\)"):
        model(ids, vision_features=features(4))
    with pytest.raises(FlamingoInputError, match=r"but 0 image"):
        model(ids)
    with pytest.raises(FlamingoInputError, match=r"vision_features: expected shape \[B, N, T, S, D\], got \(3, 1, 5, 24\)"):
        model(ids, vision_features=features(3)[0])
    with pytest.raises(FlamingoInputError, match="no vision encoder"):
        model(ids, pixel_values=torch.zeros(1, 3, 1, 3, 32, 32))
    with pytest.raises(FlamingoInputError, match="exactly one of pixel_values or vision_features"):
        model(ids, torch.zeros(1, 3, 1, 3, 32, 32), vision_features=features(3))
    with pytest.raises(FlamingoInputError, match="num_media"):
        model(ids, vision_features=features(3), num_media=torch.tensor([5]))
    with pytest.raises(FlamingoInputError, match="input_ids: expected shape"):
        model(ids[0])


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # added rows appended / over padding rows
def test_out_of_range_token_ids_are_refused(lm_dir, family):
    """An id outside the vocabulary raises, naming it and the vocabulary size, instead of reading
    the <image> row; the unused padding rows of a padded table stay valid ids."""
    model = build_tiny(lm_dir(family))
    table = model.input_embeddings.base.weight.shape[0]
    vocab = max(table, model.media_token_id + 1)
    assert model.input_embeddings.vocab_size == vocab
    for bad in (vocab, vocab + 1000, -1):
        with pytest.raises(UserError, match=rf"token id {bad} is outside the vocabulary .*{vocab} in all"):
            model(torch.tensor([[1, 2, bad]]))
    model(torch.tensor([[1, 2, model.eoc_token_id]]))  # an added id is valid
    if table > model.media_token_id + 1:  # a padding row past the added ones reads the frozen table
        embedded = model.input_embeddings(torch.tensor([[vocab - 1]]))
        torch.testing.assert_close(embedded, model.input_embeddings.base(torch.tensor([[vocab - 1]])))


def test_lm_without_a_decoder_stack_is_refused(lm_dir):
    from flamingo.model.language_model import DecoderStackNotFound, find_decoder_layers

    class NoStack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.blocks = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))

    with pytest.raises(DecoderStackNotFound, match="expected an nn.ModuleList of 2 identical blocks"):
        find_decoder_layers(NoStack())
    with pytest.raises(DecoderStackNotFound, match="has no attribute path 'model'"):
        find_decoder_layers(NoStack(), "model.layers")
    with pytest.raises(DecoderStackNotFound, match="expected an nn.ModuleList, got Sequential"):
        find_decoder_layers(NoStack(), "blocks")
    lm = AutoModelForCausalLM.from_pretrained(lm_dir("opt"))
    assert find_decoder_layers(lm)[0] == "model.decoder.layers"


def test_loss_is_the_mean_next_token_nll_over_labelled_tokens(lm_dir):
    model = build_tiny(lm_dir("llama"))
    randomize_gates(model)
    ids = encode(model, PROMPT)
    labels = ids.masked_fill(ids == model.media_token_id, -100)
    with torch.no_grad():
        out = model(ids, vision_features=features(3), labels=labels)
        logp = model(ids, vision_features=features(3)).logits.log_softmax(-1)
    terms = [-logp[0, t - 1, labels[0, t]] for t in range(1, ids.shape[1]) if labels[0, t] != -100]
    assert torch.allclose(out.loss, torch.stack(terms).mean(), atol=1e-6)
    assert torch.allclose(out.nll_sum, torch.stack(terms).sum(), atol=1e-5)


def test_the_labels_loss_never_computes_the_vocabulary_logits(lm_dir, monkeypatch):
    """`forward(labels=...)`, the training call, takes the fused head + NLL (fused_head_loss):
    the output head module never runs, so no [B, L, vocabulary] logits exist, and no logits are
    returned. (It computed the full logits and then their mean cross-entropy, 25% slower.)"""
    model = build_tiny(lm_dir("llama"))
    randomize_gates(model)
    fused_calls = []
    fused = flamingo_model.head_nll_sum
    monkeypatch.setattr(flamingo_model, "head_nll_sum", lambda *a, **k: fused_calls.append(1) or fused(*a, **k))
    head_calls = []
    model.output_head.register_forward_hook(lambda *_: head_calls.append(1))
    ids = encode(model, PROMPT)
    out = model(ids, vision_features=features(3), labels=ids)
    out.loss.backward()
    assert out.logits is None and fused_calls == [1] and head_calls == []
    assert model.cross_attn_layers[0].attn_gate.grad is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_from_labelled_positions_only_equals_full_logits(lm_dir, family):
    """The trainer asks for logits only where a next-token label exists (a 1-D logits_to_keep);
    the summed NLL and the gradients must equal those from the full [B, L, V] logits, whether the
    LM slices its hidden states itself or (GPT-2, OPT, ...) Flamingo slices the logits."""
    from flamingo.model.flamingo import labelled_positions, token_nll_sum

    model = build_tiny(lm_dir(family))
    randomize_gates(model)
    ids = encode(model, PROMPT)
    labels = torch.full_like(ids, -100)
    labels[0, 3:6] = ids[0, 3:6]
    labels[0, -2:] = ids[0, -2:]
    positions = labelled_positions(labels)
    assert positions.tolist() == [2, 3, 4, ids.shape[1] - 3, ids.shape[1] - 2]
    results = []
    for keep in (0, positions):
        model.zero_grad()
        media = model.media_context(ids, model.encode_media(vision_features=features(3)))
        out = model.logits_and_cache(ids, media, logits_to_keep=keep)
        nll = token_nll_sum(out.logits, labels, None if isinstance(keep, int) else positions)
        nll.backward()
        results.append((nll.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full, full_grads), (sparse, sparse_grads) = results
    assert torch.allclose(full, sparse, atol=1e-5)
    assert len(full_grads) == len(sparse_grads) > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(full_grads, sparse_grads))


def test_a_batch_without_any_media_is_text_only(lm_dir):
    model = build_tiny(lm_dir("llama"))
    ids = encode(model, "only text here")
    with torch.no_grad():
        empty = model(ids, vision_features=torch.zeros(1, 0, 1, 5, FEATURE_DIM)).logits
        assert torch.equal(empty, model(ids).logits)


def test_fresh_resampler_output_depends_on_the_image():
    """Encoder features share a large common part across images; a fresh resampler must keep the
    image-dependent rest visible in its output (with std-1 latents it drowned: the gates then
    had nothing to open for)."""
    from flamingo.model.config import PerceiverConfig
    from flamingo.model.perceiver import PerceiverResampler

    torch.manual_seed(0)
    features = 0.7 * torch.randn(1, 1, 49, 64) + 0.3 * torch.randn(8, 1, 49, 64)
    resampler = PerceiverResampler(PerceiverConfig(depth=2, num_latents=8, heads=2, head_dim=16, ffw_mult=2,
                                                   max_frames=1, dim=32), 64, "sqrelu")
    with torch.no_grad():
        out = resampler(features)
    assert (out.std(0).mean() / out.std()) > 0.1
