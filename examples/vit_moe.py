"""ViT-MoE on real images: a small vision transformer whose FFN is ``moelab.MoE`` in every other
block (V-MoE, Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts"), against the
same ViT with dense FFNs at equal active parameters, on scikit-learn's bundled digits (1,797 8x8
grey images, no download).

    python examples/vit_moe.py                      # 3 seeds, dense vs MoE, table + PNG
    python examples/vit_moe.py --capacity           # + capacity sweep, position vs score priority
    python examples/vit_moe.py --quick --json r.json

Matching: each expert is a SwiGLU of width ffn_hidden / top_k, so a token's top_k experts hold
as many weights as the dense SwiGLU of width ffn_hidden; the MoE adds only its router (E x D per
MoE block) to the active count. ``--capacity`` trains and evaluates with capacity factors C <= 1
(each expert takes ceil(C * N * K / E) of a batch's N * K assignments) under two drop priorities:
"position" (moelab's default: first choices before second, earlier images first) and "score"
(V-MoE's Batch Prioritized Routing: highest router weight first). V-MoE reports that BPR keeps
accuracy when many tokens are dropped; this script measures whether that holds here.

Legend: B images, P patches, T tokens (P + the class token), D width, Y classes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import moelab
from moelab.model.ffn import SwiGLU

from _shared import (mean_sd, param_counts, print_table, require_extra, save_figure, seed_everything,
                     write_json)

require_extra("sklearn")

DROP_POLICIES = ("position", "score")
DEFAULT_CAPACITIES = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    image_size: int = 8
    patch_size: int = 2
    num_classes: int = 10
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 128                 # dense SwiGLU width; an expert gets ffn_hidden // top_k
    moe: bool = False                     # MoE FFN in every other block (blocks 1, 3, ...)
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: Optional[float] = None   # None = dropless; used in training and evaluation
    drop_policy: Literal["position", "score"] = "position"   # "score" = Batch Prioritized Routing
    aux_loss_coef: float = 0.01               # Switch balance loss (V-MoE uses importance + load)
    # 1/sqrt(d_model). ViT's 0.02 is tuned for d_model = 768; at 64 it leaves every FFN almost
    # silent at the start, and 3 epochs reached 0.78 test accuracy instead of 0.94 (MoE, seed 0)
    init_std: float = 0.125


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05


# ---------------------------------------------------------------- data
def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0):
    """The digits as (N, 1, 8, 8) float tensors in [0, 1], split once, stratified by class, with a
    fixed seed: every model and every training seed sees the same train and test images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0                 # (1797, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                              random_state=split_seed)
    as_images = lambda a: torch.from_numpy(a).unsqueeze(1)      # (images, 1, 8, 8)
    return as_images(x_tr), torch.from_numpy(y_tr), as_images(x_te), torch.from_numpy(y_te)


