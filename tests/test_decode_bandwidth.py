"""benchmarks/decode_bandwidth.py in its smallest form: it runs end to end and writes the keys
that our checks read (the speeds themselves are measured by hand and kept in RESULTS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow      # runs a benchmark script

pytest.importorskip("torchao", reason="the int8 decoder needs the quant extra (torchao)")
pytest.importorskip("transformers", reason="the benchmark compares with Hugging Face generate")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_bandwidth.py"
KEYS = ("ours_bf16_tokens_per_s", "ours_int8_tokens_per_s", "hf_bf16_tokens_per_s",
        "bandwidth_limit_tokens_per_s", "bf16_fraction_of_limit", "memory_bandwidth_bytes_per_s")


def test_quick_run_writes_the_documented_keys(tmp_path):
    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(SCRIPT), "--size", "quick", "--eager", "--skip-dense", "--skip-scaling",
           "--skip-llamacpp", "--new-tokens", "6", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in KEYS:
        assert result[key] > 0, key
    assert "llamacpp_tokens_per_s" in result and result["llamacpp_tokens_per_s"] is None
    assert result["int8_weight_bytes"] < 0.6 * result["bf16_weight_bytes"]
