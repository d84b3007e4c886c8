"""`moelab train`: train a preset or config on the built-in corpus or your text; resume a run."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path

from moelab.commands import add_config_args, add_output_args, config_from_args, message_sink, raise_user


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (or resume a run)")
    add_config_args(p)
    p.add_argument("--out", help="run folder (default runs/<preset>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    p.add_argument("--init-from", metavar="RUN", help="start from the weights of RUN (fine-tune); "
                                                      "the model config comes from RUN")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip batches with a non-finite loss or gradient instead of stopping")
    p.add_argument("--strict-resume", action="store_true",
                   help="with --resume: stop if the newest checkpoint is damaged instead of falling "
                        "back to the newest intact one")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes of this machine: starts torchrun --standalone for you "
                        "(gloo on CPU, nccl on GPUs); for several machines run torchrun yourself")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")
    add_output_args(p)
    p.add_argument("--quiet-data", action="store_true",
                   help="do not print the data preparation lines (compare prints them once)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moelab.data import DataError
    from moelab.lock import FolderLockedError
    from moelab.runfolder import TOKENIZER_FILE, CheckpointError, checkpoint_dirs, read_config, resolve
    from moelab.stop import EXIT_STOPPED, StoppedByRequest
    from moelab.train.trainer import TrainingError, resume_config, train

    if args.strict_resume and not args.resume:
        raise_user("--strict-resume applies to --resume RUN only")
    overrides = list(args.overrides)
    if args.skip_nonfinite:
        overrides.append("train.skip_nonfinite=true")
    command = "moelab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        if args.resume and _is_adapter_run(args.resume):     # a LoRA fine-tune: resumed as one
            from moelab.adapt.finetune import resume_finetune
            if args.preset or args.config or args.init_from or args.nproc is not None:
                raise_user("--resume continues a fine-tune with its own settings; drop "
                           "--preset/--config/--init-from/--nproc")
            resume_finetune(args.resume, overrides, strict_resume=args.strict_resume, command=command,
                            show_progress=False if args.no_progress else None)
            return 0
        if args.resume:
            if args.preset or args.config or args.init_from:
                raise_user("--resume continues a run with its own config; drop --preset/--config/--init-from")
            run_dir = Path(args.resume)
            cfg = resume_config(run_dir, overrides)          # refuses non-runs before writing
            resume = True                                    # train() checks the checkpoint first
        else:
            args.overrides = overrides
            cfg = config_from_args(args)
            if args.init_from and _is_adapter_run(args.init_from):
                raise_user(f"--init-from {args.init_from!r} is a LoRA adapter folder: start from its "
                           f"merged weights instead ({args.init_from}/merged, written by moelab finetune --merge)")
            if args.init_from:
                # the weights come with their model config and, unless data.tokenizer says
                # otherwise, their tokenizer: token ids must mean what the embeddings learned
                source = read_config(args.init_from)
                data = cfg.data
                tokenizer = resolve(args.init_from) / TOKENIZER_FILE
                if data.tokenizer is None and tokenizer.is_file():
                    data = dataclasses.replace(data, tokenizer=str(tokenizer))
                cfg = dataclasses.replace(cfg, model=source.model, data=data).validate()
            name = args.preset or (Path(args.config).stem if args.config else "model")
            run_dir = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
            if checkpoint_dirs(run_dir):
                raise_user(f"{str(run_dir)!r} already holds a run; use --resume {run_dir} or another --out")
            resume = False
        from moelab.train.trackers import check_available
        check_available(cfg.train.trackers)               # a missing wandb/mlflow: exit 2 now
        if args.nproc is not None:
            from moelab.parallel.launch import launch_torchrun
            return launch_torchrun(args.nproc, cfg, run_dir, _without_nproc(args.argv))
        log = message_sink(args, hide=("data: ",) if args.quiet_data else ())
        train(cfg, run_dir, resume=resume, strict_resume=args.strict_resume, init_from=args.init_from,
              command=command, show_progress=False if args.no_progress or args.quiet else None, log=log)
    except StoppedByRequest as e:
        print(str(e), file=sys.stderr)
        return EXIT_STOPPED
    except (CheckpointError, TrainingError, DataError, FolderLockedError) as e:
        raise_user(str(e))
    except OSError as e:            # a full disk or unwritable folder outside a checkpoint save
        raise_user(f"{e.filename or 'a run file'}: {e.strerror or e}")
    return 0


def _is_adapter_run(run_dir: str) -> bool:
    from moelab.adapt.lora import is_adapter_folder
    return is_adapter_folder(run_dir)


def _without_nproc(argv: list[str]) -> list[str]:
    """This command's arguments for the worker processes: all but --nproc N."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out
