"""`moelab inspect RUN`: which experts a run uses, what they specialise in, which ones matter,
and how routing settled. Writes inspect.json, report.md and PNGs (see docs/inspect.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from moelab.commands import raise_user


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="routing analytics of an MoE run (load, co-activation, "
                                       "specialisation, ablation, saturation, traces)")
    p.add_argument("run", metavar="RUN", help="run folder (trained or imported with convert --from-hf)")
    p.add_argument("--tokens", type=int, default=65536, help="held-out tokens to route (default 65536)")
    p.add_argument("--corpus", help="route this corpus instead of the run's (file, folder, glob, .jsonl, "
                                    ".parquet or stdlib)")
    p.add_argument("--split", choices=("val", "train", "all"),
                   help="which part of the corpus (default: val for the run's corpus, all for --corpus)")
    p.add_argument("--categories", default="auto", metavar="KIND",
                   help="token categories: auto (python on Python sources, else file), python, file, "
                        "folder, field:NAME (.jsonl), none")
    p.add_argument("--ablate", default="all", metavar="SPEC",
                   help="experts to route around: all (default), none, or a comma list of top[:N], "
                        "bottom[:N] (by load) and expert ids, e.g. top:2,bottom:2,5")
    p.add_argument("--ablate-tokens", type=int, default=8192,
                   help="tokens each ablation is scored on (default 8192)")
    p.add_argument("--against", metavar="CKPT_OR_RUN",
                   help="router saturation against another checkpoint (RUN/ckpt-XXXXXXXX) or run")
    p.add_argument("--prompt", help="trace the experts chosen for each token of this text")
    p.add_argument("--out", help="output folder (default RUN/inspect)")
    p.add_argument("--device", help="cpu or cuda (default: the run's train.device)")
    p.add_argument("--batch-size", type=int, help="windows per forward (default: about 4096 tokens' worth)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the run's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override how tokens are read, e.g. --set data.max_bytes=2000000 (data.*, train.*)")
    p.add_argument("--json", action="store_true", help="print inspect.json's content instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from moelab.inspect import InspectError, InspectOptions, inspect_run
    from moelab.inspect.report import print_summary, write_outputs
    from moelab.progress import Progress

    opts = InspectOptions(tokens=args.tokens, corpus=args.corpus, split=args.split,
                          categories=args.categories, ablate=args.ablate,
                          ablate_tokens=args.ablate_tokens, against=args.against, prompt=args.prompt,
                          device=args.device, batch_size=args.batch_size, seq_len=args.seq_len,
                          overrides=tuple(args.overrides))
    out_dir = Path(args.out) if args.out else Path(args.run) / "inspect"
    with Progress("inspect", enabled=not args.quiet) as progress:
        try:
            progress.stage("reading the run and its held-out tokens", None)   # until routing starts
            result = inspect_run(args.run, opts, progress=progress.stage)
        except InspectError as e:
            raise_user(str(e))
        with progress.phase("writing inspect.json, report.md and the plots"):
            text = write_outputs(result, out_dir)
    if args.json:
        sys.stdout.write(text)
        return 0
    # a file or pipe gets the whole table, not one squeezed to 80 columns
    print_summary(result, out_dir, Console(width=None if sys.stdout.isatty() else 200))
    return 0
