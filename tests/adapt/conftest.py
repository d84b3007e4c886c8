"""Fixtures of the adapt tests: a model cache per session, a small real corpus, its tokenizer."""

import shutil
import sysconfig
from pathlib import Path

import pytest

from adapt_helpers import CORPUS_PACKAGE


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    src = Path(sysconfig.get_paths()["stdlib"]) / CORPUS_PACKAGE
    out = tmp_path_factory.mktemp("corpus")
    for f in sorted(src.glob("*.py")):
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tokenizer_json(corpus_dir) -> str:
    from moelab.data.tokenizer import train_bpe
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.py"))]
    return train_bpe(texts, 512).to_str()


