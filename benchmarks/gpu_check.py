"""One script that proves moelab's CUDA paths the day a GPU is at hand, in a few minutes, and says
in one JSON what works and how fast.

    python benchmarks/gpu_check.py --json gpu_check.json              # 8 minutes at most
    python benchmarks/gpu_check.py --minutes 12 --json gpu_check.json

Parts (each in its own process, each time-boxed: a part that hangs or overruns is killed and
recorded as ``timed_out`` with whatever it had reported; a part that fails is recorded with its
error; the next part runs either way):

- ``gpu_tests``: the ``gpu``-marked tests (``pytest -m gpu``), pass/fail per test;
- ``train``: a ~110M-active MoE (8 experts, top-2) trained 50 steps in bf16 autocast on CUDA, and
  the same config, same initial weights, 5 steps in fp32 on the CPU: losses at step 5 within
  2e-2; CUDA tokens/s and MFU (model FLOPs per token from ``moelab.accounting``, x3 for forward
  + backward, over the bf16 dense peak of the device, looked up from its name and stated);
- ``grouped_mm``: one MoE layer forward + backward in bf16 with the grouped_mm engine and the
  per-expert loop engine on the same weights: outputs and gradients equal within bf16
  tolerance, and the time ratio;
- ``decode``: greedy decode tokens/s in bf16, eager and with ``compile=True`` (moelab's decode
  step does not use CUDA graphs), and whether both give the same tokens;
- ``nccl_ep2``: with 2 GPUs, a 2-process nccl run with expert parallelism (ep=2) against one
  process; skipped with a line otherwise.

Without CUDA it prints that it needs a GPU and exits 0. Runs on torch 2.9 - 2.13.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT_ENV = "GPU_CHECK_OUT"          # where a part writes its figures (JSON), rewritten as it goes
# a dry run of the parts' code on the CPU at toy sizes (tests/test_gpu_check.py), so that a typo
# is found before the day a GPU is lent: GPU_CHECK_DEVICE=cpu GPU_CHECK_SCALE=tiny
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
TINY = os.environ.get("GPU_CHECK_SCALE") == "tiny"
RESERVE_S = 10.0                   # kept back from the budget for starting parts and the report

# bf16 dense tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets; the first
# name fragment found in torch.cuda.get_device_name() wins
PEAK_BF16 = [
    ("H200", 989e12), ("GH200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


@dataclass
class Part:
    name: str
    share: float                              # of the whole budget, renormalised over what is left
    command: Optional[list[str]] = None       # default: this script's --part NAME
    extra: dict = field(default_factory=dict)


PARTS = [Part("gpu_tests", 0.2), Part("train", 0.35), Part("grouped_mm", 0.1), Part("decode", 0.15),
         Part("nccl_ep2", 0.2)]


# ---------------------------------------------------------------------------------------------
# the time-boxed runner (no CUDA here: parts run in their own processes)
# ---------------------------------------------------------------------------------------------

def run_parts(parts: list[Part], total_s: float, log=print) -> dict:
    """Run ``parts`` in order, each in its own process group with a deadline: its share of the time
    left (shares renormalised over the parts not yet run, so time a part does not use goes to the
    next). Returns {name: {"status", "seconds", "budget_s", "figures", "error"}}."""
    start = time.monotonic()
    results: dict = {}
    for i, part in enumerate(parts):
        left = total_s - (time.monotonic() - start) - RESERVE_S
        shares = sum(p.share for p in parts[i:])
        budget = max(1.0, left * part.share / shares) if left > 1 else 0.0
        if budget <= 0:
            results[part.name] = {"status": "not_run", "seconds": 0.0, "budget_s": 0.0, "figures": {},
                                  "error": "no time left in the budget"}
            log(f"{part.name}: not run (no time left)")
            continue
        results[part.name] = _run_one(part, budget)
        r = results[part.name]
        log(f"{part.name}: {r['status']} in {r['seconds']:.1f} s (budget {budget:.0f} s)"
            + (f": {r['error'].splitlines()[-1][:200]}" if r.get("error") else ""))
    return results


def _run_one(part: Part, budget: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        out = Path(tmp) / "figures.json"
        cmd = part.command or [sys.executable, str(HERE), "--part", part.name]
        env = {**os.environ, OUT_ENV: str(out),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, cwd=str(ROOT))
        try:
            output, _ = proc.communicate(timeout=budget)
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            output, _ = proc.communicate()
            status = "timed_out"
        seconds = time.monotonic() - t0
        figures = {}
        if out.is_file():
            try:
                figures = json.loads(out.read_text())
            except json.JSONDecodeError:
                figures = {}
        if figures.get("skipped") and status == "ok":
            status = "skipped"
        error = None
        if status == "failed":
            error = (output or "")[-3000:]
        elif status == "timed_out":
            error = f"killed after its {budget:.0f} s budget; last output: {(output or '')[-1000:]}"
        return {"status": status, "seconds": round(seconds, 2), "budget_s": round(budget, 1),
                "figures": figures, "error": error}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


# ---------------------------------------------------------------------------------------------
# the parts (each runs in a fresh process with CUDA)
# ---------------------------------------------------------------------------------------------

_figures: dict = {}


def emit(**values) -> None:
    """Record figures now (a part killed later keeps what it emitted)."""
    _figures.update(values)
    path = os.environ.get(OUT_ENV)
    if path:
        Path(path).write_text(json.dumps(_figures, indent=1, default=str))


def peak_flops(name: str) -> tuple[Optional[float], str]:
    for fragment, flops in PEAK_BF16:
        if fragment in name:
            return flops, f"{fragment}: {flops / 1e12:.0f} TFLOP/s bf16 dense (data sheet)"
    return None, f"{name!r} is not in gpu_check.PEAK_BF16; MFU not computed"


def model_sets(steps: int, device: str) -> list[str]:
    """~110M active parameters (of ~365M): 12 layers x 768, 8 experts of 1536, top-2."""
    size = ["model.n_layers=12", "model.d_model=768", "model.n_heads=12", "model.n_kv_heads=4",
            "model.vocab_size=4096", "model.max_seq_len=512", "model.moe.num_experts=8",
            "model.moe.top_k=2", "model.moe.expert_hidden=1536", "model.ffn_hidden=3072",
            "train.batch_size=16", "train.seq_len=128"]
    if TINY:
        size = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1",
                "model.vocab_size=512", "model.max_seq_len=64", "model.moe.num_experts=4",
                "model.moe.top_k=2", "model.moe.expert_hidden=64", "model.ffn_hidden=128",
                "train.batch_size=4", "train.seq_len=32"]
    return size + [f"train.max_steps={steps}",
            "train.warmup_steps=10", "train.min_lr_ratio=1.0", "train.log_every=1",
            "train.eval_every=100000", "train.eval_batches=1", "train.save_every=100000",
            f"data.max_bytes={300_000 if TINY else 3_000_000}", f"train.device={device}"]


def part_gpu_tests() -> None:
    """``pytest -m gpu -v``, its verdicts recorded line by line (a part killed at its time box keeps
    the tests that had finished)."""
    import re
    emit(command="python -m pytest -m gpu -v tests")
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "tests"],
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cases: dict = {}
    tail: list[str] = []
    verdict = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        m = verdict.match(line)
        if m:
            cases[m.group(1)] = m.group(2).lower()
            emit(tests=cases)
    proc.wait()
    counts = {k: sum(v == k for v in cases.values()) for k in ("passed", "failed", "error", "skipped")}
    emit(tests=cases, counts=counts, pytest_exit=proc.returncode, tail="\n".join(tail))
    if proc.returncode not in (0, 5):            # 5: nothing collected
        raise SystemExit(f"gpu tests: {counts}")


def part_train() -> None:
    import torch
    import moelab
    from moelab.accounting import describe
    from moelab.runfolder import load_metrics
    from moelab.train.trainer import train

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    work = Path(os.environ[OUT_ENV]).parent
    os.environ.setdefault("MOELAB_CACHE", str(work / "cache"))
    cfg = moelab.resolve_config("mixtral", model_sets(6 if TINY else 50, DEVICE))
    info = describe(cfg.model, cfg.train.batch_size, cfg.train.seq_len)
    emit(device=name, total_params=info["total_params"], active_params=info["active_params"],
         flops_per_token_forward=info["flops_per_token"])
    summary = train(cfg, work / "cuda", show_progress=False, log=lambda m: None)     # "cuda": DEVICE
    cuda = [r["loss"] for r in load_metrics(work / "cuda") if r["kind"] == "train"]
    tps = summary["tokens_per_s"]
    peak, source = peak_flops(name)
    achieved = 3 * info["flops_per_token"] * tps
    emit(cuda_losses=cuda, cuda_tokens_per_s=tps, achieved_flops=achieved, peak_flops=peak, peak_source=source,
         mfu=(achieved / peak) if peak else None,
         mfu_note="model FLOPs = 3 x forward FLOPs per token (moelab.accounting) x tokens/s; "
                  "median over logged intervals after the first",
         cuda_peak_memory_bytes=summary["peak_memory_bytes"])
    cpu_cfg = moelab.resolve_config("mixtral", model_sets(5, "cpu"))
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    train(cpu_cfg, work / "cpu", show_progress=False, log=lambda m: None)
    cpu = [r["loss"] for r in load_metrics(work / "cpu") if r["kind"] == "train"]
    diff = abs(cuda[4] - cpu[4])
    emit(cpu_fp32_losses=cpu, step5_abs_diff=diff, step5_within_2e_2=diff <= 2e-2,
         step1_abs_diff=abs(cuda[0] - cpu[0]))
    if diff > 2e-2:
        raise SystemExit(f"bf16 CUDA vs fp32 CPU at step 5: |{cuda[4]} - {cpu[4]}| = {diff} > 2e-2")


def _cuda_ms(fn, rounds: int) -> list[float]:
    """Milliseconds per call: CUDA events (the GPU's own clock), or the host clock on a dry run."""
    import torch
    times = []
    for _ in range(rounds):
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _sync() -> None:
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def part_grouped_mm() -> None:
    import torch
    from moelab import MoE
    from moelab.model.moe.engines import HAS_GROUPED_MM
    emit(has_grouped_mm=HAS_GROUPED_MM, torch=torch.__version__)
    if not HAS_GROUPED_MM:
        raise SystemExit(f"torch {torch.__version__} has no grouped_mm")
    N, D, E, K, H = (256, 64, 4, 2, 64) if TINY else (8192, 1024, 16, 2, 1024)
    torch.manual_seed(0)
    layers = {b: MoE(D, E, K, H, backend=b).to(DEVICE) for b in ("grouped_mm", "loop")}
    layers["loop"].load_state_dict(layers["grouped_mm"].state_dict())
    x = torch.randn(N, D, device=DEVICE)
    grad = torch.randn(N, D, device=DEVICE)
    outs = {}

    def step(backend):
        layer = layers[backend]
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = layer(xi).output
        y.float().backward(grad)
        return y.float(), xi.grad, layer.experts.w_gate_up.grad, layer.experts.w_down.grad

    for b in layers:
        outs[b] = step(b)
    errs = {}
    for label, a, b in zip(("output", "grad_x", "grad_w_gate_up", "grad_w_down"), outs["grouped_mm"], outs["loop"]):
        errs[label] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    ok = all(e <= 2e-2 for e in errs.values())
    emit(shape=dict(N=N, D=D, E=E, K=K, H=H), relative_max_error=errs, equal_within_bf16=ok)
    times = {b: [] for b in layers}
    for _ in range(3):
        for b in layers:
            times[b] += _cuda_ms(lambda: step(b), 5)
    med = {b: statistics.median(t) for b, t in times.items()}
    emit(median_ms_fwd_bwd=med, loop_over_grouped_mm=med["loop"] / med["grouped_mm"])
    if not ok:
        raise SystemExit(f"grouped_mm vs loop differ beyond bf16 tolerance: {errs}")


def part_decode() -> None:
    import torch
    import moelab
    from moelab.generate import generate
    cfg = moelab.resolve_config("mixtral", model_sets(1, DEVICE))
    torch.manual_seed(0)
    model = moelab.build(cfg.model).eval().to(DEVICE).to(torch.bfloat16)
    prompts = torch.randint(0, cfg.model.vocab_size, (1, 16))
    new = 8 if TINY else 128
    emit(batch=1, prompt_len=16, new_tokens=new, dtype="bfloat16", cuda_graphs="not used by moelab's decode step")
    results = {}
    for compile in (False, True):
        label = "compiled" if compile else "eager"
        generate(model, prompts, max_new_tokens=new, temperature=0, compile=compile)     # warm-up / compile
        times, tokens = [], None
        for _ in range(3):
            _sync()
            t0 = time.perf_counter()
            tokens = generate(model, prompts, max_new_tokens=new, temperature=0, compile=compile).tokens
            _sync()
            times.append(time.perf_counter() - t0)
        results[label] = tokens
        emit(**{f"{label}_tokens_per_s": new / statistics.median(times)})
    emit(same_tokens=results["eager"] == results["compiled"])


def part_nccl_ep2() -> None:
    import torch
    count = torch.cuda.device_count()
    if count < 2:
        emit(skipped=f"needs 2 GPUs, this machine has {count}")
        print(f"nccl_ep2: skipped (needs 2 GPUs, found {count})")
        return
    work = Path(os.environ[OUT_ENV]).parent
    env = {**os.environ, "MOELAB_CACHE": str(work / "cache")}
    sets = model_sets(10, "cuda")
    args = ["--preset", "mixtral", "--no-progress"] + sum((["--set", s] for s in sets), [])
    one = subprocess.run([sys.executable, "-m", "moelab", "train", *args, "--out", str(work / "one")],
                         capture_output=True, text=True, env=env, cwd=str(ROOT))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "moelab", "train", *args, "--set", "parallel.ep=2", "--out", str(work / "two")],
                         capture_output=True, text=True, env=env, cwd=str(ROOT))
    emit(one_exit=one.returncode, two_exit=two.returncode)
    if one.returncode or two.returncode:
        raise SystemExit(f"1 process: {one.stderr[-1500:]}\n2 processes: {two.stderr[-1500:]}")
    from moelab.runfolder import load_metrics, read_summary
    losses = {k: [r["loss"] for r in load_metrics(work / k) if r["kind"] == "train"] for k in ("one", "two")}
    diff = max(abs(a - b) for a, b in zip(losses["one"], losses["two"]))
    emit(losses=losses, max_abs_diff=diff, within_2e_2=diff <= 2e-2,
         tokens_per_s={k: read_summary(work / k)["tokens_per_s"] for k in ("one", "two")})
    if diff > 2e-2:
        raise SystemExit(f"nccl ep=2 vs 1 process: max loss difference {diff} > 2e-2")


