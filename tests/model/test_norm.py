"""RMSNorm's hand-written backward equals autograd through ``F.rms_norm``."""

import pytest
import torch
import torch.nn.functional as F

from moelab.model.norm import RMSNorm, rms_norm


def _reference(x, w, eps):
    if x.dtype == w.dtype:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _grads(fn, x, w, g):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, 1e-5)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def test_matches_autograd_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    g = torch.randn(3, 5, 16, dtype=torch.float64)
    for ours, ref in zip(_grads(rms_norm, x, w, g), _grads(_reference, x, w, g)):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))


def test_non_contiguous_heads_and_bf16_input():
    torch.manual_seed(2)
    # per-head norm on a transposed (B, H, T, Dh) view, as Qwen3's q/k norm sees it
    x = torch.randn(2, 6, 3, 8).transpose(1, 2)
    w, g = torch.randn(8), torch.randn(2, 3, 6, 8)
    for ours, ref in zip(_grads(rms_norm, x, w, g), _grads(_reference, x, w, g)):
        torch.testing.assert_close(ours, ref)
    xb = torch.randn(4, 16).bfloat16()
    y = RMSNorm(16)(xb)
    torch.testing.assert_close(y, _reference(xb, torch.ones(16), 1e-5))


@pytest.mark.parametrize("need_x,need_w", [(True, False), (False, True)])
def test_partial_gradients(need_x, need_w):
    x = torch.randn(5, 8, requires_grad=need_x)
    w = torch.randn(8, requires_grad=need_w)
    rms_norm(x, w, 1e-5).sum().backward()
    assert (x.grad is not None) == need_x and (w.grad is not None) == need_w
