"""Run under torchrun by tests/parallel/test_reliability.py: both processes finish a burst of
all-reduces and exit at once, while gloo's worker threads may still be releasing the finished
operations' tensors (the race behind "terminate called without an active exception").
argv[1] == "moelab": end through moelab.proc.exit_process, as `python -m moelab` does;
anything else: a normal interpreter exit."""
import sys

import torch
import torch.distributed as dist

from moelab.proc import exit_process, native_threads_outlive_interpreter

dist.init_process_group("gloo")
native_threads_outlive_interpreter("torch.distributed process groups")
tensors = [torch.ones(256) for _ in range(64)]
for work in [dist.all_reduce(t, async_op=True) for t in tensors]:
    work.wait()
if sys.argv[1:] == ["moelab"]:
    exit_process(0)
