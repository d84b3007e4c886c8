"""A two-domain corpus from the built-in one, with no download: Python code and English prose.

The standard library holds both. Its code is the source with the prose taken out; its prose is
what people wrote for people: docstrings, comment blocks, and the language reference topics
``pydoc`` shows (``pydoc_data/topics.py``, left out of the built-in corpus because it is one
generated table; here each topic is one document). Python's own ``tokenize`` decides what is a
comment and what is a docstring (a string that is a whole statement, PEP 257's definition
wherever it sits), so no hand-written lexer does.

    build_domains(out)  ->  out/code/*.txt, out/prose/*.txt

One file per source file and domain (``json__decoder.py.txt``: folders flattened, so a
document's folder is its domain and ``moelab inspect --categories folder`` labels tokens by
domain), plus ``prose/topic__<name>.txt`` per pydoc topic. The two domains are cut to the same
size (code files in path-hash order until they hold as many bytes as the prose), so the mix is
half and half. Everything is a function of the interpreter's files: the same Python gives the same
corpus, byte for byte.
"""

from __future__ import annotations

import ast
import hashlib
import io
import re
import token as pytoken
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from moelab.data.stdlib import is_generated, stdlib_dir, stdlib_files
from moelab.fileio import write_text_atomic

DOMAINS = ("code", "prose")
MIN_PROSE_CHARS = 40          # shorter docstrings and comment blocks ("noqa", "XXX") are left out
MANIFEST = ".domains.json"          # hidden: the corpus reader skips it


@dataclass(frozen=True)
class Split:
    code: str                     # the source with comments and docstrings removed
    prose: list                   # docstrings and comment blocks, in file order


def _docstring_ranges(source: str) -> list[tuple[int, int, str]]:
    """(start offset, end offset, text) of every docstring: a string token that is a whole
    statement (first on its logical line, last before its NEWLINE)."""
    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(pos: tuple[int, int]) -> int:
        return starts[pos[0] - 1] + pos[1] if pos[0] - 1 < len(starts) else len(source)

    out = []
    significant = [t for t in toks if t.type not in (pytoken.NL, pytoken.COMMENT)]
    for i, t in enumerate(significant):
        if t.type != pytoken.STRING:
            continue
        before = significant[i - 1].type if i else pytoken.NEWLINE
        after = significant[i + 1].type if i + 1 < len(significant) else pytoken.ENDMARKER
        if before in (pytoken.NEWLINE, pytoken.INDENT, pytoken.DEDENT) and after in (pytoken.NEWLINE, pytoken.ENDMARKER):
            try:
                value = ast.literal_eval(t.string)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, str):
                out.append((offset(t.start), offset(t.end), value))
    return out


def _comment_blocks(source: str) -> list[tuple[int, int, str]]:
    """(start, end, text) of each comment; consecutive comment lines are joined into one block."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    out: list[tuple[int, int, str]] = []
    last_row = -2
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type != pytoken.COMMENT:
            continue
        text = t.string.lstrip("#").strip()
        start, end = starts[t.start[0] - 1] + t.start[1], starts[t.end[0] - 1] + t.end[1]
        if text.startswith("!") or re.fullmatch(r"-\*-.*-\*-", text):      # shebang, coding line
            text = ""
        if out and t.start[0] == last_row + 1:
            s, _, prev = out[-1]
            out[-1] = (s, end, (prev + " " + text).strip())
        else:
            out.append((start, end, text))
        last_row = t.start[0]
    return out


def split_source(source: str) -> Optional[Split]:
    """The code and the prose of one Python file; None when Python cannot tokenise it."""
    try:
        docs = _docstring_ranges(source)
        comments = _comment_blocks(source)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    cut = sorted([(s, e) for s, e, _ in docs] + [(s, e) for s, e, _ in comments])
    pieces, pos = [], 0
    for s, e in cut:
        if s >= pos:
            pieces.append(source[pos:s])
            pos = e
    pieces.append(source[pos:])
    code = "".join(pieces)
    # a removed docstring leaves its line empty: a body of only a docstring needs a statement
    code = re.sub(r"[ \t]+\n", "\n", code)
    code = re.sub(r"\n{3,}", "\n\n", code).strip() + "\n"
    prose = [_clean(text) for _, _, text in sorted(docs + comments, key=lambda x: x[0])]
    return Split(code, [p for p in prose if len(p) >= MIN_PROSE_CHARS])


def _clean(text: str) -> str:
    import inspect
    return inspect.cleandoc(text).strip()


def pydoc_topics() -> dict:
    """The language reference topics of ``pydoc`` (name -> text), read from the interpreter's own
    ``pydoc_data/topics.py`` with ``ast`` (never imported or executed)."""
    path = stdlib_dir() / "pydoc_data" / "topics.py"
    if not path.is_file():
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics" for t in node.targets):
            value = ast.literal_eval(node.value)
            return {k: v for k, v in value.items() if isinstance(v, str)}
    return {}


def _flat(relpath: str) -> str:
    return relpath.replace("/", "__") + ".txt"


def _hash(name: str) -> bytes:
    return hashlib.sha256(name.encode("utf-8")).digest()


def build_domains(out: Path, max_bytes: Optional[int] = None) -> dict:
    """Write the corpus under ``out`` (``code/`` and ``prose/``) and return its manifest (bytes and
    documents per domain). ``max_bytes``: at most this many bytes in all, half per domain. A
    folder that already holds the manifest for the same ``max_bytes`` is kept as it is."""
    import json
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("max_bytes") == max_bytes:
            return manifest
    per_domain = None if max_bytes is None else max_bytes // 2
    code: dict[str, str] = {}
    prose: dict[str, str] = {}
    for relpath, path in stdlib_files():
        raw = path.read_bytes()
        if is_generated(raw):
            continue
        try:
            split = split_source(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        if split is None:
            continue
        if split.code.strip():
            code[_flat(relpath)] = split.code
        if split.prose:
            prose[_flat(relpath)] = "\n\n".join(split.prose) + "\n"
    for name, text in sorted(pydoc_topics().items()):
        prose[f"topic__{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.txt"] = text.strip() + "\n"

    prose_bytes = sum(len(t.encode("utf-8")) for t in prose.values())
    budget = min(prose_bytes, per_domain) if per_domain is not None else prose_bytes
    chosen = {"code": _take(code, budget), "prose": _take(prose, budget)}
    for domain, docs in chosen.items():
        folder = out / domain
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in docs.items():
            write_text_atomic(folder / name, text)
    manifest = {"max_bytes": max_bytes, "source": f"stdlib:{stdlib_dir()}",
                **{d: {"documents": len(docs), "bytes": sum(len(t.encode("utf-8")) for t in docs.values())}
                   for d, docs in chosen.items()}}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _take(docs: dict, budget: int) -> dict:
    """Documents in path-hash order (an even sample of the library, not its first folders) until
    ``budget`` bytes; the last one is cut at a line end."""
    out, used = {}, 0
    for name in sorted(docs, key=_hash):
        if used >= budget:
            break
        text = docs[name]
        size = len(text.encode("utf-8"))
        if used + size > budget:
            keep = text.encode("utf-8")[:budget - used].decode("utf-8", errors="ignore")
            text = keep[:keep.rfind("\n") + 1]
            if not text.strip():
                break
        out[name] = text
        used += len(text.encode("utf-8"))
    return out
