"""`moelab bench moe` on a tiny shape: runs, checks agreement with HF, times with
torch.utils.benchmark (median and IQR), says "faster" / "slower" the right way round and keeps
the profiler's own output off the console."""

import json

import pytest

from moelab.benchmarking import faster_or_slower
from moelab.cli import main

TINY = ["bench", "moe", "--tokens", "32", "--d-model", "16", "--experts", "4", "--top-k", "2",
        "--expert-hidden", "8", "--rounds", "2", "--min-time", "0.01"]


def test_bench_moe_json(capsys):
    pytest.importorskip("transformers")
    assert main(TINY + ["--no-memory", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"]["experts"] == 4
    assert set(out["modes"]) == {"fwd+bwd", "fwd"}
    fb = out["modes"]["fwd+bwd"]
    assert {"moelab", "hf_eager", "hf_grouped_mm"} <= set(fb["x_dense"])
    assert all(fb["iqr_ms"][k] >= 0 and fb["median_ms"][k] > 0 for k in fb["median_ms"])
    assert all(n >= 2 for n in fb["calls"].values())             # blocks of calls, every round
    assert max(out["max_abs_diff"].values()) < 1e-4


def test_faster_and_slower_read_the_right_way_round():
    assert faster_or_slower(2.4) == "2.40x faster"
    assert faster_or_slower(0.41) == "2.44x slower"
    assert faster_or_slower(1.0) == "1.00x faster"


def test_text_output_without_profiler_noise(capfd):
    pytest.importorskip("transformers")
    assert main(TINY) == 0                                  # with the profiler's memory pass
    out, err = capfd.readouterr()
    assert "profiler" not in out + err and "USDT" not in out + err
    assert "± " in out and ("x faster than hf_eager" in out or "x slower than hf_eager" in out)
    assert "faster" not in out.replace("x faster", "")      # never "0.41x faster"


def test_bench_moe_rejects_bad_shape(capsys):
    assert main(["bench", "moe", "--experts", "4", "--top-k", "5"]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert main(["bench", "moe", "--min-time", "0"]) == 2
    assert "--min-time" in capsys.readouterr().err