PART_FUNCTIONS = {"gpu_tests": part_gpu_tests, "train": part_train, "grouped_mm": part_grouped_mm,
                  "decode": part_decode, "nccl_ep2": part_nccl_ep2}


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=8.0, help="the whole check's time budget (default 8)")
    p.add_argument("--json", metavar="OUT", help="write every figure and failure here")
    p.add_argument("--only", help="comma-separated parts to run (default all: %s)" % ",".join(PART_FUNCTIONS))
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        PART_FUNCTIONS[args.part]()
        return 0
    import torch
    report = {"torch": torch.__version__, "python": sys.version.split()[0], "minutes": args.minutes,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    if not torch.cuda.is_available():
        message = (f"gpu_check needs a CUDA GPU: none is available here (torch {torch.__version__}, "
                   f"CUDA build {torch.version.cuda or 'none'}); nothing was run")
        print(message)
        if args.json:
            Path(args.json).write_text(json.dumps({**report, "cuda": False, "message": message}, indent=1) + "\n")
        return 0
    if args.minutes <= 0:
        print(f"error: --minutes = {args.minutes} is invalid: must be > 0", file=sys.stderr)
        return 2
    parts = PARTS
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in PART_FUNCTIONS]
        if unknown:
            print(f"error: --only {unknown[0]!r} is not a part: one of {', '.join(PART_FUNCTIONS)}", file=sys.stderr)
            return 2
        parts = [q for q in PARTS if q.name in wanted]
    report.update(cuda=True, device=torch.cuda.get_device_name(), device_count=torch.cuda.device_count())
    t0 = time.monotonic()
    report["parts"] = run_parts(parts, args.minutes * 60)
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["failures"] = [n for n, r in report["parts"].items() if r["status"] in ("failed", "timed_out")]
    print(json.dumps({n: r["status"] for n, r in report["parts"].items()}))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
