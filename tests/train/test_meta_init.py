"""Models are built on the meta device and filled shard by shard, yet start from the very weights
(and RNG state) of today's eager build, and load run / Hugging Face folders as ``moelab.load`` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import moelab
from moelab.model.init_replay import ReplayError, build_recorded, record_build
from moelab.model.transformer import Transformer
from moelab.parallel.load import SafetensorsRows, allocate, put, unfilled
from moelab.parallel.runtime import SingleProcess
from moelab.presets import preset_names
from moelab.runfolder import load, save

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "init_reference_losses.json"
SMALL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1",
         "model.vocab_size=512", "model.ffn_hidden=128", "model.moe.num_experts=4",
         "model.moe.expert_hidden=64"]


class _Quiet:
    def info(self, message: str) -> None:
        pass

    warn = info


@pytest.mark.parametrize("preset", preset_names())
def test_replayed_build_equals_the_eager_build_bit_for_bit(preset):
    """Every parameter and buffer, and the RNG state the run continues with."""
    cfg = moelab.resolve_config(preset).model
    torch.manual_seed(11)
    eager = Transformer(cfg)
    eager_rng = torch.get_rng_state()
    torch.manual_seed(11)
    model, recipe = build_recorded(cfg)
    allocate(model, "cpu")
    biggest = max(p.numel() * p.element_size() for p in eager.parameters())
    peak = recipe.replay(lambda name, full: put(model, name, full))
    assert torch.equal(torch.get_rng_state(), eager_rng)
    assert not unfilled(model)
    got = dict(model.named_parameters()) | dict(model.named_buffers())
    want = dict(eager.named_parameters()) | dict(eager.named_buffers())
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
        assert got[name].dtype == t.dtype
    assert peak <= 2 * biggest          # one full tensor held, plus at most one scratch draw


def test_the_trainer_build_is_the_eager_build(tmp_path):
    cfg = moelab.resolve_config("deepseek-v3", ["model.n_layers=2", "train.seed=5"])
    from moelab.train.trainer import _build_model
    model = _build_model(cfg, SingleProcess(torch.device("cpu")), None, _Quiet())
    rng = torch.get_rng_state()
    torch.manual_seed(5)
    eager = Transformer(cfg.model)
    assert torch.equal(rng, torch.get_rng_state())
    for (n, a), (_, b) in zip(model.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), n
    assert model.training


def test_a_parameter_the_replay_cannot_make_is_refused_by_name():
    class CopiesAnother(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(3))
            self.b = nn.Parameter(torch.empty(3))
            with torch.no_grad():
                self.b.copy_(self.a)

    class Uninitialised(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(2, 2))

    with pytest.raises(ReplayError, match="'b'.*other tensors"):
        record_build(CopiesAnother)
    with pytest.raises(ReplayError, match="'w' is never initialised"):
        record_build(Uninitialised)


def test_chains_of_in_place_ops_replay_and_meta_no_op_initialisers_are_refused():
    def build():
        m = nn.Linear(40, 30)
        with torch.no_grad():                 # trunc_normal_'s recipe, written out
            m.weight.uniform_(-0.9, 0.9).erfinv_().mul_(0.1).clamp_(min=-0.2, max=0.2)
            m.bias.mul_(3.0).add_(1.0)
        return m
    torch.manual_seed(2)
    eager = build()
    torch.manual_seed(2)
    _, recipe = record_build(build)
    got = {}
    recipe.replay(got.__setitem__)
    assert torch.equal(got["weight"], eager.weight) and torch.equal(got["bias"], eager.bias)

    def truncated():
        m = nn.Linear(4, 3)
        nn.init.trunc_normal_(m.weight, std=0.1)          # returns at once on meta: nothing drawn
        return m
    with pytest.raises(ReplayError, match="trunc_normal_ draws nothing on the meta device"):
        record_build(truncated)
    w = torch.empty(3, 3)
    nn.init.trunc_normal_(w)                              # restored afterwards
    assert w.abs().max() <= 2


def _quiet_train_build(cfg, init_from):
    from moelab.train.trainer import _build_model
    return _build_model(cfg, SingleProcess(torch.device("cpu")), str(init_from), _Quiet())


def test_init_from_a_run_folder_loads_what_moelab_load_loads(tmp_path):
    cfg = moelab.resolve_config("mixtral", SMALL)
    torch.manual_seed(3)
    source = Transformer(cfg.model)
    source.blocks[0].ffn.router.expert_bias.fill_(0.25)        # a persistent buffer, read too
    save(tmp_path / "run", source, cfg)
    model = _quiet_train_build(cfg, tmp_path / "run")
    want = load(tmp_path / "run", dtype=torch.float32).state_dict()
    assert model.state_dict().keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(model.state_dict()[name], t), name
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(cfg.train.seed).get_state())


def _olmoe_folder(folder: Path, layout: str) -> Transformer:
    """A tiny OLMoE HF folder (bf16 weights) in the per-expert checkpoint layout or the fused one."""
    from moelab.fileio import save_tensors, write_json
    from moelab.interop.hf import config_to_hf, family
    from moelab.interop.keymap import ours_to_hf
    cfg = moelab.resolve_config("mixtral", SMALL + ["model.qk_norm=full", "model.n_kv_heads=2"]).model
    torch.manual_seed(4)
    model = Transformer(cfg).to(torch.bfloat16)
    folder.mkdir()
    write_json(folder / "config.json", config_to_hf(cfg, "olmoe", [], torch.bfloat16))
    tensors = ours_to_hf(family("olmoe").KEYMAP, cfg, model.state_dict(), layout=layout)
    save_tensors(folder / "model.safetensors", {k: v.contiguous() for k, v in tensors.items()}, {"format": "pt"})
    return model


@pytest.mark.parametrize("layout", ["checkpoint", "module"])
def test_hf_rows_read_slices_equal_to_the_in_memory_import(tmp_path, layout):
    from moelab.interop.sharded import HFRows, open_rows
    source = _olmoe_folder(tmp_path / "hf", layout)
    rows = open_rows(tmp_path / "hf")
    assert isinstance(rows, HFRows) and rows.layout == layout
    want = source.state_dict()
    if layout == "checkpoint":                            # what the in-memory import reads
        assert all(torch.equal(t, want[k]) for k, t in load(tmp_path / "hf").state_dict().items())
    assert rows.shapes() == {k: v.shape for k, v in want.items()}
    for name, t in want.items():
        n = t.shape[0]
        for start, stop in [(0, n), (1, n), (0, max(1, n // 2)), (n // 2, n)]:
            assert torch.equal(rows.rows(name, start, stop), t[start:stop]), (name, start, stop)
    model = _quiet_train_build(moelab.Config(model=rows.cfg).with_overrides([]), tmp_path / "hf")
    for name, t in want.items():
        assert torch.equal(model.state_dict()[name], t.float()), name


def test_a_folder_that_does_not_fit_the_model_is_a_checkpoint_error(tmp_path):
    from moelab.runfolder import CheckpointError
    cfg = moelab.resolve_config("mixtral", SMALL)
    save(tmp_path / "run", Transformer(cfg.model), cfg)
    other = moelab.resolve_config("mixtral", SMALL + ["model.d_model=32"])
    with pytest.raises(CheckpointError, match="wrong shape"):
        _quiet_train_build(other, tmp_path / "run")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        _quiet_train_build(cfg, tmp_path)


def test_load_rows_reads_only_a_shard_for_a_row_range(tmp_path):
    from moelab.fileio import save_tensors
    save_tensors(tmp_path / "w.safetensors", {"a": torch.arange(12.0).view(6, 2)})
    rows = SafetensorsRows(tmp_path / "w.safetensors")
    assert torch.equal(rows.rows("a", 2, 4), torch.tensor([[4.0, 5.0], [6.0, 7.0]]))


def test_streamed_safetensors_round_trips_every_dtype(tmp_path):
    from safetensors.torch import load_file
    from moelab.interop.sharded import StreamedSafetensors
    tensors = {"f": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "i": torch.arange(7),
               "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False])}
    out = StreamedSafetensors(tmp_path / "s.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                              {"format": "pt"})
    for k, v in tensors.items():
        out.write(k, v)
    out.close()
    back = load_file(str(tmp_path / "s.safetensors"))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with pytest.raises(RuntimeError, match="planned"):
        bad = StreamedSafetensors(tmp_path / "t.safetensors", [("x", torch.float32, (2,))])
        bad.write("x", torch.zeros(3))


@pytest.mark.slow
def test_per_step_losses_are_todays_bit_for_bit(tmp_path):
    """The six reference runs of tests/train/init_reference.py, trained with today's code, against
    the losses the eager build gave at the commit before this change (same machine kind: fp32 CPU
    kernels and the standard-library corpus differ between machines and Python versions)."""
    import platform
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from init_reference import run_all
    ref = json.loads(FIXTURE.read_text())
    if ref["torch"] != torch.__version__ or ref["python"] != platform.python_version():
        pytest.skip(f"reference written with torch {ref['torch']} / Python {ref['python']}")
    got = run_all(tmp_path / "losses.json")
    for name, run in ref["runs"].items():
        if got["runs"][name]["corpus_sha256"] != run["corpus_sha256"]:
            pytest.skip("this Python's standard library is another corpus")
        assert got["runs"][name]["losses"] == run["losses"], name


DEEPSEEK = ["model.n_layers=3", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
            "model.ffn_hidden=128", "model.moe.num_experts=8", "model.moe.expert_hidden=32",
            "model.moe.n_groups=4", "model.moe.topk_groups=2", "model.mla.kv_lora_rank=32",
            "model.mla.q_lora_rank=48", "model.mla.qk_nope_head_dim=16", "model.mla.qk_rope_head_dim=8",
            "model.mla.v_head_dim=16"]


def test_deepseek_v3_rows_and_the_streamed_export_match_the_in_memory_paths(tmp_path):
    """RoPE rows permuted on the way in and out, a router bias the family stores, shared experts:
    row reads equal the in-memory import, the (streamed) export equals ``ours_to_hf`` of the
    model's state dict in memory tensor for tensor; a bias the family cannot store is refused
    before anything is written."""
    from safetensors.torch import load_file
    from moelab.fileio import save_tensors, write_json
    from moelab.interop import InteropError, export_hf
    from moelab.interop.hf import config_to_hf, family
    from moelab.interop.keymap import ours_to_hf
    from moelab.interop.sharded import open_rows
    cfg = moelab.resolve_config("deepseek-v3", DEEPSEEK)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():
        model.blocks[1].ffn.router.expert_bias.normal_()
    hf = tmp_path / "hf"
    hf.mkdir()
    write_json(hf / "config.json", config_to_hf(cfg.model, "deepseek_v3", [], torch.float32))
    tensors = ours_to_hf(family("deepseek_v3").KEYMAP, cfg.model, model.state_dict(), rope_interleave=True)
    save_tensors(hf / "model.safetensors", {k: v.contiguous() for k, v in tensors.items()}, {"format": "pt"})
    rows = open_rows(hf)
    for name, t in load(hf).state_dict().items():
        assert torch.equal(rows.rows(name, 1, t.shape[0]), t[1:]), name
    save(tmp_path / "run", model, cfg)
    export_hf(tmp_path / "run", tmp_path / "b", "deepseek_v3", source="weights")
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(tensors) == sorted(b) and all(torch.equal(tensors[k], b[k]) for k in tensors)
    mixtral = moelab.resolve_config("mixtral", SMALL)
    biased = Transformer(mixtral.model)
    biased.blocks[0].ffn.router.expert_bias.fill_(1.0)
    save(tmp_path / "biased", biased, mixtral)
    with pytest.raises(InteropError, match="expert_bias is non-zero"):
        export_hf(tmp_path / "biased", tmp_path / "c", "mixtral", source="weights")
    assert not (tmp_path / "c").exists()
