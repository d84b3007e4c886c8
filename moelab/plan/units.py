"""Sizes, bandwidths, counts and FLOP rates as people write them ("80GiB", "450GB/s", "4M"), and
back to short human strings.

Decimal prefixes are powers of 1000 (GB, MB/s, 4M tokens), binary ones powers of 1024 (GiB, Mi):
"80GB" and "80GiB" are different sizes, as on a data sheet. A bandwidth is bytes per second;
"400Gb/s" (lower-case b, bits) is divided by 8, as network cards are sold in bits.
"""

from __future__ import annotations

import math
import re

from moelab.config import ConfigError

_DECIMAL = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12, "P": 1e15}
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"


def _fail(option: str, text: str, expected: str) -> None:
    raise ConfigError(f"{option} = {text!r} is invalid: expected {expected}")


def _split(text: str) -> tuple[float, str]:
    m = re.fullmatch(rf"\s*({_NUMBER})\s*([A-Za-z/]*)\s*", str(text))
    if not m:
        raise ValueError(text)
    return float(m.group(1)), m.group(3)


def _prefix(unit: str) -> float | None:
    if unit[:2] in _BINARY:
        return _BINARY[unit[:2]]
    if unit[:1] in _DECIMAL and unit[:1]:
        return _DECIMAL[unit[:1]]
    return 1.0 if unit == "" else None


def parse_bytes(text: str, option: str) -> int:
    """'80GiB', '80GB', '141 GB', '512MiB', '1.5TiB' (a unit is required: '80' is not a size)."""
    expected = "a size with its unit, such as 80GiB, 80GB or 512MiB (> 0)"
    try:
        value, unit = _split(text)
    except ValueError:
        _fail(option, text, expected)
    scale = _prefix(unit[:-1]) if unit.endswith("B") else None
    if scale is None or not value > 0 or not math.isfinite(value):
        _fail(option, text, expected)
    return int(round(value * scale))


def parse_bandwidth(text: str, option: str) -> float:
    """Bytes per second from '450GB/s', '50 GB/s', '400Gb/s' (bits), '25GiB/s'."""
    expected = "a bandwidth such as 450GB/s, 400Gb/s or 25GiB/s (> 0)"
    try:
        value, unit = _split(text)
    except ValueError:
        _fail(option, text, expected)
    if not unit.endswith("/s"):
        _fail(option, text, expected)
    unit = unit[:-2]
    if unit.endswith("B"):
        per_unit = 1.0
    elif unit.endswith("b"):
        per_unit = 1 / 8
    else:
        _fail(option, text, expected)
    scale = _prefix(unit[:-1])
    if scale is None or not value > 0 or not math.isfinite(value):
        _fail(option, text, expected)
    return value * scale * per_unit


def parse_count(text: str, option: str) -> float:
    """'4M' = 4e6, '512k', '2.5B', '4Mi' = 4 * 2**20, or a plain number (> 0)."""
    expected = "a positive count such as 4M, 512k, 4Mi or 4194304"
    try:
        value, unit = _split(text)
    except ValueError:
        _fail(option, text, expected)
    scale = _prefix(unit) if unit in _DECIMAL or unit in _BINARY else None
    if scale is None or not value > 0 or not math.isfinite(value):
        _fail(option, text, expected)
    return value * scale


def parse_tflops(text: str, option: str) -> float:
    """FLOP/s from a number of TFLOP/s ('989'), or with a unit: '989TFLOPS', '1.979 PFLOPS'."""
    expected = "peak dense TFLOP/s per GPU, e.g. 989 (H100 bf16) or 989TFLOPS"
    m = re.fullmatch(rf"\s*({_NUMBER})\s*([TtPpGg]?)(?:flop/?s|FLOP/?S|FLOPs|FLOPS|flops)?\s*", str(text))
    if not m:
        _fail(option, text, expected)
    value = float(m.group(1))
    scale = {"": 1e12, "T": 1e12, "t": 1e12, "P": 1e15, "p": 1e15, "G": 1e9, "g": 1e9}[m.group(3)]
    if not value > 0 or not math.isfinite(value):
        _fail(option, text, expected)
    return value * scale


# ---------------------------------------------------------------------------------------------
# human strings
# ---------------------------------------------------------------------------------------------

def human_count(n: float) -> str:
    """1234567 -> '1.23M'; 671026404352 -> '671B' (B for billions, as model sizes are quoted)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def human_bytes(n: float) -> str:
    """Binary units, as GPU memory is quoted: 85899345920 -> '80.0 GiB'."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.1f} {unit}" if unit != "B" else f"{sign}{n:.0f} B"
        n /= 1024
    return f"{sign}{n:.1f} TiB"


def short_bytes(n: float) -> str:
    """Table cells: 67860000000 -> '63.2G' (binary: G = GiB, M = MiB)."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{sign}{n:.0f}{unit}" if n >= 100 or unit == "" else f"{sign}{n:.1f}{unit}"
        n /= 1024
    return f"{sign}{n:.0f}P"


def human_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
