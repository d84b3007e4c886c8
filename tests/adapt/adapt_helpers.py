"""Helpers of the adapt tests: tiny configs, drawn weights, run folders with a real tokenizer
(no pretraining: drawn base weights are all upcycling and LoRA need)."""

import sys
from pathlib import Path

import torch

import moelab

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
        "model.vocab_size=512", "model.ffn_hidden=64", "model.max_seq_len=64",
        "train.batch_size=2", "train.seq_len=32", "train.eval_batches=2", "train.log_every=1",
        "train.warmup_steps=2", "train.lr=0.003", "train.eval_every=1000", "data.val_fraction=0.2"]
# the interop tests' tiny Hugging Face models (tests/interop/hf_models.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))
# a small, real slice of the built-in corpus (the json package's sources, about 50 kB)
CORPUS_PACKAGE = "json"


def tiny_cfg(preset: str = "dense", *extra: str):
    return moelab.resolve_config(preset, TINY + list(extra))


def spread_weights(model, std: float = 0.15, seed: int = 0):
    """Redraw every weight with a larger std (norms near 1) so logits and router scores are far
    from ties and float error is visible against real differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def make_run(folder: Path, cfg, tokenizer_json: str, seed: int = 0) -> Path:
    """A run folder holding a drawn model of ``cfg`` and the tokenizer."""
    from moelab.runfolder import save
    torch.manual_seed(seed)
    model = spread_weights(moelab.build(cfg), std=0.05, seed=seed)
    save(folder, model, cfg, tokenizer_json)
    return folder
