"""`moelab upcycle RUN`: turn a trained dense model (run folder or Hugging Face folder) into an MoE
whose layers start from its FFNs (sparse upcycling, Drop-Upcycling); see docs/upcycle.md."""

from __future__ import annotations

import shlex
import sys

from moelab.commands import raise_user


def add_parser(sub) -> None:
    p = sub.add_parser("upcycle", help="turn a dense model into an MoE that starts from its FFNs")
    p.add_argument("run", metavar="RUN", help="dense run folder or Hugging Face model folder")
    p.add_argument("--experts", type=int, required=True, metavar="E", help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, required=True, metavar="K", help="experts per token")
    p.add_argument("--method", default="copy", choices=("copy", "drop"),
                   help="copy: every expert is the FFN; drop: then re-draw --drop-ratio of each "
                        "expert's hidden units (Drop-Upcycling). Default copy")
    p.add_argument("--drop-ratio", type=float, default=0.5, metavar="R",
                   help="with --method drop: share of each expert's hidden units re-drawn (default 0.5)")
    p.add_argument("--granularity", type=int, default=1, metavar="G",
                   help="cut the FFN into G slices per copy: E experts of ffn_hidden/G units "
                        "(fine-grained); --experts and --top-k must be multiples of G. Default 1")
    p.add_argument("--layers", default="all", metavar="all|everyN|LIST",
                   help="which layers become MoE: all (default), every2 (layers 1, 3, ...) or 0,2,5")
    p.add_argument("--shared", type=int, default=0, metavar="S",
                   help="shared experts, each a copy of the FFN (default 0)")
    p.add_argument("--router-init", default="normal", choices=("normal", "zero"),
                   help="router weights: normal N(0, model.init_std) (default) or zero")
    p.add_argument("--seed", type=int, default=0, help="seed of the router draws and drop subsets")
    p.add_argument("--out", required=True, metavar="NEW", help="the new run folder (must not exist)")
    p.add_argument("--json", action="store_true", help="print the new folder's summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from moelab.adapt.upcycle import UpcycleOptions, upcycle
    from moelab.lock import FolderLockedError
    from moelab.runfolder import CheckpointError, read_config

    opts = UpcycleOptions(experts=args.experts, top_k=args.top_k, method=args.method,
                          drop_ratio=args.drop_ratio, granularity=args.granularity, layers=args.layers,
                          shared=args.shared, router_init=args.router_init, seed=args.seed)
    command = "moelab " + " ".join(shlex.quote(a) for a in args.argv)
    try:
        out = upcycle(args.run, opts, args.out, command=command,
                      log=lambda m: print(m, file=sys.stderr))
        cfg = read_config(out)
    except (CheckpointError, FolderLockedError) as e:
        raise_user(str(e))
    except OSError as e:
        raise_user(f"{e.filename or args.out}: {e.strerror or e}")
    from moelab.accounting import describe
    info = describe(cfg.model, 1, 1)
    summary = {"out": str(out), "moe_layers": cfg.model.moe_layer_indices(), "experts": opts.experts,
               "top_k": opts.top_k, "expert_hidden": cfg.model.moe.expert_hidden,
               "method": opts.method, "total_params": info["total_params"],
               "active_params": info["active_params"]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"upcycled {args.run} -> {out}: MoE layers {summary['moe_layers']}, {opts.experts} experts "
              f"of {summary['expert_hidden']} hidden units, top-{opts.top_k}, {opts.method}; "
              f"{info['total_params']:,} params ({info['active_params']:,} active). "
              f"Continue with: moelab train --init-from {out} --out RUN2")
    return 0
