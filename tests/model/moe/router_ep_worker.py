"""Run under torchrun by test_router_ep.py: `torchrun ... router_ep_worker.py MODE ARG`.

MODE "layer OUT.json": each new router's MoE layer with its experts spread over the ranks
(expert parallelism) against the one-process layer on the whole batch, forward and backward.
MODE "train JOBS.json": train each job {"preset", "overrides", "out"} on every process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

CASES = {
    "hash": dict(router="hash", aux_loss_coef=0.0),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.0, aux_loss_coef=0.0),
    "sinkhorn": dict(router="sinkhorn", aux_loss_coef=0.0),
    "relu": dict(router="relu", aux_loss_coef=0.0),
    "learned_groups": dict(router="softmax", n_groups=2, topk_groups=1, group_router="learned"),
    "reinforce_eval": dict(router="reinforce"),
}


def _layer(case: str):
    from moelab import MoE
    torch.manual_seed(0)
    layer = MoE(16, 4, 2, 24, vocab_size=30, **CASES[case]).double()
    with torch.no_grad():
        if hasattr(layer.router, "gate"):
            layer.router.gate.mul_(10)               # relu: a sparse, token-dependent routing
    layer.train(case != "reinforce_eval")
    return layer


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out)
    return out


def layer(out_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from moelab.parallel.expert_parallel import shard_experts

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    results = {}
    for case in CASES:
        torch.manual_seed(1)
        x = torch.randn(2 * world, 8, 16, dtype=torch.float64)              # the global batch
        ids = torch.randint(0, 30, (2 * world, 8))
        ref = _layer(case)
        x_ref = x.clone().requires_grad_()
        out = ref(x_ref, token_ids=ids.flatten())
        (out.output.square().sum() + out.aux_loss).backward()
        ep = _layer(case)
        ep.load_state_dict(ref.state_dict())
        shard_experts(ep, mesh)
        ep.count_reducer = _all_reduce_sum                   # as the distributed runtime sets it
        rows = slice(rank * 2, rank * 2 + 2)
        x_ep = x[rows].clone().requires_grad_()
        out_ep = ep(x_ep, token_ids=ids[rows].flatten())
        (out_ep.output.square().sum() + out_ep.aux_loss / world).backward()
        errs = {"output": (out_ep.output - out.output[rows]).abs().max().item(),
                "grad_x": (x_ep.grad - x_ref.grad[rows]).abs().max().item(),
                # each rank's aux loss is over its own rows: their mean is the whole batch's
                "aux_loss": abs(_all_reduce_sum(out_ep.aux_loss.detach()).item() / world - out.aux_loss.item())}
        for name, p in ep.named_parameters():
            g = p.grad
            g_ref = dict(ref.named_parameters())[name].grad
            if g is None:
                errs[f"grad {name}"] = 0.0 if g_ref is None or not g_ref.any() else float("inf")
                continue
            if isinstance(g, DTensor):
                g_ref, g = g_ref.chunk(world)[rank], g.to_local()
            else:
                g = _all_reduce_sum(g)
            errs[f"grad {name}"] = (g - g_ref).abs().max().item()
        errs["tokens"] = _all_reduce_sum(out_ep.stats.tokens_per_expert).tolist()
        errs["tokens_ref"] = out.stats.tokens_per_expert.tolist()
        results[case] = errs
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def train_jobs(path: str) -> None:
    import moelab
    from moelab.train.trainer import train
    dist.init_process_group("gloo")
    for job in json.loads(Path(path).read_text()):
        cfg = moelab.resolve_config(job["preset"], job["overrides"])
        train(cfg, job["out"], show_progress=False, log=lambda m: None)
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, arg = sys.argv[1], sys.argv[2]
    {"layer": layer, "train": train_jobs}[mode](arg)
