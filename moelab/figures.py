"""One way to draw and save a figure: matplotlib's file-only Agg backend (no display on a server or
in CI), and the file written like every other run file (a temporary beside it, renamed into place),
so a killed report never leaves half a PNG and a link planted at the name is replaced, never
written through."""

from __future__ import annotations

from pathlib import Path

from moelab.fileio import atomic_write


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; imported on first use (matplotlib takes ~0.5 s)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path, **savefig_kwargs) -> Path:
    """Lay out ``fig``, write it to ``path`` (its format from the suffix) and free it."""
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))
    pyplot().close(fig)
    return Path(path)
