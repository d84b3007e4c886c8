"""Peak memory of a training run: CUDA allocator statistics on GPU, sampled RSS on CPU.

On CPU there is no allocator counter, so a background thread samples the process's resident set
every few milliseconds; the figure reported is the peak above the level measured when tracking
started (after data preparation, before the model is built), so that tokenizer training and the
interpreter itself are not counted.
"""

from __future__ import annotations

import os
import threading

import torch


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval = device, interval_s
        self._baseline = self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            return self
        self._baseline = self._peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def peak_bytes(self) -> int:
        """Peak bytes above the starting level so far."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device) - self._baseline)
        self._peak = max(self._peak, rss_bytes())
        return int(self._peak - self._baseline)

    def stop(self) -> int:
        peak = self.peak_bytes()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        return peak
