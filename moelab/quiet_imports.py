"""Imports of optional libraries that talk at import time.

torchao (imported by moelab's int8 path, and by peft whenever it is installed) logs that it skips
C++ extensions built for another torch, and torch warns about enums it registers; neither is about
the user's command, and both land in its output. They are silenced for the import only.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

NOISY_AT_IMPORT = ("torchao", "torch.utils._pytree")


@contextmanager
def quiet_import() -> Iterator[None]:
    """Raise the noisy loggers to ERROR while the body imports, then restore them."""
    loggers = [logging.getLogger(name) for name in NOISY_AT_IMPORT]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
