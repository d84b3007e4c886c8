"""The two measured studies of docs/upcycle.md and docs/finetune.md, driven through the CLI.

    python benchmarks/adapt_study.py upcycle  --out runs/upcycle-study  [--tiny]
    python benchmarks/adapt_study.py finetune --out runs/finetune-study [--tiny]

upcycle: a dense model pretrained on the built-in corpus, then ``moelab compare --from`` it: dense
continued, copy-upcycled, Drop-Upcycled (r = 0.5) for the same extra tokens, and a from-scratch
MoE of the same shape for the dense tokens plus the extra ones, at 3 seeds. Writes
``study.json``: per arm and seed the final validation loss (equal extra tokens) and the loss at
equal wall-clock (the shortest continuation's training time in that seed), with paired t-tests
(moelab.compare.stats) of every arm against dense and of drop against copy.

finetune: an MoE pretrained on the built-in corpus without the ``email`` package, then fine-tuned
on ``email`` alone: LoRA on the routed experts, LoRA on attention only, and full fine-tuning, at
3 seeds. Writes ``study.json``: held-out (email) validation loss, the pretraining domain's
validation loss after fine-tuning (forgetting), trainable parameters and training wall-clock.

Every stage skips runs that finished (summary.json), so rerunning continues a stopped study.
Run it niced on a shared machine; the machine and load are recorded in study.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moelab.compare import stats  # noqa: E402
from moelab.compare.analysis import interpolate  # noqa: E402
from moelab.runfolder import load_metrics, read_summary  # noqa: E402

SIZES = {
    "full": {
        # sized so both studies finish in about 40 minutes on a shared 2-core CPU
        "model": ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.ffn_hidden=512"],
        "train": ["train.batch_size=8", "train.seq_len=128", "train.eval_batches=8", "train.log_every=10"],
        "data": [],
        "pretrain": 400_000, "extra": "150k", "seeds": 3, "finetune": 60_000, "tokens_per_step": 1024,
        "moe": ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.expert_hidden=256"],
        "experts": 8, "top_k": 2,
    },
    "tiny": {
        "model": ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=128",
                  "model.vocab_size=512", "model.max_seq_len=64"],
        "train": ["train.batch_size=4", "train.seq_len=32", "train.eval_batches=2", "train.log_every=1"],
        "data": ["data.max_bytes=1500000"],
        "pretrain": 20_000, "extra": "8k", "seeds": 2, "finetune": 6_000, "tokens_per_step": 128,
        "moe": ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=64"],
        "experts": 4, "top_k": 2,
    },
}
HELD_OUT = "email"       # the package the finetune study keeps out of pretraining
LORA_LR, FULL_LR, LORA_RANK = 3e-3, 3e-4, 8


def sets(items: list[str]) -> list[str]:
    return sum((["--set", s] for s in items), [])


def moelab(args: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ moelab {' '.join(args)}\n")
        f.flush()
        code = subprocess.call([sys.executable, "-m", "moelab", *args, "--no-progress"] if args[0] in
                               ("train", "finetune", "compare") else [sys.executable, "-m", "moelab", *args],
                               stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    if code != 0:
        raise SystemExit(f"moelab {args[0]} failed (exit {code}); see {log}")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


def judge(gaps: list[float]) -> dict:
    v = stats.judge(gaps, "seeds")
    return v.public()


def eval_curve(run: Path) -> list[dict]:
    return [r for r in load_metrics(run) if r["kind"] == "eval"]


# ---------------------------------------------------------------------------------------------
# upcycling
# ---------------------------------------------------------------------------------------------

def upcycle_study(out: Path, size: dict) -> dict:
    started = machine()
    dense = out / "dense"
    if read_summary(dense) is None:
        moelab(["train", "--preset", "dense", "--out", str(dense),
                *sets(size["model"] + size["train"] + size["data"] +
                      [f"train.max_tokens={size['pretrain']}", "train.max_steps=100000000",
                       f"train.eval_every={max(1, size['pretrain'] // 8 // size['tokens_per_step'])}"])], out / "logs" / "dense.log")
    E, K = size["experts"], size["top_k"]
    cmp = out / "cmp"
    models = f"dense,upcycle:E={E},K={K},method=copy,upcycle:E={E},K={K},method=drop,r=0.5"
    if (cmp / "compare.json").exists():
        moelab(["compare", "--resume", str(cmp)], out / "logs" / "compare.log")
    else:
        moelab(["compare", "--from", str(dense), "--models", models, "--budget", size["extra"],
                "--seeds", str(size["seeds"]), "--out", str(cmp)], out / "logs" / "compare.log")
    plan = json.loads((cmp / "compare.json").read_text())
    rows: dict[str, dict[int, dict]] = {}
    for unit in plan["units"]:
        run = cmp / unit["run_dir"]             # relative to the compare folder (absolute before)
        s = read_summary(run)
        rows.setdefault(unit["model"], {})[unit["seed"]] = {
            "val_loss": s["val_loss"], "tokens": s["tokens"], "train_time_s": s["train_time_s"],
            "tokens_per_s": s["tokens_per_s"], "curve": eval_curve(run)}
    seeds = plan["seeds"]
    for seed in seeds:      # equal wall-clock: the shortest continuation of the seed (as compare)
        budget_s = min(rows[a][seed]["train_time_s"] for a in rows if not a.startswith("scratch"))
        for arm in rows:
            c = rows[arm][seed]["curve"]
            rows[arm][seed]["val_loss_at_equal_time"] = interpolate(
                [e["elapsed_s"] for e in c], [e["val_loss"] for e in c], budget_s)
            rows[arm][seed]["first_eval"] = c[0]["val_loss"] if c else None
    names = list(rows)
    copy_name = next(n for n in names if n.startswith("upcycle-copy"))
    drop_name = next(n for n in names if n.startswith("upcycle-drop"))
    verdicts = {}
    for key in ("val_loss", "val_loss_at_equal_time"):
        for arm in names:
            if arm != "dense":
                gaps = [rows[arm][s][key] - rows["dense"][s][key] for s in seeds
                        if rows[arm][s][key] is not None and rows["dense"][s][key] is not None]
                verdicts[f"{arm} - dense, {key}"] = judge(gaps) if len(gaps) >= 2 else None
        gaps = [rows[drop_name][s][key] - rows[copy_name][s][key] for s in seeds
                if rows[drop_name][s][key] is not None and rows[copy_name][s][key] is not None]
        verdicts[f"{drop_name} - {copy_name}, {key}"] = judge(gaps) if len(gaps) >= 2 else None
    dense_summary = read_summary(dense)
    result = {"study": "upcycle", "sizes": size, "dense_pretrain": {
        "tokens": dense_summary["tokens"], "val_loss": dense_summary["val_loss"],
        "train_time_s": dense_summary["train_time_s"]},
        "seeds": seeds, "arms": {a: {str(s): {k: v for k, v in r.items() if k != "curve"} for s, r in by.items()}
                                 for a, by in rows.items()},
        "verdicts": verdicts, "machine_start": started, "machine_end": machine()}
    (out / "study.json").write_text(json.dumps(result, indent=2))
    return result


def upcycle_lr_study(out: Path, lr: float, n_seeds: int) -> dict:
    """The continuation arms of the upcycle study again (dense, copy, drop; same upcycled folders,
    batches and budget) at another peak learning rate, for the first ``n_seeds`` seeds: does the
    ordering survive continuing without re-warming to the pretraining's peak lr? No scratch arm
    (its lr is the pretraining's). Needs ``upcycle`` to have written ``cmp/compare.json``."""
    started = machine()
    plan = json.loads((out / "cmp" / "compare.json").read_text())
    seeds = plan["seeds"][:n_seeds]
    folder = out / f"lr-{lr:g}"
    rows: dict[str, dict[int, dict]] = {}
    for unit in plan["units"]:
        if unit["model"].startswith("scratch") or unit["seed"] not in seeds:
            continue
        args = [a if not a.startswith("train.lr=") else f"train.lr={lr}" for a in unit["train_args"]]
        run = folder / unit["id"]
        if read_summary(run) is None:
            moelab(["train", "--out", str(run), *args], folder / "logs" / f"{unit['id']}.log")
        s = read_summary(run)
        curve = eval_curve(run)
        rows.setdefault(unit["model"], {})[unit["seed"]] = {
            "val_loss": s["val_loss"], "train_time_s": s["train_time_s"], "tokens_per_s": s["tokens_per_s"],
            "first_eval": curve[0]["val_loss"], "max_eval": max(e["val_loss"] for e in curve)}
    copy_name = next(n for n in rows if n.startswith("upcycle-copy"))
    drop_name = next(n for n in rows if n.startswith("upcycle-drop"))
    verdicts = {}
    for a, b in ((copy_name, "dense"), (drop_name, "dense"), (drop_name, copy_name)):
        gaps = [rows[a][s]["val_loss"] - rows[b][s]["val_loss"] for s in seeds]
        verdicts[f"{a} - {b}, val_loss"] = judge(gaps) if len(gaps) >= 2 else None
    result = {"study": "upcycle-lr", "lr": lr, "seeds": seeds, "arms": {a: {str(k): v for k, v in by.items()}
                                                                          for a, by in rows.items()},
              "verdicts": verdicts, "machine_start": started, "machine_end": machine()}
    (folder / "study.json").write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------------
# fine-tuning
# ---------------------------------------------------------------------------------------------

def build_corpora(out: Path) -> tuple[Path, Path]:
    """stdlib without ``email`` as one .jsonl (one record per file), and ``email`` as a folder."""
    from moelab.data.stdlib import is_generated, stdlib_files
    pre, held = out / "corpus" / "stdlib-without-email.jsonl", out / "corpus" / HELD_OUT
    if pre.is_file() and held.is_dir():
        return pre, held
    held.mkdir(parents=True, exist_ok=True)
    with open(pre, "w", encoding="utf-8") as f:
        for rel, path in stdlib_files():
            raw = path.read_bytes()
            if is_generated(raw):
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if rel.startswith(HELD_OUT + "/"):
                target = held / rel.replace("/", "__")
                target.write_text(text, encoding="utf-8")
            else:
                f.write(json.dumps({"text": text}) + "\n")
    return pre, held


def domain_loss(model, run_cfg, data_cfg, batches: int) -> float:
    """Validation loss of ``model`` on ``data_cfg``'s corpus, tokenised with the run's tokenizer."""
    from moelab.data import eval_batches, prepare_data
    from moelab.train.evaluate import evaluate
    data = prepare_data(data_cfg, run_cfg.model.vocab_size, log=lambda m: None)
    with torch.no_grad():
        return evaluate(model, eval_batches(run_cfg.train, data, batches),
                        torch.device("cpu"))


def finetune_study(out: Path, size: dict) -> dict:
    import dataclasses

    import moelab as ml
    from moelab.adapt.lora import (LoraSpec, apply_lora, is_adapter_folder, load_adapter_model,
                                   param_report, parse_targets)
    from moelab.runfolder import read_config

    started = machine()
    pre_corpus, held = build_corpora(out)
    base = out / "moe"
    if read_summary(base) is None:
        moelab(["train", "--preset", "moe", "--out", str(base),
                *sets(size["model"] + size["moe"] + size["train"] + size["data"] +
                      [f"data.corpus={pre_corpus}", f"train.max_tokens={size['pretrain']}",
                       "train.max_steps=100000000", f"train.eval_every={max(1, size['pretrain'] // 8 // size['tokens_per_step'])}"])],
               out / "logs" / "moe.log")
    steps = max(1, size["finetune"] // size["tokens_per_step"])
    common = size["train"] + ["data.val_fraction=0.2", "data.max_bytes=none", f"train.max_tokens={size['finetune']}",
                              "train.max_steps=100000000", f"train.eval_every={max(1, steps // 10)}",
                              f"train.save_every={max(1, steps // 2)}", f"train.warmup_steps={max(1, steps // 10)}"]
    arms = {"lora-experts": ("experts", LORA_LR), "lora-attn": ("attn", LORA_LR), "full": (None, FULL_LR)}
    seeds = [1 + i for i in range(size["seeds"])]
    rows: dict[str, dict[int, dict]] = {}
    base_cfg = read_config(base)
    for seed in seeds:
        for arm, (targets, lr) in arms.items():
            run = out / "runs" / f"{arm}-s{seed}"
            extra = common + [f"train.lr={lr}", f"train.seed={seed}"]
            if read_summary(run) is None:
                if targets is None:
                    moelab(["train", "--init-from", str(base), "--out", str(run),
                            *sets(extra + [f"data.corpus={held}"])],
                           out / "logs" / f"{arm}-s{seed}.log")
                else:
                    moelab(["finetune", str(base), "--lora-rank", str(LORA_RANK), "--lora-targets", targets,
                            "--corpus", str(held), "--out", str(run), *sets(extra)],
                           out / "logs" / f"{arm}-s{seed}.log")
            s = read_summary(run)
            cfg = read_config(run)
            model = load_adapter_model(run) if is_adapter_folder(run) else ml.load(run)
            pretrain_data = dataclasses.replace(base_cfg.data, tokenizer=str(base / "tokenizer.json"))
            if targets is not None:
                wrapped = apply_lora(ml.load(base), LoraSpec(rank=LORA_RANK, targets=parse_targets(targets)[0],
                                                            explicit=True))
                trainable = param_report(wrapped).trainable
            else:
                trainable = sum(p.numel() for p in model.parameters())
            rows.setdefault(arm, {})[seed] = {
                "held_out_val_loss": s["val_loss"], "train_time_s": s["train_time_s"], "tokens": s["tokens"],
                "tokens_per_s": s["tokens_per_s"], "trainable_params": trainable,
                "pretrain_domain_val_loss": domain_loss(model, cfg, pretrain_data, 8),
                "first_eval": eval_curve(run)[0]["val_loss"], "curve": eval_curve(run)}
    base_model = ml.load(base)
    held_cfg = dataclasses.replace(base_cfg.data, corpus=str(held), tokenizer=str(base / "tokenizer.json"),
                                   val_fraction=0.2, max_bytes=None)
    probe_cfg = read_config(out / "runs" / f"full-s{seeds[0]}")
    before = {"held_out_val_loss": domain_loss(base_model, probe_cfg, held_cfg, 8),
              "pretrain_domain_val_loss": domain_loss(base_model, probe_cfg, dataclasses.replace(
                  base_cfg.data, tokenizer=str(base / "tokenizer.json")), 8)}
    verdicts = {}
    for key in ("held_out_val_loss", "pretrain_domain_val_loss", "train_time_s"):
        for a, b in (("lora-experts", "full"), ("lora-attn", "full"), ("lora-experts", "lora-attn")):
            gaps = [rows[a][s][key] - rows[b][s][key] for s in seeds]
            verdicts[f"{a} - {b}, {key}"] = judge(gaps) if len(gaps) >= 2 else None
    result = {"study": "finetune", "sizes": size, "held_out_package": HELD_OUT, "lora_rank": LORA_RANK,
              "lr": {"lora": LORA_LR, "full": FULL_LR}, "base": {"tokens": read_summary(base)["tokens"], **before},
              "seeds": seeds,
              "arms": {a: {str(s): {k: v for k, v in r.items() if k != "curve"} for s, r in by.items()}
                       for a, by in rows.items()},
              "verdicts": verdicts, "machine_start": started, "machine_end": machine()}
    (out / "study.json").write_text(json.dumps(result, indent=2))
    return result


def _ms(values: list[float], fmt: str = "{:.4f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{fmt.format(mean)} ± {fmt.format(sd)}"


def render(result: dict) -> str:
    """Markdown tables of a study.json (what the docs quote)."""
    lines = []
    arms = result["arms"]
    if result["study"] == "upcycle-lr":
        keys = [("val_loss", "val loss (equal extra tokens)"), ("first_eval", "val loss at step 0"),
                ("max_eval", "highest val loss on the way"), ("train_time_s", "train s"), ("tokens_per_s", "tokens/s")]
    elif result["study"] == "upcycle":
        keys = [("val_loss", "val loss (equal extra tokens)"), ("val_loss_at_equal_time", "val loss at equal time"),
                ("first_eval", "val loss at step 0"), ("tokens", "tokens"), ("train_time_s", "train s"),
                ("tokens_per_s", "tokens/s")]
    else:
        keys = [("held_out_val_loss", "held-out (email) val loss"), ("pretrain_domain_val_loss", "pretraining-domain val loss"),
                ("trainable_params", "trainable params"), ("train_time_s", "train s"), ("tokens_per_s", "tokens/s")]
    lines.append("| arm | " + " | ".join(k[1] for k in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for arm, by in arms.items():
        cells = []
        for key, _ in keys:
            vals = [r[key] for r in by.values()]
            fmt = "{:,.0f}" if key in ("tokens", "trainable_params", "tokens_per_s") else \
                "{:.1f}" if key == "train_time_s" else "{:.4f}"
            cells.append(_ms(vals, fmt))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| paired comparison (over seeds) | mean gap | t x SE | verdict |")
    lines.append("|---|---|---|---|")
    for name, v in result["verdicts"].items():
        if v:
            lines.append(f"| {name} | {v['gap']:+.4f} | {v['threshold']:.4f} | {v['verdict']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", choices=("upcycle", "upcycle-lr", "finetune", "render"))
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="minutes-long smoke sizes, not the documented study")
    p.add_argument("--lr", type=float, default=3e-4, help="upcycle-lr: the continuation's peak lr")
    p.add_argument("--seeds", type=int, default=2, help="upcycle-lr: how many of the upcycle study's seeds")
    args = p.parse_args()
    out = Path(args.out).resolve()
    if args.study == "render":
        print(render(json.loads((out / "study.json").read_text())))
        return
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES["tiny" if args.tiny else "full"]
    if args.study == "upcycle-lr":
        result = upcycle_lr_study(out, args.lr, args.seeds)
    else:
        result = (upcycle_study if args.study == "upcycle" else finetune_study)(out, size)
    print(json.dumps(result["verdicts"], indent=2))


if __name__ == "__main__":
    main()