# ---------------------------------------------------------------- model
@dataclass
class ViTOutput:
    logits: torch.Tensor                  # (B, Y)
    aux_loss: torch.Tensor                # scalar: the MoE blocks' balance losses, weighted
    router_stats: list[moelab.RouterStats]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + ffn(ln(x)); the FFN is a dense SwiGLU
    or a ``moelab.MoE``."""

    def __init__(self, cfg: ViTConfig, use_moe: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        if use_moe:
            self.ffn = moelab.MoE(cfg.d_model, num_experts=cfg.num_experts, top_k=cfg.top_k,
                                  expert_hidden=cfg.ffn_hidden // cfg.top_k,
                                  capacity_factor=cfg.capacity_factor,
                                  eval_capacity_factor=cfg.capacity_factor,
                                  drop_policy=cfg.drop_policy, aux_loss_coef=cfg.aux_loss_coef,
                                  init_std=cfg.init_std)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.ffn_on = True      # False: skip the FFN (an ablation at test time)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[moelab.MoEOutput]]:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]                     # (B, T, D)
        if not self.ffn_on:
            return x, None
        h = self.ln2(x)
        if isinstance(self.ffn, moelab.MoE):
            moe_out = self.ffn(h)
            return x + moe_out.output, moe_out                                 # (B, T, D)
        return x + self.ffn(h), None


class ViT(nn.Module):
    """Patch embedding (a strided conv), a learned class token and position embeddings, pre-norm
    blocks, and a linear head on the final class token (Dosovitskiy et al. 2021)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch = nn.Conv2d(1, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.d_model))
        # V-MoE places MoE in every other block, the odd ones (the second of each pair)
        self.blocks = nn.ModuleList(Block(cfg, use_moe=cfg.moe and i % 2 == 1)
                                    for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        self._init(cfg.init_std)

    def _init(self, std: float) -> None:
        """One init for dense and MoE models alike: normal(0, std) for every matrix, as the MoE
        layer draws its experts and router."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=std)
        nn.init.normal_(self.cls, std=std)

    def forward(self, images: torch.Tensor) -> ViTOutput:
        """(B, 1, H, W) images -> class logits, MoE aux loss and router statistics."""
        x = self.patch(images).flatten(2).transpose(1, 2)                      # (B, P, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos   # (B, T, D)
        aux, stats = x.new_zeros(()), []
        for block in self.blocks:
            x, moe_out = block(x)
            if moe_out is not None:
                aux = aux + moe_out.aux_loss
                stats.append(moe_out.stats)
        return ViTOutput(self.head(self.ln_f(x[:, 0])), aux, stats)           # (B, Y)


# ---------------------------------------------------------------- train / evaluate
@dataclass
class RunResult:
    accuracy: float
    train_seconds: float        # wall clock
    train_cpu_seconds: float    # this process's CPU time: steadier than wall time on a busy machine
    dropped_fraction: float     # test-time assignments dropped by capacity, mean over MoE blocks
    # test accuracy of the same trained model with the FFNs of the odd blocks (the MoE ones in
    # the MoE model) skipped: how much those FFNs carry on this task
    accuracy_without_odd_ffns: float


def train_and_evaluate(cfg: ViTConfig, train: TrainConfig, seed: int, data) -> RunResult:
    """Train one model from ``seed`` (initial weights and batch order) and measure test accuracy.
    ``data`` is ``load_digits_split()``'s four tensors."""
    x_tr, y_tr, x_te, y_te = data
    seed_everything(seed)
    model = ViT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = -(-len(x_tr) // train.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, pct_start=0.1,
                                                total_steps=train.epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    for _ in range(train.epochs):
        for idx in torch.randperm(len(x_tr), generator=order).split(train.batch_size):
            out = model(x_tr[idx])
            loss = F.cross_entropy(out.logits, y_tr[idx]) + out.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    accuracy, dropped = evaluate(model, x_te, y_te, train.batch_size)
    ablated = accuracy_without_odd_ffns(model, x_te, y_te, train.batch_size)
    return RunResult(accuracy, seconds, cpu_seconds, dropped, ablated)


@torch.no_grad()
def evaluate(model: ViT, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Test accuracy, in batches of the training size so that an expert's capacity (a fraction
    of a batch's tokens) means the same at test time as in training; and the dropped fraction."""
    model.eval()
    correct, dropped = 0, []
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        correct += int((out.logits.argmax(-1) == y[i:i + batch_size]).sum())
        dropped += [float(s.dropped_fraction) for s in out.router_stats]
    model.train()
    return correct / len(x), (sum(dropped) / len(dropped) if dropped else 0.0)


def accuracy_without_odd_ffns(model: ViT, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Test accuracy with the odd blocks' FFNs (the MoE ones, in the MoE model) skipped: how much
    those layers carry on this task."""
    for block in model.blocks[1::2]:
        block.ffn_on = False
    try:
        return evaluate(model, x, y, batch_size)[0]
    finally:
        for block in model.blocks[1::2]:
            block.ffn_on = True


# ---------------------------------------------------------------- experiment
def summarise(cfg: ViTConfig, runs: list[RunResult], seeds: list[int]) -> dict:
    acc_mean, acc_sd = mean_sd([r.accuracy for r in runs])
    return {
        "accuracy_mean": acc_mean,
        "accuracy_sd": acc_sd,
        "accuracies": [r.accuracy for r in runs],
        "seeds": seeds,
        **param_counts(ViT(cfg)),
        "train_seconds_mean": mean_sd([r.train_seconds for r in runs])[0],
        "train_cpu_seconds_mean": mean_sd([r.train_cpu_seconds for r in runs])[0],
        "dropped_fraction_mean": mean_sd([r.dropped_fraction for r in runs])[0],
        "accuracy_without_odd_ffns_mean": mean_sd([r.accuracy_without_odd_ffns for r in runs])[0],
    }


def run_experiment(base: ViTConfig, train: TrainConfig, seeds: list[int],
                   capacities: tuple[float, ...] = (), log=print) -> dict:
    """Dense vs dropless MoE over ``seeds`` (interleaved, so machine load falls on both alike),
    then the MoE again at each capacity factor under both drop priorities."""
    data = load_digits_split()
    dense_cfg, moe_cfg = replace(base, moe=False), replace(base, moe=True)
    runs: dict[str, list[RunResult]] = {"dense": [], "moe": []}
    for seed in seeds:
        for name, cfg in (("dense", dense_cfg), ("moe", moe_cfg)):
            runs[name].append(train_and_evaluate(cfg, train, seed, data))
            r = runs[name][-1]
            log(f"  {name:5s} seed {seed}: accuracy {r.accuracy:.4f} "
                f"({r.train_seconds:.1f} s, {r.train_cpu_seconds:.1f} s CPU)")
    results = {name: summarise(cfg, runs[name], seeds)
               for name, cfg in (("dense", dense_cfg), ("moe", moe_cfg))}
    sweep = []
    for factor in capacities:
        for policy in DROP_POLICIES:
            cfg = replace(moe_cfg, capacity_factor=factor, drop_policy=policy)
            cap_runs = []
            for seed in seeds:
                cap_runs.append(train_and_evaluate(cfg, train, seed, data))
                log(f"  moe C={factor:g} {policy:8s} seed {seed}: accuracy "
                    f"{cap_runs[-1].accuracy:.4f}, dropped {cap_runs[-1].dropped_fraction:.3f}")
            row = summarise(cfg, cap_runs, seeds)
            sweep.append({"capacity_factor": factor, "drop_policy": policy,
                          **{k: row[k] for k in ("accuracy_mean", "accuracy_sd", "accuracies",
                                                 "dropped_fraction_mean", "accuracy_without_odd_ffns_mean",
                                                 "train_seconds_mean", "train_cpu_seconds_mean")}})
    setup = {"vit": {k: v for k, v in asdict(base).items() if k != "moe"}, "train": asdict(train),
             "seeds": seeds,
             "data": "sklearn digits, stratified 80/20 split (random_state=0): 1437 train, 360 test",
             "matching": f"expert_hidden = ffn_hidden / top_k = {base.ffn_hidden} / {base.top_k}"}
    results["dense"]["setup"] = results["moe"]["setup"] = setup
    if capacities:
        results["moe"]["capacity_sweep"] = sweep
    return results


# ---------------------------------------------------------------- report
def print_results(results: dict) -> None:
    rows = []
    for name in ("dense", "moe"):
        r = results[name]
        rows.append([name, f"{r['accuracy_mean']:.4f} ± {r['accuracy_sd']:.4f}",
                     f"{r['accuracy_without_odd_ffns_mean']:.4f}",
                     f"{r['total_params']:,}", f"{r['active_params']:,}",
                     f"{r['train_seconds_mean']:.1f}", f"{r['train_cpu_seconds_mean']:.1f}"])
    seeds = len(results["dense"]["seeds"])
    print_table(f"ViT on digits: test accuracy over {seeds} seeds (mean ± sd)",
                ["model", "accuracy", "without odd-block FFNs", "total params", "active params",
                 "train s/seed", "CPU s/seed"], rows)
    sweep = results["moe"].get("capacity_sweep")
    if sweep:
        rows = [[f"{s['capacity_factor']:g}", s["drop_policy"],
                 f"{s['accuracy_mean']:.4f} ± {s['accuracy_sd']:.4f}",
                 f"{s['dropped_fraction_mean']:.3f}"] for s in sweep]
        rows.append(["dropless", "-", f"{results['moe']['accuracy_mean']:.4f} ± "
                     f"{results['moe']['accuracy_sd']:.4f}", "0.000"])
        print_table("ViT-MoE capacity sweep (score = Batch Prioritized Routing)",
                    ["capacity", "priority", "accuracy", "dropped (test)"], rows)


def plot_results(results: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["moe"].get("capacity_sweep")
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(10 if sweep else 4.5, 4), squeeze=False)
    ax = axes[0][0]
    names = ["dense", "moe"]
    means = [results[n]["accuracy_mean"] for n in names]
    sds = [results[n]["accuracy_sd"] for n in names]
    ax.bar(names, means, yerr=sds, capsize=6, color=["tab:gray", "tab:blue"])
    for i, n in enumerate(names):
        ax.scatter([i] * len(results[n]["accuracies"]), results[n]["accuracies"], color="k", s=12, zorder=3)
    low = min(min(results[n]["accuracies"]) for n in names)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, active params: dense {results['dense']['active_params']:,}, "
                 f"MoE {results['moe']['active_params']:,}", fontsize=10)
    if sweep:
        ax = axes[0][1]
        for policy, color in zip(DROP_POLICIES, ("tab:orange", "tab:green")):
            rows = [s for s in sweep if s["drop_policy"] == policy]
            xs = [s["capacity_factor"] for s in rows]
            ys = np.array([s["accuracy_mean"] for s in rows])
            sd = np.array([s["accuracy_sd"] for s in rows])
            label = "score (BPR)" if policy == "score" else "position (default)"
            ax.plot(xs, ys, marker="o", color=color, label=label)
            ax.fill_between(xs, ys - sd, ys + sd, color=color, alpha=0.2)
        ax.axhline(results["moe"]["accuracy_mean"], color="tab:blue", ls="--", label="MoE dropless")
        ax.axhline(results["dense"]["accuracy_mean"], color="tab:gray", ls=":", label="dense")
        ax.set_xlabel("capacity factor (train and test)")
        ax.set_ylabel("test accuracy")
        ax.set_title("dropping tokens: priority by position vs by router score")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------- command line
QUICK = {"epochs": 3}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"a short run for a smoke test ({QUICK['epochs']} epochs; under a minute on 2 CPU "
                        "cores)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per model (>= 2); default 3")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default {TrainConfig().epochs}; {QUICK['epochs']} with --quick)")
    p.add_argument("--capacity", type=float, nargs="*", default=None, metavar="C",
                   help="also sweep these capacity factors (0 < C <= 1) under both drop priorities; "
                        f"with no value: {' '.join(map(str, DEFAULT_CAPACITIES))}")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE block (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these matrices are too small to share out, and "
                        "on a busy machine a second thread mostly waits for a preempted one)")
    p.add_argument("--json", metavar="FILE", help='write {"dense": {...}, "moe": {...}} here')
    p.add_argument("--png", metavar="FILE", default="runs/examples/vit_moe.png",
                   help="figure path (default runs/examples/vit_moe.png)")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error(f"--seeds = {args.seeds} is invalid: must be >= 2 (the table reports a standard deviation)")
    if args.epochs is None:
        args.epochs = QUICK["epochs"] if args.quick else TrainConfig().epochs
    if args.epochs < 1:
        p.error(f"--epochs = {args.epochs} is invalid: must be >= 1")
    if args.capacity is not None:
        args.capacity = tuple(args.capacity) or DEFAULT_CAPACITIES
        bad = [c for c in args.capacity if not 0 < c <= 1]
        if bad:
            p.error(f"--capacity = {bad[0]} is invalid: capacity factors must be in (0, 1]")
    if args.threads < 1:
        p.error(f"--threads = {args.threads} is invalid: must be >= 1")
    if not 1 <= args.top_k <= args.experts:
        p.error(f"--top-k = {args.top_k} is invalid: must be in [1, --experts = {args.experts}]")
    if ViTConfig().ffn_hidden % args.top_k:
        p.error(f"--top-k = {args.top_k} is invalid: must divide the dense width {ViTConfig().ffn_hidden}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = ViTConfig(num_experts=args.experts, top_k=args.top_k)
    train = TrainConfig(epochs=args.epochs)
    results = run_experiment(base, train, list(range(args.seeds)), args.capacity or ())
    print_results(results)
    plot_results(results, args.png)
    print(f"figure: {args.png}")
    if args.json:
        write_json(args.json, results)
        print(f"results: {args.json}")
    return results


if __name__ == "__main__":
    main()
