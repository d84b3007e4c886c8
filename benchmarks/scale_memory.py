"""Per-rank memory of a model larger than one process wants to hold: load into shards, one
training step, a sharded checkpoint, an HF export, at 1, 2 and 4 gloo processes (ep = world size).

    python benchmarks/scale_memory.py --json scale_memory.json             # 1.7 GB fp32 folder
    python benchmarks/scale_memory.py --procs 1,2 --layers 1 --hidden 256 --vocab 4096 --json small.json

What it does: writes a synthetic OLMoE-shaped Hugging Face folder (OLMoE-1B-7B's config.json with
its width, depth and vocabulary scaled down; 64 experts, top-8; fp32 random weights in the per-expert
checkpoint layout, split into shards with an index as the Hub's OLMoE is, written a tensor at a
time) and a small BPE tokenizer beside it. Then, for each process count N, it starts N processes
(torchrun, gloo, ``parallel.ep = N``; one plain process for N = 1) that each run the trainer's own
``setup`` with ``init_from`` the folder (meta build, sharding, each rank reading its rows),
one ``train_step`` and one checkpoint save, and finally one process that runs the streamed
HF export (``moelab convert --to-hf``) of that run.

Figures: peak resident set size per process (``resource.getrusage``: the kernel's high-water mark
of the process's own pages, so other programs on the machine do not change it; they change only
the times). ``load_step`` is the peak from start through loading and one step (Python, torch and
the tokenised corpus included: the baseline is reported); ``save`` and ``export`` are the peaks of
those phases alone (the high-water mark is reset before each with ``/proc/self/clear_refs``;
where that is not allowed the figure is cumulative and says so). File pages memory-mapped while
reading safetensors count as resident while mapped, as the kernel counts them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# OLMoE-1B-7B's config.json (allenai/OLMoE-1B-7B-0924); --hidden, --layers, --vocab, --experts scale it
OLMOE = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096,
    "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
    "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "float32", "use_cache": True, "vocab_size": 50304,
}


# ---------------------------------------------------------------------------------------------
# the synthetic folder
# ---------------------------------------------------------------------------------------------

def olmoe_config(hidden: int, layers: int, vocab: int, experts: int = 64, heads: int = 16) -> dict:
    return {**OLMOE, "hidden_size": hidden, "intermediate_size": hidden // 2, "num_hidden_layers": layers,
            "vocab_size": vocab, "num_experts": experts, "num_attention_heads": heads,
            "num_key_value_heads": heads, "num_experts_per_tok": min(8, experts)}


def olmoe_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of an OLMoE checkpoint (per-expert layout), in the Hub's order."""
    D, F, V, E = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_experts"]
    out = [("model.embed_tokens.weight", (V, D))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{n}_proj.weight", (D, D)) for n in "qkvo"]
        out += [(p + "self_attn.q_norm.weight", (D,)), (p + "self_attn.k_norm.weight", (D,)),
                (p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
                (p + "mlp.gate.weight", (E, D))]
        for e in range(E):
            out += [(p + f"mlp.experts.{e}.gate_proj.weight", (F, D)), (p + f"mlp.experts.{e}.up_proj.weight", (F, D)),
                    (p + f"mlp.experts.{e}.down_proj.weight", (D, F))]
    return out + [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]


def write_olmoe_folder(folder: Path, config: dict, shard_bytes: int = 500 * 10**6, seed: int = 0) -> int:
    """An HF folder of ``config`` with N(0, 0.02) weights (norms 1), fp32, written a tensor at a
    time into shards of about ``shard_bytes`` with a model.safetensors.index.json, plus a 512-entry
    byte-level BPE trained on a little of the standard library. Returns the weights' bytes."""
    from moelab.data.tokenizer import train_bpe
    from moelab.fileio import write_json
    from moelab.interop.folders import plan_shards
    from moelab.interop.sharded import StreamedSafetensors

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config)
    specs = olmoe_tensors(config)
    metas = {n: torch.empty(s, device="meta") for n, s in specs}
    shards = plan_shards(metas, shard_bytes)
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    g = torch.Generator().manual_seed(seed)
    for name, keys in zip(files, shards):
        out = StreamedSafetensors(folder / name, [(k, torch.float32, tuple(metas[k].shape)) for k in keys],
                                  {"format": "pt"})
        for k in keys:
            t = torch.ones(metas[k].shape) if k.endswith("norm.weight") else \
                torch.empty(metas[k].shape).normal_(0, 0.02, generator=g)
            out.write(k, t)
        out.close()
    total = sum(m.numel() * 4 for m in metas.values())
    write_json(folder / "model.safetensors.index.json", {
        "metadata": {"total_size": total}, "weight_map": {k: f for f, ks in zip(files, shards) for k in ks}})
    texts = [p.read_text(errors="replace") for p in sorted(Path(os.__file__).parent.glob("[a-c]*.py"))[:20]]
    train_bpe(texts, 512).save(str(folder / "tokenizer.json"))
    return total


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------

def peak_rss() -> int:
    """getrusage's peak resident set size in bytes (Linux reports KiB). Only a fallback for
    ``hwm``: Linux carries ru_maxrss across fork and exec, so a process started by a large parent
    (a pytest that has run for a while, 1.3 GB in CI) reports the parent's peak, not its own."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def hwm() -> int:
    """This process's peak resident set size: VmHWM (its own memory's high-water mark, reset by
    ``reset_peak``, starting from zero at exec), else the getrusage peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss()


