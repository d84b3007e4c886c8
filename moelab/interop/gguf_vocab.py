"""A ``tokenizer.json`` as GGUF BPE metadata, so that llama.cpp tokenizes exactly like moelab.

llama.cpp does not read tokenizer.json: a GGUF file carries the vocabulary, the merges, the token
types, the special ids and a *named* pre-tokenizer (``tokenizer.ggml.pre``), each name selecting a
regex hard-coded in llama.cpp's ``llama-vocab.cpp``. So the mapping from a Hugging Face
pre-tokenizer to a llama.cpp name is an explicit table here, and only exact matches pass:

- ``ByteLevel(add_prefix_space=False, use_regex=True)``, what moelab's trained BPE uses
  (``moelab.data.tokenizer.new_bpe``), splits with GPT-2's regex: llama.cpp ``gpt-2``;
- ``Sequence[Split(<Llama 3 regex>, Isolated), ByteLevel(use_regex=False)]`` with
  ``ignore_merges``: llama.cpp ``llama-bpe``;
- ``Sequence[Split(<Qwen2 regex>, Isolated), ByteLevel(use_regex=False)]``: llama.cpp ``qwen2``.

tests/interop/test_gguf_tokenizer.py checks each row on 1,000 lines of the built-in corpus
(llama.cpp's ids against ``tokenizers``' ids). Anything else (a normalizer, a prefix space, a
post-processor that adds tokens, a non-BPE model) is refused, naming the tokenizer.json field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from moelab.data.tokenizer import MASK_CANDIDATES
from moelab.interop.gguf_arch import GGUFRefusal

# Hugging Face pre-tokenizer regexes (as tokenizer.json spells them) -> llama.cpp pre-tokenizer
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
# llama.cpp's llama-bpe takes a whole pre-token from the vocabulary before merging (ignore_merges);
# its gpt-2 and qwen2 always merge
IGNORES_MERGES = {"gpt-2": False, "llama-bpe": True, "qwen2": False}

# gguf.TokenType values (kept here so this module imports without the gguf package)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class Vocab:
    """What the GGUF writer needs: tokens and types for every embedding row, merges, specials."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int
    mask_id: Optional[int] = None
    notes: list[str] = field(default_factory=list)


def _bad(key: str, value: Any, why: str) -> None:
    raise GGUFRefusal(f"cannot export to GGUF: tokenizer.json {key} = {json.dumps(value)[:200]}: {why}")


def pre_tokenizer_name(pre: Any) -> str:
    """The llama.cpp pre-tokenizer that splits text as the tokenizer.json ``pre_tokenizer`` does."""
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            _bad("pre_tokenizer", pre, "llama.cpp's gpt-2 pre-tokenizer needs add_prefix_space = false "
                 "and use_regex = true")
        return "gpt-2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        regex = (split.get("pattern") or {}).get("Regex") if split.get("type") == "Split" else None
        plain_bytes = byte_level == {**byte_level, "type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
        if regex in SPLIT_REGEXES and plain_bytes and split.get("behavior") == "Isolated" and not split.get("invert"):
            return SPLIT_REGEXES[regex]
    _bad("pre_tokenizer", pre, "no llama.cpp pre-tokenizer is known to split the same way (mapped: "
         "ByteLevel = gpt-2, the Llama 3 split regex = llama-bpe, the Qwen2 split regex = qwen2)")
    return ""  # unreachable


def _merge_text(m: Any) -> str:
    return m if isinstance(m, str) else " ".join(m)


def vocab_from_tokenizer_json(text: str, n_vocab: int, eos_id: int) -> Vocab:
    """GGUF vocabulary metadata for ``n_vocab`` embedding rows from a tokenizer.json string.
    ``eos_id``: the end-of-text id moelab uses (``moelab.data.tokenizer.find_eos_id``)."""
    data = json.loads(text)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        _bad("model.type", model.get("type"), "only BPE tokenizers are mapped to GGUF")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):                          # None, "" and False are the plain BPE
            _bad(f"model.{key}", model[key], "llama.cpp's BPE has no such option")
    if data.get("normalizer") is not None:
        _bad("normalizer", data["normalizer"], "llama.cpp's BPE tokenizers apply no normalizer")
    post = data.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":
        _bad("post_processor", post, "it may add tokens (BOS/EOS templates) that moelab's ids do not have")
    decoder = data.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        _bad("decoder", decoder, "llama.cpp decodes byte-level BPE only")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    if bool(model.get("ignore_merges", False)) != IGNORES_MERGES[pre]:
        _bad("model.ignore_merges", model.get("ignore_merges", False),
             f"llama.cpp's {pre} pre-tokenizer {'takes whole words from the vocabulary' if IGNORES_MERGES[pre] else 'always merges'}")

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: NORMAL for i in by_id}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if by_id and max(by_id) >= n_vocab:
        raise GGUFRefusal(f"cannot export to GGUF: tokenizer.json has token id {max(by_id)} but "
                          f"model.vocab_size = {n_vocab}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, UNUSED) for i in range(n_vocab)]
    mask = next((i for i, t in sorted(by_id.items()) if t in MASK_CANDIDATES and types[i] == CONTROL), None)
    return Vocab(pre=pre, tokens=tokens, types=token_types, merges=[_merge_text(m) for m in model.get("merges", [])],
                 eos_id=eos_id, mask_id=mask)


def write_vocab(writer, vocab: Optional[Vocab], n_vocab: int) -> None:
    """Tokenizer keys of a GGUF file; without a tokenizer, ids only (tokenizer model "none")."""
    if vocab is None:
        writer.add_tokenizer_model("none")
        writer.add_vocab_size(n_vocab)
        return
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.eos_id)      # GPT-2's convention: end-of-text doubles as BOS ...
    writer.add_add_bos_token(False)            # ... and is never prepended: moelab prompts have none
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_eos_token(False)
    if vocab.mask_id is not None:
        writer.add_mask_token_id(vocab.mask_id)
