"""The new routers through the trainer: the hash table is fitted from the training tokens, saved
in the run folder and reused on resume, evaluation, generation and export; the ReLU router holds
its target number of active experts; every new preset trains and resumes exactly (those tests
are slow: each trains tiny models); Hugging Face export refuses what no family expresses."""

from __future__ import annotations

import shutil
import statistics

import pytest
import torch

import moelab
from moelab.interop import InteropError
from moelab.interop.folders import export_hf
from moelab.interop.hf import config_to_hf
from moelab.model.moe.hash_table import balanced_hash_table, hash_loads, token_counts
from moelab.runfolder import WEIGHTS_FILE, checkpoint_dirs, load_metrics, load_tensors
from moelab.train.trainer import train

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.max_seq_len=64", "model.ffn_hidden=128", "model.moe.expert_hidden=64",
        "train.batch_size=8", "train.seq_len=32", "train.eval_batches=2", "train.log_every=1",
        "train.warmup_steps=5", "train.eval_every=1000", "data.max_bytes=1500000", "data.val_fraction=0.1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def _train(preset, run, sets, **kw):
    cfg = moelab.resolve_config(preset, TINY + sets)
    return train(cfg, run, show_progress=False, log=lambda m: None, **kw)


def _losses(run):
    return [(r["step"], r["loss"]) for r in load_metrics(run) if r["kind"] == "train"]


@pytest.mark.slow
def test_hash_table_is_fitted_saved_and_reused_on_resume_eval_generation_and_export(tmp_path, monkeypatch):
    from moelab.data import prepare_data
    sets = ["train.max_steps=8", "train.save_every=4"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train("hash-moe", full, sets)
    _train("hash-moe", cut, sets)
    # the table in the run folder is the balanced fit of the training tokens, in every layer
    cfg = moelab.resolve_config("hash-moe", TINY + sets)
    data = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda m: None)
    fitted = balanced_hash_table(token_counts(data.train_tokens, 512), 8, 2)
    saved = load_tensors(full / WEIGHTS_FILE)
    tables = [v for k, v in saved.items() if k.endswith("router.hash_table")]
    assert len(tables) == 2 and all(torch.equal(t.long(), fitted) for t in tables)
    loads = hash_loads(fitted, data.train_tokens, 8).double()
    assert (loads / loads.mean() - 1).abs().max() < 0.05
    # resume: the checkpoint's table is used (fitting is not even called) and the run continues
    # exactly as the uninterrupted one
    for ckpt in checkpoint_dirs(cut)[1:]:
        shutil.rmtree(ckpt)

    def no_refit(*a, **k):
        raise AssertionError("a resumed run must reuse the saved hash table")
    monkeypatch.setattr("moelab.train.trainer.fit_hash_routers", no_refit)
    _train("hash-moe", cut, sets, resume=True)
    assert _losses(cut) == _losses(full)
    # evaluation / generation load the table with the weights
    model = moelab.load(full)
    assert all(torch.equal(m.router.hash_table.long(), fitted) for m in model.moe_layers())
    prompt = torch.tensor([[5, 17, 33, 2, 90]])
    gen = model.generate(prompt, max_new_tokens=6, temperature=0, trace_experts=True)
    seq = torch.cat([prompt, torch.tensor([gen.tokens[0]])], dim=1)
    with torch.no_grad():
        logits = model(seq).logits[0]
    assert gen.tokens[0] == logits[4:-1].argmax(-1).tolist()       # cached decoding = full forward
    # export: a Hugging Face family has no hash routing, and says so by name
    with pytest.raises(InteropError, match=r"moe\.router = 'hash'"):
        export_hf(full, tmp_path / "hf", "mixtral")


@pytest.mark.parametrize("preset,sets,why", [
    ("remoe", [], "moe.router = 'relu'"),
    ("hash-moe", [], "moe.router = 'hash'"),
    ("hetero-moe", [], "moe.expert_hidden = [128"),
    ("moe", ["model.moe.n_groups=4", "model.moe.topk_groups=2", "model.moe.group_router=learned"],
     "moe.group_router = 'learned'"),
])
def test_hf_export_refuses_what_no_family_expresses_by_name(preset, sets, why):
    pattern = why.replace("[", r"\[").replace(".", r"\.")
    for family, own in [("mixtral", []), ("qwen3_moe", ["model.qk_norm=head"]), ("olmoe", ["model.qk_norm=full"])]:
        cfg = moelab.resolve_config(preset, sets + own).model
        with pytest.raises(InteropError, match=pattern):
            config_to_hf(cfg, family)


