"""Training throughput and communication share, one process vs several (torch.distributed).

Runs real `moelab train` jobs (the CLI, as a user would: `--nproc N` starts torchrun) for
dense (FSDP2), MoE with ep=1 (FSDP2, experts sharded like any weight) and MoE with ep=2 (experts
split over the ranks, tokens exchanged by all-to-all), in rounds that alternate the variants, and
reads each run's metrics.jsonl: median step time, tokens/s, and the seconds per step spent in
all-to-all and FSDP collectives (the slowest rank's, as a share of the step).

On one 2-core CPU, 2 gloo processes share the same two cores that one process uses with two
threads: the ratio measures what distribution costs here (collectives, duplicated work, one
thread per process), not a speed-up. On a GPU machine give `--device cuda --nproc 1` for the
single-GPU bf16 figures (multi-GPU needs as many GPUs as processes).

    python benchmarks/scaling.py [--nproc 2] [--steps 30] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = ["model.n_layers=4", "model.d_model=256", "model.n_heads=4", "train.batch_size=8",
        "train.seq_len=128", "train.eval_every=100000", "train.save_every=100000",
        "train.save_every_minutes=none", "train.log_every=1", "data.max_bytes=3000000"]
VARIANTS = {                      # name: (preset, extra overrides, uses expert parallelism)
    "dense": ("dense", []),
    "moe ep=1": ("mixtral", ["parallel.ep=1"]),
    "moe ep=2": ("mixtral", ["parallel.ep=2"]),
}


def run_once(preset: str, extra: list[str], nproc: int, steps: int, device: str, workdir: Path) -> dict:
    out = workdir / f"{preset}-{nproc}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "moelab", "train", "--preset", preset, "--out", str(out), "--no-progress"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    for s in SIZE + extra + [f"train.max_steps={steps}", f"train.device={device}"]:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"][3:]          # skip warm-up steps
    step_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(train, train[1:])]
    tokens_per_step = train[1]["tokens"] - train[0]["tokens"]
    comm = [max(a + f for a, f in zip(r["comm"]["alltoall_s"], r["comm"]["fsdp_s"]))
            for r in train if "comm" in r]
    a2a = [max(r["comm"]["alltoall_s"]) for r in train if "comm" in r]
    step = statistics.median(step_s)
    return {"step_s": step, "tokens_per_s": tokens_per_step / step,
            "comm_s": statistics.median(comm) if comm else 0.0,
            "alltoall_s": statistics.median(a2a) if a2a else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    os.environ.setdefault("MOELAB_CACHE", str(Path.home() / ".cache" / "moelab"))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (preset, extra) in VARIANTS.items():
                counts = [1, args.nproc] if "ep=2" not in name else [args.nproc]
                if "ep=2" in name and args.nproc < 2:
                    continue
                for n in counts:
                    res = run_once(preset, extra, n, args.steps, args.device, Path(tmp))
                    results.setdefault(f"{name}, {n} proc", []).append(res)
                    print(f"round {r + 1}: {name}, {n} proc: {res['tokens_per_s']:,.0f} tok/s, "
                          f"comm {res['comm_s'] / res['step_s']:.0%} of the step", flush=True)
    table = {}
    for key, runs in results.items():
        tps = statistics.median(x["tokens_per_s"] for x in runs)
        share = statistics.median(x["comm_s"] / x["step_s"] for x in runs)
        a2a = statistics.median(x["alltoall_s"] / x["step_s"] for x in runs)
        table[key] = {"tokens_per_s": tps, "comm_share": share, "alltoall_share": a2a}
    print(f"\n{'variant':<22}{'tokens/s':>10}{'comm share':>12}{'all-to-all':>12}")
    for key, row in table.items():
        print(f"{key:<22}{row['tokens_per_s']:>10,.0f}{row['comm_share']:>12.0%}{row['alltoall_share']:>12.0%}")
    import torch
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "device": args.device, "nproc": args.nproc, "steps": args.steps,
            "rounds": args.rounds}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": table, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
