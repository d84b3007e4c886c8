"""Inference weight formats: the compute dtype (float32 | bfloat16) and int8 weight-only weights.

Legend: N output features, K input features, M rows, E experts, D width, H expert hidden.

Why these exist: decoding one token at a time reads every active weight once per token and does
little arithmetic with it, so its speed is the active weight bytes over the memory bandwidth.
bfloat16 halves the bytes of float32, int8 halves them again.

int8 weight-only (``quantize="int8"``). Every weight matrix of a linear layer (attention, dense
SwiGLU, shared experts, LM head) and the stacked routed experts get symmetric int8 values with a
float scale per output channel; for the stacked (E, N, K) expert weights that is a scale per expert
and output channel (block (1, 1, K)). The scales and the rounding come from torchao's affine
quantisation primitives (``choose_qparams_affine`` / ``quantize_affine``, the numerics of its
``Int8WeightOnlyConfig`` with per-row granularity), so this module picks no quantisation scheme of
its own. Products run on ``torch._weight_int8pack_mm`` (bf16 activations x int8 weights x per-row
scale, float32 accumulation): the kernel torchao's int8 weight-only linear is lowered to on CPU by
inductor; calling it directly gives eager decoding the same kernel. Where it does not apply (float32
activations, whose x86 path is a scalar loop; shapes it does not support) the weight is dequantised
for the product instead, which is correct but no faster than the unquantised model. Activations,
norms and the embedding stay in the compute dtype (a token reads one embedding row), the router
in float32 in every format (its top-k choices are sensitive to rounding).

Only the weights change; the model keeps its modules and its ``forward``, so an int8 model still
scores text (``model(tokens)``) and generates. It cannot be trained or exported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import OptionError
from moelab.model.moe.experts import GroupedExperts, expert_views

if TYPE_CHECKING:  # pragma: no cover
    from moelab.model.moe.dispatch import DispatchPlan
    from moelab.model.transformer import Transformer

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("int8",)
QUANT_EXTRA = 'pip install "moelab[quant]" (or: pip install torchao)'
# _weight_int8pack_mm reads K in vector steps (8 on AVX2, 16 on AVX-512, 8 on NEON) with aligned
# loads and no tail loop: other K give wrong results or crash, so those layers are dequantised.
INT8PACK_K_MULTIPLE = 16
INT8PACK_ALIGN_BYTES = 64


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

class QuantizeError(OptionError):
    """A bad weight-format option (``dtype``, ``quantize``) or a missing torchao, named by its
    keyword (a ConfigError, so ``moelab`` exits with status 2)."""


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """A compute dtype from its name ("float32", "bfloat16") or a torch dtype; None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise QuantizeError("dtype", f"dtype = {dtype!r} is invalid: must be one of {', '.join(DTYPES)}")


def resolve_quantize(quantize: Optional[str]) -> Optional[str]:
    if quantize is None or quantize in QUANTIZATIONS:
        return quantize
    raise QuantizeError("quantize", f"quantize = {quantize!r} is invalid: must be "
                          f"{' or '.join(QUANTIZATIONS)} (or None for unquantised weights)")


