"""Run logging: metrics.jsonl (the record every other command reads), the experiment trackers of
``train.trackers`` (TensorBoard by default, wandb, MLflow: every scalar of every record), and a live
progress bar on a terminal (plain lines at evaluations otherwise)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from moelab.fileio import open_no_follow, refuse_symlink
from moelab.runfolder import METRICS_FILE, repair_metrics

SUMMARY_FILE = "summary.json"


class RunLogger:
    """``writer=False`` (every rank but the first of a distributed run) keeps messages, metrics,
    TensorBoard and progress silent: one process speaks for the run."""

    def __init__(self, run_dir: Path, show_progress: Optional[bool] = None,
                 log: Optional[Callable[[str], None]] = None, writer: bool = True, config=None):
        from rich.console import Console
        self.run_dir = run_dir
        self.writer = writer
        self.console = Console(stderr=True)
        self.interactive = (self.console.is_terminal if show_progress is None else show_progress) and writer
        self._log = log
        self._progress = None
        self._task = None
        # the run's Config; without it the trackers are read from RUN/config.json when first needed
        self._config = config
        self._trackers: Optional[list] = None
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
        """Start the trackers now if the config is known (their imports are then not counted as
        training memory); otherwise they start with the first record, and only TensorBoard, the
        default, is imported now."""
        if not self.writer:
            return
        if self._config is not None or (self.run_dir / "config.json").is_file():
            self._open_trackers()
            return
        try:
            import torch.utils.tensorboard  # noqa: F401
        except Exception:  # noqa: BLE001 - reported when the tracker starts
            pass

    def _open_trackers(self) -> list:
        if self._trackers is not None or not self.writer:
            return self._trackers or []
        from moelab.config import ConfigError
        from moelab.train.trackers import open_trackers
        config = self._config
        if config is None:
            from moelab.runfolder import read_config
            config = read_config(self.run_dir)
        self._trackers = []
        try:
            self._trackers = open_trackers(config.train.trackers, self.run_dir, config.to_dict(),
                                           config.train.run_name)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a tracker that cannot start (no login, bad URI)
            raise ConfigError(f"train.trackers: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                              "(fix it, or leave the tracker out of train.trackers)") from None
        return self._trackers

    def _track(self, record: dict) -> None:
        """Every scalar of ``record`` to every tracker; a tracker that fails is dropped, once,
        with a warning (metrics.jsonl keeps everything)."""
        from moelab.train.trackers import scalars
        values = scalars(record)
        for tracker in list(self._open_trackers()):
            try:
                tracker.log(values, record["step"])
            except Exception as e:  # noqa: BLE001 - a full disk or a lost server must not stop training
                self._trackers.remove(tracker)
                self.warn(f"{tracker.name} logging stopped ({type(e).__name__}: {e})")

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
        self._track(record)

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
        self._track(record)
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
        """Stop the progress bar and finish the trackers, with the run's summary when it has one
        (a run stopped by a signal has none yet)."""
        self.stop_progress()
        summary = None
        path = self.run_dir / SUMMARY_FILE
        if self._trackers and path.is_file():
            try:
                summary = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                summary = None
        for tracker in self._trackers or []:
            try:
                tracker.finish(summary)
            except Exception as e:  # noqa: BLE001
                self.warn(f"{tracker.name} could not finish ({type(e).__name__}: {e})")
        self._trackers = None
