"""LM head and cross-entropy in one pass over row chunks, without the (N, V) logits.

Legend: N token positions, D width, V vocabulary, C rows of one chunk.

The plain ``F.cross_entropy(h @ W.T, y)`` keeps the whole (N, V) logits alive for the backward,
runs a log-softmax forward and backward kernel over them and zero-fills a fresh (N, V) gradient.
At a small width the LM head is the largest activation of the step, and on CPU those passes (plus
page-faulting a fresh 32 MiB buffer every step) cost about as much as its two matmuls.

Because the loss is a scalar, its gradients can be finished in the forward: for each chunk of
rows, logits -> softmax -> (softmax - one_hot(y)) / N is the gradient of the logits, and two
matmuls turn it into the chunk's dL/dh and its share of dL/dW; the chunk's logits are then
dropped. The backward only scales the saved gradients by the incoming scalar. This is the idea
of the fused linear cross-entropy in Liger Kernel (Hsu et al. 2024) and of Cut Cross-Entropy
(Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models"), written here with
plain PyTorch ops so that it runs on any device.

Cost: the same matmul FLOPs as the unfused pair; memory: one (C, V) chunk instead of (N, V)
logits plus their gradient, and the (N, D) and (V, D) gradients, which autograd holds anyway.

Targets equal to ``IGNORE_INDEX`` are not scored, as in ``F.cross_entropy(..., ignore_index=-100)``:
the mean is over the scored positions only and an unscored row gets a zero gradient (the masked
LM scores only the selected ~15% of positions). The count of scored positions stays a tensor, so
nothing waits on the device to read it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

# Rows per chunk: about this many logits (8 MiB of fp32) per chunk. Buffers below glibc's mmap
# threshold are reused from the heap instead of being page-faulted in anew every step, and a
# few hundred rows keep the matmuls large.
CHUNK_ELEMENTS = 2**21
MIN_CHUNK_ROWS = 128
# Targets with this value are not scored (F.cross_entropy's default ignore_index).
IGNORE_INDEX = -100


def chunk_rows(num_rows: int, vocab: int) -> int:
    return max(1, min(num_rows, max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1))))


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over scored n of CE(h_n @ W.T, y_n); gradients computed in the forward (see the module
    docstring)."""

    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                compute_dtype: torch.dtype, chunk: int, grad_enabled: bool) -> torch.Tensor:
        N = h_ND.shape[0]
        # needs_input_grad stays True under no_grad for inputs that require grad: ask the caller's
        # grad mode too, or evaluation would pay for two gradient matmuls it never uses
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        w = w_VD.to(compute_dtype)
        grad_h = torch.empty_like(h_ND) if need_h else None
        grad_w = torch.zeros_like(w_VD) if need_w else None
        stats_dtype = torch.promote_types(compute_dtype, torch.float32)   # float64 stays float64
        scored_N = targets_N != IGNORE_INDEX
        # no scored position: 0 / 0, a nan loss, as F.cross_entropy gives
        count = scored_N.sum().to(stats_dtype)
        inv_count = count.reciprocal()
        loss = h_ND.new_zeros((), dtype=stats_dtype)
        token_loss_N = h_ND.new_empty(N, dtype=stats_dtype)      # each position's own loss (0 if unscored)
        for s in range(0, N, chunk):
            h_CD = h_ND[s:s + chunk].to(compute_dtype)
            scored_C1 = scored_N[s:s + chunk, None]
            y_C1 = targets_N[s:s + chunk, None].where(scored_C1, 0)          # any valid id
            logits_CV = (h_CD @ w.t()).to(stats_dtype)                                # (C, V)
            # log-softmax statistics by hand: four vectorised passes instead of the (slower)
            # softmax kernel, and the exponentials are computed once, in place
            max_C1 = logits_CV.amax(dim=-1, keepdim=True)
            target_C1 = logits_CV.gather(1, y_C1)
            probs_CV = logits_CV.sub_(max_C1).exp_()                          # unnormalised
            sum_C1 = probs_CV.sum(dim=-1, keepdim=True)
            lse_C1 = max_C1 + sum_C1.log()
            chunk_loss_C1 = (lse_C1 - target_C1).where(scored_C1, 0)
            token_loss_N[s:s + chunk] = chunk_loss_C1.squeeze(1)
            loss += chunk_loss_C1.sum()
            if not (need_h or need_w):
                continue
            # dL/dlogits = (softmax - one_hot) / count on scored rows, 0 on the others
            row_scale_C1 = inv_count * scored_C1                              # (C, 1)
            grad_CV = probs_CV.mul_(sum_C1.reciprocal_().mul_(row_scale_C1))
            grad_CV.scatter_add_(1, y_C1, row_scale_C1.neg())
            grad_CV = grad_CV.to(compute_dtype)
            if need_h:
                grad_h[s:s + chunk] = grad_CV @ w                             # (C, D)
            if need_w:
                if grad_w.dtype == compute_dtype:
                    grad_w.addmm_(grad_CV.t(), h_CD)                           # (V, D)
                else:
                    grad_w += (grad_CV.t() @ h_CD).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(token_loss_N)
        return loss / count, token_loss_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, _grad_token_loss: Optional[torch.Tensor] = None):
        grad_h, grad_w = ctx.saved_tensors
        # in place: the saved gradients are used once; usually grad_loss is 1 (two small passes)
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight_VD: torch.Tensor, targets: torch.Tensor,
                         chunk: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, a float32 (or float64) scalar.

    ``h`` (..., D), ``targets`` (...) of int64 token ids in [0, V), or ``IGNORE_INDEX`` for a
    position that is not scored (the mean is over the scored ones). Under autocast the matmuls run
    in the autocast dtype and the softmax in float32, as ``F.cross_entropy(logits.float(), y)``
    after an autocast ``F.linear`` would."""
    return linear_cross_entropy_per_token(h, weight_VD, targets, chunk)[0]


def linear_cross_entropy_per_token(h: torch.Tensor, weight_VD: torch.Tensor, targets: torch.Tensor,
                                   chunk: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean loss as :func:`linear_cross_entropy`, each position's own loss (N,) without
    gradient, 0 where unscored), from the same single pass over the logits: the REINFORCE router's
    per-token reward reads them."""
    h_ND = h.reshape(-1, h.shape[-1])
    targets_N = targets.reshape(-1)
    if targets_N.shape[0] != h_ND.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h_ND.shape[0]} positions but {targets_N.shape[0]} targets")
    dtype = h_ND.dtype
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    chunk = chunk or chunk_rows(h_ND.shape[0], weight_VD.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N, dtype, chunk, torch.is_grad_enabled())
