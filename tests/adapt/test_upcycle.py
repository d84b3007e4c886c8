"""Sparse upcycling: copy keeps the dense function exactly (any granularity, shared experts,
some layers), Drop-Upcycling re-draws exactly the requested units, bad options are refused by
name, and an upcycled run continues from the dense loss."""

import json
import math

import pytest
import torch

import moelab
from moelab.adapt.upcycle import (
    UpcycleOptions, drop_reinit, expert_weights, scales, upcycle, upcycle_model, upcycled_config,
)
from moelab.config import ConfigError

from adapt_helpers import make_run, spread_weights, tiny_cfg


def _dense(seed=0):
    cfg = tiny_cfg("dense")
    torch.manual_seed(seed)
    return cfg, spread_weights(moelab.build(cfg), seed=seed).eval()


def _tokens(vocab=512, seed=1):
    return torch.randint(0, vocab, (3, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [
    dict(experts=4, top_k=2),                                   # G = 1
    dict(experts=8, top_k=2, granularity=2),                    # G = 2: one whole copy per token
    dict(experts=4, top_k=2, shared=1),                         # with a shared expert
    dict(experts=8, top_k=4, granularity=2, shared=2),          # G = 2 and two shared experts
    dict(experts=4, top_k=2, router_init="zero"),
    dict(experts=4, top_k=3, layers="every2"),                  # only layer 1 becomes MoE
], ids=["g1", "g2", "shared1", "g2-shared2", "zero-router", "every2"])
def test_copy_keeps_the_dense_logits(options):
    cfg, dense = _dense()
    x = _tokens()
    with torch.no_grad():
        want = dense(x).logits
        up = upcycle_model(dense, cfg, UpcycleOptions(**options))
        got = up.model(x).logits
    assert up.config.model.moe.renormalize and up.config.model.moe.top_k > 1
    assert (got - want).abs().max().item() < 1e-5
    moe_layers = [i for i, b in enumerate(up.model.blocks) if b.is_moe]
    assert moe_layers == ([1] if options.get("layers") == "every2" else [0, 1])
    # the routers really do differ between tokens (not a degenerate router that hides the test)
    if options.get("router_init", "normal") == "normal":
        ids = [s.expert_ids for s in up.model(x).router_stats]
        assert len({tuple(r.tolist()) for r in ids[0]}) > 1


def test_drop_does_change_the_function():
    cfg, dense = _dense()
    x = _tokens()
    with torch.no_grad():
        want = dense(x).logits
        got = upcycle_model(dense, cfg, UpcycleOptions(experts=4, top_k=2, method="drop")).model(x).logits
    assert (got - want).abs().max().item() > 1e-2


def test_drop_redraws_exactly_the_requested_units_from_the_original_statistics():
    D, H, E, ratio = 64, 256, 4, 0.5
    g = torch.Generator().manual_seed(0)
    gate = 0.5 * torch.randn(H, D, generator=g) + 0.1
    up = 0.3 * torch.randn(H, D, generator=g) - 0.2
    down = 0.2 * torch.randn(D, H, generator=g) + 0.05
    gate_up = torch.cat([gate, up])
    copy_gu, copy_down = expert_weights(gate_up, down, E, 1, 1.0)
    w_gu, w_down = copy_gu.clone(), copy_down.clone()
    subsets = drop_reinit(w_gu, w_down, gate_up, down, ratio, 1.0, torch.Generator().manual_seed(1))
    seen = []
    for e in range(E):
        changed_gate = (w_gu[e, :H] != copy_gu[e, :H]).any(dim=1).nonzero().flatten()
        changed_up = (w_gu[e, H:] != copy_gu[e, H:]).any(dim=1).nonzero().flatten()
        changed_down = (w_down[e] != copy_down[e]).any(dim=0).nonzero().flatten()
        assert changed_gate.tolist() == changed_up.tolist() == changed_down.tolist() == subsets[e].tolist()
        assert len(changed_gate) == round(ratio * H)                          # exactly the share
        # every value of a re-drawn unit is new; the other units are untouched copies
        assert (w_gu[e, changed_gate] != copy_gu[e, changed_gate]).all()
        seen.append(tuple(changed_gate.tolist()))
        for new, original in ((w_gu[e, changed_gate], gate), (w_gu[e, H + changed_up], up),
                              (w_down[e][:, changed_down], down)):
            assert abs(new.mean().item() - original.mean().item()) < 0.05 * original.std().item() + 0.01
            assert abs(new.std().item() / original.std().item() - 1) < 0.05
    assert len(set(seen)) == E                                                # a different subset each


def test_drop_in_a_fine_grained_layer_keeps_the_scaled_down_projection():
    cfg, dense = _dense()
    opts = UpcycleOptions(experts=4, top_k=2, granularity=2, method="drop", drop_ratio=0.25)
    up = upcycle_model(dense, cfg, opts)
    Hs = cfg.model.ffn_hidden // 2
    assert set(up.dropped) == {0, 1}
    assert all(len(s) == round(0.25 * Hs) for s in up.dropped[0])
    kept = [u for u in range(Hs) if u not in set(up.dropped[0][0].tolist())]
    routed_scale, _ = scales(opts)
    w_down = up.model.blocks[0].ffn.experts.w_down[0]                # expert 0 = slice 0 of copy 0
    original = dense.blocks[0].ffn.down.weight[:, :Hs]
    assert torch.allclose(w_down[:, kept], original[:, kept] * routed_scale)


@pytest.mark.parametrize("options,words", [
    (dict(experts=4, top_k=2, granularity=3), "--granularity = 3"),          # 64 % 3 != 0
    (dict(experts=8, top_k=3, granularity=2), "--top-k = 3"),
    (dict(experts=6, top_k=2, granularity=4), "--experts = 6"),
    (dict(experts=8, top_k=2, granularity=2, router_init="zero"), "--router-init = zero"),
    (dict(experts=4, top_k=5), "--top-k = 5"),
    (dict(experts=4, top_k=2, layers="0,7"), "--layers = '0,7'"),
    (dict(experts=4, top_k=2, method="swap"), "--method = 'swap'"),
    (dict(experts=4, top_k=2, method="drop", drop_ratio=1.5), "--drop-ratio = 1.5"),
])
def test_bad_options_are_refused_by_name(options, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        upcycled_config(tiny_cfg("dense"), UpcycleOptions(**options))


def test_an_moe_source_is_refused():
    with pytest.raises(ConfigError, match="upcycling starts from a dense model"):
        upcycled_config(tiny_cfg("moe"), UpcycleOptions(experts=4, top_k=2))


def test_cli_writes_a_run_folder_that_loads_and_records_its_parent(tmp_path, tokenizer_json, capsys):
    from moelab.cli import main
    base = make_run(tmp_path / "dense", tiny_cfg("dense"), tokenizer_json)
    assert main(["upcycle", str(base), "--experts", "4", "--top-k", "2", "--method", "drop",
                 "--layers", "every2", "--shared", "1", "--out", str(tmp_path / "up"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = moelab.load(tmp_path / "up")
    assert [b.is_moe for b in model.blocks] == [False, True]
    assert model.tokenizer is not None and model.tokenizer.to_str() == tokenizer_json
    assert summary["total_params"] == sum(p.numel() for p in model.parameters())
    meta = json.loads((tmp_path / "up" / "run_meta.json").read_text())
    assert meta["parent"] == str(base.resolve())
    assert meta["upcycle"]["method"] == "drop" and meta["upcycle"]["shared"] == 1
    # a second upcycle into the same folder is refused, naming it
    assert main(["upcycle", str(base), "--experts", "4", "--top-k", "2", "--out", str(tmp_path / "up")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_upcycled_run_continues_from_the_dense_loss(tmp_path):
    """Dense trained for a few steps; its copy-upcycled MoE, trained with --init-from, starts at
    the dense run's last validation loss and scores its first batch as the dense model does."""
    from moelab.cli import main
    from moelab.data import objective_batches, prepare_data
    from moelab.runfolder import load_metrics
    from moelab.train.checkpoint import OPTIMIZER_FILE
    from moelab.runfolder import load_tensors
    sets = ["--set", "data.max_bytes=400000", "--set", "train.eval_every=6", "--set", "train.save_every=6"]
    common = sum((["--set", s] for s in ["model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                                          "model.vocab_size=512", "model.ffn_hidden=64", "model.max_seq_len=64",
                                          "train.batch_size=2", "train.seq_len=32", "train.eval_batches=2",
                                          "train.log_every=1", "train.warmup_steps=2"]), []) + sets
    assert main(["train", "--preset", "dense", "--out", str(tmp_path / "dense"), "--no-progress",
                 "--set", "train.max_steps=6", *common]) == 0
    assert main(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2", "--granularity", "2",
                 "--shared", "1", "--out", str(tmp_path / "up")]) == 0
    assert main(["train", "--init-from", str(tmp_path / "up"), "--out", str(tmp_path / "moe"), "--no-progress",
                 "--set", "train.max_steps=2", "--set", "train.seed=7", *common]) == 0
    dense_last = [r for r in load_metrics(tmp_path / "dense") if r["kind"] == "eval"][-1]["val_loss"]
    moe_first = [r for r in load_metrics(tmp_path / "moe") if r["kind"] == "eval"][0]
    assert moe_first["step"] == 0 and math.isclose(moe_first["val_loss"], dense_last, abs_tol=1e-5)
    # the first training step's loss is the dense model's loss on the same batch
    cfg = moelab.runfolder.read_config(tmp_path / "moe")
    batches, _ = objective_batches(cfg.train, prepare_data(cfg.data, cfg.model.vocab_size, log=lambda m: None))
    x, y = batches.batch(0)
    with torch.no_grad():
        dense_loss = moelab.load(tmp_path / "dense").train()(x, targets=y).loss.item()
    first = [r for r in load_metrics(tmp_path / "moe") if r["kind"] == "train"][0]
    assert math.isclose(first["loss"], dense_loss, abs_tol=1e-5)
    meta = json.loads((tmp_path / "moe" / "run_meta.json").read_text())
    assert meta["parent"] == str(tmp_path / "up")
    # a fresh optimiser: its step count is this run's own
    opt = load_tensors(tmp_path / "moe" / "ckpt-00000002" / OPTIMIZER_FILE)
    assert {v.item() for k, v in opt.items() if k.endswith(".step")} == {2.0}


def test_imported_llama_upcycles_to_mixtral_and_exports(tmp_path):
    """A Hugging Face Llama folder -> a Mixtral-family MoE with the same logits -> --to-hf."""
    hf_models = pytest.importorskip("hf_models")   # on the path via adapt_helpers
    from moelab.interop import export_hf
    hf = hf_models.hf_model("llama", dict(num_key_value_heads=2, intermediate_size=80, rope_theta=5e5))
    hf.save_pretrained(tmp_path / "llama")
    x = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    want, _ = hf_models.hf_forward(hf, x)
    upcycle(tmp_path / "llama", UpcycleOptions(experts=4, top_k=2), tmp_path / "up", log=lambda m: None)
    ours = moelab.load(tmp_path / "up")
    assert all(b.is_moe for b in ours.blocks)
    got, _ = hf_models.our_forward(ours, x)
    assert (got - want).abs().max().item() < 1e-4
    meta = json.loads((tmp_path / "up" / "run_meta.json").read_text())
    assert meta["parent_kind"] == "huggingface"
    export_hf(tmp_path / "up", tmp_path / "mixtral", "mixtral")
    back = hf_models.transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral",
                                                                        attn_implementation="eager").eval()
    assert back.config.model_type == "mixtral" and back.config.num_local_experts == 4
    assert (hf_models.hf_forward(back, x)[0] - want).abs().max().item() < 1e-4
