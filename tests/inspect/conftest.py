"""One small trained MoE run shared by the inspect tests (trained once per session)."""

from pathlib import Path

import pytest

import moelab
from moelab.train.trainer import train

# 2 MoE layers of 4 experts, top-2, on the 1.5 MB slice of the built-in corpus tests/train uses
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "model.moe.expert_hidden=64", "model.moe.num_experts=4",
        "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=64", "train.eval_batches=1",
        "train.warmup_steps=2", "train.lr=0.003", "train.max_steps=12", "train.eval_every=12",
        "train.save_every=6", "train.log_every=6", "train.device=cpu",
        "data.max_bytes=1500000", "data.val_fraction=0.1"]


@pytest.fixture(scope="session")
def data_overrides() -> list[str]:
    """The run's corpus slice, for runs whose config does not carry it (imported models)."""
    return [o for o in TINY if o.startswith("data.")]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    # the same folder tests/train uses, so one session tokenises the corpus slice once
    path = tmp_path_factory.getbasetemp() / "moelab-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOELAB_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def moe_run(tmp_path_factory, cache_dir) -> Path:
    run = tmp_path_factory.mktemp("inspect") / "moe"
    train(moelab.resolve_config("moe", TINY), run, show_progress=False, log=lambda m: None)
    return run


@pytest.fixture(autouse=True)
def _cache_env(cache_dir, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(cache_dir))
