"""Routed experts stored as stacked (E, ·, ·) weights and run as grouped GEMMs.

Legend: M rows (expert-sorted), D width, H expert hidden, E experts.

Weights use the (out, in) layout of ``nn.Linear`` and Hugging Face's fused experts:
``w_gate_up`` (E, 2H, D) with the gate rows first, ``w_down`` (E, D, H). Two backends compute the
same thing on contiguous per-expert slices of the sorted rows:
- "grouped_mm": ``torch.nn.functional.grouped_mm`` (one kernel per GEMM; no host sync);
- "loop": one ``F.linear`` per expert (a loop over experts, never over tokens), which is what a
  CPU build without grouped_mm falls back to.
``naive_expert`` is the per-token reference the tests compare both against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x, w, offs=offs)


def default_backend(device: torch.device) -> str:
    if HAS_GROUPED_MM and device.type == "cuda":
        return "grouped_mm"
    return "loop"


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, hidden: int, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden = num_experts, hidden
        self.backend = backend
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, hidden))

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        backend = default_backend(x_MD.device) if self.backend == "auto" else self.backend
        if backend == "grouped_mm":
            return self._forward_grouped_mm(x_MD, counts_E)
        return self._forward_loop(x_MD, counts_E)

    def _forward_grouped_mm(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)                       # (E,)
        w_gate_up = self.w_gate_up.to(x_MD.dtype).transpose(1, 2)                  # (E, D, 2H)
        w_down = self.w_down.to(x_MD.dtype).transpose(1, 2)                        # (E, H, D)
        gate, up = _grouped_mm(x_MD, w_gate_up, offs).chunk(2, dim=-1)             # (M, H) each
        return _grouped_mm(F.silu(gate) * up, w_down, offs)                        # (M, D)

    def _forward_loop(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        outputs = []
        for e, x_e in enumerate(x_MD.split(counts_E.tolist())):
            gate, up = F.linear(x_e, self.w_gate_up[e]).chunk(2, dim=-1)          # (M_e, H)
            outputs.append(F.linear(F.silu(gate) * up, self.w_down[e]))           # (M_e, D)
        return torch.cat(outputs)

    def naive_expert(self, e: int, x_D: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to one token, written plainly: the reference for tests."""
        gate = self.w_gate_up[e, : self.hidden] @ x_D
        up = self.w_gate_up[e, self.hidden:] @ x_D
        return self.w_down[e] @ (F.silu(gate) * up)
