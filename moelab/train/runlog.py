"""Run logging: metrics.jsonl (the record every other command reads), TensorBoard events, and a
live progress bar on a terminal (plain lines at evaluations otherwise)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from moelab.fileio import open_no_follow, refuse_symlink
from moelab.runfolder import METRICS_FILE, repair_metrics


class RunLogger:
    """``writer=False`` (every rank but the first of a distributed run) keeps messages, metrics,
    TensorBoard and progress silent: one process speaks for the run."""

    def __init__(self, run_dir: Path, show_progress: Optional[bool] = None,
                 log: Optional[Callable[[str], None]] = None, writer: bool = True):
        from rich.console import Console
        self.run_dir = run_dir
        self.writer = writer
        self.console = Console(stderr=True)
        self.interactive = (self.console.is_terminal if show_progress is None else show_progress) and writer
        self._log = log
        self._progress = None
        self._task = None
        self._tb = None
        self._last_val: Optional[float] = None
        if writer:
            # files appended or written in place: a link would lead writes (and a resume's
            # metrics repair, reads) out of the run folder; refused before anything is written
            refuse_symlink(run_dir / METRICS_FILE)
            refuse_symlink(run_dir / "tb")

    # ---- plain messages -------------------------------------------------------------------------
    def info(self, message: str) -> None:
        if not self.writer:
            return
        if self._log is not None:
            self._log(message)
        elif self._progress is not None:
            self._progress.console.print(message)
        else:
            self.console.print(message, highlight=False, markup=False)

    def warn(self, message: str) -> None:
        self.info(f"warning: {message}")

    # ---- metrics ----------------------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        if not self.writer:
            return
        # never through a link: a metrics.jsonl symlink would append to a file outside the run
        path = self.run_dir / METRICS_FILE
        fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            with open(fd, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as e:                   # a full disk: say which file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None

    def repair_metrics(self, after_step: int) -> None:
        """Before a resume: drop records logged after the checkpoint (a killed run may have logged
        steps that will now be redone) and a torn last line, saying so, so the file reads as one
        uninterrupted run."""
        if self.writer:
            refuse_symlink(self.run_dir / METRICS_FILE)   # it would read a file outside the run
            message = repair_metrics(self.run_dir, after_step)
            if message:
                self.warn(message)

    def open_tensorboard(self) -> None:
        self._writer()

    def _writer(self):
        if not self.writer:
            return None
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                refuse_symlink(self.run_dir / "tb")      # events stay inside the run folder
                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except Exception as e:  # tensorboard missing or broken: keep training, say so once
                self.warn(f"TensorBoard logging disabled ({e})")
                self._tb = False
        return self._tb or None

    def train_record(self, loop, *, loss: float, aux_loss: float, lr: float, grad_norm: float,
                     tokens_per_s: float, router: list[dict], skipped: bool,
                     comm: Optional[dict] = None) -> None:
        record = {"kind": "train", "step": loop.step, "tokens": loop.tokens, "loss": loss,
                  "aux_loss": aux_loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "elapsed_s": loop.elapsed_s, "router": router}
        if skipped:
            record["skipped"] = True
        if comm is not None:
            # one value per rank: bytes sent and seconds spent in all-to-all and FSDP collectives
            record["comm"] = comm
        self._append(record)
        tb = self._writer()
        if tb:
            tb.add_scalar("train/loss", loss, loop.step)
            tb.add_scalar("train/aux_loss", aux_loss, loop.step)
            tb.add_scalar("train/lr", lr, loop.step)
            tb.add_scalar("train/tokens_per_s", tokens_per_s, loop.step)
            for r in router:
                for key in ("load_cv", "max_over_mean", "dropped_fraction", "entropy"):
                    tb.add_scalar(f"router/layer{r['layer']}/{key}", r[key], loop.step)
            if comm is not None:
                for key in ("alltoall_bytes", "alltoall_s", "fsdp_bytes", "fsdp_s"):
                    tb.add_scalar(f"comm/{key}", max(comm.get(key, [0])), loop.step)

    def eval_record(self, loop, val_loss: float, mlm_accuracy: Optional[float] = None) -> None:
        """A validation record; a masked LM's also holds its masked-token accuracy."""
        import math
        ppl = math.exp(min(val_loss, 50.0))
        self._last_val = val_loss
        record = {"kind": "eval", "step": loop.step, "tokens": loop.tokens,
                  "elapsed_s": loop.elapsed_s, "val_loss": val_loss, "val_ppl": ppl}
        if mlm_accuracy is not None:
            record["mlm_accuracy"] = mlm_accuracy
        self._append(record)
        tb = self._writer()
        if tb:
            tb.add_scalar("val/loss", val_loss, loop.step)
            tb.add_scalar("val/perplexity", ppl, loop.step)
            if mlm_accuracy is not None:
                tb.add_scalar("val/mlm_accuracy", mlm_accuracy, loop.step)
        if not self.interactive:
            extra = f"  masked-token accuracy {mlm_accuracy:.4f}" if mlm_accuracy is not None else ""
            self.info(f"step {loop.step:>6}  tokens {loop.tokens:>11,}  val loss {val_loss:.4f}  "
                      f"ppl {ppl:.2f}{extra}")

    # ---- progress bar ------------------------------------------------------------------------------
    def start_progress(self, total_steps: int, done: int) -> None:
        if not self.interactive:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=done,
                                             loss="-", val="-", tps="-")

    def advance(self, loop, loss: float) -> None:
        if self._progress is None:
            return
        tps = loop.tokens / max(loop.elapsed_s, 1e-9)
        val = f"{self._last_val:.3f}" if self._last_val is not None else "-"
        self._progress.update(self._task, completed=loop.step, loss=f"{loss:.3f}", val=val,
                              tps=f"{tps:,.0f}")

    def stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self.stop_progress()
        if self._tb:
            self._tb.close()
