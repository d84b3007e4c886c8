"""The training loop: data -> model -> loss + aux losses -> AdamW -> router bias updates, with
periodic validation, logging and checkpoints. Read it in three parts: ``setup`` (everything a run
needs), ``train_step`` (one optimiser step) and ``run_loop`` (the budget, logging, evaluation,
checkpoints and signals).

Determinism: on CPU in fp32 a run is a pure function of its config. Batches are a function of
(seed, step) and the RNG state is checkpointed, so a run stopped at any checkpoint and resumed
reproduces the uninterrupted per-step losses bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from moelab.accounting import describe
from moelab.config import Config, ConfigError
from moelab.lock import FolderLock, FolderLockedError
from moelab.model.moe.hash_table import fit_hash_routers
from moelab.model.moe.layer import load_cv, max_over_mean
from moelab.model.transformer import ModelOutput, Transformer
from moelab.parallel.layout import device_for, layout_from_env
from moelab.parallel.runtime import start as start_runtime
from moelab.fileio import remove_temporaries, write_json, write_text_atomic
from moelab.runfolder import (
    CONFIG_FILE, METRICS_FILE, RUN_META_FILE, SUMMARY_FILE, TOKENIZER_FILE, CheckpointError, read_config,
)
from moelab.stop import GracefulStop, StoppedByRequest
from moelab.train.allocator import reuse_freed_memory
from moelab.train.checkpoint import (
    Checkpointer, LoopState, ResumePoint, choose_resume_checkpoint, verify_checkpoint,
)
from moelab.train.evaluate import autocast, validate
from moelab.train.memory import PeakMemory
from moelab.train.optim import build_optimizer, lr_at
from moelab.train.runlog import RunLogger


class TrainingError(RuntimeError):
    """Training cannot continue (a non-finite loss or gradient); the message names step and layer."""


@dataclass
class Budget:
    """Whichever limit is reached first ends the run."""
    max_steps: int
    max_tokens: Optional[int]
    max_seconds: Optional[float]
    tokens_per_step: int

    @property
    def planned_steps(self) -> int:
        steps = self.max_steps
        if self.max_tokens is not None:
            steps = min(steps, math.ceil(self.max_tokens / self.tokens_per_step))
        return steps

    def progress(self, loop: LoopState) -> float:
        """Fraction of the budget used, driving the cosine schedule (time budgets included)."""
        p = loop.step / max(1, self.planned_steps)
        if self.max_seconds:
            p = max(p, loop.elapsed_s / self.max_seconds)
        return min(1.0, p)

    def done(self, loop: LoopState) -> bool:
        if loop.step >= self.planned_steps:
            return True
        return bool(self.max_seconds) and loop.elapsed_s >= self.max_seconds


class RunFolderWriter:
    """The run files the main process writes (config, tokenizer, run_meta, summary); on every
    other rank each method does nothing, as the metrics logger does."""

    def __init__(self, run_dir: Path, active: bool):
        self.run_dir, self.active = run_dir, active

    def start(self, cfg: Config, tokenizer_json: str) -> None:
        """A new run: its config, tokenizer and an empty metrics file."""
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / CONFIG_FILE, cfg.to_dict())
            write_text_atomic(self.run_dir / TOKENIZER_FILE, tokenizer_json)
            write_text_atomic(self.run_dir / METRICS_FILE, "")

    def meta(self, meta: dict) -> None:
        if self.active:
            path = self.run_dir / RUN_META_FILE
            if meta.get("parent") is None and path.is_file():   # a resumed run keeps its parent
                meta["parent"] = json.loads(path.read_text(encoding="utf-8")).get("parent")
            write_json(path, meta)

    def summary(self, summary: dict) -> None:
        if self.active:
            write_json(self.run_dir / SUMMARY_FILE, summary)


@dataclass
class Run:
    """Everything ``setup`` prepares for the loop."""
    cfg: Config
    run_dir: Path
    runtime: object
    model: Transformer
    optimizer: torch.optim.Optimizer
    batches: object             # training batches: ``batches.batch(i)`` -> (x, y)
    val: list                   # fixed validation batches
    checkpointer: Checkpointer
    logger: RunLogger
    files: RunFolderWriter
    memory: PeakMemory
    budget: Budget
    loop: LoopState
    info: dict                  # accounting: params, FLOPs, memory estimate
    corpus_sha256: str


@dataclass
class StepResult:
    loss: float                 # mean task loss over the micro-batches (this rank)
    aux_loss: float
    grad_norm: float            # before clipping; nan when the batch was skipped before it
    skipped: bool
    out: Optional[ModelOutput]  # the last micro-batch's output (router statistics)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, strict_resume: bool = False,
          init_from: str | Path | None = None, command: str = "", log: Callable[[str], None] | None = None,
          show_progress: bool | None = None, adapter=None) -> dict:
    """Train (or resume) the run in ``run_dir`` on this process, or on every process of a torchrun
    job; returns its summary (also in summary.json). Raises StoppedByRequest after a signal asked
    the run to stop and its checkpoint is written. ``adapter``: a LoRA run (``moelab.adapt.lora``):
    it wraps the built model and is what checkpoints hold instead of the full weights."""
    cfg.validate_for_training()                      # before any file or data work
    layout = layout_from_env(cfg)                    # before any process-group work
    device = device_for(layout, cfg.train.device)
    if device.type == "cpu":
        reuse_freed_memory()                         # no fresh pages to fault in every step
    runtime = start_runtime(layout, device, cfg.parallel.timeout_s)
    try:
        with _run_folder_lock(Path(run_dir), runtime):
            run = setup(cfg, Path(run_dir), runtime, resume=resume, strict_resume=strict_resume,
                        init_from=init_from, command=command, log=log, show_progress=show_progress,
                        adapter=adapter)
            return run_loop(run)
    finally:
        runtime.close()


@contextlib.contextmanager
def _run_folder_lock(run_dir: Path, runtime):
    """The main process holds the run folder's lock for the whole run; every rank learns whether
    it got it before anything is written."""
    lock, error = None, None
    if runtime.layout.is_main:
        try:
            lock = FolderLock(run_dir, "training").acquire()
            remove_temporaries(run_dir)          # what a killed write left: no writer is live now
        except (FolderLockedError, OSError) as e:    # OSError: a .lock symlink, an unwritable folder
            error = e
    if not runtime.broadcast_int(0 if error is None else 1) == 0:
        raise error or FolderLockedError(f"{str(run_dir)!r} is locked by another process (see rank 0)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------

def setup(cfg: Config, run_dir: Path, runtime, *, resume: bool, strict_resume: bool, init_from,
          command: str, log, show_progress, adapter=None) -> Run:
    """Data, model, optimiser, checkpointer and logger of a new or resumed run; the run folder's
    files written (new run) or the checkpoint restored (resume)."""
    from moelab.data import objective_batches, prepare_data

    t_cfg, layout, device = cfg.train, runtime.layout, runtime.device
    logger = RunLogger(run_dir, show_progress=show_progress, log=log, writer=layout.is_main, config=cfg)
    files = RunFolderWriter(run_dir, layout.is_main)
    point = _resume_point(run_dir, strict_resume, runtime, logger) if resume else None
    torch.manual_seed(t_cfg.seed)

    # the main process tokenises first (and fills the cache); the others then read the cache
    data = prepare_data(cfg.data, cfg.model.vocab_size, log=logger.info) if layout.is_main else None
    runtime.barrier()
    data = data or prepare_data(cfg.data, cfg.model.vocab_size, log=logger.info)
    batches, val = objective_batches(t_cfg, data)    # train.objective: next-token or masked LM

    logger.open_tensorboard()           # its import is not training memory: do it before tracking
    memory = PeakMemory(device).start()
    model = _build_model(cfg, runtime, init_from, logger)     # built on meta, sharded, then filled
    if init_from is None and point is None and fit_hash_routers(model, data.train_tokens):
        logger.info("hash routers: balanced token-id tables fitted to the training tokens")
    if adapter is not None:             # LoRA: base frozen, adapter trainable (moelab.adapt.lora)
        model = adapter.wrap(model, logger.info)
    optimizer = build_optimizer(model, t_cfg)
    checkpointer = Checkpointer(run_dir, runtime, t_cfg.keep_checkpoints, weights=adapter)
    loop = LoopState()
    if point is not None:
        loop = checkpointer.restore(point, model, optimizer)
        logger.repair_metrics(after_step=loop.step)
        logger.info(f"resumed from {point.path.name} (step {loop.step}, {loop.tokens:,} tokens)")
    else:
        files.start(cfg, data.tokenizer_json)
    info = describe(cfg.model, t_cfg.batch_size, t_cfg.seq_len)
    files.meta({
        "command": command, "corpus": data.corpus.__dict__, "torch": torch.__version__,
        "device": str(device), "machine": platform.platform(), "processor": platform.processor(),
        "world_size": layout.world_size, "layout": layout.describe(),
        "total_params": info["total_params"], "active_params": info["active_params"],
        "flops_per_token": info["flops_per_token"],
        "parent": str(init_from) if init_from is not None else None,   # the run it started from
    })
    tokens_per_step = t_cfg.batch_size * t_cfg.seq_len * t_cfg.grad_accum
    budget = Budget(t_cfg.max_steps, t_cfg.max_tokens,
                    t_cfg.max_minutes * 60 if t_cfg.max_minutes else None, tokens_per_step)
    logger.info(f"{info['total_params']:,} params ({info['active_params']:,} active), "
                f"{tokens_per_step:,} tokens/step, up to {budget.planned_steps} steps on {device}"
                + (f" x {layout.describe()}" if layout.distributed else ""))
    return Run(cfg, run_dir, runtime, model, optimizer, batches, val, checkpointer, logger, files,
               memory, budget, loop, info, data.corpus.sha256)


def _build_model(cfg: Config, runtime, init_from, logger: RunLogger) -> Transformer:
    """The model every rank starts from, already wrapped by ``runtime`` (expert parallelism and
    FSDP2): built on the meta device, sharded there, then each rank fills only its own shards, so
    no rank ever holds the whole model. From scratch, the weights are those an eager
    ``Transformer(cfg.model)`` draws after ``torch.manual_seed(train.seed)``, bit for bit, and the
    RNG continues from where that build would leave it (``moelab.model.init_replay``). With
    ``init_from`` (a run folder, checkpoint, Hugging Face folder or Hub id) each rank reads its
    rows straight from the safetensors files (``moelab.interop.sharded``) and the RNG restarts at
    ``train.seed``: no initial weights are drawn."""
    from moelab.model.init_replay import build_recorded
    from moelab.model.weights import StateMismatch, build_on_meta
    from moelab.parallel.load import allocate, load_rows, put, unfilled

    torch.manual_seed(cfg.train.seed)
    if init_from is None:
        model, recipe = build_recorded(cfg.model)
    else:
        model, recipe = build_on_meta(cfg.model), None
    model = runtime.wrap(model)
    allocate(model, runtime.device)
    if recipe is not None:
        recipe.replay(lambda name, full: put(model, name, full))
    else:
        from moelab.interop.sharded import open_rows
        try:
            load_rows(model, open_rows(init_from))
        except StateMismatch as e:
            raise CheckpointError(str(e)) from None
        torch.manual_seed(cfg.train.seed)
        logger.info(f"initialised weights from {init_from}")
    left = unfilled(model)
    if left:
        raise RuntimeError(f"the model build left {left[:5]} without a value")
    model.train()
    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    if cfg.train.compile:
        from moelab.train.compile import compile_dense_parts
        if compile_dense_parts(model, logger.warn):
            logger.info("train.compile: attention and norms compiled (MoE layers stay eager)")
    return model


def _resume_point(run_dir: Path, strict: bool, runtime, logger) -> ResumePoint:
    """The main process picks the checkpoint (moving damaged newer ones aside); the others load
    the same one."""
    point, error = None, None
    if runtime.layout.is_main:
        try:
            point = choose_resume_checkpoint(run_dir, strict, warn=logger.warn)
        except CheckpointError as e:
            error = e
    step = runtime.broadcast_int(-1 if point is None else int(point.state["step"]))
    if step < 0:
        raise error or CheckpointError(f"{str(run_dir)!r}: no checkpoint to resume from (see rank 0)")
    if point is None:
        path = run_dir / f"ckpt-{step:08d}"
        point = ResumePoint(path, verify_checkpoint(path), [])
    return point


# ---------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------

def train_step(run: Run, step: int) -> StepResult:
    """One optimiser step over ``train.grad_accum`` micro-batches: forward, backward, clip, AdamW,
    router bias updates. A non-finite loss or gradient stops the run or skips the batch
    (``train.skip_nonfinite``), naming where it first appeared."""
    t_cfg, runtime, model, device = run.cfg.train, run.runtime, run.model, run.runtime.device
    loss_sum, aux_sum, out = 0.0, 0.0, None
    for micro in range(t_cfg.grad_accum):
        x, y = run.batches.batch(step * t_cfg.grad_accum + micro)
        x, y = runtime.local_rows(x), runtime.local_rows(y)                # this rank's rows
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            out = model(x, targets=y)
            loss = out.loss + out.aux_loss
        if runtime.any_of([not torch.isfinite(loss)])[0]:
            where = _first_nonfinite_module(model, x, device)
            return _skip(run, f"non-finite loss ({loss.item()}) at step {step + 1}; first appeared "
                              f"in {where}", StepResult(loss_sum, aux_sum, float("nan"), True, out))
        (loss * runtime.loss_scale / t_cfg.grad_accum).backward()
        loss_sum += out.loss.item() / t_cfg.grad_accum
        aux_sum += out.aux_loss.item() / t_cfg.grad_accum
    grad_norm = runtime.clip_grad_norm(model, t_cfg.grad_clip or float("inf"))
    if not math.isfinite(grad_norm):
        bad = _nonfinite_grads(model)
        return _skip(run, f"non-finite gradient at step {step + 1}; first appeared in "
                          f"{bad[0] if bad else 'unknown'} ({len(bad)} parameters affected)",
                     StepResult(loss_sum, aux_sum, grad_norm, True, out))
    run.optimizer.step()
    model.update_router_biases()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, aux_sum, grad_norm, False, out)


def _skip(run: Run, message: str, result: StepResult) -> StepResult:
    """The one place a non-finite step is handled: stop, or drop its gradients and go on."""
    if not run.cfg.train.skip_nonfinite:
        raise TrainingError(message + " (use --skip-nonfinite to skip such batches)")
    run.logger.warn(message + "; batch skipped")
    run.optimizer.zero_grad(set_to_none=True)
    return result


def _first_nonfinite_module(model: Transformer, x: torch.Tensor, device) -> str:
    """Re-run the forward with hooks and name the first sub-module whose output is not finite."""
    found: list[str] = []
    hooks = []
    names = {"embed": model.embed, "norm": model.norm}
    for i, blk in enumerate(model.blocks):
        names[f"blocks.{i}.attn"] = blk.attn
        names[f"blocks.{i}.ffn ({'moe' if blk.is_moe else 'dense'})"] = blk.ffn
    for name, module in names.items():
        def hook(_m, _inp, out, name=name):
            t = out.output if hasattr(out, "output") else out
            if torch.is_tensor(t) and not found and not torch.isfinite(t).all():
                found.append(name)
        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), autocast(device):
            logits = model(x).logits
    finally:
        for h in hooks:
            h.remove()
    if found:
        return found[0]
    return "lm_head" if not torch.isfinite(logits).all() else "the loss (logits were finite)"


def _nonfinite_grads(model: Transformer) -> list[str]:
    """Parameters with non-finite gradients, the one nearest the output first (where backward
    meets the problem first)."""
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    return list(reversed(bad))


def router_record(out: Optional[ModelOutput], runtime) -> list[dict]:
    """Per MoE layer: the last micro-batch's routing statistics, loads summed and everything else
    averaged over ranks."""
    if out is None or not out.router_stats:
        return []
    records = []
    for s in out.router_stats:
        load = runtime.sum_tensor(s.tokens_per_expert.float())
        averages = s.averages()
        record = {"layer": s.layer, "load_cv": load_cv(load), "max_over_mean": max_over_mean(load)}
        record.update(zip(averages, runtime.mean(list(averages.values()))))
        record["load"] = (load / load.sum().clamp_min(1)).tolist()
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

def run_loop(run: Run) -> dict:
    """Steps until the budget is spent: log, evaluate, checkpoint (also on a signal, then stop);
    returns the summary."""
    t_cfg, runtime, logger, loop, budget = run.cfg.train, run.runtime, run.logger, run.loop, run.budget
    model, device = run.model, runtime.device
    tokens_per_step = budget.tokens_per_step
    if loop.step == 0 and t_cfg.eval_every:
        logger.eval_record(loop, *validate(model, run.val, device, runtime, t_cfg.objective))
    logger.start_progress(budget.planned_steps, loop.step)
    throughput: list[float] = []
    interval_tokens, interval_time, last_val = 0, 0.0, None
    save_interval = t_cfg.save_every_minutes * 60 if t_cfg.save_every_minutes else None
    last_save = time.monotonic()
    with GracefulStop(log=logger.info) as stop:
        while not budget.done(loop):
            step_start = time.perf_counter()
            runtime.comm_start_step()
            lr = lr_at(loop.step, budget.progress(loop), t_cfg)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            result = train_step(run, loop.step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            # every rank takes the same decisions from here: the slowest rank's step time, and a
            # stop or time-based save requested on any rank
            dt, stop_now, save_due = runtime.max_of([
                time.perf_counter() - step_start, float(stop.requested),
                float(save_interval is not None and time.monotonic() - last_save >= save_interval)])
            loop.step += 1
            loop.tokens += tokens_per_step
            loop.elapsed_s += dt
            interval_tokens += tokens_per_step
            interval_time += dt

            if loop.step % t_cfg.log_every == 0 or budget.done(loop):
                throughput.append(interval_tokens / max(interval_time, 1e-9))
                interval_tokens, interval_time = 0, 0.0
                loss_mean, aux_mean = runtime.mean([result.loss, result.aux_loss])
                logger.train_record(loop, loss=loss_mean, aux_loss=aux_mean, lr=lr,
                                    grad_norm=result.grad_norm, tokens_per_s=throughput[-1],
                                    router=router_record(result.out, runtime), skipped=result.skipped,
                                    comm=runtime.comm_record())
            logger.advance(loop, result.loss)
            if loop.step % t_cfg.eval_every == 0 or budget.done(loop):
                last_val, accuracy = validate(model, run.val, device, runtime, t_cfg.objective)
                logger.eval_record(loop, last_val, accuracy)
            if loop.step % t_cfg.save_every == 0 or budget.done(loop) or save_due or stop_now:
                run.checkpointer.save(model, run.optimizer, loop)
                last_save = time.monotonic()
            if stop_now and not budget.done(loop):
                logger.close()
                raise StoppedByRequest(
                    f"stopped by {stop.signal_name or 'a signal on another rank'} at step {loop.step} with "
                    f"a checkpoint; continue with: moelab train --resume {run.run_dir}", str(run.run_dir))

    logger.stop_progress()
    peaks = runtime.per_rank(run.memory.stop())
    if last_val is None:
        last_val, _ = validate(model, run.val, device, runtime, t_cfg.objective)
    summary = _summary(run, last_val, throughput, peaks)
    run.files.summary(summary)
    logger.info(f"done: {loop.step} steps, {loop.tokens:,} tokens, val loss {last_val:.4f} "
                f"(ppl {summary['perplexity']:.2f}), run folder {run.run_dir}")
    logger.close()
    return summary


def _summary(run: Run, val_loss: float, throughput: list[float], peaks: list[float]) -> dict:
    device, info, loop = run.runtime.device, run.info, run.loop
    return {
        "run_dir": str(run.run_dir),
        "steps": loop.step,
        "tokens": loop.tokens,
        "train_time_s": loop.elapsed_s,
        "val_loss": val_loss,
        "perplexity": math.exp(min(val_loss, 50.0)),
        "tokens_per_s": statistics.median(throughput[1:] or throughput) if throughput else None,
        "peak_memory_bytes": max(peaks),
        "peak_memory_bytes_per_rank": peaks,
        "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS above pre-model level",
        "memory_estimate_bytes": info["memory_bytes"],
        "total_params": info["total_params"],
        "active_params": info["active_params"],
        "flops_per_token": info["flops_per_token"],
        "device": str(device),
        "world_size": run.runtime.layout.world_size,
        "corpus_sha256": run.corpus_sha256,
    }


def resume_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """The config a resumed run continues with: its own, plus train.* and parallel.* overrides only
    (a longer budget, another layout); anything that would change the model or data is refused."""
    cfg = read_config(run_dir)
    for o in overrides:
        if not o.strip().startswith(("train.", "parallel.")):
            raise ConfigError(f"--resume keeps the run's model and data; only train.* and parallel.* "
                              f"keys may be overridden (got '{o.split('=')[0]}')")
    return cfg.with_overrides(overrides).validate() if overrides else cfg
