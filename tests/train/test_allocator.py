"""moelab.train.allocator: glibc's malloc keeps freed memory for reuse in training processes,
unless the user chose malloc settings themselves."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt only")

PROBE = """
import ctypes, sys
from moelab.train.allocator import reuse_freed_memory
first, second = reuse_freed_memory(), reuse_freed_memory()
print(first, second)
"""


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MOELAB_KEEP_ALLOCATOR")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_applied_once_and_idempotent():
    assert _probe() == ["True", "True"]


@pytest.mark.parametrize("setting", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MOELAB_KEEP_ALLOCATOR"])
def test_user_settings_win(setting):
    assert _probe(**{setting: "65536"}) == ["False", "False"]


@pytest.mark.slow
def test_a_step_s_worth_of_tensors_comes_back_without_page_faults():
    """The effect itself, on a training step's pattern: many multi-MiB tensors alive at once,
    then all freed. Without reuse (glibc's initial 128 KiB mmap threshold, pinned here because
    its dynamic default depends on the process's history) every page faults in again on the
    next step; once tuned, the pages are reused."""
    code = """
import resource, sys, torch
from moelab.train.allocator import reuse_freed_memory
if sys.argv[1] == "tuned":
    assert reuse_freed_memory()
def step():
    live = [torch.empty(3 * 2**19 + 1000 * i) for i in range(8)]     # about 6 MiB each
    for t in live:
        t.fill_(1.0)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean["OMP_NUM_THREADS"] = "1"
    faults = {}
    for mode in ("default", "tuned"):
        env = {**clean, "MALLOC_MMAP_THRESHOLD_": "131072"} if mode == "default" else clean
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        faults[mode] = int(done.stdout.split()[-1])
    pages = 10 * 8 * 6 * 2**20 // 4096
    assert faults["default"] > pages // 2, faults
    assert faults["tuned"] < pages // 20, faults
