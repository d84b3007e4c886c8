"""The runs whose per-step losses pin down moelab's initialisation: tiny versions of several
presets (dense, MoE, MLA with a shared expert and sigmoid routing, hybrid, per-layer expert
counts, a noisy router that draws from the RNG stream the build leaves, an encoder trained as a
masked LM), 4 steps each in one process.

``python tests/train/init_reference.py OUT.json`` trains them with whatever moelab is on
PYTHONPATH and writes their losses; tests/fixtures/init_reference_losses.json was written this way
from the commit before models were built on the meta device (3d62ea4, every rank building the
whole model eagerly), and test_meta_init.py checks that today's code reproduces it bit for bit.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
        "train.log_every=1", "train.warmup_steps=2", "train.eval_every=100", "train.max_steps=4",
        "train.save_every=100", "data.max_bytes=1500000", "data.val_fraction=0.1"]
MOE = ["model.ffn_hidden=128", "model.moe.expert_hidden=64"]
JOBS = {
    "dense": ("dense", TINY + ["model.ffn_hidden=128"]),
    "mixtral": ("mixtral", TINY + MOE + ["model.n_kv_heads=1", "model.moe.num_experts=4"]),
    "mixtral-noisy": ("mixtral", TINY + MOE + ["model.n_kv_heads=1", "model.moe.num_experts=4",
                                               "model.moe.router=noisy"]),
    "deepseek-v3": ("deepseek-v3", TINY + ["model.n_layers=3", "model.ffn_hidden=128",
                    "model.moe.num_experts=8", "model.moe.expert_hidden=32", "model.moe.top_k=2",
                    "model.moe.n_groups=4", "model.moe.topk_groups=2", "model.mla.kv_lora_rank=32",
                    "model.mla.q_lora_rank=48", "model.mla.qk_nope_head_dim=16",
                    "model.mla.qk_rope_head_dim=8", "model.mla.v_head_dim=16",
                    "model.moe.bias_update_rate=0.01"]),
    "hybrid": ("hybrid", TINY + MOE + ["model.n_layers=3", "model.moe.num_experts=4"]),
    "bert-moe": ("bert-moe", TINY + MOE + ["model.moe.num_experts=4"]),
}


def run_all(out: Path) -> dict:
    import torch

    import moelab
    from moelab.runfolder import load_metrics
    from moelab.train.trainer import train

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MOELAB_CACHE", str(Path(tmp) / "cache"))
        for name, (preset, sets) in JOBS.items():
            run = Path(tmp) / name
            train(moelab.resolve_config(preset, sets), run, show_progress=False, log=lambda m: None)
            summary = json.loads((run / "summary.json").read_text())
            results[name] = {"losses": [r["loss"] for r in load_metrics(run) if r["kind"] == "train"],
                             "corpus_sha256": summary["corpus_sha256"]}
    data = {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "runs": results}
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


if __name__ == "__main__":
    import torch
    torch.set_num_threads(2)
    print(json.dumps(run_all(Path(sys.argv[1])), indent=1))
