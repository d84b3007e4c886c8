"""`moelab plan` against published training runs: step time, throughput and memory.

Each entry is a run whose configuration and result were published (source in ``source``); the
planner is evaluated on the same model, GPU count, batch and, where moelab can run it, the same
layout, and prints a markdown table (pasted into docs/plan.md). Nothing is asserted: this is a
calibration record, not a test.

    python benchmarks/plan_vs_published.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelab.plan import Hardware, Layout, Workload, count, evaluate, load_hf, plan  # noqa: E402
from moelab.plan.units import human_bytes  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "plan" / "hf_configs"
GiB = 2**30


@dataclass(frozen=True)
class Published:
    name: str
    model: str                       # folder under tests/plan/hf_configs
    gpus: int
    seq_len: int
    global_batch_tokens: int
    layout: str                      # as published
    source: str
    step_s: Optional[float] = None
    tokens_per_s_per_gpu: Optional[float] = None
    tflops_per_gpu: Optional[float] = None
    memory_gib: Optional[float] = None
    same_layout: Optional[Layout] = None     # the published layout in moelab terms, when it has one
    gpu_memory: int = 80 * GiB
    intra_bw: float = 450e9
    inter_bw: float = 50e9
    peak: float = 989e12


RUNS = [
    Published("Qwen3-30B-A3B, NeMo AutoModel, 8 H100, BF16", "qwen3-30b-a3b", 8, 4096, 512 * 4096,
              "FSDP 8 x EP 8, MBS 4, GA 16, TE + DeepEP, balanced routing forced",
              "NVIDIA-NeMo/Automodel docs/performance-summary.md (2025-10-02)",
              step_s=21.773, tokens_per_s_per_gpu=12040, tflops_per_gpu=277,
              same_layout=Layout(dp_shard=8, ep=8, micro_batch=4)),
    Published("DeepSeek-V3, NeMo AutoModel, 256 H100, BF16", "deepseek-v3", 256, 4096, 512 * 4096,
              "PP 4 (VP 8) x FSDP 64 x EP 64, MBS 1, TE + DeepEP, balanced routing forced",
              "NVIDIA-NeMo/Automodel docs/performance-summary.md (2025-10-02)",
              step_s=8.18, tokens_per_s_per_gpu=1002, tflops_per_gpu=250),
    Published("DeepSeek-V3, NeMo AutoModel, 1024 H100, BF16", "deepseek-v3", 1024, 4096, 8192 * 4096,
              "PP 4 (VP 8) x FSDP 256 x EP 64, MBS 1, GA 4, TE + DeepEP",
              "NVIDIA-NeMo/Automodel docs/performance-summary.md (2025-10-02)",
              step_s=37.87, tokens_per_s_per_gpu=865, tflops_per_gpu=216),
    Published("DeepSeek-V3 pre-training, 2048 H800, FP8", "deepseek-v3", 2048, 4096, 15360 * 4096,
              "PP 16 (DualPipe) x EP 64 x ZeRO-1 DP, FP8 GEMMs, a2a overlapped with compute",
              "DeepSeek-V3 Technical Report (2024), sec. 3 and table 1: 180K H800 GPU hours per "
              "trillion tokens; NVLink 160 GB/s, IB 50 GB/s",
              tokens_per_s_per_gpu=1e12 / (180e3 * 3600), intra_bw=160e9, peak=1979e12),
    Published("Mixtral-8x7B, Megatron-Core v0.9, 64 H100, BF16", "mixtral-8x7b", 64, 4096, 256 * 4096,
              "TP 1 x EP 8 x PP 4 (VP 8), MBS 1, GBS 256, dropless, all-to-all dispatcher",
              "NVIDIA/Megatron-LM megatron/core/transformer/moe/README.md (468 TFLOPS; reference "
              "mapping table)", tflops_per_gpu=468),
    Published("Llama-3.1-8B, torchtitan, 8 H100, BF16", "llama-3-8b", 8, 8192, 16 * 8192,
              "FSDP 8, local batch 2, selective activation checkpointing, no compile",
              "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md, table 1 (96 GB "
              "HBM2e H100 at 500 W)", tokens_per_s_per_gpu=5762, memory_gib=82.4,
              same_layout=Layout(dp_shard=8, micro_batch=2), gpu_memory=96 * GiB),
    Published("Llama-3.1-8B, torchtitan, 128 H100, BF16", "llama-3-8b", 128, 8192, 256 * 8192,
              "FSDP 128, local batch 2, selective activation checkpointing, no compile",
              "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md, table 3",
              tokens_per_s_per_gpu=5605, memory_gib=67.0,
              same_layout=Layout(dp_shard=128, micro_batch=2), gpu_memory=96 * GiB),
]


def row(run: Published) -> list[str]:
    src = load_hf(CONFIGS / run.model)
    hw = Hardware(gpus=run.gpus, gpu_memory=run.gpu_memory, intra_node_bw=run.intra_bw,
                  inter_node_bw=run.inter_bw, peak_flops=run.peak)
    wl = Workload(seq_len=run.seq_len, global_batch_tokens=run.global_batch_tokens)
    counts = count(src.config.model, run.seq_len)
    p = plan(src, hw, wl)
    cells = []
    chosen = []
    if run.same_layout is not None:
        for ac in (False, True):
            lay = Layout(dp_shard=run.same_layout.dp_shard, dp_replicate=run.gpus // run.same_layout.dp_shard,
                         ep=run.same_layout.ep, micro_batch=run.same_layout.micro_batch,
                         activation_checkpointing=ac)
            chosen.append((f"same layout, AC {'on' if ac else 'off'}", evaluate(src.config.model, counts, lay, hw, wl)))
    if p.best is not None:
        chosen.append((f"planner's best ({p.best.layout.label()}, AC "
                       f"{'on' if p.best.layout.activation_checkpointing else 'off'}, mb {p.best.layout.micro_batch})",
                       p.best))
    for label, lp in chosen:
        tok = run.global_batch_tokens / lp.time.step_s / run.gpus
        tflops = counts.training_flops_per_token * tok / 1e12
        cells.append(f"{label}: {lp.time.step_s:.3g} s, {tok:,.0f} tok/s/GPU, {tflops:.0f} TFLOP/s, "
                     f"{human_bytes(lp.memory.total)}{'' if lp.fits else ' (does not fit)'}")
    if not chosen:
        cells.append(f"no layout fits; smallest {human_bytes(p.smallest.memory.total)}")
    published = []
    if run.step_s:
        published.append(f"{run.step_s:g} s/step")
    if run.tokens_per_s_per_gpu:
        published.append(f"{run.tokens_per_s_per_gpu:,.0f} tok/s/GPU")
    if run.tflops_per_gpu:
        published.append(f"{run.tflops_per_gpu:g} TFLOP/s/GPU")
    if run.memory_gib:
        published.append(f"{run.memory_gib:g} GiB")
    return [run.name, run.layout, "; ".join(published), "<br>".join(cells), run.source]


def main() -> None:
    print("| run | published layout | published | planner (peak x 0.5, FSDP overlapped, a2a not) | source |")
    print("|---|---|---|---|---|")
    for run in RUNS:
        print("| " + " | ".join(row(run)) + " |")


if __name__ == "__main__":
    main()
