"""An MoE policy network in deep RL: PPO whose actor and critic have a ``moelab.MoE`` as their
penultimate layer, against the same networks with a dense layer at equal active parameters
(after Obando-Ceron et al. 2024, "Mixtures of Experts Unlock Parameter Scaling for Deep RL",
which puts a soft or top-k MoE in the penultimate layer of DQN and Rainbow).

    python examples/moe_policy.py --env CartPole-v1    # 3 seeds each, curves + table + PNG
    python examples/moe_policy.py --env Acrobot-v1
    python examples/moe_policy.py --quick --json r.json

Network (actor and critic alike, separate weights): obs -> Linear(O, W) -> tanh -> penultimate
(SwiGLU of width H, or MoE of E SwiGLU experts of width H / top_k) -> tanh -> Linear head. A state
visits top_k experts, so it meets as many expert weights as the dense SwiGLU holds; the MoE adds
its router (E x W) to the active count.

Legend: B states, O observation size, W width, A actions.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

import moelab
from moelab.model.ffn import SwiGLU

from _shared import (mean_sd, param_counts, print_table, require_extra, save_figure, seed_everything,
                     write_json)

require_extra("gymnasium")
import ppo  # noqa: E402  (needs gymnasium)

ENVS = ("CartPole-v1", "Acrobot-v1")
# environment steps per seed in a full run: where PPO has about levelled off on these tasks
FULL_STEPS = {"CartPole-v1": 100_000, "Acrobot-v1": 150_000}
QUICK_STEPS = 8_192
CURVE_WINDOW = 10    # the learning curve is the mean of the last 10 finished training episodes


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    width: int = 64
    ffn_hidden: int = 128          # dense SwiGLU width; an expert gets ffn_hidden // top_k
    moe: bool = False
    num_experts: int = 8
    top_k: int = 2
    aux_loss_coef: float = 0.01    # Switch balance loss of the MoE layer


class Tower(nn.Module):
    """obs -> Linear -> tanh -> penultimate layer (dense SwiGLU or moelab.MoE) -> tanh -> head."""

    def __init__(self, obs_dim: int, out_dim: int, cfg: PolicyConfig, head_std: float):
        super().__init__()
        self.inp = nn.Linear(obs_dim, cfg.width)
        std = 1.0 / math.sqrt(cfg.width)   # one init for dense and MoE: normal(0, 1/sqrt(W))
        if cfg.moe:
            self.penultimate = moelab.MoE(cfg.width, num_experts=cfg.num_experts, top_k=cfg.top_k,
                                          expert_hidden=cfg.ffn_hidden // cfg.top_k,
                                          aux_loss_coef=cfg.aux_loss_coef, init_std=std)
        else:
            self.penultimate = SwiGLU(cfg.width, cfg.ffn_hidden)
            for w in (self.penultimate.gate_up.weight, self.penultimate.down.weight):
                nn.init.normal_(w, std=std)
        self.head = nn.Linear(cfg.width, out_dim)
        # PPO's usual orthogonal init (Engstrom et al. 2020): small policy head, unit value head
        nn.init.orthogonal_(self.inp.weight, gain=math.sqrt(2))
        nn.init.orthogonal_(self.head.weight, gain=head_std)
        nn.init.zeros_(self.inp.bias)
        nn.init.zeros_(self.head.bias)

    def forward(self, obs_BO: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_BW = torch.tanh(self.inp(obs_BO))
        if isinstance(self.penultimate, moelab.MoE):
            out = self.penultimate(h_BW)
            h_BW, aux = out.output, out.aux_loss
        else:
            h_BW, aux = self.penultimate(h_BW), h_BW.new_zeros(())
        return self.head(torch.tanh(h_BW)), aux


class ActorCritic(nn.Module):
    def __init__(self, obs_dim: int, num_actions: int, cfg: PolicyConfig):
        super().__init__()
        self.actor = Tower(obs_dim, num_actions, cfg, head_std=0.01)
        self.critic = Tower(obs_dim, 1, cfg, head_std=1.0)

    def forward(self, obs_BO: torch.Tensor) -> ppo.AgentOutput:
        logits_BA, actor_aux = self.actor(obs_BO)
        value_B1, critic_aux = self.critic(obs_BO)
        return ppo.AgentOutput(logits_BA, value_B1.squeeze(-1), actor_aux + critic_aux)


def build_agent(env_id: str, cfg: PolicyConfig) -> ActorCritic:
    envs = ppo.make_envs(env_id, 1)
    obs_dim, actions = envs.single_observation_space.shape[0], int(envs.single_action_space.n)
    envs.close()
    return ActorCritic(obs_dim, actions, cfg)


# ---------------------------------------------------------------- experiment
@dataclass
class SeedResult:
    episodes: list[tuple[int, float]]
    final_return: float
    train_seconds: float        # wall clock
    train_cpu_seconds: float    # this process's CPU time: steadier than wall time on a busy machine


def run_seed(env_id: str, cfg: PolicyConfig, ppo_cfg: ppo.PPOConfig, seed: int) -> SeedResult:
    seed_everything(seed)
    agent = build_agent(env_id, cfg)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = ppo.train(agent, env_id, ppo_cfg, seed)
    return SeedResult(result.episodes, result.final_return, time.perf_counter() - start,
                      time.process_time() - cpu_start)


def learning_curve(episodes: list[tuple[int, float]], steps: list[int]) -> list[float | None]:
    """At each step count: the mean return of the last CURVE_WINDOW episodes finished by then
    (None before the first one ends)."""
    ends = np.array([e[0] for e in episodes])
    returns = np.array([e[1] for e in episodes])
    curve = []
    for t in steps:
        done = returns[ends <= t]
        curve.append(float(done[-CURVE_WINDOW:].mean()) if len(done) else None)
    return curve


def summarise(runs: list[SeedResult], steps: list[int], agent: nn.Module, env_id: str,
              seeds: list[int]) -> dict:
    final_mean, final_sd = mean_sd([r.final_return for r in runs])
    curves = [learning_curve(r.episodes, steps) for r in runs]
    # keep the points where every seed has finished an episode, so the band is over all seeds
    keep = [i for i in range(len(steps)) if all(c[i] is not None for c in curves)]
    per_step = np.array([[c[i] for c in curves] for i in keep]).reshape(len(keep), len(runs))
    return {
        "env": env_id,
        "final_return_mean": final_mean,
        "final_return_sd": final_sd,
        "final_returns": [r.final_return for r in runs],
        "last_train_episodes_mean": float(np.mean([c[-1] for c in curves if c[-1] is not None])),
        "seeds": seeds,
        **param_counts(agent),
        "train_seconds_mean": mean_sd([r.train_seconds for r in runs])[0],
        "train_cpu_seconds_mean": mean_sd([r.train_cpu_seconds for r in runs])[0],
        "curve": {"env_steps": [steps[i] for i in keep],
                  "return_mean": per_step.mean(axis=1).tolist(),
                  "return_sd": per_step.std(axis=1, ddof=1).tolist(),
                  "return_min": per_step.min(axis=1).tolist(),
                  "return_max": per_step.max(axis=1).tolist()},
    }


def run_experiment(env_id: str, base: PolicyConfig, ppo_cfg: ppo.PPOConfig, seeds: list[int],
                   log=print) -> dict:
    """Dense vs MoE policy networks over ``seeds``, interleaved (dense, MoE, dense, ...) so that
    machine load falls on both alike."""
    configs = {"dense": replace(base, moe=False), "moe": replace(base, moe=True)}
    runs: dict[str, list[SeedResult]] = {name: [] for name in configs}
    for seed in seeds:
        for name, cfg in configs.items():
            r = run_seed(env_id, cfg, ppo_cfg, seed)
            runs[name].append(r)
            log(f"  {name:5s} seed {seed}: final return {r.final_return:8.1f} "
                f"({len(r.episodes)} training episodes, {r.train_seconds:.1f} s, "
                f"{r.train_cpu_seconds:.1f} s CPU)")
    batch = ppo_cfg.num_envs * ppo_cfg.rollout_steps
    steps = [batch * (u + 1) for u in range(max(1, ppo_cfg.total_steps // batch))]
    setup = {"policy": {k: v for k, v in asdict(base).items() if k != "moe"}, "ppo": asdict(ppo_cfg),
             "seeds": seeds,
             "final_return": f"mean return of {ppo_cfg.eval_episodes} greedy episodes after training",
             "matching": f"expert_hidden = ffn_hidden / top_k = {base.ffn_hidden} / {base.top_k}"}
    results = {}
    for name, cfg in configs.items():
        results[name] = summarise(runs[name], steps, build_agent(env_id, cfg), env_id, seeds)
        results[name]["setup"] = setup
    return results


# ---------------------------------------------------------------- report
def print_results(results: dict) -> None:
    rows = []
    for name in ("dense", "moe"):
        r = results[name]
        rows.append([name, f"{r['final_return_mean']:.1f} ± {r['final_return_sd']:.1f}",
                     f"{r['last_train_episodes_mean']:.1f}", f"{r['total_params']:,}",
                     f"{r['active_params']:,}", f"{r['train_seconds_mean']:.1f}",
                     f"{r['train_cpu_seconds_mean']:.1f}"])
    env, seeds = results["dense"]["env"], len(results["dense"]["seeds"])
    print_table(f"PPO on {env}: final return over {seeds} seeds (greedy policy, mean ± sd)",
                ["policy net", "final return", f"last {CURVE_WINDOW} train ep.", "total params",
                 "active params", "train s/seed", "CPU s/seed"], rows)


def plot_results(results: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, color in (("dense", "tab:gray"), ("moe", "tab:blue")):
        r = results[name]
        xs = np.array(r["curve"]["env_steps"])
        label = (f"{name}: {r['active_params']:,} active / {r['total_params']:,} total params")
        ax.plot(xs, r["curve"]["return_mean"], color=color, label=label)
        # the band spans the seeds (lowest to highest), so it never leaves the returns' range
        ax.fill_between(xs, r["curve"]["return_min"], r["curve"]["return_max"], color=color, alpha=0.2)
    seeds = len(results["dense"]["seeds"])
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"training return (last {CURVE_WINDOW} episodes)")
    ax.set_title(f"PPO on {results['dense']['env']}: mean over {seeds} seeds, band = min to max")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="CartPole-v1", choices=ENVS, help="gymnasium task (default CartPole-v1)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run for a smoke test ({QUICK_STEPS:,} steps per seed; about a minute "
                        "on 2 CPU cores)")
    p.add_argument("--steps", type=int, default=None,
                   help="environment steps per seed (default: " +
                        ", ".join(f"{e} {n:,}" for e, n in FULL_STEPS.items())
                        + f"; {QUICK_STEPS:,} with --quick)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per model (>= 2); default 3")
    p.add_argument("--experts", type=int, default=8, help="experts in the MoE layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per state (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these matrices are too small to share out)")
    p.add_argument("--json", metavar="FILE", help='write {"dense": {...}, "moe": {...}} here')
    p.add_argument("--png", metavar="FILE", default=None,
                   help="figure path (default runs/examples/moe_policy_<env>.png)")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error(f"--seeds = {args.seeds} is invalid: must be >= 2 (the table reports a standard deviation)")
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else FULL_STEPS[args.env]
    batch = ppo.PPOConfig().num_envs * ppo.PPOConfig().rollout_steps
    if args.steps < batch:
        p.error(f"--steps = {args.steps} is invalid: must be >= {batch} (one PPO rollout)")
    if args.threads < 1:
        p.error(f"--threads = {args.threads} is invalid: must be >= 1")
    if not 1 <= args.top_k <= args.experts:
        p.error(f"--top-k = {args.top_k} is invalid: must be in [1, --experts = {args.experts}]")
    if PolicyConfig().ffn_hidden % args.top_k:
        p.error(f"--top-k = {args.top_k} is invalid: must divide the dense width {PolicyConfig().ffn_hidden}")
    if args.png is None:
        args.png = f"runs/examples/moe_policy_{args.env}.png"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = PolicyConfig(num_experts=args.experts, top_k=args.top_k)
    ppo_cfg = ppo.PPOConfig(total_steps=args.steps)
    results = run_experiment(args.env, base, ppo_cfg, list(range(args.seeds)))
    print_results(results)
    plot_results(results, args.png)
    print(f"figure: {args.png}")
    if args.json:
        write_json(args.json, results)
        print(f"results: {args.json}")
    return results


if __name__ == "__main__":
    main()
