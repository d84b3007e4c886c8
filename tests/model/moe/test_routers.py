"""The routers of issue 27 (hash, expert_choice, sinkhorn, reinforce, relu, the learned group
gate) and heterogeneous experts: each equals a per-token reference written independently
(reference_routing.py), forward and the gradients that flow, in float64; plus each rule's own
promise (determinism, exact capacity, balance, where the gradient comes from)."""

from __future__ import annotations


import pytest
import torch

import moelab
from moelab import MoE
from moelab.accounting import param_counts
from moelab.config import ConfigError
from moelab.model.moe.router import adapt_relu_l1, plackett_luce_logprob
from moelab.model.transformer import Transformer
from reference_routing import reference_moe, reinforce_choices

D, V = 16, 40

CASES = {
    "hash": dict(router="hash", aux_loss_coef=0.0),
    "hash-top1": dict(router="hash", top_k=1, hash="random"),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
    "expert_choice-cf2-shared": dict(router="expert_choice", capacity_factor=2.0, top_k=1, num_shared_experts=1),
    "sinkhorn": dict(router="sinkhorn", sinkhorn_iters=3),
    "reinforce": dict(router="reinforce"),
    "relu": dict(router="relu"),
    "learned-groups": dict(router="softmax", n_groups=4, topk_groups=2, group_router="learned"),
    "hetero": dict(expert_hidden=(4, 4, 8, 8, 12, 12, 20, 20), size_penalty_coef=0.1),
    "hetero-relu": dict(router="relu", expert_hidden=(4, 4, 8, 8, 12, 12, 20, 20)),
    "hetero-learned-shared": dict(expert_hidden=(4, 8, 8, 12, 12, 12, 20, 20), n_groups=2, topk_groups=1,
                                  group_router="learned", num_shared_experts=1, shared_expert_hidden=6),
}


def _layer(seed=0, **options):
    torch.manual_seed(seed)
    opts = dict(num_experts=8, top_k=2, expert_hidden=12)
    opts.update(options)
    layer = MoE(d_model=D, vocab_size=V, **opts).double()
    with torch.no_grad():                           # gates large enough that relu routes sparsely
        layer.router._parameters.get("gate", torch.zeros(1)).mul_(10)
    return layer


