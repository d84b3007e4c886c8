"""The fused LM head + cross-entropy equals the plain ``F.cross_entropy(h @ W.T, y)``."""

import pytest
import torch
import torch.nn.functional as F

import moelab
from moelab.model.linear_cross_entropy import IGNORE_INDEX, chunk_rows, linear_cross_entropy
from moelab.train.evaluate import lm_loss


def _plain_and_fused(N, D, V, chunk, scale=1.0, dtype=torch.float64, seed=0, ignored=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, dtype=dtype, generator=g)
    w = torch.randn(V, D, dtype=dtype, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    if ignored is not None:
        y[ignored] = IGNORE_INDEX
    results = []
    for fn in (lambda a, b: F.cross_entropy(a @ b.t(), y),
               lambda a, b: linear_cross_entropy(a, b, y, chunk=chunk)):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(a, b)
        (loss * scale).backward()
        results.append((loss.detach(), a.grad, b.grad))
    return results


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])          # uneven, tiny, one chunk, > N
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_matches_plain_cross_entropy_and_its_gradients_in_float64(chunk, scale):
    (l0, gh0, gw0), (l1, gh1, gw1) = _plain_and_fused(N=50, D=16, V=37, chunk=chunk, scale=scale)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh1, gh0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw1, gw0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_ignored_targets_are_not_scored_exactly_as_plain_cross_entropy(chunk):
    # rows 0..13 ignored: with chunk 7 two whole chunks score nothing; then every 4th row
    ignored = torch.zeros(50, dtype=torch.bool)
    ignored[:14] = True
    ignored[20::4] = True
    (l0, gh0, gw0), (l1, gh1, gw1) = _plain_and_fused(N=50, D=16, V=37, chunk=chunk, scale=0.5,
                                                      ignored=ignored)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh1, gh0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw1, gw0, rtol=1e-10, atol=1e-12)
    assert not gh1[ignored].any() and gh1[~ignored].abs().amin(dim=1).gt(0).all()
    # the mean is over the 27 scored rows: not the plain mean over all 50
    (l_all, _, _), _ = _plain_and_fused(N=50, D=16, V=37, chunk=chunk)
    assert not torch.isclose(l1, l_all)


def test_nothing_scored_gives_nan_like_plain_cross_entropy():
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8)
    y = torch.full((6,), IGNORE_INDEX)
    assert torch.isnan(F.cross_entropy(h @ w.t(), y)) and torch.isnan(linear_cross_entropy(h, w, y))


def test_float32_with_large_logits_stays_finite_and_close():
    # logits of order 100: a naive exp would overflow; the max-shift keeps it finite
    (l0, gh0, gw0), (l1, gh1, gw1) = _plain_and_fused(N=64, D=8, V=300, chunk=16, dtype=torch.float32)
    for a in (l1, gh1, gw1):
        assert torch.isfinite(a).all()
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-6)


def test_no_grad_gives_the_loss_without_computing_gradients(monkeypatch):
    (l0, _, _), _ = _plain_and_fused(N=20, D=8, V=11, chunk=6)
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(20, 8, dtype=torch.float64, generator=g), torch.randn(11, 8, dtype=torch.float64, generator=g) * 0.3
    y = torch.randint(0, 11, (20,), generator=g)
    w.requires_grad_()                         # a parameter, as in evaluation under no_grad

    def gradient_work(*args, **kwargs):
        raise AssertionError("gradient computed under no_grad")

    monkeypatch.setattr(torch.Tensor, "scatter_add_", gradient_work)   # only the gradient uses it
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, chunk=6)
    torch.testing.assert_close(loss, l0)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="positions but"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))


def test_chunks_stay_a_few_mib_but_never_tiny():
    assert chunk_rows(2048, 4096) == 512
    assert chunk_rows(2048, 256_000) == 128
    assert chunk_rows(100, 10) == 100


@pytest.mark.parametrize("tied", [True, False])
def test_model_targets_path_equals_logits_path_with_gradients(tied):
    torch.manual_seed(0)
    model = moelab.build("moe", ["model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                                 "model.n_kv_heads=1", "model.vocab_size=64", "model.moe.expert_hidden=16",
                                 "model.ffn_hidden=48", "model.max_seq_len=16",
                                 f"model.tie_embeddings={str(tied).lower()}"]).double()
    x = torch.randint(0, 64, (3, 16))
    y = torch.randint(0, 64, (3, 16))
    out = model(x, targets=y)
    assert out.logits is None
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = lm_loss(model(x).logits, y)
    plain.backward()
    torch.testing.assert_close(out.loss, plain.to(out.loss.dtype))
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, msg=n)


def test_bfloat16_autocast_on_cpu_is_close_to_float32():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(64, 32, generator=g), torch.randn(50, 32, generator=g) * 0.2
    y = torch.randint(0, 50, (64,), generator=g)
    ref = F.cross_entropy(h @ w.t(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), y)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
