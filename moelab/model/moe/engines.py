"""Which engine runs the routed experts, decided in one function (``choose_engine``), and the two
engines that exist for inference only.

Legend: N tokens, D width, E experts, K experts per token, H expert hidden, M = N*K rows.

Every engine computes the same function; tests compare each against the per-token reference.
When each wins (figures: benchmarks/RESULTS.md, "Expert engines"):

- ``one_token``: a single token on CPU runs just its K chosen experts, reading only their
  weights (float or int8). Batch-1 decoding: sorting, counting and visiting all E experts would
  cost more than the K small products.
- ``all_experts``: every expert on every row, the rows an expert was not chosen for weighted by
  zero. Under ``torch.compile`` with at least 2 assignments per expert (N*K >= 2E), where nearly
  every expert is reached anyway and the shapes no longer depend on the routing, so one graph
  serves every decode step.
- ``int8``: int8 weight-only experts (``moelab.quantize``) run their own per-expert int8 products.
- ``grouped_mm``: torch's grouped GEMM, one kernel per projection with the per-expert offsets on
  the device (no host sync). The default on CUDA (its fused kernel wants bf16 on compute
  capability >= 9.0). On CPU it wins only without gradients and with few rows per expert
  (E <= M <= 32E), where the loop's per-expert Python cost shows.
- ``loop``: one ``torch.mm`` per non-empty expert over tiles of whole experts. The CPU default
  (its backward is the faster one) and the fallback wherever grouped_mm cannot take the dtype
  or the shapes (its operands' strides must be multiples of 16 bytes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

import torch
import torch.nn.functional as F

from moelab.model.moe.dispatch import plan_dispatch
from moelab.model.moe.grouped_swiglu import HAS_GROUPED_MM

if TYPE_CHECKING:  # pragma: no cover
    from moelab.model.moe.router import Routing

Engine = Literal["one_token", "all_experts", "int8", "grouped_mm", "loop"]
BACKENDS = ("auto", "grouped_mm", "loop")
# CPU, no gradients: grouped_mm up to this many rows per expert (see the module docstring)
INFERENCE_GROUPED_MAX_ROWS_PER_EXPERT = 32
# compiled decoding runs every expert when there are at least this many assignments per expert
ALL_EXPERTS_MIN_ROWS_PER_EXPERT = 2


def default_backend(device: torch.device) -> str:
    return "grouped_mm" if HAS_GROUPED_MM and device.type == "cuda" else "loop"


def grouped_mm_supports(dtype: torch.dtype, d_model: int, hidden: int) -> bool:
    """grouped_mm takes fp32/bf16/fp16 only, and its operands' strides must be multiples of 16
    bytes, which the (M, 2H) gate/up halves and the transposed operands of the backward satisfy
    when D and H are multiples of 16 bytes' worth of elements."""
    if not HAS_GROUPED_MM or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    per_16_bytes = 128 // torch.finfo(dtype).bits
    return d_model % per_16_bytes == 0 and hidden % per_16_bytes == 0


def _stacked_float(experts) -> bool:
    return getattr(experts, "weight_format", "float") == "float" and hasattr(experts, "w_gate_up")


def uses_all_experts(experts, num_tokens: int, top_k: int) -> bool:
    """Whether compiled decoding of ``num_tokens`` rows runs every expert (shapes free of routing)."""
    return (_stacked_float(experts)
            and num_tokens * top_k >= ALL_EXPERTS_MIN_ROWS_PER_EXPERT * experts.num_experts)


def choose_engine(experts, x: torch.Tensor, num_rows: Optional[int],
                  decode: Optional[tuple[int, int]] = None) -> Engine:
    """The engine for ``experts`` (``GroupedExperts`` or int8 experts) on ``num_rows``
    expert-sorted rows of ``x``'s dtype and device. ``decode`` = (tokens, top_k) when the caller
    is the inference step (``MoE.infer``), which may also take the two inference-only engines;
    ``num_rows`` None (the unfused expert-parallel path) keeps to grouped_mm/loop by device."""
    if decode is not None:
        num_tokens, top_k = decode
        if num_tokens == 1 and x.device.type == "cpu":
            return "one_token"
        if torch.compiler.is_compiling() and uses_all_experts(experts, num_tokens, top_k):
            return "all_experts"
    if getattr(experts, "weight_format", "float") == "int8":
        return "int8"
    requested = experts.backend
    backend = default_backend(x.device) if requested == "auto" else requested
    if (requested == "auto" and backend == "loop" and num_rows is not None and HAS_GROUPED_MM
            and not torch.is_grad_enabled()
            and experts.num_experts <= num_rows <= INFERENCE_GROUPED_MAX_ROWS_PER_EXPERT * experts.num_experts):
        backend = "grouped_mm"
    if backend == "grouped_mm" and not grouped_mm_supports(x.dtype, experts.d_model, experts.hidden):
        return "loop"
    return backend


def infer_experts(experts, x_ND: torch.Tensor, routing: "Routing") -> torch.Tensor:
    """The routed experts' dropless output for inference, (N, D), on the engine ``choose_engine``
    picks."""
    N, K = routing.ids_NK.shape
    engine = choose_engine(experts, x_ND, N * K, decode=(N, K))
    if engine == "one_token":
        return one_token(experts, x_ND, routing.ids_NK, routing.weights_NK)
    if engine == "all_experts":
        return all_experts(experts, x_ND, routing.ids_NK, routing.weights_NK)
    plan = plan_dispatch(routing, experts.num_experts)                            # dropless
    return experts.forward_dispatched(x_ND, plan)                                 # int8 / grouped_mm / loop


def one_token(experts, x_1D: torch.Tensor, ids_1K: torch.Tensor, weights_1K: torch.Tensor) -> torch.Tensor:
    """The K chosen experts of a single token, summed with their weights: (1, D). Reading K ids
    on the host costs nothing on CPU; only the chosen experts' weights are read (float or int8
    alike, through ``expert_forward``)."""
    out_1D = None
    if torch.compiler.is_compiling():      # the ids become symbolic ints; weights stay tensors
        for k, e in enumerate(ids_1K[0].tolist()):
            y_1D = experts.expert_forward(e, x_1D) * weights_1K[:, k:k + 1].to(x_1D.dtype)  # (1, D)
            out_1D = y_1D if out_1D is None else out_1D + y_1D
        return out_1D
    # eagerly the weights come to the host with the ids: one fused multiply-add per expert
    for e, w in zip(ids_1K[0].tolist(), weights_1K[0].tolist()):
        y_1D = experts.expert_forward(e, x_1D)                                          # (1, D)
        out_1D = y_1D.mul_(w) if out_1D is None else out_1D.add_(y_1D, alpha=w)
    return out_1D


def all_experts(experts, x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Every expert on every row, the rows each expert was not chosen for weighted by zero: (N, D).
    The combine weight multiplies the SwiGLU output before the (linear) down projection, as in
    the grouped engine."""
    E, H = experts.num_experts, experts.hidden
    w_EN = torch.zeros(x_ND.shape[0], E, dtype=x_ND.dtype, device=x_ND.device).scatter_(
        1, ids_NK, weights_NK.to(x_ND.dtype)).t()                                  # (E, N)
    gate_up_EN2H = torch.matmul(x_ND, experts.w_gate_up.transpose(1, 2))            # (E, N, 2H)
    h_ENH = F.silu(gate_up_EN2H[..., :H]).mul_(gate_up_EN2H[..., H:]).mul_(w_EN[..., None])
    return torch.bmm(h_ENH, experts.w_down.transpose(1, 2)).sum(dim=0)              # (N, D)