def _grads(y, g, tensors):
    return torch.autograd.grad((y * g).sum(), tensors, allow_unused=True)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_router_matches_per_token_reference_forward_and_gradients(name, training):
    layer = _layer(**CASES[name])
    layer.train(training)
    B, T = 3, 6
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B * T,))
    torch.manual_seed(5)
    out = layer(x, token_ids=ids)
    torch.manual_seed(5)
    u = torch.rand(B * T, 8, dtype=torch.float64)          # the uniforms reinforce draws
    ref = reference_moe(layer, x.view(-1, D), token_ids=ids, group_size=T, u_NE=u).view(B, T, D)
    torch.testing.assert_close(out.output, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(ref)
    params = [x] + list(layer.parameters())
    for a, b in zip(_grads(out.output, g, params), _grads(ref, g, params)):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_sinkhorn_with_capacity_matches_the_layers_own_reference():
    layer = _layer(router="sinkhorn", capacity_factor=1.0)
    x = torch.randn(40, D, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.stats.tokens_per_expert.max() <= 10               # capacity 40 * 2 / 8
    torch.testing.assert_close(out.output, layer.reference_forward(x), rtol=1e-10, atol=1e-12)


# ---- hash ------------------------------------------------------------------------------------

def test_hash_routing_is_a_fixed_function_of_the_token_id():
    layer = _layer(router="hash")
    ids = torch.tensor([3, 7, 3, 11, 7, 3])
    a = layer(torch.randn(6, D, dtype=torch.float64), token_ids=ids).stats.expert_ids
    b = layer(torch.randn(6, D, dtype=torch.float64), token_ids=ids).stats.expert_ids
    assert torch.equal(a, b)                                   # other inputs, same tokens
    assert torch.equal(a[0], a[2]) and torch.equal(a[0], a[5]) and torch.equal(a[1], a[4])
    assert torch.equal(a, layer.router.hash_table[ids].long())
    assert layer.to(torch.bfloat16).router.hash_table.dtype == torch.float32   # ids are never rounded
    assert (a[:, 0] != a[:, 1]).all()                         # two distinct experts per token
    assert not hasattr(layer.router, "gate")                  # nothing learned in the router
    with pytest.raises(ValueError, match="token id"):
        layer(torch.randn(6, D, dtype=torch.float64))


def test_balanced_hash_table_gives_equal_loads_on_its_fitting_corpus(tmp_path, monkeypatch):
    from moelab.config import DataConfig
    from moelab.data import prepare_data
    from moelab.model.moe.hash_table import balanced_hash_table, hash_loads, token_counts
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    data = prepare_data(DataConfig(max_bytes=600_000), 512, log=lambda m: None)
    for E, K in [(8, 1), (8, 2), (16, 4)]:
        table = balanced_hash_table(token_counts(data.train_tokens, 512), E, K)
        loads = hash_loads(table, data.train_tokens, E).double()
        assert (loads / loads.mean() - 1).abs().max() < 0.05, (E, K, loads.tolist())
        assert (table.sort(dim=1).values.diff(dim=1) > 0).all()      # K distinct experts per id
    # a random table on the same corpus is not balanced to that degree
    random = torch.rand(512, 8).topk(2, dim=-1).indices
    loads = hash_loads(random, data.train_tokens, 8).double()
    assert (loads / loads.mean() - 1).abs().max() > 0.05


def test_hash_transformer_routes_by_the_tokens_it_embeds():
    cfg = moelab.resolve_config("hash-moe", ["model.d_model=32", "model.n_heads=2", "model.n_layers=2",
                                             "model.vocab_size=64", "model.moe.expert_hidden=16"]).model
    model = Transformer(cfg).double()
    tokens = torch.randint(0, 64, (2, 9))
    out = model(tokens)
    for s, moe in zip(out.router_stats, model.moe_layers()):
        assert torch.equal(s.expert_ids, moe.router.hash_table[tokens.flatten()].long())


# ---- expert choice ---------------------------------------------------------------------------

def test_expert_choice_gives_every_expert_exactly_its_capacity():
    for factor, k, T in [(1.0, 2, 16), (2.0, 1, 10), (0.5, 2, 12)]:
        layer = _layer(router="expert_choice", capacity_factor=factor, top_k=k)
        x = torch.randn(3, T, D, dtype=torch.float64)
        out = layer(x)
        C = min(T, -(-int(factor * T * k) // 8))
        assert out.stats.tokens_per_expert.tolist() == [3 * C] * 8
        # within each sequence: the C tokens an expert took are its C best-scoring ones
        probs = torch.softmax(x @ layer.router.gate.T, dim=-1)                  # (B, T, E)
        mask = out.stats.expert_mask.view(3, T, -1)
        ids = out.stats.expert_ids.view(3, T, -1)
        for b in range(3):
            taken = torch.zeros(T, 8, dtype=torch.bool)
            for t in range(T):
                taken[t, ids[b, t][mask[b, t]]] = True
            for e in range(8):
                assert set(torch.nonzero(taken[:, e]).flatten().tolist()) == \
                    set(probs[b, :, e].topk(C).indices.tolist())


def test_expert_choice_is_refused_in_a_causal_model_and_builds_in_an_encoder():
    with pytest.raises(ConfigError, match=r"model\.moe\.router = 'expert_choice' .*model\.causal = false"):
        moelab.resolve_config("bert-ec", ["model.causal=true", "train.objective=clm"])
    cfg = moelab.resolve_config("bert-ec", ["model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
                                            "model.moe.expert_hidden=16"])
    out = Transformer(cfg.model)(torch.randint(0, 64, (2, 8)))
    assert out.logits.shape == (2, 8, 64)


# ---- sinkhorn --------------------------------------------------------------------------------

def test_sinkhorn_balances_a_skewed_batch_that_top_k_piles_onto_one_expert():
    """A router that has drifted toward some experts: every token's logits carry the same
    per-expert offsets (through one constant input feature) on top of token-dependent scores.
    Sinkhorn equalises the soft column totals exactly; the hard top-k loads follow closely (not
    exactly: see docs/routers.md)."""
    for seed in range(3):
        torch.manual_seed(seed)
        layer = MoE(d_model=64, num_experts=8, top_k=2, expert_hidden=8, router="sinkhorn")
        x = torch.randn(4096, 64)
        x[:, 0] = 1.0
        with torch.no_grad():
            layer.router.gate.normal_(std=0.16)
            layer.router.gate[:, 0] = torch.tensor([3.0, 2.5, 1.0, 0.0, 0.0, -1.0, -1.0, -2.0])
        layer.eval()                                   # inference: plain top-k
        skewed = layer(x).stats.tokens_per_expert.double()
        layer.train()                                  # training: the Sinkhorn-balanced assignment
        balanced = layer(x).stats.tokens_per_expert.double()
        assert skewed.max() / skewed.mean() > 3 and skewed.min() / skewed.mean() < 0.05
        assert (balanced / balanced.mean() - 1).abs().max() < 0.10, balanced.tolist()


# ---- reinforce -------------------------------------------------------------------------------

def test_reinforce_router_learns_only_from_the_policy_gradient_and_the_balance_loss():
    layer = _layer(router="reinforce", aux_loss_coef=0.01)
    layer.train()
    x = torch.randn(24, D, dtype=torch.float64)
    out = layer(x)
    gate = layer.router.gate
    # the layer's output (the combine weights included) carries no gradient to the router
    (g_out,) = torch.autograd.grad((out.output * torch.randn_like(out.output)).sum(), [gate], allow_unused=True,
                                   retain_graph=True)
    assert g_out is None or not g_out.any()
    # the balancing loss does, and so does the policy-gradient term
    (g_aux,) = torch.autograd.grad(out.aux_loss, [gate], retain_graph=True)
    assert g_aux.abs().sum() > 0
    token_loss = torch.rand(24, dtype=torch.float64) * 5
    policy = layer.router.policy_loss(out.stats.policy_logprob, token_loss)
    (g_pg,) = torch.autograd.grad(policy, [gate])
    assert g_pg.abs().sum() > 0
    # and that term is reinforce_coef * mean((loss - baseline) * log pi), baseline = batch mean
    torch.manual_seed(11)
    out = layer(x)
    torch.manual_seed(11)
    u = torch.rand(24, 8, dtype=torch.float64)
    _, ref_logprob = reinforce_choices(layer, x, u)
    torch.testing.assert_close(out.stats.policy_logprob, ref_logprob)
    expected = layer.cfg.reinforce_coef * ((token_loss - token_loss.mean()) * ref_logprob).mean()
    torch.testing.assert_close(layer.router.policy_loss(out.stats.policy_logprob, token_loss), expected)


def test_reinforce_baseline_follows_the_losses_and_inference_is_greedy():
    layer = _layer(router="reinforce", reinforce_baseline_decay=0.5)
    layer.train()
    x = torch.randn(10, D, dtype=torch.float64)
    lp = layer(x).stats.policy_logprob
    layer.router.policy_loss(lp, torch.full((10,), 4.0, dtype=torch.float64))
    layer.router.update_bias()
    assert layer.router.loss_baseline.item() == pytest.approx(4.0)       # first step: the mean
    layer.router.policy_loss(lp, torch.full((10,), 2.0, dtype=torch.float64))
    layer.router.update_bias()
    assert layer.router.loss_baseline.item() == pytest.approx(3.0)       # 0.5 * 4 + 0.5 * 2
    layer.eval()
    out = layer(x)
    probs = torch.softmax(x @ layer.router.gate.T, dim=-1)
    assert torch.equal(out.stats.expert_ids, probs.topk(2).indices) and out.stats.policy_logprob is None


def test_plackett_luce_log_probabilities_sum_to_one_over_all_ordered_draws():
    logp = torch.log_softmax(torch.randn(1, 4, dtype=torch.float64), dim=-1)
    draws = torch.tensor([[a, b] for a in range(4) for b in range(4) if a != b])
    total = plackett_luce_logprob(logp.expand(len(draws), 4), draws).exp().sum()
    assert total.item() == pytest.approx(1.0)


# ---- relu ------------------------------------------------------------------------------------

def test_relu_router_reports_active_experts_and_adapts_its_l1_coefficient():
    layer = _layer(router="relu", top_k=2, relu_l1_factor=2.0)
    layer.train()
    out = layer(torch.randn(50, D, dtype=torch.float64))
    active = out.stats.expert_mask.sum(-1).double()
    m = out.stats.metrics
    assert m["active_experts_mean"].item() == pytest.approx(active.mean().item())
    assert m["zero_expert_fraction"].item() == pytest.approx((active == 0).double().mean().item())
    assert m["active_experts_p95"].item() == pytest.approx(torch.quantile(active, 0.95).item())
    before = layer.router.l1_coef.item()
    adapt_relu_l1([layer.router])
    # about half of 8 random gates are positive: above the target of 2, so the coefficient doubles
    assert active.mean() > 2 and layer.router.l1_coef.item() == pytest.approx(2 * before)
    assert "l1_loss" in out.stats.losses and out.aux_loss.requires_grad


# ---- heterogeneous experts -------------------------------------------------------------------

def test_heterogeneous_experts_run_one_grouped_engine_per_width():
    layer = _layer(**CASES["hetero"])
    assert [g.hidden for g in layer.experts.groups] == [4, 8, 12, 20]
    assert [g.num_experts for g in layer.experts.groups] == [2, 2, 2, 2]
    x = torch.randn(30, D, dtype=torch.float64, requires_grad=True)
    # the unfused call (permute -> experts -> unpermute), as expert parallelism would make it
    from moelab.model.moe.dispatch import permute, plan_dispatch, unpermute
    routing = layer.router(x)
    plan = plan_dispatch(routing, 8)
    y = unpermute(layer.experts(permute(x, plan), plan.counts_E), plan)
    torch.testing.assert_close(y, layer.experts.forward_dispatched(x, plan))


@pytest.mark.parametrize("overrides", [
    ["model.moe.expert_hidden=[16, 16, 32, 32, 48, 48, 96, 96]"],
    ["model.moe.expert_hidden=[16, 32, 48, 96, 16, 32, 48, 96]", "model.moe.num_shared_experts=1",
     "model.moe.shared_expert_hidden=32", "model.moe.every=2"],
    ["model.moe.router=hash"], ["model.moe.router=relu"], ["model.moe.router=noisy"],
    ["model.moe.n_groups=4", "model.moe.topk_groups=2", "model.moe.group_router=learned"],
])
def test_accounting_equals_counted_parameters(overrides):
    cfg = moelab.resolve_config("moe", ["model.d_model=32", "model.n_heads=2", "model.n_layers=2",
                                        "model.vocab_size=64", "model.moe.expert_hidden=48"] + overrides).model
    model = Transformer(cfg)
    assert param_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_heterogeneous_active_parameters_are_an_expectation_labelled_as_such():
    from moelab.accounting import describe, measured_active
    cfg = moelab.resolve_config("hetero-moe").model
    moe = moelab.resolve_config("moe").model
    info = describe(cfg)
    assert info["total_params"] == describe(moe)["total_params"]           # same total as `moe`
    assert info["active_params"] == describe(moe)["active_params"]         # uniform-routing expectation
    assert "uniform routing" in info["active_basis"]
    # all of a layer's assignments on the two narrowest experts: 2 x 3 x 256 x 128 per token
    narrow = {layer: [1.0, 1.0, 0, 0, 0, 0, 0, 0] for layer in range(4)}
    m = measured_active(cfg, narrow, tokens=1)
    routed_uniform = 2 * 3 * 256 * 384
    assert m["active_params"] == info["active_params"] - 4 * (routed_uniform - 2 * 3 * 256 * 128)
    assert m["flops_per_token"] == info["flops_per_token"] - 2 * 4 * (routed_uniform - 2 * 3 * 256 * 128)
    assert "measured" in m["basis"]


# ---- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("preset,override,field,words", [
    ("hash-moe", "model.moe.z_loss_coef=0.001", "model.moe.z_loss_coef", "router 'hash'"),
    ("hash-moe", "model.moe.n_groups=2", "model.moe.n_groups", "router 'hash'"),
    ("remoe", "model.moe.capacity_factor=1.0", "model.moe.capacity_factor", "dropless"),
    ("remoe", "model.moe.relu_l1_factor=1.0", "model.moe.relu_l1_factor", "> 1"),
    ("sbase-moe", "model.moe.bias_update_rate=0.001", "model.moe.bias_update_rate", "router 'sinkhorn'"),
    ("sbase-moe", "model.moe.sinkhorn_iters=0", "model.moe.sinkhorn_iters", ">= 1"),
    ("reinforce-moe", "model.moe.reinforce_baseline_decay=1.0", "model.moe.reinforce_baseline_decay", "[0, 1)"),
    ("moe", "model.moe.group_router='learned'", "model.moe.group_router", "n_groups >= 2"),
    ("moe", "model.moe.size_penalty_coef=0.01", "model.moe.size_penalty_coef", "list"),
    ("hetero-moe", "model.moe.num_experts=4", "model.moe.expert_hidden", "one width per routed expert"),
    ("hetero-moe", "model.moe.num_shared_experts=1", "model.moe.shared_expert_hidden", "must be set"),
    ("hetero-moe", "parallel.ep=2", "parallel.ep", "heterogeneous"),
    ("bert-ec", "model.moe.size_penalty_coef=0.1", "model.moe.size_penalty_coef", "expert choice"),
    ("hetero-moe", "model.moe.expert_hidden=[8, 8, 8, 0, 8, 8, 8, 8]", "model.moe.expert_hidden[3]", "> 0"),
])
def test_meaningless_compositions_are_refused_by_name(preset, override, field, words):
    with pytest.raises(ConfigError) as err:
        moelab.resolve_config(preset, [override])
    assert field in str(err.value) and words in str(err.value)


def test_reinforce_is_refused_in_an_encoder():
    with pytest.raises(ConfigError, match=r"model\.moe\.router = 'reinforce' .*decoder"):
        moelab.resolve_config("bert-moe", ["model.moe.router=reinforce"])


def test_presets_of_issue_27_hold_moe_active_parameters():
    base = param_counts(moelab.resolve_config("moe").model)
    for name in ("hash-moe", "sbase-moe", "reinforce-moe", "remoe", "hetero-moe"):
        counts = param_counts(moelab.resolve_config(name).model)
        assert abs(counts["active"] / base["active"] - 1) < 0.01, name
    assert param_counts(moelab.resolve_config("hetero-moe").model)["total"] == base["total"]
    ec, topk = (param_counts(moelab.resolve_config(p).model) for p in ("bert-ec", "bert-moe"))
    assert ec == topk


# ---------------------------------------------------------------------------------------------
# inference: MoE.infer routes as forward does at evaluation; cached decoding equals a full forward
# ---------------------------------------------------------------------------------------------

DECODABLE = [name for name in CASES if not name.startswith("expert_choice")]


@pytest.mark.parametrize("name", DECODABLE)
@pytest.mark.parametrize("n_tokens", [1, 6])
def test_infer_equals_forward_at_evaluation(name, n_tokens):
    """One token (the one_token engine) and several (dispatched), every decodable router kind."""
    layer = _layer(**CASES[name]).eval()
    x = torch.randn(n_tokens, D, dtype=torch.float64)
    ids = torch.randint(0, V, (n_tokens,))
    layer.router.token_ids = ids                         # what a Transformer's embedding hands over
    with torch.no_grad():
        want = layer(x, token_ids=ids)
        got, experts = layer.infer(x)
    torch.testing.assert_close(got, want.output, rtol=1e-12, atol=1e-12)
    if want.stats.expert_mask is not None:               # relu: the used experts, -1 past them
        assert torch.equal(experts, want.stats.expert_ids.masked_fill(~want.stats.expert_mask, -1))
    else:
        assert torch.equal(experts, want.stats.expert_ids)


@pytest.mark.parametrize("preset", ["hash-moe", "sbase-moe", "reinforce-moe", "remoe", "hetero-moe"])
def test_cached_generation_equals_the_full_forward(preset):
    """Built on meta and materialised as training builds it, then greedy decoding with the cache:
    every generated token is the argmax of a full forward over the sequence so far."""
    import moelab.generate  # noqa: F401  (adds Transformer.generate)
    from moelab.model.weights import build_on_meta, materialize
    sets = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
            "model.max_seq_len=32", "model.ffn_hidden=64", "model.moe.expert_hidden=32"]
    if preset == "hetero-moe":
        sets[-1] = "model.moe.expert_hidden=[8, 8, 16, 16, 32, 32, 64, 80]"
    cfg = moelab.resolve_config(preset, sets).model
    torch.manual_seed(0)
    model = materialize(build_on_meta(cfg)).eval()
    if preset == "remoe":
        assert all(float(m.router.l1_coef) == cfg.moe.relu_l1_coef for m in model.moe_layers())
    if preset == "hash-moe":
        tables = [m.router.hash_table for m in model.moe_layers()]
        assert all(torch.equal(t, tables[0]) for t in tables) and len(set(tables[0][:, 0].tolist())) > 1
    prompt = torch.tensor([[5, 17, 33, 2, 9], [1, 2, 3, 4, 5]])
    gen = model.generate(prompt, max_new_tokens=5, temperature=0, trace_experts=True)
    for b in range(2):
        seq = torch.cat([prompt[b:b + 1], torch.tensor([gen.tokens[b]])], dim=1)
        with torch.no_grad():
            logits = model(seq).logits[0]
        assert gen.tokens[b] == logits[4:-1].argmax(-1).tolist()
        assert all(0 <= e < 8 for step in gen.experts[b] for layer in step for e in layer)
