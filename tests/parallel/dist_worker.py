"""Run under torchrun by the distributed tests: `torchrun ... dist_worker.py MODE ARGS`.

MODE "train JOBS.json": train each job {"preset", "overrides", "out"} in turn on every process.
MODE "dispatch OUT.json": the expert-parallel MoE layer against the one-process layer, forward and
backward, with ordinary routing and with every token forced onto rank 0's experts; and a sharded
checkpoint round trip that must give every rank its own experts back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def train_jobs(path: str) -> None:
    import moelab
    from moelab.train.trainer import train
    dist.init_process_group("gloo")     # one group for every job: the runtime joins it, keeps it
    for job in json.loads(Path(path).read_text()):
        cfg = moelab.resolve_config(job["preset"], job["overrides"])
        train(cfg, job["out"], show_progress=False, log=lambda m: None)
    dist.destroy_process_group()


def _layer(router: str):
    from moelab import MoE
    torch.manual_seed(0)
    opts = dict(router=router, aux_loss_coef=0.01)
    if router == "sigmoid":
        opts.update(routed_scaling=2.5, num_shared_experts=1, n_groups=2, topk_groups=1, group_score="max")
    return MoE(16, 4, 2, 24, **opts).double()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out)
    return out


def dispatch(out_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from moelab.parallel.comm import CommMeter
    from moelab.parallel.expert_parallel import shard_experts

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    results = {}
    for case in ("softmax", "sigmoid", "forced"):
        ref = _layer("softmax" if case == "softmax" else "sigmoid")
        if case == "forced":                    # every token picks experts 0 and 1: rank 0's
            ref.router.expert_bias.copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]))
        torch.manual_seed(1)
        x = torch.randn(2 * world, 8, 16, dtype=torch.float64)              # the global batch
        # one-process reference over the whole batch
        x_ref = x.clone().requires_grad_()
        out = ref(x_ref)
        (out.output.square().sum() + out.aux_loss).backward()
        # the same layer spread over the ranks: each takes its rows of the batch
        ep = _layer("softmax" if case == "softmax" else "sigmoid")
        ep.load_state_dict(ref.state_dict())
        meter = CommMeter()
        shard_experts(ep, mesh, meter)
        ep.count_reducer = _all_reduce_sum                  # global-batch balancing, as training does
        rows = slice(rank * 2, rank * 2 + 2)
        x_ep = x[rows].clone().requires_grad_()
        out_ep = ep(x_ep)
        # the sum over ranks of each rank's loss is the reference loss (aux loss: averaged)
        (out_ep.output.square().sum() + out_ep.aux_loss / world).backward()
        errs = {"output": (out_ep.output - out.output[rows]).abs().max().item(),
                "grad_x": (x_ep.grad - x_ref.grad[rows]).abs().max().item()}
        for name, p in ep.named_parameters():
            g = p.grad
            if isinstance(g, DTensor):                  # expert weights: this rank's slice
                g_ref = dict(ref.named_parameters())[name].grad.chunk(world)[rank]
                g = g.to_local()
            else:                                       # replicated: sum the ranks' parts
                g = g.clone()
                dist.all_reduce(g)
                g_ref = dict(ref.named_parameters())[name].grad
            errs[f"grad {name}"] = (g - g_ref).abs().max().item()
        sent = meter.take()
        errs["alltoall_bytes_with_local"] = sent["alltoall_bytes_with_local"]
        errs["tokens_per_expert"] = out_ep.stats.tokens_per_expert.tolist()
        results[case] = errs
    # capacity dropping with all tokens forced onto rank 0's experts: each rank drops over its
    # own capacity (as GShard does per group), so only finiteness is compared, not values
    layer = _layer("sigmoid")
    layer.router.expert_bias.copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]))
    layer.cfg = type(layer.cfg)(**{**layer.cfg.__dict__, "capacity_factor": 0.5})
    shard_experts(layer, mesh)
    x = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    (out.output.square().sum() + out.aux_loss).backward()
    finite = bool(torch.isfinite(out.output).all() and torch.isfinite(x.grad).all())
    results["capacity"] = {"finite": finite, "dropped": float(out.stats.dropped_fraction)}
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    from moelab.proc import exit_process, native_threads_outlive_interpreter
    mode, arg = sys.argv[1], sys.argv[2]
    {"train": train_jobs, "dispatch": dispatch}[mode](arg)
    native_threads_outlive_interpreter("gloo")     # end as `python -m moelab` does (issue 25)
    exit_process(0)