def rss_now() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_config(folder: Path, world: int, max_bytes: int):
    """The training config of the folder's model on ``world`` processes."""
    import dataclasses
    from moelab.runfolder import read_config
    cfg = read_config(folder)
    sets = [f"train.batch_size={max(2, world)}", "train.seq_len=32", "train.max_steps=1",
            "train.eval_batches=1", "train.eval_every=1000", "train.save_every=1000", "train.log_every=1",
            f"data.max_bytes={max_bytes}", f"parallel.ep={world}"]
    cfg = cfg.with_overrides(sets).validate()
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(folder / "tokenizer.json")))


def worker(folder: Path, run_dir: Path, out: Path, max_bytes: int) -> None:
    """One rank: setup (load into shards) -> one step -> sharded checkpoint; its peaks."""
    from moelab.parallel.layout import device_for, layout_from_env
    from moelab.parallel.runtime import start
    from moelab.train.trainer import setup, train_step

    baseline = rss_now()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = run_config(folder, world, max_bytes)
    layout = layout_from_env(cfg)
    runtime = start(layout, device_for(layout, "cpu"))
    t0 = time.perf_counter()
    run = setup(cfg, run_dir, runtime, resume=False, strict_resume=False, init_from=str(folder),
                command="scale_memory", log=lambda m: None, show_progress=False)
    load_s, load_peak = time.perf_counter() - t0, hwm()
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in run.model.parameters())
    t0 = time.perf_counter()
    result = train_step(run, 0)
    step_s, load_step_peak = time.perf_counter() - t0, hwm()
    reset = reset_peak()
    t0 = time.perf_counter()
    run.loop.step, run.loop.tokens = 1, cfg.train.batch_size * cfg.train.seq_len
    run.checkpointer.save(run.model, run.optimizer, run.loop)
    save_s, save_peak = time.perf_counter() - t0, hwm()
    run.logger.close()
    runtime.close()
    out.write_text(json.dumps({
        "rank": layout.rank, "baseline_rss_bytes": baseline, "load_peak_rss_bytes": load_peak,
        "load_step_peak_rss_bytes": load_step_peak, "save_peak_rss_bytes": save_peak,
        "save_peak_is_phase_only": reset, "local_param_bytes": local, "loss": result.loss,
        "load_s": load_s, "step_s": step_s, "save_s": save_s}))


