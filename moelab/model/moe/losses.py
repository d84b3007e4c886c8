"""Load-balancing and stability losses for routers, as pure functions.

Legend: N tokens, E experts, K experts per token, B sequences, T tokens per sequence.
Each returns an unweighted scalar; the MoE layer multiplies by its coefficients and hands the sum
to the caller, who adds it to the task loss. Nothing is accumulated globally.
"""

from __future__ import annotations

from typing import Optional

import torch


def expert_histogram(ids: torch.Tensor, num_experts: int, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Assignments per expert, (E,) int64, counting only those where ``keep`` (same shape as
    ``ids``) is True when given. Not ``torch.bincount``: on CUDA it reads the largest id back to
    the host to size its output, a sync in every layer; a scatter-add into E bins is not."""
    ids = ids.flatten()
    counts = torch.ones_like(ids) if keep is None else keep.flatten().to(ids.dtype)
    return ids.new_zeros(num_experts).scatter_add_(0, ids, counts)


def expert_counts(ids_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, (E,) float."""
    return expert_histogram(ids_NK, num_experts).float()


def switch_balance_loss(probs_NE: torch.Tensor, counts_E: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4), generalised to top-k.

    E * sum_i f_i * P_i, where f_i is the fraction of the assignments sent to expert i (from
    ``counts_E``, see :func:`expert_counts`) and P_i the mean router probability of expert i. It
    equals 1 when routing is uniform; only P carries gradient (f comes from a discrete top-k).
    The counts may cover more tokens than ``probs_NE`` (every data-parallel rank's micro-batch:
    global-batch balancing, Qiu et al. 2025); averaging the loss over those ranks then gives the
    loss of the whole batch.
    """
    f_E = counts_E.float() / counts_E.sum().clamp_min(1)             # (E,)
    p_E = probs_NE.float().mean(dim=0)                               # (E,)
    return num_experts * (f_E * p_E).sum()


def sequence_balance_loss(probs_BTE: torch.Tensor, ids_BTK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss (DeepSeek-V3 report, eqs. 17-20).

    Per sequence: f_i = E / (K T) * (tokens of the sequence choosing i), P_i = mean over its tokens
    of the normalised scores; loss = mean over sequences of sum_i f_i P_i (1 when uniform).
    """
    B, T, K = ids_BTK.shape
    counts_BE = torch.zeros(B, num_experts, device=ids_BTK.device, dtype=torch.float32)
    counts_BE.scatter_add_(1, ids_BTK.reshape(B, T * K), torch.ones(B, T * K, device=ids_BTK.device))
    f_BE = counts_BE * num_experts / (K * T)
    p_BE = probs_BTE.float().mean(dim=1)
    return (f_BE * p_BE).sum(dim=-1).mean()


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean squared log-partition of the logits,
    which keeps router logits small and the softmax numerically tame."""
    return torch.logsumexp(logits_NE.float(), dim=-1).square().mean()


def router_entropy(probs_NE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy (nats) of the routing distribution; log(E) is uniform."""
    p = probs_NE.float().clamp_min(1e-12)
    return -(p * p.log()).sum(dim=-1).mean()


def relu_l1_loss(gates_NE: torch.Tensor, active_E: torch.Tensor, tokens: torch.Tensor,
                 top_k: int) -> torch.Tensor:
    """ReMoE's load-balanced L1 sparsity loss (Wang et al. 2025, section 3.3): sum_e f_e * mean_n
    g_ne, with f_e = E / (K * tokens) * (tokens with expert e active) the expert's activation
    frequency relative to the target (1 when every expert serves K/E of the tokens). Pushing the
    gates of busy experts harder down both sparsifies and balances. ``active_E`` and ``tokens``
    may cover every data-parallel rank (they carry no gradient); the mean is over ``gates_NE``."""
    E = gates_NE.shape[1]
    f_E = active_E.to(gates_NE.dtype) * E / (top_k * tokens.to(gates_NE.dtype).clamp_min(1))
    return (f_E * gates_NE.mean(dim=0)).sum()


def size_penalty_loss(probs_NE: torch.Tensor, counts_E: torch.Tensor, widths_E: torch.Tensor) -> torch.Tensor:
    """HMoE's parameter penalty (Wang et al. 2024): the Switch balance loss E * sum_i f_i P_i with
    each expert's term weighted by its width relative to the mean width, so that the router is
    pushed off the wide experts more than off the narrow ones. With equal widths it is the Switch
    loss. (The paper scales by the expert's parameter count; widths are proportional to it.)"""
    E = probs_NE.shape[1]
    f_E = counts_E.float() / counts_E.sum().clamp_min(1)
    p_E = probs_NE.float().mean(dim=0)
    size_E = widths_E.float() / widths_E.float().mean()
    return E * (size_E * f_E * p_E).sum()


def active_expert_stats(keep_NE: torch.Tensor) -> dict[str, torch.Tensor]:
    """How many experts each token used (variable routers): mean, 95th percentile and the share of
    tokens that used none (they pass on the residual alone)."""
    active_N = keep_NE.sum(dim=-1).float()
    return {"active_experts_mean": active_N.mean(),
            "active_experts_p95": torch.quantile(active_N, 0.95) if active_N.numel() else active_N.sum(),
            "zero_expert_fraction": (active_N == 0).float().mean()}
