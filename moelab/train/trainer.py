"""The training loop: data -> model -> loss + aux losses -> AdamW -> router bias updates, with
periodic validation, logging and checkpoints.

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
import torch.nn.functional as F

from moelab.accounting import describe
from moelab.config import Config
from moelab.model.moe.hash_table import fit_hash_routers
from moelab.model.transformer import Transformer
from moelab.lock import FolderLock, FolderLockedError
from moelab.parallel.layout import device_for, layout_from_env
from moelab.parallel.runtime import start as start_runtime
from moelab.train.allocator import reuse_freed_memory
from moelab.train.checkpoint import (
    METRICS_FILE, TOKENIZER_FILE, CheckpointError, atomic_write, load_model, read_config,
    write_json,
)
from moelab.train.runlog import RunLogger
from moelab.train.memory import PeakMemory
from moelab.train.optim import build_optimizer, lr_at
from moelab.train.state import (
    Checkpointer, LoopState, ResumePoint, choose_resume_checkpoint, verify_checkpoint,
)
from moelab.train.stop import GracefulStop, StoppedByRequest

SUMMARY_FILE = "summary.json"


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


def pick_device(name: str) -> torch.device:
    """The device a one-process command (eval, inspect, ...) runs on."""
    from moelab.parallel.layout import Layout
    return device_for(Layout(), name)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from materialised logits (the unfused form, for models that
    only return logits; ``Transformer(x, targets=y).loss`` is the same number, fused)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: Transformer, batches, device: torch.device, runtime=None) -> float:
    """Mean cross-entropy over fixed validation windows (eval mode: dropless routing); under
    torch.distributed each rank scores its rows of every window and the mean is over all."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        if runtime is not None:
            x, y = runtime.local_rows(x), runtime.local_rows(y)
        with _autocast(device):
            total += model(x.to(device), targets=y.to(device)).loss.item()
    model.train(was_training)
    mean = total / max(1, len(batches))
    return runtime.mean([mean])[0] if runtime is not None else mean


@dataclass(frozen=True)
class Scores:
    loss: float       # mean cross-entropy over the scored targets
    accuracy: float   # fraction of the scored targets that are the model's top-1 prediction
    scored: int       # how many targets were scored


@torch.no_grad()
def evaluate_scores(model: Transformer, batches, device: torch.device, runtime=None) -> Scores:
    """Loss and top-1 accuracy over the scored targets of fixed batches (for a masked LM: the
    masked-token loss and accuracy). Reads the logits, so it costs more than ``evaluate``. Under
    torch.distributed each rank scores its rows and the sums are taken over every rank."""
    from moelab.model.linear_cross_entropy import IGNORE_INDEX
    was_training = model.training
    model.eval()
    loss_sum, correct, scored = 0.0, 0, 0
    for x, y in batches:
        if runtime is not None:
            x, y = runtime.local_rows(x), runtime.local_rows(y)
        x, y = x.to(device), y.to(device)
        with _autocast(device):
            logits = model(x).logits
        keep = y != IGNORE_INDEX                                          # (B, T)
        logits_NV, y_N = logits[keep].float(), y[keep]
        loss_sum += F.cross_entropy(logits_NV, y_N, reduction="sum").item()
        correct += int((logits_NV.argmax(dim=-1) == y_N).sum())
        scored += int(y_N.numel())
    model.train(was_training)
    if runtime is not None:
        loss_sum, correct, scored = runtime.sum_tensor(
            torch.tensor([loss_sum, correct, scored], dtype=torch.float64)).tolist()
        correct, scored = int(correct), int(scored)
    return Scores(loss_sum / max(1, scored), correct / max(1, scored), scored)


