"""benchmarks/compare_throughput.py and benchmarks/sparse_dense_bound.py in their smallest form:
they run end to end on the default study's models (shrunk) and write what RESULTS.md quotes (the
speeds themselves are measured by hand and kept there)."""

import pytest
import json
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow      # runs benchmark scripts

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SMALL = ["--set", "model.n_layers=2", "--set", "model.d_model=64", "--set", "model.n_heads=2"]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_compare_throughput_reports_ratios_to_dense(tmp_path):
    out = tmp_path / "tp.json"
    _run("compare_throughput.py", "--blocks", "2", "--steps", "1", "--warmup", "1", "--json", str(out), *SMALL)
    result = json.loads(out.read_text())
    assert set(result["ratio_to_dense"]) == {"dense", "moe", "hybrid"}
    assert result["ratio_to_dense"]["dense"] == 1.0
    assert all(len(v) == 2 and min(v) > 0 for v in result["tokens_per_s"].values())


def test_sparse_dense_bound_is_a_ratio_below_one_per_sparse_model(tmp_path):
    out = tmp_path / "bound.json"
    proc = _run("sparse_dense_bound.py", "--rounds", "2", "--json", str(out), *SMALL)
    result = json.loads(out.read_text())
    assert set(result["bound"]) == {"moe", "hybrid"}
    med = result["median_ms"]
    assert all(v > 0 for v in med.values())
    # one row per MoE layer: moe has every layer sparse, hybrid every other one
    assert sum(k.startswith("moe layer") for k in med) == 2
    assert sum(k.startswith("hybrid layer") for k in med) == 1
    assert "| moe | 2 |" in proc.stdout
