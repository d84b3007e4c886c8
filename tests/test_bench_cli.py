"""`moelab bench moe` on a tiny shape: runs, checks agreement with HF, prints JSON ratios."""

import json

import pytest

from moelab.cli import main


def test_bench_moe_json(capsys):
    pytest.importorskip("transformers")
    rc = main(["bench", "moe", "--tokens", "32", "--d-model", "16", "--experts", "4", "--top-k", "2",
               "--expert-hidden", "8", "--rounds", "1", "--no-memory", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"]["experts"] == 4
    assert set(out["modes"]) == {"fwd+bwd", "fwd"}
    assert {"moelab", "hf_eager", "hf_grouped_mm"} <= set(out["modes"]["fwd+bwd"]["x_dense"])
    assert max(out["max_abs_diff"].values()) < 1e-4


def test_bench_moe_rejects_bad_shape(capsys):
    assert main(["bench", "moe", "--experts", "4", "--top-k", "5"]) == 2
    assert "--top-k" in capsys.readouterr().err
