"""What this machine can hold, and the refusal of a command that cannot fit.

Commands that build a model (``train``, ``eval``, ``generate``) compare the accounting estimate
(``moelab.accounting``) with the memory available before they allocate anything, so an absurd
size ends in one line naming both numbers instead of the kernel's OOM killer (which picks a
victim among everything on the host)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from moelab.config import ConfigError

_NO_LIMIT = 2**60          # cgroup v1 writes "no limit" as a page-aligned 2^63 - 1


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def available_ram() -> Optional[int]:
    """Bytes a new allocation can take: the kernel's MemAvailable, lowered by this process's
    cgroup limit (v2 or v1) when one is set; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < _NO_LIMIT:
            found.append(max(0, limit - usage))
    return min(found) if found else None


def available_on(device) -> Optional[int]:
    """Free bytes on ``device`` ("cpu", "cuda", "cuda:1" or a torch.device)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device if not isinstance(device, str) else torch.device(device))
        return int(free)
    return available_ram()


def refuse_unless_fits(needed: int, available: Optional[int], what: str, where: str, advice: str) -> None:
    """ConfigError naming both numbers when ``needed`` bytes exceed ``available`` (None: unknown,
    nothing refused)."""
    if available is not None and needed > available:
        raise ConfigError(f"{what} needs at least {human_bytes(needed)} ({needed:,} bytes), but "
                          f"{where} has {human_bytes(available)} ({available:,} bytes) available; {advice}")
