"""Run under torchrun by tests/parallel/test_scale.py: `torchrun ... scale_worker.py init JOBS.json OUT`.

For each job {"preset", "overrides"}: the trainer's model build (meta device, sharded, then each
rank fills its own shards from the replayed initial draws) against today's eager path (every rank
builds the whole model after ``torch.manual_seed``, then expert parallelism and FSDP2 cut it):
every local shard and the RNG state after the build must be equal bit for bit. Each rank writes
OUT.rank<R>.json with what it found and how many bytes of parameters it holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


class _Quiet:
    def info(self, message: str) -> None:
        pass

    warn = info


def _local(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor
    return {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def init(jobs_path: str, out: str) -> None:
    import moelab
    from moelab.model.transformer import Transformer
    from moelab.parallel.layout import plan_layout
    from moelab.parallel.runtime import start
    from moelab.train.trainer import _build_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for job in json.loads(Path(jobs_path).read_text()):
        cfg = moelab.resolve_config(job["preset"], job["overrides"])
        runtime = start(plan_layout(cfg, world, rank, rank), torch.device("cpu"))
        model = _build_model(cfg, runtime, None, _Quiet())
        new, new_rng = _local(model), torch.get_rng_state()
        torch.manual_seed(cfg.train.seed)
        eager = Transformer(cfg.model)
        eager_rng = torch.get_rng_state()
        full_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
        old = _local(start(plan_layout(cfg, world, rank, rank), torch.device("cpu")).wrap(eager))
        results[job["preset"]] = {
            "names_equal": sorted(new) == sorted(old),
            "unequal": [n for n in old if n in new and not torch.equal(new[n], old[n])],
            "rng_equal": bool(torch.equal(new_rng, eager_rng)),
            "local_bytes": sum(t.numel() * t.element_size() for t in new.values()),
            "full_bytes": full_bytes,
        }
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    {"init": init}[sys.argv[1]](*sys.argv[2:])
