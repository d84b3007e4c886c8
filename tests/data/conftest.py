"""Shared fixtures for the data tests: a tiny stdlib slice, prepared once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelab.config import DataConfig
from moelab.data import PreparedData, prepare_data

SLICE_BYTES = 200_000
SMALL_VOCAB = 512


class LogLines(list):
    """A ``log`` callable that keeps the lines, so tests can check what happened."""

    def __call__(self, line: str) -> None:
        self.append(line)

    def has(self, fragment: str) -> bool:
        return any(fragment in line for line in self)


@pytest.fixture
def log() -> LogLines:
    return LogLines()


@pytest.fixture(scope="session")
def stdlib_slice() -> DataConfig:
    return DataConfig(max_bytes=SLICE_BYTES)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("moelab-cache")


@pytest.fixture(scope="session")
def prepared(stdlib_slice: DataConfig, data_cache: Path) -> PreparedData:
    """The 200 kB stdlib slice with a 512-token BPE, built once (cold) for the whole session."""
    return prepare_data(stdlib_slice, SMALL_VOCAB, cache_dir=data_cache, log=lambda line: None)


def _write_files(root: Path, files: dict[str, bytes | str]) -> Path:
    """Create ``files`` (relative path -> content) under ``root``; returns ``root``."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
    return root


@pytest.fixture
def write_files():
    """``write_files(root, {relpath: text or bytes}) -> root``."""
    return _write_files
