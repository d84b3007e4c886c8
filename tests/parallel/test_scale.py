"""Models larger than one process: built on the meta device and filled shard by shard (the same
shards today's eager build gave), Hugging Face weights read straight into 2 ranks' shards (the same
first losses as one process), a streamed export equal to the one-process export bit for bit, and
per-rank memory that falls with the number of processes. torchrun + gloo on this CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelab.cli import main
from moelab.runfolder import load_metrics

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
BENCH = HERE.parents[1] / "benchmarks" / "scale_memory.py"
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "train.batch_size=4"]


def _bench():
    spec = importlib.util.spec_from_file_location("scale_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def _torchrun(*args: str, timeout: float = 600):
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_meta_build_gives_every_rank_todays_shards(tmp_path):
    """FSDP2 alone, and FSDP2 + expert parallelism (softmax experts; MLA + shared expert +
    sigmoid routing): every rank's shards and RNG state equal those of the eager build cut by
    the same wrappers, and each rank holds half of the parameters."""
    jobs = [
        {"preset": "dense", "overrides": TINY},
        {"preset": "mixtral", "overrides": TINY + ["model.n_kv_heads=1", "model.moe.num_experts=4",
                                                   "model.moe.expert_hidden=64", "parallel.ep=2"]},
        {"preset": "deepseek-v3", "overrides": TINY + [
            "model.moe.num_experts=8", "model.moe.expert_hidden=32", "model.moe.n_groups=4",
            "model.moe.topk_groups=2", "model.mla.kv_lora_rank=32", "model.mla.q_lora_rank=48",
            "model.mla.qk_nope_head_dim=16", "model.mla.qk_rope_head_dim=8", "model.mla.v_head_dim=16",
            "parallel.ep=2"]},
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    _torchrun(str(HERE / "scale_worker.py"), "init", str(tmp_path / "jobs.json"), str(tmp_path / "out"))
    for rank in (0, 1):
        results = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        assert set(results) == {"dense", "mixtral", "deepseek-v3"}
        for preset, r in results.items():
            assert r["names_equal"] and r["unequal"] == [] and r["rng_equal"], (rank, preset, r)
            assert abs(r["local_bytes"] - r["full_bytes"] / 2) <= 0.01 * r["full_bytes"], (preset, r)


def _losses(run) -> list[float]:
    return [r["loss"] for r in load_metrics(run) if r["kind"] == "train"]


def test_init_from_hf_folder_two_ranks_equal_one_and_the_streamed_export_is_bit_exact(tmp_path):
    """An OLMoE folder (OLMoE-1B-7B's config.json scaled down, sharded with an index): 2 processes
    with ep=2 reading their slices start from the same losses as 1 process; `convert --to-hf` of the
    2-process run (read from its sharded checkpoint) equals the export of its consolidated weights,
    tensor for tensor, in one file or in several."""
    bench = _bench()
    hf = tmp_path / "olmoe"
    bench.write_olmoe_folder(hf, bench.olmoe_config(hidden=64, layers=2, vocab=512, experts=4, heads=4),
                             shard_bytes=200_000)
    assert len(list(hf.glob("model-*.safetensors"))) > 1
    sets = ["train.max_steps=2", "train.batch_size=4", "train.seq_len=32", "train.eval_every=100",
            "train.eval_batches=1", "train.log_every=1", "data.max_bytes=300000"]
    args = ["--init-from", str(hf), "--no-progress"] + sum((["--set", s] for s in sets), [])
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    _torchrun("-m", "moelab", "train", *args, "--set", "parallel.ep=2", "--out", str(tmp_path / "two"))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)

    from moelab.interop import export_hf
    from moelab.interop.sharded import newest_sharded
    assert newest_sharded(tmp_path / "two") is not None
    export_hf(tmp_path / "two", tmp_path / "hf-memory", "olmoe", source="weights")   # the consolidated copy
    want = load_file(str(tmp_path / "hf-memory" / "model.safetensors"))
    for max_size, out in (("5GB", "hf-streamed"), ("100000", "hf-streamed-shards")):
        assert main(["convert", "--to-hf", str(tmp_path / "two"), "--family", "olmoe", "--max-shard-size",
                     max_size, "--out", str(tmp_path / out)]) == 0
        folder = tmp_path / out
        got = {}
        for f in sorted(folder.glob("*.safetensors")):
            got.update(load_file(str(f)))
        assert sorted(got) == sorted(want)
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
        assert json.loads((folder / "config.json").read_text()) == \
            json.loads((tmp_path / "hf-memory" / "config.json").read_text())
    index = json.loads((tmp_path / "hf-streamed-shards" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(want)


def test_each_of_two_ranks_needs_under_three_quarters_of_one_process(tmp_path):
    """benchmarks/scale_memory.py on a ~400 MB fp32 OLMoE-shaped folder (64 experts): peak RSS of
    loading into shards plus one training step, per rank, at 2 processes (ep=2) against 1.

    Why not 100 MB: every process carries ~0.4 GB that does not shard (Python, torch, the tokenised
    corpus), and each of 2 ranks ~0.14 GB more (the process group, FSDP's unsharded root weights and
    gradients during the step); only the model's share halves. Measured: 0.78 at 141 MB, 0.73 at
    274 MB, 0.55 at 1.67 GB (benchmarks/RESULTS.md); at ~400 MB the ratio is ~0.68, clear of the
    0.75 bound by more than the run-to-run spread."""
    bench = _bench()
    folder = tmp_path / "olmoe"
    bench.write_olmoe_folder(folder, bench.olmoe_config(hidden=384, layers=6, vocab=16384, experts=64))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert 350e6 <= size <= 450e6
    results = bench.measure(folder, tmp_path, [1, 2], max_bytes=200_000, timeout=900, log=lambda m: None)
    one = results["1"]["load_step_peak_rss_bytes"]
    ranks = [r["load_step_peak_rss_bytes"] for r in results["2"]["ranks"]]
    assert len(ranks) == 2
    assert all(r < 0.75 * one for r in ranks), (one, ranks)
    # the export of the 2-process run holds about one tensor (the largest: 38 MB here), not the
    # model: its peak over the exporting process's baseline stays below half the model's bytes
    export = results["2"]
    assert export["export_peak_rss_bytes"] - export["export_baseline_rss_bytes"] < size / 2
