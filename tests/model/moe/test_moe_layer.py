"""The MoE layer against its per-token reference, the dense FFN, and hand-computed values."""

import itertools

import pytest
import torch

from moelab import MoE
from moelab.config import ConfigError
from moelab.model.ffn import SwiGLU
from moelab.model.moe.router import Routing, capacity_keep_mask

ROUTERS = [
    dict(router="softmax"),
    dict(router="softmax", renormalize=False, top_k=1),                       # Switch
    dict(router="noisy"),
    dict(router="sigmoid", routed_scaling=2.5, bias_update_rate=0.01),        # DeepSeek-V3
    dict(router="softmax", n_groups=4, topk_groups=2),                        # DeepSeek-V2
    dict(router="sigmoid", n_groups=4, topk_groups=2, group_score="top2"),    # DeepSeek-V3
]
EXTRAS = [
    dict(),
    dict(capacity_factor=0.5),                                # forces drops
    dict(num_shared_experts=2, shared_expert_gate=True),
    dict(capacity_factor=1.0, drop_policy="score", num_shared_experts=1),
]


def _layer(seed=0, **options):
    torch.manual_seed(seed)
    opts = dict(num_experts=8, top_k=2, expert_hidden=12)
    opts.update(options)
    return MoE(d_model=16, **opts).double()


@pytest.mark.parametrize("router,extra", list(itertools.product(ROUTERS, EXTRAS)))
def test_fast_dispatch_matches_per_token_reference(router, extra):
    layer = _layer(**router, **extra)
    layer.train()
    # random shapes, and few tokens so that some experts get none
    for shape in [(3, 5, 16), (7, 16), (1, 16)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(1)
        out = layer(x)
        torch.manual_seed(1)
        ref = layer.reference_forward(x)
        assert out.output.shape == x.shape
        torch.testing.assert_close(out.output, ref, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(ref)
        grads = torch.autograd.grad((out.output * g).sum(), [x] + list(layer.parameters()), allow_unused=True)
        ref_grads = torch.autograd.grad((ref * g).sum(), [x] + list(layer.parameters()), allow_unused=True)
        for a, b in zip(grads, ref_grads):
            if a is None or b is None:
                assert (a is None or not a.any()) and (b is None or not b.any())
            else:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_experts_without_tokens_and_both_backends_agree():
    layer = _layer(num_experts=16, top_k=1).float()   # grouped_mm has no float64 kernel
    x = torch.randn(3, 16)
    layer.experts.backend = "loop"
    out = layer(x)
    assert int((out.stats.tokens_per_expert == 0).sum()) >= 13
    layer.experts.backend = "grouped_mm"
    torch.testing.assert_close(layer(x).output, out.output, rtol=1e-5, atol=1e-6)


def test_one_expert_top1_equals_dense_swiglu():
    layer = MoE(d_model=16, num_experts=1, top_k=1, expert_hidden=24).double()
    dense = SwiGLU(16, 24).double()
    with torch.no_grad():
        dense.gate_up.weight.copy_(layer.experts.w_gate_up[0])
        dense.down.weight.copy_(layer.experts.w_down[0])
    x = torch.randn(4, 6, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x).output
    ref = dense(x)
    torch.testing.assert_close(out, ref)
    gx, = torch.autograd.grad(out.sum(), x)
    gx_ref, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(gx, gx_ref)


def test_capacity_drops_later_choices_then_later_tokens():
    """position policy: all first choices outrank all second choices; then token order."""
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 2]])          # (N=4, K=2)
    weights = torch.tensor([[.6, .4], [.7, .3], [.5, .5], [.9, .1]])
    routing = Routing(ids, weights, torch.zeros(4, 3), torch.zeros(4, 3))
    keep = capacity_keep_mask(routing, num_experts=3, slots=2, policy="position")
    # expert 0: first choices of tokens 0,1,3 -> token 3's first choice is dropped (3rd in line),
    #           token 2's second choice dropped too.
    # expert 1: token 2 first choice, then second choices of token 0 (kept), token 1 (dropped).
    expected = torch.tensor([[True, True], [True, False], [True, False], [False, True]])
    assert torch.equal(keep, expected)
    keep_score = capacity_keep_mask(routing, num_experts=3, slots=2, policy="score")
    # expert 0 by weight: token3 .9, token1 .7, token0 .6, token2 .5 -> keep tokens 3 and 1
    # expert 1 by weight: token2 .5, token0 .4, token1 .3 -> keep tokens 2 and 0
    expected_score = torch.tensor([[False, True], [True, False], [True, False], [True, True]])
    assert torch.equal(keep_score, expected_score)


def test_dropped_token_keeps_only_residual_and_stats_report_it():
    layer = _layer(num_experts=4, top_k=1, capacity_factor=0.25)
    layer.train()
    x = torch.randn(16, 16, dtype=torch.float64)
    out = layer(x)
    kept = out.stats.tokens_per_expert.sum().item()
    assert kept <= 4 * 1  # capacity = ceil(.25 * 16 / 4) = 1 per expert
    assert out.stats.dropped_fraction.item() == pytest.approx(1 - kept / 16)
    zero_rows = (out.output.abs().sum(-1) == 0).sum().item()
    assert zero_rows == 16 - kept
    layer.eval()   # eval is dropless by default (eval_capacity_factor=None)
    assert layer(x).stats.dropped_fraction.item() == 0


