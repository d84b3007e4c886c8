"""Rotary position embeddings (Su et al. 2021, RoFormer) in the half-split layout of Llama and
Hugging Face, with the context-extension scalings released checkpoints use.

Legend: B batch, H heads, T positions, D rotary dims (even), F = D / 2 frequencies.

The scalings only change the (F,) inverse frequencies and, for YaRN, multiply cos/sin by an
attention factor; the rotation itself is the same for all of them (see ``RopeScalingConfig``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from moelab.config import RopeScalingConfig


# ---------------------------------------------------------------------------------------------
# Frequencies and tables
# ---------------------------------------------------------------------------------------------

def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(dim: int, theta: float, scaling: Optional[RopeScalingConfig] = None
                        ) -> tuple[torch.Tensor, float]:
    """(F,) float32 inverse frequencies and the factor cos/sin are multiplied by."""
    base_F = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    s = scaling or RopeScalingConfig()
    if s.kind == "default":
        return base_F, 1.0
    if s.kind == "linear":
        return base_F / s.factor, 1.0
    if s.kind == "llama3":
        # wavelengths shorter than the short bound are kept, longer than the long bound are
        # divided by the factor, and the band between blends the two linearly in 1/wavelength
        wavelen_F = 2 * math.pi / base_F
        smooth_F = (s.original_max_seq_len / wavelen_F - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended_F = (1 - smooth_F) * base_F / s.factor + smooth_F * base_F
        long_F = wavelen_F > s.original_max_seq_len / s.low_freq_factor
        short_F = wavelen_F < s.original_max_seq_len / s.high_freq_factor
        return torch.where(long_F, base_F / s.factor, torch.where(short_F, base_F, blended_F)), 1.0
    # yarn: dims that turn fewer than beta_slow times over the original context are interpolated,
    # more than beta_fast times are kept, and a linear ramp over dims joins the two
    def dim_for(rotations: float) -> float:
        return dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(s.beta_fast), dim_for(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                                                 # avoid a zero-width ramp
    ramp_F = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_F = base_F / s.factor * ramp_F + base_F * (1 - ramp_F)
    if s.attention_factor is not None:
        attention = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        attention = _yarn_mscale(s.factor)
    return inv_F, float(attention)


def rope_tables(dim: int, max_len: int, theta: float, scaling: Optional[RopeScalingConfig] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, dim), computed in float32."""
    inv_F, attention = inverse_frequencies(dim, theta, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_F)          # (L, F)
    angles = torch.cat([angles, angles], dim=-1)                                      # (L, D)
    return angles.cos() * attention, angles.sin() * attention


def softmax_scale_factor(scaling: RopeScalingConfig) -> float:
    """DeepSeek's YaRN also sharpens MLA's softmax by mscale(factor, mscale_all_dim) squared
    (as transformers' DeepSeek-V2/V3 attention does for any scaled RoPE); 1 otherwise."""
    if scaling.kind == "default" or not scaling.mscale_all_dim:
        return 1.0
    return _yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


# ---------------------------------------------------------------------------------------------
# The rotation
# ---------------------------------------------------------------------------------------------

def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE written plainly: x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1].
    The reference ``apply_rope`` is tested against."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class _Rope(torch.autograd.Function):
    """RoPE as three fused multiply-adds each way, with no concatenation, negation or slice
    gradients: plain autograd through ``rotate_half_reference`` zero-fills a full-size buffer for
    each slice's gradient and concatenates twice (measured: about 3 ms of a 21 ms attention
    sublayer, forward + backward, B=8, T=256, 4 heads of 64, 2 CPU threads). The backward needs
    only the tables, not ``x``, since the rotation is linear: its transpose is the rotation by
    minus the angle."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_out, cos, sin, sign=-1.0), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x * cos + sign * rotate_half(x) * sin, in cos's precision, returned in x's dtype."""
    half = x.shape[-1] // 2
    out = x * cos                                                       # (B, H, T, D), float32
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    return out.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by position; cos/sin are (B or 1, 1, T, D). Without gradients
    (inference) the rotation runs directly, saving the autograd Function's per-call cost."""
    if not torch.is_grad_enabled():
        return _rotate(x, cos, sin, sign=1.0)
    return _Rope.apply(x, cos, sin)
