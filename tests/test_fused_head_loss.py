"""The training loss through the fused, chunked output head + NLL (`flamingo.model.fused_head_loss`)
equals the loss from materialised logits, with the same gradients: chunk boundaries, new-token rows
appended after the frozen table or replacing its padding rows, biases, tied embeddings, every LM
family, bf16 autocast, and LMs that post-process their logits (found when the model is built:
they use their own logits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, FEATURE_DIM, build_tiny, randomize_gates, tiny_config
from torch import nn

from flamingo.model.flamingo import Flamingo, token_nll_sum
from flamingo.model.fused_head_loss import head_nll_sum
from flamingo.model.language_model import DecoupledLMHead, load_language_model


def _head(vocab: int, dim: int, first_new: int, bias: bool, seed: int = 0) -> DecoupledLMHead:
    torch.manual_seed(seed)
    base = nn.Linear(dim, vocab, bias=bias).requires_grad_(False)
    head = DecoupledLMHead(base, first_new, 2)
    with torch.no_grad():
        head.new_rows.normal_()
        if head.new_bias is not None:
            head.new_bias.normal_()
    return head


def _reference(head: DecoupledLMHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _grads(head: DecoupledLMHead, hidden: torch.Tensor, loss_fn) -> tuple[torch.Tensor, ...]:
    hidden = hidden.detach().clone().requires_grad_(True)
    params = [p for p in (head.new_rows, head.new_bias) if p is not None]
    for p in params:
        p.grad = None
    loss = loss_fn(hidden)
    (loss * 0.37).backward()  # a non-unit incoming gradient
    return (loss.detach(), hidden.grad, *[p.grad for p in params])


@pytest.mark.parametrize("appended", [True, False], ids=["appended", "replaced"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_fused_head_nll_equals_logits_then_cross_entropy(appended, bias, chunk):
    vocab, dim, n = 50, 16, 7  # chunk 3: chunks of 3, 3, 1; chunk 7: one; chunk 64: larger than N
    first_new = vocab if appended else vocab - 5  # appended after the table, or over rows 45-46
    head = _head(vocab, dim, first_new, bias)
    hidden = torch.randn(n, dim)
    targets = torch.tensor([0, first_new, first_new + 1, 3, vocab - 1 + 2 * appended, 11, first_new])

    def fused(h):
        return head_nll_sum(h, targets, head.base.weight, head.base.bias, head.new_rows, head.new_bias,
                            head.first_new_id, chunk)

    expected = _grads(head, hidden, lambda h: _reference(head, h, targets))
    got = _grads(head, hidden, fused)
    assert len(got) == len(expected) == 3 + bias
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert expected[2].abs().sum() > 0  # the new rows are predicted targets: they get gradients


def test_fused_head_nll_under_bf16_autocast_matches_the_unfused_path():
    """Products in bf16 (as F.linear under autocast), log-softmax in fp32; gradients cast back."""
    head = _head(300, 32, 300, bias=False)
    hidden = torch.randn(37, 32)
    targets = torch.randint(0, 302, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _grads(head, hidden, lambda h: _reference(head, h, targets))
        got = _grads(head, hidden, lambda h: head_nll_sum(h, targets, head.base.weight, None, head.new_rows, None,
                                                          head.first_new_id, 8))
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-3)
    for a, b in zip(got[1:], expected[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_fused_head_nll_refuses_a_trainable_frozen_table_and_handles_no_targets():
    head = _head(20, 8, 20, bias=False)
    with pytest.raises(ValueError, match="must not require gradients"):
        head_nll_sum(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), head.base.weight.requires_grad_(True),
                     None, head.new_rows, None, 20)
    head.base.weight.requires_grad_(False)
    hidden = torch.randn(0, 8, requires_grad=True)
    loss = head_nll_sum(hidden, torch.zeros(0, dtype=torch.long), head.base.weight, None, head.new_rows, None, 20)
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad.shape == (0, 8) and float(head.new_rows.grad.abs().sum()) == 0.0


# ------------------------------------------------------------------------------- whole model
PROMPT = "a red circle<image> two green squares<|endofchunk|><image> This is a dax.<|endofchunk|><image> a wug"


def _batch(model):
    ids = torch.tensor([model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]).repeat(2, 1)
    text = ids[1] < min(model.media_token_id, model.eoc_token_id)
    g = torch.Generator().manual_seed(1)
    ids[1, text] = torch.randint(4, int(ids.max()), (int(text.sum()),), generator=g)  # another text, same images
    labels = ids.clone()
    labels[ids == model.media_token_id] = -100
    labels[0, :5] = -100  # rows labelled at different positions
    labels[1, -4:] = -100
    g.manual_seed(0)
    return ids, labels, torch.randn(2, 3, 1, 5, FEATURE_DIM, generator=g)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float, name: str) -> None:
    """Equal up to float rounding, relative to the gradient's size (summed over many terms)."""
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert float((a - b).norm()) <= rel * float(b.norm()) + 1e-7, (name, float((a - b).norm()), float(b.norm()))


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.trainable_state_dict().items() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_model_nll_labels_equals_full_logits_loss_and_gradients(lm_dir, family):
    """`forward(labels=...)` (the trainer's call) gives the summed NLL and gradients of the full
    [B, L, V] logits path, for every LM family: tied and untied heads, new rows appended or
    replacing padding rows, chunks smaller than the labelled tokens."""
    model = build_tiny(lm_dir(family))
    randomize_gates(model)
    with torch.no_grad():
        model.input_embeddings.new_rows.normal_()
        model.output_head.new_rows.normal_()  # the same tensor when tied
    ids, labels, feats = _batch(model)
    model.nll_chunk = 5  # labelled tokens span several chunks
    full = _loss_and_grads(model, lambda: token_nll_sum(model(ids, vision_features=feats).logits, labels))
    fused_out = model(ids, vision_features=feats, labels=labels)
    assert fused_out.logits is None
    fused = _loss_and_grads(model, lambda: model(ids, vision_features=feats, labels=labels).nll_sum)
    assert model.fused_nll, "the fused head was not used for this family"
    torch.testing.assert_close(fused[0], full[0], rtol=1e-5, atol=1e-5)
    assert full[1].keys() == fused[1].keys() and "new_token_embeddings.new_rows" in full[1]
    assert ("new_token_logits.new_rows" in full[1]) == (not model.tied_new_rows)
    for name in full[1]:
        assert full[1][name].abs().sum() > 0, name
        _close(fused[1][name], full[1][name], 1e-5, name)