def validate(model: Transformer, batches, device: torch.device, runtime, objective: str
             ) -> tuple[float, Optional[float]]:
    """The validation loss the run logs, and for a masked LM the masked-token accuracy from the
    same pass: scored as ``moelab eval`` scores the run, so the two agree."""
    if objective == "mlm":
        scores = evaluate_scores(model, batches, device, runtime)
        return scores.loss, scores.accuracy
    return evaluate(model, batches, device, runtime), None


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
        with torch.no_grad(), _autocast(device):
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


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, strict_resume: bool = False,
          init_from: str | Path | None = None, command: str = "", log: Callable[[str], None] | None = None,
          show_progress: bool | None = None) -> dict:
    """Train (or resume) the run in ``run_dir`` on this process, or on every process of a torchrun
    job; returns its summary (also in summary.json). Raises StoppedByRequest after a signal asked
    the run to stop and its checkpoint is written."""
    cfg.validate_for_training()                      # before any file or data work
    layout = layout_from_env(cfg)                    # before any process-group work
    device = device_for(layout, cfg.train.device)
    if device.type == "cpu":
        reuse_freed_memory()                         # no fresh pages to fault in every step
    runtime = start_runtime(layout, device)
    try:
        with _run_folder_lock(Path(run_dir), runtime):
            return _train(cfg, Path(run_dir), runtime, resume=resume, strict_resume=strict_resume,
                          init_from=init_from, command=command, log=log, show_progress=show_progress)
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
        except FolderLockedError as e:
            error = e
    if not runtime.broadcast_int(0 if error is None else 1) == 0:
        raise error or FolderLockedError(f"{str(run_dir)!r} is locked by another process (see rank 0)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, run_dir: Path, runtime, *, resume: bool, strict_resume: bool, init_from,
           command: str, log, show_progress) -> dict:
    from moelab.data import objective_batches, prepare_data

    t_cfg, layout, device = cfg.train, runtime.layout, runtime.device
    logger = RunLogger(run_dir, show_progress=show_progress, log=log, writer=layout.is_main)
    point = _resume_point(run_dir, strict_resume, runtime, logger) if resume else None
    torch.manual_seed(t_cfg.seed)

    # the main process tokenises first (and fills the cache); the others then read the cache
    data = prepare_data(cfg.data, cfg.model.vocab_size, log=logger.info) if layout.is_main else None
    runtime.barrier()
    data = data or prepare_data(cfg.data, cfg.model.vocab_size, log=logger.info)
    batches, val = objective_batches(t_cfg, data)    # train.objective: next-token or masked LM

    logger.open_tensorboard()           # its import is not training memory: do it before tracking
    memory = PeakMemory(device).start()
    torch.manual_seed(t_cfg.seed)
    model = Transformer(cfg.model).to(device)        # the same full weights on every rank
    if init_from is not None:
        source = load_model(init_from)
        model.load_state_dict(source.state_dict())
        logger.info(f"initialised weights from {init_from}")
    elif point is None and fit_hash_routers(model, data.train_tokens):
        logger.info("hash routers: balanced token-id tables fitted to the training tokens")
    model.train()
    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    if t_cfg.compile:
        from moelab.train.compile import compile_dense_parts
        if compile_dense_parts(model, logger.warn):
            logger.info("train.compile: attention and norms compiled (MoE layers stay eager)")
    model = runtime.wrap(model)
    optimizer = build_optimizer(model, t_cfg)
    checkpointer = Checkpointer(run_dir, runtime, t_cfg.keep_checkpoints)
    loop = LoopState()
    if point is not None:
        loop = checkpointer.restore(point, model, optimizer)
        logger.truncate_metrics(after_step=loop.step)
        logger.info(f"resumed from {point.path.name} (step {loop.step}, {loop.tokens:,} tokens)")
    elif layout.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.to_dict())
        atomic_write(run_dir / TOKENIZER_FILE, lambda t: Path(t).write_text(data.tokenizer_json, encoding="utf-8"))
        (run_dir / METRICS_FILE).write_text("")
    info = describe(cfg.model, t_cfg.batch_size, t_cfg.seq_len)
    if layout.is_main:
        write_json(run_dir / "run_meta.json", {
            "command": command, "corpus": data.corpus.__dict__, "torch": torch.__version__,
            "device": str(device), "machine": platform.platform(), "processor": platform.processor(),
            "world_size": layout.world_size, "layout": layout.describe(),
            "total_params": info["total_params"], "active_params": info["active_params"],
            "flops_per_token": info["flops_per_token"],
        })
    tokens_per_step = t_cfg.batch_size * t_cfg.seq_len * t_cfg.grad_accum
    budget = Budget(t_cfg.max_steps, t_cfg.max_tokens,
                    t_cfg.max_minutes * 60 if t_cfg.max_minutes else None, tokens_per_step)
    logger.info(f"{info['total_params']:,} params ({info['active_params']:,} active), "
                f"{tokens_per_step:,} tokens/step, up to {budget.planned_steps} steps on {device}"
                + (f" x {layout.describe()}" if layout.distributed else ""))

    if loop.step == 0 and t_cfg.eval_every:
        logger.eval_record(loop, *validate(model, val, device, runtime, t_cfg.objective))
    logger.start_progress(budget.planned_steps, loop.step)
    throughput: list[float] = []
    interval_tokens, interval_time = 0, 0.0
    last_val = None
    save_interval = t_cfg.save_every_minutes * 60 if t_cfg.save_every_minutes else None
    last_save = time.monotonic()
    with GracefulStop(log=logger.info) as stop:
        while not budget.done(loop):
            step_start = time.perf_counter()
            runtime.comm_start_step()
            lr = lr_at(loop.step, budget.progress(loop), t_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, aux_sum, skipped = 0.0, 0.0, False
            out = None
            for micro in range(t_cfg.grad_accum):
                x, y = batches.batch(loop.step * t_cfg.grad_accum + micro)
                x, y = runtime.local_rows(x), runtime.local_rows(y)        # this rank's rows
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device):
                    out = model(x, targets=y)
                    ce = out.loss
                    loss = ce + out.aux_loss
                if runtime.any_of([not torch.isfinite(loss)])[0]:
                    where = _first_nonfinite_module(model, x, device)
                    msg = f"non-finite loss ({loss.item()}) at step {loop.step + 1}; first appeared in {where}"
                    if not t_cfg.skip_nonfinite:
                        raise TrainingError(msg + " (use --skip-nonfinite to skip such batches)")
                    logger.warn(msg + "; batch skipped")
                    skipped = True
                    break
                (loss * runtime.loss_scale / t_cfg.grad_accum).backward()
                loss_sum += ce.item() / t_cfg.grad_accum
                aux_sum += out.aux_loss.item() / t_cfg.grad_accum
            grad_norm = float("nan")
            if not skipped:
                grad_norm = runtime.clip_grad_norm(model, t_cfg.grad_clip or float("inf"))
                if not math.isfinite(grad_norm):
                    bad = _nonfinite_grads(model)
                    msg = (f"non-finite gradient at step {loop.step + 1}; first appeared in "
                           f"{bad[0] if bad else 'unknown'} ({len(bad)} parameters affected)")
                    if not t_cfg.skip_nonfinite:
                        raise TrainingError(msg + " (use --skip-nonfinite to skip such batches)")
                    logger.warn(msg + "; batch skipped")
                    skipped = True
            if not skipped:
                optimizer.step()
                model.update_router_biases()
            optimizer.zero_grad(set_to_none=True)
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
                tps = interval_tokens / max(interval_time, 1e-9)
                throughput.append(tps)
                interval_tokens, interval_time = 0, 0.0
                loss_mean, aux_mean = runtime.mean([loss_sum, aux_sum])
                logger.train_record(loop, loss=loss_mean, aux_loss=aux_mean, lr=lr, grad_norm=grad_norm,
                                    tokens_per_s=tps, router=router_record(out, runtime), skipped=skipped,
                                    comm=runtime.comm_record())
            logger.advance(loop, loss_sum)
            if loop.step % t_cfg.eval_every == 0 or budget.done(loop):
                last_val, accuracy = validate(model, val, device, runtime, t_cfg.objective)
                logger.eval_record(loop, last_val, accuracy)
            if loop.step % t_cfg.save_every == 0 or budget.done(loop) or save_due or stop_now:
                checkpointer.save(model, optimizer, loop)
                last_save = time.monotonic()
            if stop_now and not budget.done(loop):
                logger.stop_progress()
                logger.close()
                raise StoppedByRequest(
                    f"stopped by {stop.signal_name or 'a signal on another rank'} at step {loop.step} with "
                    f"a checkpoint; continue with: moelab train --resume {run_dir}", str(run_dir))

    logger.stop_progress()
    peaks = runtime.per_rank(memory.stop())
    if last_val is None:
        last_val, _ = validate(model, val, device, runtime, t_cfg.objective)
    summary = {
        "run_dir": str(run_dir),
        "steps": loop.step,
        "tokens": loop.tokens,
        "train_time_s": loop.elapsed_s,
        "val_loss": last_val,
        "perplexity": math.exp(min(last_val, 50.0)),
        "tokens_per_s": statistics.median(throughput[1:] or throughput) if throughput else None,
        "peak_memory_bytes": max(peaks),
        "peak_memory_bytes_per_rank": peaks,
        "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS above pre-model level",
        "memory_estimate_bytes": info["memory_bytes"],
        "total_params": info["total_params"],
        "active_params": info["active_params"],
        "flops_per_token": info["flops_per_token"],
        "device": str(device),
        "world_size": layout.world_size,
        "corpus_sha256": data.corpus.sha256,
    }
    if layout.is_main:
        write_json(run_dir / SUMMARY_FILE, summary)
    logger.info(f"done: {loop.step} steps, {loop.tokens:,} tokens, val loss {last_val:.4f} "
                f"(ppl {summary['perplexity']:.2f}), run folder {run_dir}")
    logger.close()
    return summary


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


