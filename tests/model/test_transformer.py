"""Model-level invariants: causality, RoPE relativity, presets, parameter accounting."""

import pytest
import torch

import moelab
from moelab.accounting import flops_per_token, memory_estimate, param_counts
from moelab.model.rope import apply_rope, rope_tables, rotate_half_reference
from moelab.presets import preset_names

SMALL = ["model.n_layers=2", "model.d_model=64", "model.vocab_size=128", "model.ffn_hidden=96",
         "model.moe.expert_hidden=32", "model.max_seq_len=32"]


def _small(preset):
    overrides = list(SMALL)
    cfg = moelab.resolve_config(preset)
    if cfg.model.moe.num_experts_per_layer is not None:          # pr-moe: 2 MoE layers now
        overrides.append("model.moe.num_experts_per_layer=[4, 8]")
    if isinstance(cfg.model.moe.layers, tuple):                  # hybrid: explicit list
        overrides.append("model.moe.layers=[1]")
    if cfg.model.moe.first_dense:
        overrides.append("model.moe.first_dense=1")
    if cfg.model.moe.heterogeneous:                              # hetero-moe: one width per expert
        overrides.append("model.moe.expert_hidden=[16, 16, 32, 32, 32, 32, 48, 48]")
    return moelab.build(preset, overrides)


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_builds_runs_and_counts_exactly(preset):
    model = moelab.build(preset)
    counts = param_counts(model.config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    expected_active = counts["total"]
    for layer in range(model.config.n_layers):
        E = model.config.experts_in_layer(layer)
        if E:
            # heterogeneous experts: the expectation under uniform routing (the mean width)
            per_expert = 3 * model.config.d_model * model.config.moe.mean_expert_hidden
            expected_active -= (E - model.config.moe.top_k) * per_expert
            if model.config.moe.router == "noisy":
                expected_active -= E * model.config.d_model
    assert counts["active"] == expected_active
    assert counts["active"] <= counts["total"]
    small = _small(preset)
    small.train()
    tokens = torch.randint(0, 128, (2, 12))
    out = small(tokens)
    assert out.logits.shape == (2, 12, 128)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()) + out.aux_loss
    loss.backward()
    grads = [p.grad for p in small.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert sum(g is not None for g in grads) > 0.9 * len(grads)
    assert len(out.router_stats) == len(small.config.moe_layer_indices())


@pytest.mark.parametrize("preset", ["dense", "mixtral", "deepseek-v3", "llama4"])
def test_future_tokens_do_not_change_past_logits(preset):
    model = _small(preset).eval()
    a = torch.randint(0, 128, (2, 16))
    b = a.clone()
    b[:, 10:] = torch.randint(0, 128, (2, 6))
    la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_rope_scores_depend_on_relative_position_only():
    cos, sin = rope_tables(16, 64, 10000.0)
    q = torch.randn(1, 1, 1, 16)
    k = torch.randn(1, 1, 1, 16)

    def score(m, n):
        qm = apply_rope(q, cos[m][None, None, None], sin[m][None, None, None])
        kn = apply_rope(k, cos[n][None, None, None], sin[n][None, None, None])
        return (qm * kn).sum().item()

    assert score(5, 3) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(40, 0) == pytest.approx(score(41, 1), abs=1e-5)
    assert score(5, 3) != pytest.approx(score(5, 4), abs=1e-3)


@pytest.mark.parametrize("batch_tables", [False, True])      # (1, 1, T, D) or per-row (B, 1, T, D)
def test_fused_rope_matches_the_plain_formula_and_its_gradient(batch_tables):
    cos, sin = rope_tables(16, 8, 10000.0)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]]) if batch_tables else torch.arange(6)[None]
    cos, sin = cos[pos].unsqueeze(1).double(), sin[pos].unsqueeze(1).double()   # (B|1, 1, T, D)
    x = torch.randn(2, 3, 6, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 6, 16, dtype=torch.float64)
    fused = apply_rope(x, cos, sin)
    (gx_fused,) = torch.autograd.grad(fused, x, g)
    plain = rotate_half_reference(x, cos, sin)
    (gx_plain,) = torch.autograd.grad(plain, x, g)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_fused, gx_plain, rtol=1e-12, atol=1e-12)
    xb = x.detach().bfloat16()
    out = apply_rope(xb, cos.float(), sin.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), plain.detach().float(), rtol=2e-2, atol=2e-2)


def test_hybrid_patterns_and_pyramid():
    cfg = moelab.resolve_config("dense", ["model.n_layers=6", "model.moe.layers=all",
                                          "model.moe.every=2"]).model
    assert cfg.moe_layer_indices() == [1, 3, 5]
    cfg = moelab.resolve_config("dense", ["model.n_layers=6", "model.moe.layers=all",
                                          "model.moe.first_dense=2"]).model
    assert cfg.moe_layer_indices() == [2, 3, 4, 5]
    cfg = moelab.resolve_config("dense", ["model.n_layers=6", "model.moe.layers=[0, 4]"]).model
    assert cfg.moe_layer_indices() == [0, 4]
    cfg = moelab.resolve_config("dense").model
    assert cfg.moe_layer_indices() == []
    model = moelab.build("pr-moe")
    assert [m.num_experts for m in model.moe_layers()] == [4, 4, 8, 8]


def test_tied_embeddings_share_one_tensor():
    model = moelab.build("dense", ["model.tie_embeddings=true"])
    assert model.lm_head is None
    assert param_counts(model.config)["total"] == sum(p.numel() for p in model.parameters())


def test_gqa_and_mqa_shapes():
    for kv in (4, 2, 1):
        model = moelab.build("dense", SMALL + [f"model.n_kv_heads={kv}"])
        assert model(torch.randint(0, 128, (1, 8))).logits.shape == (1, 8, 128)
        assert param_counts(model.config)["total"] == sum(p.numel() for p in model.parameters())


def test_flops_and_memory_accounting_are_consistent():
    dense = moelab.resolve_config("dense").model
    moe = moelab.resolve_config("moe").model
    f_dense, f_moe = flops_per_token(dense, 128), flops_per_token(moe, 128)
    # matmul FLOPs are 2 x active matmul weights; the MoE adds only the router
    router = 2 * moe.n_layers * moe.moe.num_experts * moe.d_model
    assert f_moe["matmul"] - f_dense["matmul"] == router
    assert f_dense["attention"] == f_moe["attention"] > 0
    mem = memory_estimate(moe, batch=4, seq_len=64)
    P = param_counts(moe)["total"]
    assert mem["weights"] == 4 * P and mem["adamw_states"] == 8 * P
    assert mem["activations"] > 0