def test_model_nll_labels_under_bf16_autocast(lm_dir):
    """Under bf16 autocast the fused loss equals the unfused one, and its gradients are at least as
    close to the fp32 gradients as the unfused path's (bf16 rounding differs in places)."""
    model = build_tiny(lm_dir("qwen2"))  # tied, new rows over padding rows
    randomize_gates(model)
    ids, labels, feats = _batch(model)
    reference = _loss_and_grads(model, lambda: token_nll_sum(model(ids, vision_features=feats).logits, labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = _loss_and_grads(model, lambda: token_nll_sum(model(ids, vision_features=feats).logits, labels))
        fused = _loss_and_grads(model, lambda: model(ids, vision_features=feats, labels=labels).nll_sum)
    assert model.fused_nll
    torch.testing.assert_close(fused[0], full[0], rtol=1e-4, atol=1e-3)
    assert full[1].keys() == fused[1].keys() == reference[1].keys()
    for name, ref in reference[1].items():
        assert fused[1][name].dtype == torch.float32, name
        err_fused = float((fused[1][name] - ref).norm() / ref.norm())
        err_full = float((full[1][name] - ref).norm() / ref.norm())
        assert err_fused <= max(1.5 * err_full, 0.01), (name, err_fused, err_full)


def _post_processing_model(lm_dir, how: str):
    """A model over an LM that changes its logits after the head: Gemma 3 with its config's
    soft-capping switched on, or an LM whose forward is wrapped by a hook no config names."""
    config = tiny_config(lm_dir("gemma3" if how == "softcapping" else "llama"))
    lm, tokenizer = load_language_model(config.lm)
    if how == "softcapping":
        lm.config.final_logit_softcapping = 0.5  # small: the capping changes every logit
    else:
        def scale(_module, _args, out):
            out.logits = out.logits * 0.5
            return out

        lm.register_forward_hook(scale)
    torch.manual_seed(0)
    return Flamingo(config, lm, tokenizer, vision_feature_dim=FEATURE_DIM)


@pytest.mark.parametrize("how", [
    pytest.param("softcapping", marks=pytest.mark.skipif("gemma3" not in FAMILIES, reason="no Gemma 3 in this transformers")),
    "hook",
])
def test_an_lm_that_changes_its_logits_after_the_head_uses_its_logits(lm_dir, how):
    """A post-processing of the logits (a config's soft-capping or scaling, or any other change
    seen when the model is built) turns the fused head off once, at construction; the loss then
    comes from the LM's own logits of the labelled positions, and is right."""
    model = _post_processing_model(lm_dir, how)
    assert not model.fused_nll
    assert ("final_logit_softcapping=0.5" if how == "softcapping" else "not its output head's output") in (
        model.logit_postprocessing)
    randomize_gates(model)
    ids, labels, feats = _batch(model)
    full = _loss_and_grads(model, lambda: token_nll_sum(model(ids, vision_features=feats).logits, labels))
    got = _loss_and_grads(model, lambda: model(ids, vision_features=feats, labels=labels).nll_sum)
    assert not model.fused_nll
    torch.testing.assert_close(got[0], full[0], rtol=1e-5, atol=1e-5)
    for name in full[1]:
        _close(got[1][name], full[1][name], 1e-5, name)