def router_record(out, runtime) -> list[dict]:
    """Per MoE layer: the last micro-batch's routing statistics, summed (loads) or averaged
    (fractions, entropy, losses) over ranks."""
    if out is None or not out.router_stats:
        return []
    records = []
    for s in out.router_stats:
        load = runtime.sum_tensor(s.tokens_per_expert.float())
        summary = s.summary()
        keys = [k for k in summary if k not in ("load_cv", "max_over_mean")]
        means = runtime.mean([summary[k] for k in keys])
        cv = float(load.std(unbiased=False) / load.mean().clamp_min(1e-9))
        record = {"layer": s.layer, "load_cv": cv, "max_over_mean": float(load.max() / load.mean().clamp_min(1e-9))}
        record.update(dict(zip(keys, means)))
        record["load"] = (load / load.sum().clamp_min(1)).tolist()
        records.append(record)
    return records


def resume_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """The config a resumed run continues with: its own, plus train.* and parallel.* overrides only
    (a longer budget, another layout); anything that would change the model or data is refused."""
    from moelab.config import ConfigError
    cfg = read_config(run_dir)
    for o in overrides:
        if not o.strip().startswith(("train.", "parallel.")):
            raise ConfigError(f"--resume keeps the run's model and data; only train.* and parallel.* "
                              f"keys may be overridden (got '{o.split('=')[0]}')")
    return cfg.with_overrides(overrides).validate() if overrides else cfg


def load_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
