"""Where caches live. Tokenizers and token streams are cached across runs; every cache file is
written through :mod:`moelab.fileio`, so a run killed half way leaves no file the next run trusts.
"""

from __future__ import annotations

import os
from pathlib import Path



def default_cache_dir() -> Path:
    """``$MOELAB_CACHE`` if set, else ``~/.cache/moelab``."""
    env = os.environ.get("MOELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moelab"
