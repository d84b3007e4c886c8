"""Token categories: what kind of text each routed token is, so routing can be tested for
specialisation by kind.

Python source (the built-in corpus) is labelled by Python's own ``tokenize`` module, so no
hand-written lexer decides what a keyword or a docstring is. Every character of a document gets
the category of the Python token covering it; the characters between tokens (spaces) get
:data:`BLANK`. A BPE token then takes the category of its first non-blank character, and a token
made only of blanks counts as indentation. On other corpora the category is where the document
came from: its file, its folder, or a field of its JSON Lines record.
"""

from __future__ import annotations

import json
import keyword
import re
import token as pytoken
import tokenize
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from moelab.data import Document

# Python categories, in report order. The ids are indices into this tuple.
PYTHON_CATEGORIES = ("keyword", "identifier", "operator", "number", "string", "docstring",
                     "comment", "indent/newline", "other", "end of text")
KEYWORD, IDENTIFIER, OPERATOR, NUMBER, STRING, DOCSTRING, COMMENT, INDENT, OTHER, EOS = range(10)
BLANK = 255            # a character between Python tokens (never a token's category)

CATEGORY_KINDS = ("python", "file", "folder")   # plus "field:NAME" for .jsonl corpora
MAX_SOURCE_CATEGORIES = 24   # file / folder / field values beyond these are lumped together
OTHER_SOURCES = "(other)"

_STRING_TYPES = {pytoken.STRING} | {getattr(pytoken, n) for n in
                                    ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END",
                                     "TSTRING_START", "TSTRING_MIDDLE", "TSTRING_END")
                                    if hasattr(pytoken, n)}
_LAYOUT_TYPES = {pytoken.NEWLINE, pytoken.NL, pytoken.INDENT, pytoken.DEDENT}
_LINE_STARTERS = {pytoken.NEWLINE, pytoken.NL, pytoken.INDENT, pytoken.DEDENT, pytoken.ENCODING}


def _python_token_category(tok: tokenize.TokenInfo) -> int:
    if tok.type == pytoken.NAME:
        return KEYWORD if keyword.iskeyword(tok.string) else IDENTIFIER
    if tok.type == pytoken.OP:
        return OPERATOR
    if tok.type == pytoken.NUMBER:
        return NUMBER
    if tok.type in _STRING_TYPES:
        return STRING
    if tok.type == pytoken.COMMENT:
        return COMMENT
    if tok.type in _LAYOUT_TYPES:
        return INDENT
    return OTHER


def python_char_categories(text: str) -> np.ndarray:
    """(len(text),) uint8: the category of the Python token covering each character, BLANK
    between tokens.

    A docstring is a string that is a whole statement on its own (the first token of a logical
    line, followed by the end of that line): what PEP 257 calls a docstring wherever it sits.
    Text that Python cannot tokenise (a document cut by ``data.max_bytes``, a syntax error) keeps
    the categories found before the error and OTHER after it.
    """
    cats = np.full(len(text), BLANK, dtype=np.uint8)
    # fed to tokenize as lines that end at "\n", so (row, col) positions map back to offsets
    lines = re.split(r"(?<=\n)", text)
    line_start = np.cumsum([0] + [len(s) for s in lines])
    feed = iter(lines)

    def offset(pos: tuple[int, int]) -> int:
        row, col = pos
        return int(line_start[row - 1]) + col if row - 1 < len(line_start) else len(text)

    tokens: list[tokenize.TokenInfo] = []
    try:
        for tok in tokenize.generate_tokens(lambda: next(feed, "")):
            tokens.append(tok)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        stop = offset(tokens[-1].end) if tokens else 0
        cats[stop:] = OTHER
    significant = [t for t in tokens if t.type not in (pytoken.NL, pytoken.COMMENT)]
    next_of = {id(a): b for a, b in zip(significant, significant[1:])}
    prev_type = pytoken.NEWLINE
    for tok in tokens:
        cat = _python_token_category(tok)
        if tok.type == pytoken.STRING:
            nxt = next_of.get(id(tok))
            if prev_type in _LINE_STARTERS and (nxt is None or nxt.type in (pytoken.NEWLINE, pytoken.ENDMARKER)):
                cat = DOCSTRING
        start, end = offset(tok.start), offset(tok.end)
        if tok.type == pytoken.DEDENT or end <= start:
            continue
        cats[start:end] = cat
        if tok.type not in (pytoken.NL, pytoken.COMMENT):
            prev_type = tok.type
    return cats


def token_categories(char_cats: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    """(T,) int: each BPE token's category from its character span ``offsets[t]``: the category
    of its first non-blank character; INDENT for a token of blanks only."""
    out = np.full(len(offsets), INDENT, dtype=np.int64)
    for t, (start, end) in enumerate(offsets):
        span = char_cats[start:end]
        labelled = span[span != BLANK]
        if len(labelled):
            out[t] = labelled[0]
    return out


# --------------------------------------------------------------------------------------------
# categories from where a document came from (user corpora)
# --------------------------------------------------------------------------------------------

def source_file(relpath: str) -> str:
    """The file a document came from: its relative path without the ``#index`` of a chunk or
    a record."""
    return relpath.split("#", 1)[0]


def source_folder(relpath: str) -> str:
    parent = Path(source_file(relpath)).parent.as_posix()
    return parent if parent != "." else "(top level)"


class FieldReader:
    """The value of one JSON Lines field for a document named ``<file>#<line index>``; reads
    each file once, on first use."""

    def __init__(self, corpus: str, field_name: str):
        self.root = Path(corpus).expanduser()
        self.field = field_name
        self._values: dict[str, list[Optional[str]]] = {}

    def _file(self, name: str) -> Path:
        return self.root if self.root.is_file() else self.root / name

    def __call__(self, relpath: str) -> str:
        name, _, index = relpath.partition("#")
        if name not in self._values:
            path = self._file(name)
            values: list[Optional[str]] = []
            if path.suffix.lower() == ".jsonl" and path.is_file():
                with open(path, "rb") as f:
                    for line in f:
                        try:
                            record = json.loads(line)
                        except ValueError:
                            record = None
                        value = record.get(self.field) if isinstance(record, dict) else None
                        values.append(None if value is None else str(value))
            self._values[name] = values
        values = self._values[name]
        i = int(index) if index.isdigit() else -1
        value = values[i] if 0 <= i < len(values) else None
        return value if value is not None else f"(no {self.field})"


def source_namer(kind: str, corpus: str) -> Callable[[str], str]:
    """relpath -> category name for ``kind`` in file / folder / field:NAME."""
    if kind == "file":
        return source_file
    if kind == "folder":
        return source_folder
    if kind.startswith("field:"):
        return FieldReader(corpus, kind.split(":", 1)[1])
    raise ValueError(f"unknown category kind {kind!r}")


def top_sources(docs: list[Document], namer: Callable[[str], str],
                limit: int = MAX_SOURCE_CATEGORIES) -> list[str]:
    """The ``limit`` source names holding the most text (ties by name), in that order; the rest
    share :data:`OTHER_SOURCES`."""
    sizes: dict[str, int] = {}
    for d in docs:
        name = namer(d.relpath)
        sizes[name] = sizes.get(name, 0) + len(d.text)
    ranked = sorted(sizes, key=lambda n: (-sizes[n], n))
    names = ranked[:limit]
    if len(ranked) > limit:
        names.append(OTHER_SOURCES)
    return names
