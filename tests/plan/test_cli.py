"""`moelab plan` as a user runs it: JSON for scripts, tables and a verdict for people, exit 2 on
bad input naming the option."""

import json
from pathlib import Path

import pytest

from moelab.cli import main

CONFIGS = Path(__file__).parent / "hf_configs"


def run_json(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_for_an_hf_config(capsys):
    d = run_json(capsys, "--hf-config", str(CONFIGS / "mixtral-8x7b"), "--gpus", "64", "--gpu-memory", "80GiB")
    assert (d["total_params"], d["active_params"]) == (46_702_792_704, 12_879_925_248)
    assert d["layouts"] and all({"dp_shard", "ep", "memory_bytes_per_gpu", "fits",
                                 "alltoall_bytes_per_layer_per_gpu"} <= set(lay) for lay in d["layouts"])
    best = d["best_layout"]
    assert best["fits"] and best["step_time_s"] == min(lay["step_time_s"] for lay in d["layouts"] if lay["fits"])
    T = 4e6 / 64
    for lay in d["layouts"]:
        e = lay["ep"]
        assert lay["alltoall_bytes_per_layer_per_gpu"] == pytest.approx(2 * T * 2 * 4096 * 2 * (e - 1) / e)
    assert [r["kind"] for r in d["advice"]["rows"]] == ["dense", "moe (yours)", "hybrid"]
    actives = [r["active_params"] for r in d["advice"]["rows"]]
    assert max(actives) / min(actives) < 1.01                   # matched active parameters
    assert d["advice"]["verdict"]


def test_config_file_path_preset_and_overrides(capsys, tmp_path):
    d = run_json(capsys, "--hf-config", str(CONFIGS / "llama-3-8b" / "config.json"), "--gpus", "8",
                 "--gpu-memory", "80GB", "--dtype", "fp32", "--seq-len", "2048", "--global-batch-tokens", "1Mi")
    assert d["total_params"] == 8_030_261_248 and d["workload"]["global_batch_tokens"] == 2**20
    assert d["hardware"]["gpu_memory_bytes"] == 80 * 10**9 and {lay["ep"] for lay in d["layouts"]} == {1}
    a = run_json(capsys, "--preset", "mixtral", "--gpus", "2", "--gpu-memory", "16GiB")
    b = run_json(capsys, "--preset", "mixtral", "--set", "model.moe.num_experts=16", "--gpus", "2",
                 "--gpu-memory", "16GiB")
    assert b["total_params"] > a["total_params"]
    assert b["active_params"] == a["active_params"] + 8 * 256 * 4        # only the router grows
    toml = tmp_path / "mine.toml"
    toml.write_text("[model]\nd_model = 128\nn_layers = 2\nn_heads = 2\n[model.moe]\nlayers = 'none'\n")
    c = run_json(capsys, "--config", str(toml), "--gpus", "1", "--gpu-memory", "8GiB")
    assert c["model"] == "mine" and c["best_layout"]["dp_shard"] == 1


def test_human_report_has_three_tables_and_a_computed_verdict(capsys):
    args = ["plan", "--preset", "deepseek-v3", "--gpus", "4", "--gpu-memory", "24GiB", "--seq-len", "256",
            "--global-batch-tokens", "64k"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for word in ("Model", "Layouts", "Advice", "Verdict", "total parameters", "KV cache", "best layout"):
        assert word in out
    assert main(args[:-6] + ["--gpu-memory", "1MiB"]) == 0   # same models, nothing fits: a different verdict
    tiny = capsys.readouterr().out
    assert "None of the 3 models fits" in tiny and "no layout fits" in tiny
    assert "None of the" not in out


def test_compare_user_models(capsys):
    d = run_json(capsys, "--compare", "dense,moe,hybrid", "--gpus", "2", "--gpu-memory", "16GiB",
                 "--seq-len", "128", "--global-batch-tokens", "16k")
    assert [r["name"] for r in d["advice"]["rows"]] == ["dense", "moe", "hybrid"]
    assert d["model"] == "dense" and d["advice"]["basis"].endswith("(--compare)")


@pytest.mark.parametrize("option, value", [
    ("--gpus", "0"), ("--gpus", "two"), ("--gpu-memory", "80"), ("--gpu-memory", "lots"),
    ("--intra-node-bw", "450GB"), ("--inter-node-bw", "-5GB/s"), ("--peak-tflops", "fast"),
    ("--seq-len", "0"), ("--global-batch-tokens", "0"), ("--dtype", "int4"), ("--gpus-per-node", "0"),
    ("--compute-efficiency", "1.5"),
])
def test_bad_input_exits_2_naming_the_option(capsys, option, value):
    base = {"--gpus": "8", "--gpu-memory": "80GiB"}
    base[option] = value
    args = ["plan", "--preset", "mixtral"] + [f"{k}={v}" for k, v in base.items()]
    assert main(args) == 2
    assert option in capsys.readouterr().err


def test_bad_model_inputs_exit_2(capsys, tmp_path):
    assert main(["plan", "--gpus", "8", "--gpu-memory", "80GiB"]) == 2
    assert "--preset" in capsys.readouterr().err
    assert main(["plan", "--hf-config", str(tmp_path), "--gpus", "8", "--gpu-memory", "80GiB"]) == 2
    assert "config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["plan", "--hf-config", str(tmp_path), "--gpus", "8", "--gpu-memory", "80GiB"]) == 2
    assert "model_type" in capsys.readouterr().err
