"""benchmarks/decode_bandwidth.py with llama.cpp: the benchmark exports through the product's
exporter and decodes through the product's engine, and writes the llama.cpp keys (the speeds are
measured by hand and kept in benchmarks/RESULTS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
pytest.importorskip("torchao", reason="the benchmark's int8 decoder needs the quant extra")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_bandwidth.py"


@pytest.mark.slow
def test_quick_run_measures_llama_cpp(tmp_path):
    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(SCRIPT), "--size", "quick", "--eager", "--skip-dense", "--skip-scaling", "--skip-hf",
           "--new-tokens", "6", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["llamacpp_note"] is None
    for key in ("llamacpp_tokens_per_s", "llamacpp_int8_tokens_per_s", "llamacpp_bf16_fraction_of_limit",
                "llamacpp_q8_0_fraction_of_limit"):
        assert result[key] > 0, key
    assert set(result["first_mismatch_vs_ours_bf16"]) == {"ours_int8", "llamacpp_bf16", "llamacpp_q8_0"}