def exporter(run_dir: Path, out_dir: Path, out: Path) -> None:
    """One process: the HF export of a run, and its peak."""
    baseline = rss_now()
    t0 = time.perf_counter()
    from moelab.interop import export_hf
    export_hf(run_dir, out_dir, "olmoe")
    out.write_text(json.dumps({"export_peak_rss_bytes": hwm(), "baseline_rss_bytes": baseline,
                               "export_s": time.perf_counter() - t0}))


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run(cmd: list[str], timeout: float) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def measure(folder: Path, work: Path, procs: list[int], max_bytes: int, timeout: float,
            log=print) -> dict:
    """Run every process count; {"procs": {N: {...}}} with the per-rank figures."""
    folder_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    results: dict = {}
    for n in procs:
        need = folder_bytes * 4.5 / n + n * 6e8      # params + grads + AdamW moments, per rank, + runtime
        if n > 1 and mem_available() and mem_available() < need:
            log(f"{n} processes: skipped, {mem_available() / 1e9:.1f} GB available < about {need / 1e9:.1f} GB needed")
            results[str(n)] = {"skipped": f"not enough memory ({mem_available()} bytes available)"}
            continue
        run = work / f"run-{n}"
        shutil.rmtree(run, ignore_errors=True)
        outs = work / f"ranks-{n}"
        shutil.rmtree(outs, ignore_errors=True)
        outs.mkdir(parents=True)
        args = ["--worker", str(folder), str(run), str(outs / "rank"), "--max-bytes", str(max_bytes)]
        if n == 1:
            cmd = [sys.executable, str(HERE), *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   str(HERE), *args]
        t0 = time.time()
        _run(cmd, timeout)
        ranks = [json.loads(p.read_text()) for p in sorted(outs.glob("rank*.json"))]
        ranks.sort(key=lambda r: r["rank"])
        entry = {"ranks": ranks, "load_step_peak_rss_bytes": max(r["load_step_peak_rss_bytes"] for r in ranks),
                 "save_peak_rss_bytes": max(r["save_peak_rss_bytes"] for r in ranks),
                 "wall_s": round(time.time() - t0, 1)}
        hf = work / f"hf-{n}"
        shutil.rmtree(hf, ignore_errors=True)
        report = outs / "export.json"
        _run([sys.executable, str(HERE), "--export", str(run), str(hf), str(report)], timeout)
        exported = json.loads(report.read_text())
        entry["export_peak_rss_bytes"] = exported["export_peak_rss_bytes"]
        entry["export_baseline_rss_bytes"] = exported["baseline_rss_bytes"]
        shutil.rmtree(hf, ignore_errors=True)
        results[str(n)] = entry
        log(f"{n} process(es): load+step peak per rank "
            f"{[round(r['load_step_peak_rss_bytes'] / 1e9, 2) for r in ranks]} GB, save "
            f"{[round(r['save_peak_rss_bytes'] / 1e9, 2) for r in ranks]} GB, export "
            f"{entry['export_peak_rss_bytes'] / 1e9:.2f} GB")
        shutil.rmtree(run, ignore_errors=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2,4", help="process counts, e.g. 1,2,4 (4 is skipped when RAM is short)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden_size (OLMoE-1B-7B: 2048)")
    p.add_argument("--layers", type=int, default=3, help="num_hidden_layers (OLMoE-1B-7B: 16)")
    p.add_argument("--vocab", type=int, default=50304, help="vocab_size")
    p.add_argument("--experts", type=int, default=64, help="num_experts")
    p.add_argument("--max-bytes", type=int, default=300_000, help="corpus bytes tokenised per run")
    p.add_argument("--workdir", help="folder for the synthetic model and runs (default: a temp folder, removed)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", metavar="OUT", help="write the figures here")
    p.add_argument("--worker", nargs=3, metavar=("FOLDER", "RUN", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--export", nargs=3, metavar=("RUN", "HF", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        folder, run, out = args.worker
        rank = os.environ.get("RANK", "0")
        worker(Path(folder), Path(run), Path(f"{out}{rank}.json"), args.max_bytes)
        return 0
    if args.export:
        run, hf, out = map(Path, args.export)
        exporter(run, hf, out)
        return 0
    procs = [int(x) for x in args.procs.split(",")]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="scale_memory."))
    try:
        folder = work / "olmoe-synthetic"
        config = olmoe_config(args.hidden, args.layers, args.vocab, args.experts)
        t0 = time.time()
        if not (folder / "model.safetensors.index.json").is_file():
            write_olmoe_folder(folder, config)
        folder_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"synthetic OLMoE folder: {folder_bytes / 1e9:.2f} GB ({time.time() - t0:.0f} s)", flush=True)
        load_start = os.getloadavg()
        from moelab.decode_bench import cpu_name
        results = measure(folder, work, procs, args.max_bytes, args.timeout,
                          log=lambda m: print(m, flush=True))
        one = results.get("1", {}).get("load_step_peak_rss_bytes")
        ratios = {n: r["load_step_peak_rss_bytes"] / one for n, r in results.items()
                  if one and "load_step_peak_rss_bytes" in r}
        report = {
            "procs": results, "ratio_load_step_to_1_process": ratios, "folder_bytes": folder_bytes,
            "config": config, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": cpu_name(), "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        print(json.dumps({"ratio_load_step_to_1_process": ratios}, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
