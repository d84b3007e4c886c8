"""benchmarks/adapt_study.py at its --tiny sizes: the upcycling study, its lower-lr rerun and the
tables run end to end and write what docs/upcycle.md quotes (the figures themselves are measured
at full size by hand and kept in the docs and RESULTS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow      # trains a dozen tiny runs in subprocesses (a few minutes)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "adapt_study.py"


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    return proc.stdout


def test_upcycle_study_and_its_lr_rerun_at_tiny_sizes(tmp_path):
    out = tmp_path / "study"
    _run("upcycle", "--out", str(out), "--tiny")
    result = json.loads((out / "study.json").read_text())
    arms = result["arms"]
    assert set(arms) == {"dense", "upcycle-copy-E4-K2", "upcycle-drop-E4-K2", "scratch-E4-K2"}
    for seed, dense in arms["dense"].items():
        # a copy starts from the dense function; half-redrawn experts do not; scratch is random
        assert arms["upcycle-copy-E4-K2"][seed]["first_eval"] == pytest.approx(dense["first_eval"], abs=1e-5)
        assert abs(arms["upcycle-drop-E4-K2"][seed]["first_eval"] - dense["first_eval"]) > 1e-3
        assert arms["scratch-E4-K2"][seed]["tokens"] > dense["tokens"] + result["dense_pretrain"]["tokens"] - 200
    assert "drop" in " ".join(result["verdicts"]) and result["machine_end"]["cpu"]

    _run("upcycle-lr", "--out", str(out), "--lr", "1e-4", "--seeds", "1")
    rerun = json.loads((out / "lr-0.0001" / "study.json").read_text())
    assert rerun["lr"] == 1e-4 and set(rerun["arms"]) == {"dense", "upcycle-copy-E4-K2", "upcycle-drop-E4-K2"}
    cfg = json.loads(next((out / "lr-0.0001").glob("upcycle-copy-*/config.json")).read_text())
    assert cfg["train"]["lr"] == 1e-4

    table = _run("render", "--out", str(out))
    assert "| upcycle-drop-E4-K2 |" in table and "paired comparison" in table
    assert "highest val loss" in _run("render", "--out", str(out / "lr-0.0001"))
