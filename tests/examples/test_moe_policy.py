"""examples/moe_policy.py and examples/ppo.py: the --quick run a user would type, the layer the
policy network uses, the harder task, PPO's advantage arithmetic and its determinism."""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.model.ffn import SwiGLU

import moe_policy
import ppo


@pytest.fixture(scope="module")
def quick(run_example, tmp_path_factory):
    """``python examples/moe_policy.py --quick --steps 4096 --json F`` (CartPole-v1), run once."""
    folder = tmp_path_factory.mktemp("policy_quick")
    # --quick with half its steps keeps CI short; tests/examples/test_vit_moe.py runs its --quick as is
    args = ["--quick", "--steps", "4096", "--png", str(folder / "curves.png")]
    results, stdout = run_example("moe_policy.py", args, folder)
    return results, stdout, folder


@pytest.mark.slow   # the example's --quick run at 4096 steps: ~15 s of CPU
def test_quick_run_reports_finite_returns_with_the_documented_keys(quick):
    results, stdout, folder = quick
    assert set(results) == {"dense", "moe"}
    for name in ("dense", "moe"):
        r = results[name]
        for key in ("final_return_mean", "final_return_sd", "total_params", "active_params"):
            assert key in r, f"{name} lacks {key}"
            assert math.isfinite(r[key])
        assert r["env"] == "CartPole-v1"
        assert len(r["final_returns"]) == 3                    # three seeds
        # CartPole pays 1 per step, at most 500 steps
        assert all(1.0 <= x <= 500.0 for x in r["final_returns"])
        curve = r["curve"]
        assert len(curve["env_steps"]) == len(curve["return_mean"]) == len(curve["return_sd"]) > 0
        assert all(lo <= m <= hi for lo, m, hi in zip(curve["return_min"], curve["return_mean"], curve["return_max"]))
    dense, moe = results["dense"], results["moe"]
    assert dense["active_params"] == dense["total_params"] < moe["total_params"]
    # matched: active MoE = the dense network + one router (E x W) in each of actor and critic
    cfg = moe_policy.PolicyConfig()
    assert moe["active_params"] == dense["active_params"] + 2 * cfg.num_experts * cfg.width
    assert (folder / "curves.png").stat().st_size > 10_000
    assert "final return" in stdout


def test_the_penultimate_layer_is_moelab_moe():
    agent = moe_policy.build_agent("CartPole-v1", moe_policy.PolicyConfig(moe=True))
    for tower in (agent.actor, agent.critic):
        layer = tower.penultimate
        assert type(layer) is moelab.MoE
        assert layer.cfg.expert_hidden * layer.cfg.top_k == moe_policy.PolicyConfig().ffn_hidden
    dense = moe_policy.build_agent("CartPole-v1", moe_policy.PolicyConfig(moe=False))
    assert type(dense.actor.penultimate) is SwiGLU
    assert not any(isinstance(m, moelab.MoE) for m in dense.modules())


def test_acrobot_trains_and_is_scored_by_its_own_returns(one_thread):
    """The harder task runs end to end (one PPO update); Acrobot pays -1 per step until the swing-up."""
    cfg = ppo.PPOConfig(total_steps=1024, eval_episodes=2)
    run = moe_policy.run_seed("Acrobot-v1", moe_policy.PolicyConfig(moe=True), cfg, seed=0)
    assert -500.0 <= run.final_return <= 0.0


def test_gae_equals_the_discounted_sum_when_lambda_is_one():
    """With lambda = 1, the advantage is the discounted return (bootstrapped from the last value,
    cut at an episode's end) minus the value: checked against a plain loop."""
    torch.manual_seed(0)
    S, V, gamma = 6, 2, 0.9
    rew, value, next_value = torch.randn(S, V), torch.randn(S, V), torch.randn(V)
    done = torch.zeros(S, V)
    done[2, 0] = 1.0                                   # env 0's episode ends at step 2
    adv, ret = ppo.gae(rew, value, done, next_value, gamma, lam=1.0)
    for v in range(V):
        for s in range(S):
            g, discount = 0.0, 1.0
            for t in range(s, S):
                g += discount * float(rew[t, v])
                discount *= gamma
                if done[t, v]:
                    discount = 0.0
                    break
            g += discount * float(next_value[v])
            assert ret[s, v].item() == pytest.approx(g, abs=1e-5)
            assert adv[s, v].item() == pytest.approx(g - float(value[s, v]), abs=1e-5)


def test_same_seed_same_training(one_thread):
    cfg = ppo.PPOConfig(total_steps=1024, eval_episodes=2)
    runs = [moe_policy.run_seed("CartPole-v1", moe_policy.PolicyConfig(moe=True), cfg, seed=3)
            for _ in range(2)]
    assert runs[0].episodes == runs[1].episodes
    assert runs[0].final_return == runs[1].final_return


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1"], "--seeds = 1 is invalid"),
    (["--steps", "10"], "--steps = 10 is invalid"),
    (["--env", "Pong-v5"], "invalid choice"),
])
def test_bad_options_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        moe_policy.parse_args(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
