"""Proximal Policy Optimization (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms") in plain torch, short enough to read in one sitting: vectorised gymnasium
environments, GAE(lambda) advantages (Schulman et al. 2016), the clipped surrogate, a value loss,
an entropy bonus, and whatever auxiliary loss the network returns (an MoE's balance loss).

Seeded and deterministic on CPU: the environments are seeded once at reset, actions are sampled
from torch's global generator, minibatches come from a generator of their own.

Legend: S rollout steps, V parallel environments, O observation size, A actions, M minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from torch import nn


@dataclass(frozen=True, kw_only=True)
class PPOConfig:
    total_steps: int = 100_000     # environment steps, summed over the V environments
    num_envs: int = 8
    rollout_steps: int = 128       # steps per environment between updates
    update_epochs: int = 4
    minibatches: int = 4
    lr: float = 1e-3               # annealed linearly to 0
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    eval_episodes: int = 10        # greedy episodes after training, for the final return


@dataclass
class AgentOutput:
    logits: torch.Tensor      # (B, A)
    value: torch.Tensor       # (B,)
    aux_loss: torch.Tensor    # scalar, added to the PPO loss as it is (already weighted)


class Agent(Protocol):
    def __call__(self, obs: torch.Tensor) -> AgentOutput: ...


@dataclass
class TrainResult:
    episodes: list[tuple[int, float]]   # (environment steps when it ended, episode return)
    final_return: float                 # mean return of the greedy policy over eval_episodes


def make_envs(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """V copies of ``env_id`` that reset themselves in the step an episode ends ("same step"
    autoreset: the returned observation is already the next episode's first one, and the last
    observation of the finished episode is in ``info["final_obs"]``)."""
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    return RecordEpisodeStatistics(envs)


def _obs(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


def train(agent: nn.Module, env_id: str, cfg: PPOConfig, seed: int) -> TrainResult:
    """Train ``agent`` (which maps observations to ``AgentOutput``) with PPO; returns every
    finished training episode and the greedy policy's final return."""
    envs = make_envs(env_id, cfg.num_envs)
    V, S = cfg.num_envs, cfg.rollout_steps
    batch = V * S
    updates = max(1, cfg.total_steps // batch)
    opt = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)
    shuffle = torch.Generator().manual_seed(seed)

    obs_SVO = torch.zeros((S, V) + envs.single_observation_space.shape)
    act_SV = torch.zeros((S, V), dtype=torch.long)
    logp_SV, rew_SV, done_SV, value_SV = (torch.zeros((S, V)) for _ in range(4))

    episodes: list[tuple[int, float]] = []
    obs_VO = _obs(envs.reset(seed=seed)[0])
    step = 0
    for update in range(updates):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * (1.0 - update / updates)
        # ---- rollout: S steps in each of the V environments
        for s in range(S):
            with torch.no_grad():
                out = agent(obs_VO)
                dist = torch.distributions.Categorical(logits=out.logits)
                action_V = dist.sample()
            obs_SVO[s], act_SV[s], value_SV[s] = obs_VO, action_V, out.value
            logp_SV[s] = dist.log_prob(action_V)
            next_obs, reward, terminated, truncated, info = envs.step(action_V.numpy())
            step += V
            reward_V = torch.as_tensor(reward, dtype=torch.float32)
            # a time limit is not a failure: bootstrap from the value of the state it cut off
            # (Pardo et al. 2018, "Time Limits in Reinforcement Learning")
            cut = truncated & ~terminated
            if cut.any():
                final_obs = _obs(np.stack([info["final_obs"][i] for i in np.flatnonzero(cut)]))
                with torch.no_grad():
                    reward_V[torch.as_tensor(cut)] += cfg.gamma * agent(final_obs).value
            rew_SV[s] = reward_V
            done_SV[s] = torch.as_tensor(terminated | truncated, dtype=torch.float32)
            if "episode" in info:
                for i in np.flatnonzero(info["_episode"]):
                    episodes.append((step, float(info["episode"]["r"][i])))
            obs_VO = _obs(next_obs)
        with torch.no_grad():
            next_value_V = agent(obs_VO).value
        adv_SV, ret_SV = gae(rew_SV, value_SV, done_SV, next_value_V, cfg.gamma, cfg.gae_lambda)

        # ---- update: a few epochs of minibatch steps on the clipped surrogate
        flat = lambda t: t.reshape(batch, *t.shape[2:])
        b_obs, b_act, b_logp, b_adv, b_ret = map(flat, (obs_SVO, act_SV, logp_SV, adv_SV, ret_SV))
        for _ in range(cfg.update_epochs):
            for idx_M in torch.randperm(batch, generator=shuffle).chunk(cfg.minibatches):
                loss = ppo_loss(agent(b_obs[idx_M]), b_act[idx_M], b_logp[idx_M], b_adv[idx_M],
                                b_ret[idx_M], cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                opt.step()
    envs.close()
    return TrainResult(episodes, evaluate(agent, env_id, cfg.eval_episodes, seed=10_000 + seed))


def gae(rew_SV: torch.Tensor, value_SV: torch.Tensor, done_SV: torch.Tensor, next_value_V: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and value targets, (S, V) each. ``done_SV[s]`` marks that
    the episode ended at step s, so step s + 1 belongs to a new episode and is not bootstrapped."""
    S = rew_SV.shape[0]
    adv_SV = torch.zeros_like(rew_SV)
    last_V = torch.zeros_like(next_value_V)
    for s in reversed(range(S)):
        next_V = next_value_V if s == S - 1 else value_SV[s + 1]
        live_V = 1.0 - done_SV[s]
        delta_V = rew_SV[s] + gamma * next_V * live_V - value_SV[s]
        last_V = delta_V + gamma * lam * live_V * last_V
        adv_SV[s] = last_V
    return adv_SV, adv_SV + value_SV


def ppo_loss(out: AgentOutput, act_M: torch.Tensor, old_logp_M: torch.Tensor, adv_M: torch.Tensor,
             ret_M: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
    """Clipped surrogate + vf_coef * value MSE - ent_coef * entropy + the network's aux loss."""
    dist = torch.distributions.Categorical(logits=out.logits)
    ratio_M = (dist.log_prob(act_M) - old_logp_M).exp()
    adv_M = (adv_M - adv_M.mean()) / (adv_M.std() + 1e-8)
    surrogate = torch.min(ratio_M * adv_M, ratio_M.clamp(1 - cfg.clip, 1 + cfg.clip) * adv_M).mean()
    value_loss = 0.5 * (out.value - ret_M).pow(2).mean()
    return -surrogate + cfg.vf_coef * value_loss - cfg.ent_coef * dist.entropy().mean() + out.aux_loss


@torch.no_grad()
def evaluate(agent: nn.Module, env_id: str, episodes: int, seed: int) -> float:
    """Mean return of ``episodes`` greedy (argmax) episodes, one per parallel environment."""
    agent.eval()
    envs = make_envs(env_id, episodes)
    obs = _obs(envs.reset(seed=seed)[0])
    returns = np.zeros(episodes)
    running = np.ones(episodes, dtype=bool)
    while running.any():
        action = agent(obs).logits.argmax(-1).numpy()
        next_obs, reward, terminated, truncated, _ = envs.step(action)
        returns += reward * running
        running &= ~(terminated | truncated)
        obs = _obs(next_obs)
    envs.close()
    agent.train()
    return float(returns.mean())