def test_switch_balance_and_z_loss_on_hand_computed_inputs():
    from moelab.model.moe.losses import (
        expert_counts, router_z_loss, sequence_balance_loss, switch_balance_loss,
    )
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    ids = torch.tensor([[0], [1]])
    # f = [1/2, 1/2, 0], P = [0.4, 0.5, 0.1] -> 3 * (0.2 + 0.25) = 1.35
    assert switch_balance_loss(probs, expert_counts(ids, 3), 3).item() == pytest.approx(1.35)
    # counts from a larger (global) batch: f = [1/4, 3/4, 0] -> 3 * (0.1 + 0.375) = 1.425
    assert switch_balance_loss(probs, torch.tensor([1, 3, 0]), 3).item() == pytest.approx(1.425)
    uniform = torch.full((4, 4), 0.25)
    ids4 = torch.tensor([[0], [1], [2], [3]])
    assert switch_balance_loss(uniform, expert_counts(ids4, 4), 4).item() == pytest.approx(1.0)
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # logsumexp = [log 2, 1 + log 2]
    expected = ((torch.log(torch.tensor(2.0))) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected.item())
    # sequence loss: one sequence of 2 tokens, K=1, E=2 -> f = E/(K T) * counts = [1, 1]
    probs_bte = torch.tensor([[[0.9, 0.1], [0.3, 0.7]]])
    ids_btk = torch.tensor([[[0], [1]]])
    assert sequence_balance_loss(probs_bte, ids_btk, 2).item() == pytest.approx(0.6 + 0.4)


def test_aux_losses_are_returned_with_their_coefficients_not_added():
    layer = _layer(aux_loss_coef=0.5, z_loss_coef=0.25, seq_aux_loss_coef=2.0)
    layer.train()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out = layer(x)
    l = out.stats.losses
    expected = 0.5 * l["balance_loss"] + 0.25 * l["z_loss"] + 2.0 * l["seq_balance_loss"]
    assert out.aux_loss.item() == pytest.approx(expected.item())
    assert out.aux_loss.requires_grad


def test_bias_update_moves_load_toward_uniform():
    torch.manual_seed(0)
    layer = MoE(d_model=16, num_experts=8, top_k=2, expert_hidden=8, router="sigmoid",
                bias_update_rate=0.01, aux_loss_coef=0.0)
    with torch.no_grad():   # skew the router toward experts 0 and 1
        layer.router.gate[0] += 0.15
        layer.router.gate[1] += 0.15
    layer.train()
    probe = torch.randn(2048, 16)
    cv_before = layer(probe).stats.load_cv
    layer.router.load_seen.zero_()
    for _ in range(100):                 # fresh batches, as in training
        layer(torch.randn(512, 16))
        layer.router.update_bias()
    cv_after = layer(probe).stats.load_cv
    assert cv_after < 0.7 * cv_before      # 0.43 -> 0.25 here; without updates it stays
    assert layer.router.expert_bias[0] < 0 and layer.router.expert_bias[1] < 0


def test_router_stats_without_extra_pass():
    layer = _layer()
    out = layer(torch.randn(10, 16, dtype=torch.float64))
    s = out.stats
    assert s.tokens_per_expert.sum().item() == 20
    assert s.expert_ids.shape == (10, 2)
    assert 0 < s.entropy.item() <= torch.log(torch.tensor(8.0)).item() + 1e-6
    summary = s.summary()
    assert set(summary) >= {"load_cv", "max_over_mean", "dropped_fraction", "entropy"}
    assert summary["max_over_mean"] >= 1.0


@pytest.mark.parametrize("options,field", [
    (dict(top_k=9), "MoE.top_k"),
    (dict(capacity_factor=0.0), "MoE.capacity_factor"),
    (dict(capacity_factor=-1.0), "MoE.capacity_factor"),
    (dict(router="bogus"), "MoE.router"),
    (dict(expert_hidden=0), "MoE.expert_hidden"),
    (dict(n_groups=3), "MoE.n_groups"),
    (dict(top_kk=2), "top_k"),
])
def test_standalone_moe_rejects_bad_options(options, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MoE(d_model=16, **{"num_experts": 8, "expert_hidden": 8, "top_k": 2, **options})


def test_moe_works_in_a_non_lm_setting():
    """The layer is reusable outside the LM (a regression head, as in a vision or policy
    network): trained alone on a fixed random teacher it fits the target, and every expert
    learns (gets gradient and moves)."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32))
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = teacher(x)
    moe = MoE(d_model=32, num_experts=4, top_k=1, expert_hidden=32)
    start = moe.experts.w_gate_up.detach().clone()
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
    baseline = torch.nn.functional.mse_loss(torch.zeros_like(y), y).item()     # predicting 0
    for _ in range(300):
        out = moe(x)
        loss = torch.nn.functional.mse_loss(out.output, y) + out.aux_loss
        opt.zero_grad(); loss.backward(); opt.step()
    assert loss.item() < 0.3 * baseline
    moved = (moe.experts.w_gate_up.detach() - start).flatten(1).norm(dim=1)       # (E,)
    assert (moved > 0).all(), moved