def torchao_primitives():
    """torchao's affine quantisation primitives, or a QuantizeError naming the extra.

    torchao logs at import that it skips C++ extensions built for another torch (we use none of
    them) and torch warns about an enum it registers; both are silenced for that import."""
    from moelab.quiet_imports import quiet_import
    try:
        with quiet_import():
            from torchao.quantization.quant_primitives import (MappingType, choose_qparams_affine,
                                                               quantize_affine)
    except ImportError as e:
        raise QuantizeError("quantize", f"quantize = 'int8' needs torchao, which cannot be "
                              f"imported ({e}): {QUANT_EXTRA}") from None
    return MappingType, choose_qparams_affine, quantize_affine


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dimension, with torchao's primitives.

    (..., N, K) float -> int8 values (..., N, K) and float32 scales (..., N), w ~ values * scale."""
    MappingType, choose_qparams_affine, quantize_affine = torchao_primitives()
    block = (1,) * (w.dim() - 1) + (w.shape[-1],)
    w32 = w.detach().float()
    scale, zero_point = choose_qparams_affine(w32, MappingType.SYMMETRIC, block, torch.int8,
                                              -128, 127, torch.finfo(torch.float32).eps,
                                              torch.float32, torch.int8)
    values = quantize_affine(w32, block, scale, zero_point, torch.int8, -128, 127)
    return values, scale.reshape(w.shape[:-1])


# ---------------------------------------------------------------------------------------------
# The int8 product
# ---------------------------------------------------------------------------------------------

def int8pack_supported(w_NK: torch.Tensor) -> bool:
    """Whether ``torch._weight_int8pack_mm`` takes this weight (see INT8PACK_K_MULTIPLE).
    CPU only: its CUDA kernel computes one output per thread; on CUDA the dequantising product
    is what inductor fuses (as torchao's int8 weight-only linear does there)."""
    return (w_NK.device.type == "cpu" and w_NK.shape[-1] % INT8PACK_K_MULTIPLE == 0
            and w_NK.is_contiguous() and w_NK.data_ptr() % 16 == 0)


def int8_linear(x: torch.Tensor, w_NK: torch.Tensor, scale_N: torch.Tensor,
                packable: Optional[bool] = None) -> torch.Tensor:
    """x (..., K) @ (w * scale).T -> (..., N) in x's dtype; ``scale_N`` in x's dtype.
    ``packable``: ``int8pack_supported(w_NK)``, when the caller knows it already (a decode step
    calls this a few hundred times; the checks cost as much as a small product)."""
    if torch.compiler.is_compiling():
        # the pattern inductor lowers to _weight_int8pack_mm itself (bf16 on CPU), with its own
        # buffers and checks; elsewhere it fuses the int8 -> float conversion into the product
        return F.linear(x, w_NK.to(x.dtype)) * scale_N
    if packable is None:
        packable = int8pack_supported(w_NK)
    if packable and x.dtype == torch.bfloat16 and x.is_cpu:
        x_MK = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if not x_MK.is_contiguous() or x_MK.data_ptr() % INT8PACK_ALIGN_BYTES:
            x_MK = x_MK.clone(memory_format=torch.contiguous_format)    # the kernel loads aligned rows
        y = torch._weight_int8pack_mm(x_MK, w_NK, scale_N)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], w_NK.shape[0])
    return F.linear(x, w_NK.to(x.dtype) * scale_N[:, None])


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (N, K) and a scale per output row (N,)."""

    def __init__(self, values_NK: torch.Tensor, scale_N: torch.Tensor, bias: Optional[torch.Tensor],
                 dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = values_NK.shape[1], values_NK.shape[0]
        self.register_buffer("weight_int8", values_NK.contiguous())
        self.register_buffer("scale", scale_N.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.packable = int8pack_supported(self.weight_int8)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "Int8Linear":
        values, scale = quantize_rows(linear.weight)
        return cls(values, scale, linear.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, self.weight_int8, self.scale, self.packable)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn, recurse=True):                   # .to(device) and friends
        out = super()._apply(fn, recurse)
        self.packable = int8pack_supported(self.weight_int8)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


class Int8Experts(nn.Module):
    """Routed experts with int8 stacked weights: ``w_gate_up`` (E, 2H, D) and ``w_down`` (E, D, H)
    as int8 values with a scale per expert and output channel, (E, 2H) and (E, D).

    The same calls as ``GroupedExperts`` (``forward``, ``forward_dispatched``, ``naive_expert``),
    each expert's rows in one int8 product per projection; ``expert_forward`` runs one expert,
    which is what batch-1 decoding calls for each chosen expert."""

    weight_format = "int8"       # what ``moelab.model.moe.engines.choose_engine`` reads

    def __init__(self, experts: "GroupedExperts", dtype: torch.dtype):
        super().__init__()
        self.num_experts, self.d_model, self.hidden = experts.num_experts, experts.d_model, experts.hidden
        for name in ("w_gate_up", "w_down"):
            values, scale = quantize_rows(getattr(experts, name))
            self.register_buffer(f"{name}_int8", values.contiguous())
            self.register_buffer(f"{name}_scale", scale.to(dtype))
        self._set_packable()

    def _set_packable(self) -> None:
        self.packable = (int8pack_supported(self.w_gate_up_int8[0]), int8pack_supported(self.w_down_int8[0]))

    def _apply(self, fn, recurse=True):                   # .to(device) and friends
        out = super()._apply(fn, recurse)
        self._set_packable()
        return out

    def expert_forward(self, e: int, x_RD: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows (R, D): down(silu(gate(x)) * up(x)), (R, D)."""
        w_gu, s_gu, w_d, s_d = expert_views(self, ("w_gate_up_int8", "w_gate_up_scale", "w_down_int8",
                                                   "w_down_scale"), e)
        gate, up = int8_linear(x_RD, w_gu, s_gu, self.packable[0]).chunk(2, dim=-1)    # (R, H) each
        return int8_linear(F.silu(gate).mul_(up), w_d, s_d, self.packable[1])

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Expert-sorted rows in, expert outputs out, (M, D) -> (M, D)."""
        out_MD = torch.empty_like(x_MD)
        start = 0
        for e, count in enumerate(counts_E.tolist()):
            if count:
                out_MD[start:start + count] = self.expert_forward(e, x_MD[start:start + count])
            start += count
        return out_MD

    def forward_dispatched(self, x_ND: torch.Tensor, plan: "DispatchPlan") -> torch.Tensor:
        """Gather each expert's rows, run it, add the weighted outputs back to their tokens: (N, D)."""
        out_ND = torch.zeros_like(x_ND)
        start = 0
        for e, count in enumerate(plan.counts_E.tolist()):
            if not count:
                continue
            rows = slice(start, start + count)
            token_R = plan.token_idx_M[rows]
            y_RD = self.expert_forward(e, x_ND.index_select(0, token_R))
            out_ND.index_add_(0, token_R, y_RD * plan.weight_M[rows, None].to(y_RD.dtype))
            start += count
        return out_ND

    def naive_expert(self, e: int, x_D: torch.Tensor) -> torch.Tensor:
        return self.expert_forward(e, x_D[None])[0]


