"""Batch-1 decode speed of a run folder with moelab's torch engine and llama.cpp, side by side,
against the memory-bandwidth limit (``moelab bench decode RUN --engine both``).

Decoding one token reads every active weight once, so its ceiling is the memory bandwidth over the
bytes of weights a token reads (active parameters, one embedding row instead of the table). The
bandwidth is a STREAM-like copy (``b.copy_(a)`` over 2 x 256 MiB, read + write counted, as STREAM
does), measured between the decode runs; every speed is reported as a fraction of the bf16 limit,
so an int8 / Q8_0 engine can pass 1. Decode tokens/s excludes the prompt: time(n new tokens) -
time(1 new token), over n - 1 tokens; engines are measured in turn, ``repeats`` rounds, medians.
benchmarks/decode_bandwidth.py does the same on a real-sized model built in place.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from moelab.accounting import param_counts
from moelab.config import ModelConfig


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What a reported speed depends on: CPU, cores, threads, load, library versions."""
    try:
        import llama_cpp
        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "llama_cpp_python": llama_version}


def copy_bandwidth(mib: int = 256, repeats: int = 3) -> float:
    """STREAM "copy" bytes/s (read + write) of ``b.copy_(a)`` on the CPU, best of ``repeats``."""
    n = mib * 2**20 // 4
    a = torch.ones(n)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best


def read_params(cfg: ModelConfig) -> int:
    """Parameters one decoded token reads: the active ones, with one embedding row instead of the
    whole table (unless the LM head is the embedding)."""
    counts = param_counts(cfg)
    return counts["active"] if cfg.tie_embeddings else counts["active"] - counts["embedding"] + cfg.d_model


def seconds_per_token(run: Callable[[int], list[int]], new: int) -> float:
    """(time of ``new`` greedy tokens - time of 1) / (new - 1): decoding without the prompt."""
    start = time.perf_counter()
    run(1)
    mid = time.perf_counter()
    run(new)
    end = time.perf_counter()
    return max((end - mid) - (mid - start), 1e-9) / (new - 1)


def torch_runner(run_dir: Union[str, Path], prompt: list[int], dtype: Optional[str]):
    from moelab.generate import generate
    from moelab.runfolder import load
    model = load(run_dir, dtype=dtype)
    return lambda n: generate(model, [prompt], max_new_tokens=n, temperature=0).tokens[0]


def llamacpp_runner(run_dir: Union[str, Path], prompt: list[int], gguf_type: str, log=lambda s: None):
    from moelab.interop.llamacpp import open_run
    engine, path = open_run(run_dir, gguf_type, log=log)
    return (lambda n: engine.greedy(prompt, n)), engine, path


def measure(run_dir: Union[str, Path], engines: tuple[str, ...], *, gguf_type: str = "bf16",
            dtype: Optional[str] = "bfloat16", new_tokens: int = 32, prompt_len: int = 16, repeats: int = 3,
            seed: int = 0, log: Callable[[str], None] = lambda s: None) -> dict:
    """Decode tokens/s of each engine on the run's model, the bandwidth and the fractions."""
    from moelab.runfolder import read_config
    cfg = read_config(run_dir).model
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g).tolist()
    runners: dict[str, Callable[[int], list[int]]] = {}
    closers = []
    if "torch" in engines:
        runners[f"torch_{dtype or 'checkpoint'}"] = torch_runner(run_dir, prompt, dtype)
    if "llama.cpp" in engines:
        run, engine, path = llamacpp_runner(run_dir, prompt, gguf_type, log)
        runners[f"llamacpp_{gguf_type}"] = run
        closers.append(engine.close)
    try:
        for run in runners.values():          # warm-up: first calls allocate and page weights in
            run(2)
        times: dict[str, list[float]] = {name: [] for name in runners}
        tokens: dict[str, list[int]] = {}
        bandwidth = []
        for _ in range(repeats):
            bandwidth.append(copy_bandwidth())
            for name, run in runners.items():
                times[name].append(seconds_per_token(run, new_tokens))
        for name, run in runners.items():
            tokens[name] = run(new_tokens)
    finally:
        for close in closers:
            close()
    bw = statistics.median(bandwidth)
    read = read_params(cfg)
    limit = bw / (2 * read)
    result = {"run": str(run_dir), "read_params_per_token": read, "bf16_bytes_per_token": 2 * read,
              "memory_bandwidth_bytes_per_s": round(bw), "bf16_limit_tokens_per_s": round(limit, 3),
              "new_tokens": new_tokens, "prompt_len": prompt_len, "repeats": repeats, "engines": {}}
    for name in runners:
        rate = 1.0 / statistics.median(times[name])
        result["engines"][name] = {"tokens_per_s": round(rate, 3), "fraction_of_bf16_limit": round(rate / limit, 3),
                                   "greedy_tokens": tokens[name]}
    names = list(runners)
    if len(names) == 2:
        a, b = (tokens[n] for n in names)
        result["greedy_agreement"] = round(sum(x == y for x, y in zip(a, b)) / len(a), 3)
    return result
