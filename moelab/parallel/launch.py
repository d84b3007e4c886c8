"""`moelab train --nproc N`: start torchrun (standalone, this machine) with N workers running the
same `moelab train` command, and pass on what the user does to it.

torchrun runs in its own session, so a Ctrl-C reaches only this launcher, which forwards one
SIGTERM: the workers finish their step, checkpoint and exit, and torchrun waits for them (30 s by
default before it kills them). A second Ctrl-C kills the job at once; the last checkpoint stays
intact.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from moelab.config import Config, ConfigError
from moelab.parallel.layout import plan_layout


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "moelab", *argv]


def launch_torchrun(nproc: int, cfg: Config, run_dir: Path, argv: list[str]) -> int:
    from moelab.runfolder import checkpoint_dirs
    from moelab.stop import EXIT_STOPPED

    if nproc < 1:
        raise ConfigError(f"--nproc = {nproc} is invalid: must be >= 1")
    plan_layout(cfg, nproc)                     # a bad layout is refused here, before any process starts
    if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc = {nproc} is invalid: this machine has {torch.cuda.device_count()} GPUs "
                          "(one process per GPU; set train.device=cpu to run gloo processes instead)")
    proc = subprocess.Popen(torchrun_command(nproc, argv), start_new_session=True)
    stop_sent_at = None

    def forward(signum, frame):
        nonlocal stop_sent_at
        if stop_sent_at is None:
            stop_sent_at = time.time()
            print(f"{signal.Signals(signum).name}: asking the {nproc} workers to checkpoint and stop "
                  "(again to kill them at once)", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGTERM)
        else:
            proc.kill()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop_sent_at is not None:
        newest = checkpoint_dirs(run_dir)[-1:] if run_dir.is_dir() else []
        if newest and newest[0].stat().st_mtime >= stop_sent_at - 1:
            print(f"stopped with a checkpoint ({newest[0].name}); continue with: "
                  f"moelab train --resume {run_dir} --nproc {nproc}", file=sys.stderr)
            return EXIT_STOPPED
    return code
