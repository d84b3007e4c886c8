"""benchmarks/gpu_check.py: on a machine without CUDA it says so and exits 0; its runner keeps
every part inside its time box (a fake slow part is killed, the parts after it still run) and
records failures without stopping."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module              # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_exits_0_saying_it_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--minutes", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs a CUDA GPU" in proc.stdout
    report = json.loads(out.read_text())
    assert report["cuda"] is False and "needs a CUDA GPU" in report["message"]


def test_a_slow_part_is_killed_at_its_time_box_and_the_others_still_run():
    gc = _module()
    py = sys.executable
    write = ("import json, os; json.dump({'answer': 42}, open(os.environ['GPU_CHECK_OUT'], 'w'))")
    slow = ("import json, os, time; json.dump({'started': True}, open(os.environ['GPU_CHECK_OUT'], 'w'));"
            "time.sleep(120)")
    parts = [gc.Part("slow", 1.0, [py, "-c", slow]),
             gc.Part("fails", 1.0, [py, "-c", "raise SystemExit('broken on purpose')"]),
             gc.Part("quick", 1.0, [py, "-c", write])]
    gc.RESERVE_S = 0.5
    t0 = time.monotonic()
    results = gc.run_parts(parts, total_s=12.0, log=lambda m: None)
    elapsed = time.monotonic() - t0
    assert elapsed < 12.0 + 5
    slow_r = results["slow"]
    assert slow_r["status"] == "timed_out" and slow_r["figures"] == {"started": True}
    assert slow_r["seconds"] < slow_r["budget_s"] + 3 and 2 < slow_r["budget_s"] < 5
    assert results["fails"]["status"] == "failed" and "broken on purpose" in results["fails"]["error"]
    assert results["quick"]["status"] == "ok" and results["quick"]["figures"] == {"answer": 42}
    # time a part leaves unused goes to those after it
    assert results["quick"]["budget_s"] > slow_r["budget_s"]


def test_a_part_that_cannot_start_in_time_is_not_run_and_peaks_come_from_the_device_name():
    gc = _module()
    gc.RESERVE_S = 0.5
    results = gc.run_parts([gc.Part("late", 1.0, [sys.executable, "-c", "pass"])], total_s=0.2, log=lambda m: None)
    assert results["late"]["status"] == "not_run"
    assert gc.peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert gc.peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert gc.peak_flops("Some Future GPU")[0] is None


@pytest.mark.slow
def test_every_part_runs_its_code_on_the_cpu_at_toy_sizes(tmp_path):
    """The parts' own code (training beside the fp32 run, grouped_mm vs loop, eager and compiled
    decode, the gpu-test runner) dry-run on the CPU, so the day a GPU is lent the script does not
    stop on a typo. On a machine without 2 GPUs the nccl part skips with a line."""
    import os
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SCALE": "tiny",
           "MOELAB_CACHE": str(tmp_path / "cache")}
    for part in ("train", "grouped_mm", "decode", "nccl_ep2", "gpu_tests"):
        out = tmp_path / f"{part}.json"
        proc = subprocess.run([sys.executable, str(SCRIPT), "--part", part], capture_output=True, text=True,
                              timeout=600, env={**env, "GPU_CHECK_OUT": str(out)})
        assert proc.returncode == 0, (part, proc.stdout[-2000:], proc.stderr[-3000:])
        figures = json.loads(out.read_text())
        if part == "train":
            assert len(figures["cuda_losses"]) == 6 and len(figures["cpu_fp32_losses"]) == 5
            assert figures["step5_abs_diff"] == 0.0           # fp32 on both sides here: identical
            assert figures["mfu"] is None and "not in gpu_check.PEAK_BF16" in figures["peak_source"]
        elif part == "grouped_mm":
            assert figures["equal_within_bf16"] and figures["loop_over_grouped_mm"] > 0
        elif part == "decode":
            assert figures["eager_tokens_per_s"] > 0 and figures["compiled_tokens_per_s"] > 0
            assert figures["same_tokens"] in (True, False)
        elif part == "nccl_ep2":
            assert "needs 2 GPUs" in figures["skipped"]
        else:
            assert figures["counts"]["skipped"] >= 5 and figures["counts"]["failed"] == 0
