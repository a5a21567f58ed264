"""Training loss without the [tokens, vocabulary] logits: a fused, chunked output head + NLL.

In training only the summed next-token NLL of the labelled tokens is needed, and the output head
is frozen except for the rows of the added tokens. `head_nll_sum` computes, chunk by chunk of
labelled tokens, the chunk's logits (frozen table and trainable new rows, laid out exactly as
`DecoupledLMHead` lays them out), their log-sum-exp and NLL, and, in the same pass, the gradient
of the summed NLL with respect to the hidden states and the new rows (softmax minus one-hot,
times the head). The backward pass only scales those by the incoming gradient: the head is never
recomputed, and no logits, log-probabilities or logit gradients of the whole batch exist at any
time (a chunk's fp32 logits buffer is reused in place for its softmax and gradient).

Numerics follow the unfused path (`DecoupledLMHead` then `F.cross_entropy(logits.float())`):
the head's matrix products run in the compute dtype (the autocast dtype when autocast is on,
else the hidden states' dtype), the log-softmax in fp32, and the logit gradients are cast to the
compute dtype before the products that give the hidden-state and new-row gradients.
"""

from __future__ import annotations

import torch

# Rows (labelled tokens) per chunk: a chunk's fp32 logits are CHUNK x vocabulary (49k vocabulary:
# 25 MB). Large enough for efficient matrix products, small enough to stay out of the way.
DEFAULT_CHUNK = 128


def compute_dtype_for(hidden: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(hidden, W)` computes in here: the autocast dtype when autocast is on
    for this device (and the op is autocast-eligible), else the hidden states' own."""
    device = hidden.device.type
    if hidden.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _HeadNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, weight, bias, new_rows, new_bias, first_new_id, chunk, compute_dtype):
        # hidden [N, D] (labelled tokens only), targets [N] in [0, V); weight [V0, D] frozen.
        n, dim = hidden.shape
        num_new = new_rows.shape[0]
        start, end = first_new_id, first_new_id + num_new
        appended = start == weight.shape[0]
        vocab = weight.shape[0] + num_new if appended else weight.shape[0]
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        nr = new_rows.to(compute_dtype)
        nb = None if new_bias is None else new_bias.to(compute_dtype)
        h_all = hidden.to(compute_dtype)
        needs_h = ctx.needs_input_grad[0]
        needs_new = ctx.needs_input_grad[4]
        needs_new_bias = new_bias is not None and ctx.needs_input_grad[5]

        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(n, dim, dtype=compute_dtype, device=hidden.device) if needs_h else None
        grad_new = torch.zeros(num_new, dim, dtype=torch.float32, device=hidden.device) if needs_new else None
        grad_new_bias = (torch.zeros(num_new, dtype=torch.float32, device=hidden.device)
                         if needs_new_bias else None)
        fp32 = compute_dtype == torch.float32
        buf = torch.empty(min(chunk, n), vocab, dtype=torch.float32, device=hidden.device)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            rows = hi - lo
            h = h_all[lo:hi]
            t = targets[lo:hi]
            logits = buf[:rows]
            base_cols = logits[:, :start] if appended else logits
            # Frozen part: written straight into the fp32 buffer when computing in fp32.
            if fp32:
                if b is None:
                    torch.mm(h, w.t(), out=base_cols)
                else:
                    torch.addmm(b, h, w.t(), out=base_cols)
            else:
                base = h @ w.t() if b is None else torch.addmm(b, h, w.t())
                base_cols.copy_(base)
            new = h @ nr.t() if nb is None else torch.addmm(nb, h, nr.t())
            logits[:, start:end] = new  # appended: the last columns; else over the replaced rows
            # NLL: logsumexp - target logit, in fp32 (logits hold the compute-dtype values).
            lse = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            total += (lse - picked).sum()
            if grad_h is None and grad_new is None and grad_new_bias is None:
                continue
            # d NLL / d logits = softmax - onehot, computed in place.
            logits.sub_(lse[:, None]).exp_()
            logits.scatter_add_(1, t[:, None], torch.full((rows, 1), -1.0, device=logits.device))
            g_new = logits[:, start:end]
            if grad_new is not None:
                grad_new += (g_new.to(compute_dtype).t() @ h).float()
            if grad_new_bias is not None:
                grad_new_bias += g_new.to(compute_dtype).float().sum(0)
            if grad_h is not None:
                torch.mm(g_new.to(compute_dtype), nr, out=grad_h[lo:hi])
                if not appended:
                    logits[:, start:end] = 0  # the frozen logits there were replaced: no gradient
                g_base = (logits[:, :start] if appended else logits).to(compute_dtype)
                grad_h[lo:hi].addmm_(g_base, w)
        ctx.save_for_backward(grad_h, grad_new, grad_new_bias)
        ctx.hidden_dtype = hidden.dtype
        ctx.new_dtype = new_rows.dtype
        ctx.new_bias_dtype = None if new_bias is None else new_bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_new, grad_new_bias = ctx.saved_tensors
        gh = gn = gnb = None
        if grad_h is not None:
            gh = (grad_h * grad_out.to(grad_h.dtype)).to(ctx.hidden_dtype)
        if grad_new is not None:
            gn = (grad_new * grad_out).to(ctx.new_dtype)
        if grad_new_bias is not None:
            gnb = (grad_new_bias * grad_out).to(ctx.new_bias_dtype)
        return gh, None, None, None, gn, gnb, None, None, None


def head_nll_sum(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 new_rows: torch.Tensor, new_bias: torch.Tensor | None, first_new_id: int,
                 chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Summed NLL (fp32 scalar) of `targets` [N] under the logits of `hidden` [N, D] through a
    decoupled head: frozen `weight` [V0, D] (+ `bias`), whose rows first_new_id.. are replaced by
    (or, when first_new_id == V0, extended with) the trainable `new_rows` [k, D] (+ `new_bias`).
    Every target must be a real id (no ignore index). Differentiable in `hidden`, `new_rows` and
    `new_bias`; the frozen weight and bias must not require gradients."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("head_nll_sum: the frozen head weight/bias must not require gradients")
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"head_nll_sum: expected hidden [N, D] and targets [N], got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    compute_dtype = compute_dtype_for(hidden)
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0).float() + (new_rows.sum() * 0).float()
    with torch.autocast(hidden.device.type, enabled=False):
        return _HeadNLL.apply(hidden, targets, weight, bias, new_rows, new_bias, first_new_id, max(1, int(chunk)),
                              compute_dtype)

