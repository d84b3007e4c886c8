"""moelab.parallel.clip: the same clipping as torch's, skipping the multiply under the limit."""

import math

import pytest
import torch

from moelab.parallel.clip import clip_grad_norm_, total_grad_norm


def _params(scale: float, dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (7,), (3, 5, 11), (1,)]
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * scale).to(dtype)
        params.append(p)
    params.append(torch.nn.Parameter(torch.zeros(4)))           # no gradient: skipped
    return params


@pytest.mark.parametrize("scale, max_norm", [(1.0, 1.0), (0.01, 1.0), (1.0, math.inf), (3.0, 0.5)])
def test_matches_torch_clip_grad_norm(scale, max_norm):
    ours, theirs = _params(scale), _params(scale)
    norm = clip_grad_norm_(ours, max_norm)
    want = float(torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    assert norm == pytest.approx(want, rel=1e-5)
    for a, b in zip(ours, theirs):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=0)
    clipped = float(total_grad_norm([p.grad for p in ours if p.grad is not None]))
    assert clipped == pytest.approx(min(norm, max_norm), rel=1e-5)


def test_under_the_limit_the_gradients_are_left_bit_for_bit():
    params = _params(0.01)
    before = [p.grad.clone() for p in params if p.grad is not None]
    clip_grad_norm_(params, 1.0)
    for b, p in zip(before, [p for p in params if p.grad is not None]):
        assert torch.equal(b, p.grad)


def test_bf16_gradients_and_non_finite_norms():
    params = _params(1.0, torch.bfloat16)
    norm = clip_grad_norm_(params, 0.5)
    want = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad.float()) for p in _params(1.0, torch.bfloat16) if p.grad is not None])))
    assert norm == pytest.approx(want, rel=1e-4)
    bad = _params(1.0)
    bad[0].grad[3, 3] = float("nan")
    before = bad[1].grad.clone()
    assert math.isnan(clip_grad_norm_(bad, 1.0))
    assert torch.equal(before, bad[1].grad)                       # not scaled by a nan factor
    assert clip_grad_norm_([], 1.0) == 0.0


def test_float64_gradients_keep_their_precision():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad = torch.tensor([1.0, 1e-4, 0.0], dtype=torch.float64)
    norm = clip_grad_norm_([p], 10.0)
    assert norm != 1.0                                   # what a float32 sum would give
    assert norm == pytest.approx(math.sqrt(1.0 + 1e-8), rel=1e-14)
