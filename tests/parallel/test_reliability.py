"""Processes that end well (issue 25): children die with their parent, a graceful stop is quiet
under torchrun, a stopped peer ends the run by name, damaged sharded checkpoints fall back, a
full disk under 2 ranks is one line, and a finished distributed run exits 0 every time.

Every test here starts real processes (torchrun, `python -m moelab`): all are slow."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.lock import FolderLock, FolderLockedError
from moelab.runfolder import checkpoint_dirs, load_metrics
from moelab.stop import EXIT_STOPPED

pytestmark = pytest.mark.slow

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=300",
        "model.ffn_hidden=64", "model.moe.expert_hidden=16", "model.moe.num_experts=4",
        "model.max_seq_len=32", "train.batch_size=4", "train.seq_len=16", "train.eval_batches=1",
        "train.log_every=1", "train.warmup_steps=1", "data.max_bytes=100000", "parallel.ep=2"]
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def _sets(*extra) -> list[str]:
    return sum((["--set", s] for s in TINY + list(extra)), [])


def _train_steps(run: Path) -> int:
    return len([r for r in load_metrics(run) if r["kind"] == "train"])


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                   # a zombie (not reaped by its dead parent yet) is gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _lock_is_free(run: Path) -> bool:
    try:
        FolderLock(run).acquire().release()
        return True
    except FolderLockedError:
        return False


# ---- item 7: children die with their parent ------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_the_nproc_launcher_stops_the_job_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "moelab", "train", "--nproc", "2", "--preset", "moe", "--out", str(run),
         "--no-progress", *_sets("train.max_steps=100000", "train.save_every=100000",
                                 "train.save_every_minutes=none", "train.eval_every=100000")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: (run / "metrics.jsonl").exists() and _train_steps(run) >= 3, 300, "3 steps")
    (torchrun,) = _children(launcher.pid)
    workers = _children(torchrun)
    launcher.kill()                                            # kill -9: no chance to forward
    launcher.wait()
    _wait(lambda: not any(_alive(p) for p in [torchrun, *workers]), 120, "torchrun and its workers")
    assert checkpoint_dirs(run), "the workers stopped without a checkpoint"
    assert _lock_is_free(run)
    stopped_at = int(checkpoint_dirs(run)[-1].name.split("-")[1])
    assert stopped_at == _train_steps(run)                     # saved at the step it stopped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_compare_stops_its_trainer_with_a_checkpoint(tmp_path):
    out = tmp_path / "cmp"
    sets = [s for s in TINY if not s.startswith("parallel.")] + ["train.save_every_minutes=none"]
    compare = subprocess.Popen(
        [sys.executable, "-m", "moelab", "compare", "--models", "moe", "--budget", "10M", "--seeds", "1",
         "--out", str(out), "--no-progress", *sum((["--set", s] for s in sets), [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = out / "runs"
    _wait(lambda: runs.is_dir() and any((r / "metrics.jsonl").exists() and _train_steps(r) >= 3
                                        for r in runs.iterdir()), 300, "the first unit's 3 steps")
    (unit,) = list(runs.iterdir())
    (trainer,) = _children(compare.pid)
    compare.kill()
    compare.wait()
    _wait(lambda: not _alive(trainer), 120, "the trainer")
    assert checkpoint_dirs(unit) and _lock_is_free(unit)


# ---- item 10: graceful stops under torchrun, a stopped peer -------------------------------------

def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def test_sigterm_to_the_workers_of_raw_torchrun_exits_75_from_each_without_a_traceback(tmp_path):
    """A scheduler that signals the training processes (as `scancel` signals a job step's
    processes): every worker checkpoints and exits 75, which torchrun's failure summary lists."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_torchrun("-m", "moelab", "train", "--preset", "moe", "--out", str(run),
                                      "--no-progress", *_sets("train.max_steps=100000", "train.save_every=100000",
                                                              "train.save_every_minutes=none",
                                                              "train.eval_every=100000")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait(lambda: (run / "metrics.jsonl").exists() and _train_steps(run) >= 3, 300, "3 steps")
    workers = _children(proc.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert err.count("exitcode  : 75") == 2, err[-3000:]
    assert err.count("moelab train --resume") == 2               # each worker's one line
    assert 'moelab/' not in "".join(line for line in err.splitlines() if line.startswith("  File"))
    assert checkpoint_dirs(run)


def test_nproc_after_sigterm_exits_75_and_prints_no_traceback(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moelab", "train", "--nproc", "2", "--preset", "moe", "--out", str(run),
         "--no-progress", *_sets("train.max_steps=100000", "train.save_every=100000",
                                 "train.save_every_minutes=none", "train.eval_every=100000")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait(lambda: (run / "metrics.jsonl").exists() and _train_steps(run) >= 3, 300, "3 steps")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert f"moelab train --resume {run}" in err


def test_a_stopped_peer_ends_the_run_with_an_error_naming_the_timeout(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moelab", "train", "--nproc", "2", "--preset", "moe", "--out", str(run),
         "--no-progress", *_sets("train.max_steps=100000", "train.save_every=100000",
                                 "train.save_every_minutes=none", "train.eval_every=100000",
                                 "parallel.timeout_s=10")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait(lambda: (run / "metrics.jsonl").exists() and _train_steps(run) >= 3, 300, "3 steps")
    (torchrun,) = _children(proc.pid)
    workers = sorted(_children(torchrun))
    os.kill(workers[-1], signal.SIGSTOP)                       # one rank stops answering
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "parallel.timeout_s = 10" in err, err[-3000:]


# ---- items 8, 9: damaged sharded checkpoints, a full disk under 2 ranks --------------------------

@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A 2-process run with sharded checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    env = {**os.environ, "MOELAB_CACHE": str(tmp_path_factory.getbasetemp() / "moelab-cache")}
    proc = subprocess.run(_torchrun("-m", "moelab", "train", "--preset", "moe", "--out", str(run), "--no-progress",
                                    *_sets("train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=2",
                                           "train.eval_every=100")),
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in checkpoint_dirs(run)] == ["ckpt-00000002", "ckpt-00000004"]
    return run


# DCP numbers the ranks from 1 in its file names (shard-00001 is rank 0)
@pytest.mark.parametrize("remove", ["optim/shard-00001-model-00001-of-*.safetensors",
                                    "model/sharded/shard-00002-model-00002-of-*.safetensors",
                                    "rng/rank-00001.safetensors"])
def test_a_sharded_checkpoint_missing_a_piece_falls_back_on_a_one_process_resume(sharded_run, tmp_path,
                                                                                 remove, capsys):
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    pieces = sorted((run / "ckpt-00000004").glob(remove))     # one file per tensor and rank
    assert len(pieces) == 1 and pieces[0].is_file(), pieces
    pieces[0].unlink()
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=5", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "ckpt-00000004" in err and "resuming from ckpt-00000002" in err
    assert (run / "damaged-ckpt-00000004").is_dir()
    assert [r["step"] for r in load_metrics(run) if r["kind"] == "train"] == [1, 2, 3, 4, 5]


def test_a_full_disk_under_two_ranks_is_one_line_naming_the_file_and_bytes(sharded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    shards = sorted((run / "ckpt-00000004").rglob("shard-*.safetensors"), key=lambda p: p.stat().st_size)
    limit = shards[-1].stat().st_size // 2                       # the largest shard no longer fits

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "moelab", "train", "--nproc", "2", "--resume", str(run),
                           "--set", "train.max_steps=6", "--set", "train.save_every=2", "--no-progress"],
                          capture_output=True, text=True, timeout=600, preexec_fn=cap)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "bytes" in errors[0] and "ckpt-00000006" in errors[0] and ".safetensors" in errors[0], errors[0]
    assert "CheckpointException" not in proc.stderr
    assert [p.name for p in checkpoint_dirs(run)][-1] == "ckpt-00000004"


# ---- item 11: a finished distributed run exits 0, every time -------------------------------------

def test_ending_through_exit_process_skips_finalization_but_runs_exit_handlers(tmp_path):
    script = ("import atexit, sys\n"
              "from moelab.proc import exit_process, native_threads_outlive_interpreter\n"
              "class Finalized:\n"
              "    def __del__(self): print('finalized', flush=True)\n"
              "keep = Finalized()\n"
              "atexit.register(print, 'exit handler ran')\n"
              "native_threads_outlive_interpreter('a test')\n"
              "exit_process(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "exit handler ran\n"


def test_gloo_threads_releasing_work_at_exit_never_abort_a_moelab_process(tmp_path):
    """The race behind "terminate called without an active exception": both ranks finish a burst
    of all-reduces and exit at once. Exiting normally, a gloo worker thread still releasing a
    finished operation takes the GIL during finalization and aborts the process (about 1 launch
    in 4 here); ending through moelab.proc.exit_process, as `python -m moelab` does, never."""
    for attempt in range(4):
        proc = subprocess.run(_torchrun(str(HERE / "exit_race.py"), "moelab"), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, (attempt, proc.stderr[-3000:])


def test_twenty_two_process_runs_in_a_row_all_exit_0(tmp_path):
    for i in range(20):
        run = tmp_path / f"run{i}"
        proc = subprocess.run([sys.executable, "-m", "moelab", "train", "--nproc", "2", "--preset", "moe",
                               "--out", str(run), "--no-progress",
                               *_sets("train.max_steps=3", "train.eval_every=3", "train.save_every=3")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (i, proc.stderr[-3000:])
        for bad in ("terminate called", "Traceback", "Exception ignored"):
            assert bad not in proc.stderr, (i, proc.stderr[-3000:])
        assert json.loads((run / "summary.json").read_text())["steps"] == 3
