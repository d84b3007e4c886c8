"""How long `moelab plan` takes for a 671B config, without building anything.

Times ``count`` (parameters, FLOPs, FSDP units) and the full ``plan`` over every layout for
DeepSeek-V3 on 2048 GPUs, best of a few repeats, in this process (Python start-up and the torch
import that `moelab` pays once are not included; they are printed apart).

    python benchmarks/plan_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

t_import = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moelab.plan import Hardware, Workload, count, load_hf, plan  # noqa: E402
from moelab.plan.advice import advise, matched_variants  # noqa: E402

t_import = time.perf_counter() - t_import
CONFIG = Path(__file__).resolve().parents[1] / "tests" / "plan" / "hf_configs" / "deepseek-v3"


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    hw, wl = Hardware(gpus=2048, gpu_memory=80 * 2**30), Workload(global_batch_tokens=15360 * 4096)
    src = load_hf(CONFIG)
    t_read = best_of(lambda: load_hf(CONFIG))
    t_count = best_of(lambda: count(src.config.model, 4096, 1))
    p = plan(src, hw, wl)
    t_plan = best_of(lambda: plan(src, hw, wl))
    t_advice = best_of(lambda: advise(matched_variants(src), hw, wl, "matched"), repeats=2)
    print(f"import moelab.plan (torch included): {t_import:.2f} s")
    print(f"read config.json (deepseek-v3):      {t_read * 1e3:.1f} ms")
    print(f"count (671B params, FLOPs, units):   {t_count * 1e3:.2f} ms")
    print(f"plan ({len(p.layouts)} layouts on 2048 GPUs):    {t_plan * 1e3:.0f} ms")
    print(f"advice (dense/moe/hybrid, 3 plans):  {t_advice * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