def test_expert_choice_is_refused_by_the_families_moe_check_too():
    """An encoder is refused before its router is looked at; the MoE check refuses the router
    itself, should a family ever export encoders."""
    from moelab.interop.families.common import check_moe_export
    with pytest.raises(InteropError, match=r"moe\.router = 'expert_choice'"):
        check_moe_export(moelab.resolve_config("bert-ec").model, "mixtral", [])


def test_sinkhorn_and_reinforce_export_as_softmax_top_k_with_a_note():
    for preset in ("sbase-moe", "reinforce-moe"):
        notes: list[str] = []
        hf = config_to_hf(moelab.resolve_config(preset, ["model.qk_norm=head"]).model, "qwen3_moe", notes)
        assert hf["num_experts_per_tok"] == 2
        assert any("inference routing is plain softmax top-k" in n for n in notes)


@pytest.mark.slow
def test_relu_router_holds_its_target_of_active_experts(tmp_path):
    """ReMoE's adaptive L1: averaged over the layers and the last 40 of 160 steps, the active
    experts per token are within 10% of top_k = 2 (they start near E/2 = 4)."""
    run = tmp_path / "remoe"
    _train("remoe", run, ["train.max_steps=160", "train.lr=1e-3", "train.seed=1"])
    records = [r for r in load_metrics(run) if r["kind"] == "train"]
    active = [statistics.mean(layer["active_experts_mean"] for layer in r["router"]) for r in records]
    assert active[0] > 3
    assert abs(statistics.mean(active[-40:]) / 2 - 1) < 0.10, active[-40:]
    assert all("zero_expert_fraction" in layer and "active_experts_p95" in layer for layer in records[-1]["router"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sbase-moe", "reinforce-moe", "hetero-moe", "bert-ec"])
def test_new_presets_train_and_resume_exactly(preset, tmp_path):
    sets = ["train.max_steps=6", "train.save_every=3"]
    if preset == "hetero-moe":
        sets.append("model.moe.expert_hidden=[16, 16, 32, 32, 64, 64, 128, 160]")
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train(preset, full, sets)
    _train(preset, cut, sets)
    for ckpt in checkpoint_dirs(cut)[1:]:
        shutil.rmtree(ckpt)
    _train(preset, cut, sets, resume=True)
    assert _losses(cut) == _losses(full)            # sampling (reinforce) and baselines resume too
    records = [r for r in load_metrics(full) if r["kind"] == "train"]
    assert len(records) == 6 and all(r["loss"] == r["loss"] for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["hetero-moe", "remoe"])
def test_inspect_reports_measured_active_parameters_and_wide_vs_narrow_experts(preset, tmp_path):
    from moelab.accounting import param_counts
    from moelab.inspect.analyze import InspectOptions, inspect_run
    from moelab.inspect.report import render_markdown
    sets = ["train.max_steps=12", "train.lr=1e-3"]
    if preset == "hetero-moe":
        sets.append("model.moe.expert_hidden=[16, 16, 32, 32, 64, 64, 128, 160]")
    run = tmp_path / preset
    _train(preset, run, sets)
    result = inspect_run(run, InspectOptions(tokens=2048, ablate="none"))
    cfg = moelab.resolve_config(preset, TINY + sets).model
    # the measured expectation: the config's count with each layer's routed part replaced by the
    # parameters of the experts its assignments actually ran on, per token
    widths = cfg.moe.expert_widths(8)
    routed = sum(sum(n * 3 * 64 * w for n, w in zip(l["tokens_per_expert"], widths)) for l in result["layers"])
    expected = param_counts(cfg)["active"] - 2 * 2 * 3 * 64 * cfg.moe.mean_expert_hidden + routed / result["tokens"]
    act = result["active_measured"]
    assert act["active_params"] == round(expected) and "measured on 2,048 held-out tokens" in act["basis"]
    for layer in result["layers"]:
        # variable routers: only the experts a token used are counted as chosen
        assert sum(layer["tokens_per_expert"]) == sum(layer["coactivation"][e][e] for e in range(8))
        if preset == "hetero-moe":
            w = layer["widths"]
            assert w["wide_experts"] == [4, 5, 6, 7]                 # wider than the median, 48
            assert sum(c["assignments"] for c in w["categories"].values()) == sum(layer["tokens_per_expert"])
            assert all(16 <= c["mean_width"] <= 160 for c in w["categories"].values())
    text = render_markdown(result, [])
    assert "Active parameters under the measured routing" in text
    assert ("Wide and narrow experts" in text) == (preset == "hetero-moe")
