"""`moelab finetune BASE`: train LoRA adapters (Hugging Face peft) on a run folder or Hugging Face
folder with new text; the base stays frozen and is not copied. See docs/finetune.md."""

from __future__ import annotations

import shlex
import sys

from moelab.commands import raise_user


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="LoRA fine-tuning (peft) of a run folder or Hugging Face folder")
    p.add_argument("base", nargs="?", metavar="RUN_OR_HF_FOLDER", help="the model to adapt")
    p.add_argument("--lora-rank", type=int, metavar="R", help="adapter rank (required for a new run)")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="LoRA alpha; the update is scaled by alpha / rank (default 2 * rank)")
    p.add_argument("--lora-targets", default=None, metavar="KINDS",
                   help="comma-separated: attn, ffn (dense layers), shared (shared experts), experts "
                        "(routed experts' stacked weights), router. Default: all but router")
    p.add_argument("--corpus", metavar="PATH", help="text to fine-tune on: a file, folder, glob, .jsonl "
                                                     "or .parquet (or 'stdlib')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override train.* or data.* (e.g. train.max_steps=200, train.lr=1e-3)")
    p.add_argument("--out", metavar="NEW", help="the new run folder (adapter, checkpoints, logs)")
    p.add_argument("--merge", action="store_true",
                   help="after training, also write NEW/merged: base + adapter as a normal run folder")
    p.add_argument("--resume", metavar="NEW", help="continue the fine-tune in NEW from its last checkpoint")
    p.add_argument("--base", dest="base_override", metavar="BASE",
                   help="with --resume: the base model, when the path NEW records has moved")
    p.add_argument("--strict-resume", action="store_true",
                   help="with --resume: stop if the newest checkpoint is damaged")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from moelab.adapt.finetune import finetune, resume_finetune
    from moelab.adapt.lora import LoraSpec, parse_targets, require_peft
    from moelab.data import DataError
    from moelab.lock import FolderLockedError
    from moelab.runfolder import CheckpointError
    from moelab.stop import EXIT_STOPPED, StoppedByRequest
    from moelab.train.trainer import TrainingError

    require_peft()                                   # exit 2 naming the extra, before anything else
    command = "moelab " + " ".join(shlex.quote(a) for a in args.argv)
    progress = False if args.no_progress else None
    try:
        if args.resume:
            given = [o for o, v in (("RUN_OR_HF_FOLDER", args.base), ("--lora-rank", args.lora_rank),
                                    ("--lora-alpha", args.lora_alpha), ("--lora-targets", args.lora_targets),
                                    ("--corpus", args.corpus), ("--out", args.out)) if v is not None]
            if given:
                raise_user(f"--resume continues the fine-tune with its own settings; drop {', '.join(given)}")
            summary = resume_finetune(args.resume, args.overrides, base=args.base_override, merge=args.merge,
                                      strict_resume=args.strict_resume, command=command, show_progress=progress)
        else:
            missing = [o for o, v in (("RUN_OR_HF_FOLDER", args.base), ("--lora-rank", args.lora_rank),
                                      ("--corpus", args.corpus), ("--out", args.out)) if v is None]
            if missing:
                raise_user(f"moelab finetune needs {', '.join(missing)} (or --resume NEW)")
            if args.base_override or args.strict_resume:
                raise_user("--base and --strict-resume apply to --resume NEW only")
            targets, explicit = parse_targets(args.lora_targets)
            spec = LoraSpec(rank=args.lora_rank, alpha=args.lora_alpha, targets=targets, explicit=explicit)
            summary = finetune(args.base, spec, args.corpus, args.out, args.overrides, merge=args.merge,
                               command=command, show_progress=progress)
    except StoppedByRequest as e:
        print(str(e).replace("moelab train --resume", "moelab finetune --resume"), file=sys.stderr)
        return EXIT_STOPPED
    except (CheckpointError, TrainingError, DataError, FolderLockedError) as e:
        raise_user(str(e))
    except OSError as e:
        raise_user(f"{e.filename or 'a run file'}: {e.strerror or e}")
    if "merged" in summary:
        print(f"merged model: {summary['merged']}", file=sys.stderr)
    return 0
