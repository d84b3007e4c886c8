"""`moelab train`: train a preset or config on the built-in corpus or your text; resume a run."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from moelab.commands import add_config_args, add_output_args, config_from_args, message_sink, raise_user


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (or resume a run)")
    add_config_args(p)
    p.add_argument("--out", help="run folder (default runs/<preset>-<time>); refused when it already "
                                 "holds a model or run files, unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="with --out: remove the model and run files already in the folder (its "
                        "config, weights, checkpoints, metrics, ...) and train a new run there")
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
    from moelab.runfolder import TOKENIZER_FILE, CheckpointError, read_config, resolve
    from moelab.stop import EXIT_STOPPED, StoppedByRequest
    from moelab.train.trainer import TrainingError, resume_config, train

    if args.strict_resume and not args.resume:
        raise_user("--strict-resume applies to --resume RUN only")
    if args.overwrite and (args.resume or not args.out):
        raise_user("--overwrite applies to --out DIR only (a new run replacing what DIR holds)")
    overrides = list(args.overrides)
    if args.skip_nonfinite:
        overrides.append("train.skip_nonfinite=true")
    command = "moelab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cfg, run_dir = None, None
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
                _check_init_weights(args.init_from, cfg)      # before any data or folder work
            name = args.preset or (Path(args.config).stem if args.config else "model")
            run_dir = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
            if os.environ.get("RANK", "0") == "0":           # under torchrun rank 0 speaks for all
                _claim_out_dir(run_dir, args.overwrite)
            resume = False
        from moelab.train.trackers import check_available
        check_available(cfg.train.trackers)               # a missing wandb/mlflow: exit 2 now
        _check_memory(cfg, args.nproc)
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
    except RuntimeError as e:
        lost = _lost_peer(e, cfg, run_dir) if cfg is not None else None
        if lost is None:
            raise
        print(f"error: {lost}", file=sys.stderr)     # every rank that meets it says so
        return 1
    return 0


def _lost_peer(e: RuntimeError, cfg, run_dir) -> str | None:
    """One line for a collective that failed because another process stopped answering
    (gloo's timeout after parallel.timeout_s, or a closed connection); None for anything else."""
    text = str(e)
    rank = os.environ.get("RANK", "0")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    resume = f"the newest checkpoint is intact: continue with `moelab train --resume {run_dir}`"
    if "Timed out" in text or "timed out" in text:
        return (f"rank {rank}: a collective waited longer than parallel.timeout_s = "
                f"{cfg.parallel.timeout_s:g} s for another process (stopped, hung or lost) and "
                f"the run ended ({first}); {resume}")
    if "Connection closed by peer" in text or "Connection reset by peer" in text:
        return (f"rank {rank}: another process of the run closed its connection (it stopped or "
                f"was killed) and the run ended ({first}); {resume}")
    return None


def _run_files(run_dir: Path) -> list[str]:
    from moelab.runfolder import NotAFolder, run_files
    try:
        return run_files(run_dir)
    except NotAFolder:
        raise_user(f"--out {str(run_dir)!r} exists and is not a folder")


def _claim_out_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that already holds a model or run, touching nothing in it; with
    ``overwrite``, remove those files (under the folder's lock, so never under a live run)."""
    from moelab.lock import FolderLock
    found = _run_files(run_dir)
    if not found:
        return
    # what a run leaves beside its files, removed with them: its tracker ids (a new run must not
    # log into the old run's wandb / MLflow run), wandb's folder and the GGUF export cache
    found = sorted(set(found) | {n for n in ("trackers.json", "wandb", "gguf") if (run_dir / n).exists()})
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    if not overwrite:
        raise_user(f"--out {str(run_dir)!r} already holds a model or run ({shown}); continue it with "
                   f"`moelab train --resume {run_dir}`, choose another --out, or add --overwrite to "
                   "replace it")
    with FolderLock(run_dir, "overwrite"):
        for name in found:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    print(f"--overwrite: removed {shown} from {run_dir}", file=sys.stderr)


def _check_init_weights(source: str, cfg) -> None:
    """--init-from: the source's weights file is whole and fits its config, checked from the
    safetensors header before any data preparation or run-folder work."""
    from safetensors import SafetensorError, safe_open

    from moelab.model.weights import StateMismatch, build_on_meta, check_shapes, expected_shapes
    from moelab.runfolder import WEIGHTS_FILE, CheckpointError, is_hf_folder, resolve
    folder = resolve(source)
    if is_hf_folder(folder):
        return                        # converted on load; interop checks its shards
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"--init-from {source!r}: {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"--init-from {source!r}: {path} is damaged or not a safetensors file: {e}") from None
    try:
        check_shapes(expected_shapes(build_on_meta(cfg.model)), found, str(path))
    except StateMismatch as e:
        raise CheckpointError(f"--init-from {source!r}: {e}") from None


def _check_memory(cfg, nproc) -> None:
    """Refuse, before anything is allocated, a run this machine cannot hold: each process holds
    its share of the training state (the model is sharded before it is filled), in RAM or on its GPU."""
    from moelab.accounting import training_bytes_per_process
    from moelab.resources import available_on, available_ram, refuse_unless_fits
    t = cfg.train
    world = nproc or int(os.environ.get("WORLD_SIZE") or 1)
    local = nproc or int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    # activations are those of one micro-batch: gradient accumulation runs them one at a time
    per_process = training_bytes_per_process(cfg.model, t.batch_size, t.seq_len, world,
                                             cfg.parallel.activation_checkpointing)
    on = f" on {local} processes" if local > 1 else ""
    advice = "make the model (model.*) or the batch (train.batch_size, train.seq_len) smaller"
    if t.device == "cuda" or (t.device == "auto" and _cuda_available()):
        if nproc is None:             # a launcher leaves the GPUs to its workers
            gpu = f"cuda:{int(os.environ.get('LOCAL_RANK') or 0)}"
            refuse_unless_fits(per_process, available_on(gpu), "training this model", gpu, advice)
        return
    refuse_unless_fits(per_process * local, available_ram(), f"training this model{on}", "this machine",
                       advice)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


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
