"""docs/config.md is generated from the config dataclasses and their comments, and kept current:
a key without a `#` comment, or a change not regenerated, fails here."""

import pytest

from moelab import config_docs
from moelab.config import valid_keys


@pytest.fixture(scope="module")
def rendered():
    return config_docs.render()


def test_docs_config_md_is_current(rendered):
    current = config_docs.DOC_PATH.read_text(encoding="utf-8")
    assert current == rendered, "docs/config.md is stale: run python -m moelab.config_docs"


def test_every_key_has_a_row_with_a_meaning(rendered):
    text = rendered
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(valid_keys())
    for key, line in rows.items():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert len(cells) == 5 and all(cells), line        # key, type, default, allowed, meaning


def test_a_key_without_a_comment_fails(monkeypatch):
    real = config_docs.field_comments

    def without_top_k(source):
        comments = real(source)
        comments[("MoEConfig", "top_k")] = ""
        return comments
    monkeypatch.setattr(config_docs, "field_comments", without_top_k)
    with pytest.raises(ValueError, match="model.moe.top_k"):
        config_docs.render()
    assert config_docs.main(["--check"]) == 2


def test_comments_are_read_from_the_line_and_the_lines_above():
    source = ("class A:\n"
              "    # first line\n    # second line\n    x: int = 1  # and the end\n"
              "    y: str = '#not a comment'\n"
              "    z: int = 3   # z's meaning\n")
    comments = config_docs.field_comments(source)
    assert comments[("A", "x")] == "first line second line and the end"
    assert comments[("A", "y")] == ""
    assert comments[("A", "z")] == "z's meaning"


def test_ranges_come_from_the_validator(rendered):
    assert config_docs.allowed_range("train.min_lr_ratio", float) == "in [0, 1]"
    assert config_docs.allowed_range("model.d_model", int) == "> 0"
    assert "each one of tensorboard, wandb, mlflow" in rendered