# ---------------------------------------------------------------------------------------------
# Converting a model in place
# ---------------------------------------------------------------------------------------------

def cast_parameters_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters to ``dtype``, except the routers' (which compute in float32 anyway, and whose
    top-k choices are sensitive to rounding); buffers (RoPE tables, router biases and loads)
    keep float32 so positions and expert choices are not rounded. Tied parameters stay tied."""
    from moelab.model.moe.router import Router
    keep = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and id(p) not in keep:
            p.data = p.data.to(dtype)
    return model


def quantize_int8_(model: "Transformer", dtype: torch.dtype = torch.bfloat16) -> "Transformer":
    """Replace every ``nn.Linear`` by an :class:`Int8Linear` and every ``GroupedExperts`` by
    :class:`Int8Experts`, one module at a time (the float weights of each are freed as it goes).
    ``dtype`` is the activations' dtype (the scales are kept in it)."""
    torchao_primitives()                         # fail before touching the model
    replace: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.Linear, GroupedExperts)):
                replace.append((parent, name, child))
    for parent, name, child in replace:
        if isinstance(child, nn.Linear):
            new = Int8Linear.from_linear(child, dtype)
        else:
            new = Int8Experts(child, dtype)
        setattr(parent, name, new.to(next(child.parameters()).device))
    model.quantization = "int8"
    return model


def quantization(model: nn.Module) -> Optional[str]:
    return getattr(model, "quantization", None)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations run in: the embedding's."""
    return model.embed.weight.dtype


def prepare(model: "Transformer", dtype: Union[None, str, torch.dtype] = None,
            quantize: Optional[str] = None) -> "Transformer":
    """Convert ``model`` in place for inference and return it.

    ``dtype``: compute dtype ("float32" or "bfloat16"; None keeps the model's, or bfloat16 when
    quantising a float32 model, since the int8 kernel takes bf16 activations). ``quantize``: "int8"
    for int8 weight-only weights (needs torchao), None to leave the weights as they are. Converting
    an int8 model again is a no-op for its weights; int8 cannot be undone."""
    target = resolve_dtype(dtype)
    quantize = resolve_quantize(quantize)
    current = quantization(model)
    if target is None:
        target = torch.bfloat16 if quantize == "int8" and current is None else compute_dtype(model)
    if current == "int8" and target != compute_dtype(model):
        raise QuantizeError("dtype", f"dtype = {str(target).removeprefix('torch.')!r} cannot be "
                              f"applied to an int8 model quantised for "
                              f"{str(compute_dtype(model)).removeprefix('torch.')}; reload it")
    cast_parameters_(model, target)
    if quantize == "int8" and current is None:
        quantize_int8_(model, target)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and persistent buffers (what a checkpoint of the model holds)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
