"""The tokenizer side of a Hugging Face folder, derived from a run's ``tokenizer.json``.

A folder with only ``tokenizer.json`` loads in ``AutoTokenizer``, but with bos/eos/pad = None, so
``generate``, pipelines and servers (vLLM, TGI, llama.cpp's converter) cannot stop at end of text.
transformers reads the special tokens from ``tokenizer_config.json`` (and older readers from
``special_tokens_map.json``) and the ids ``generate`` stops at from ``generation_config.json`` and
``config.json``; these are written here from the tokens the tokenizer really holds.

The byte-level BPE moelab trains has two special tokens, end-of-text (id 0) and a mask token.
As in GPT-2's files, end-of-text also serves as bos (it is what precedes every document in
training: documents are joined with it), as pad, and as unk (a byte-level BPE never meets an
unknown symbol). A user's tokenizer (``data.tokenizer``, or one imported from Hugging Face) keeps
its own spellings (``<s>``, ``</s>``, ``<unk>``, ``<pad>``, ``[MASK]`` ...) when it has them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from moelab.interop.errors import InteropError
from moelab.interop.containment import inside

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"

# spellings tried in order; the end-of-text and mask lists are the ones training uses
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "[CLS]")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")
UNK_CANDIDATES = ("<unk>", "[UNK]", "<|unk|>")


@dataclass(frozen=True)
class SpecialTokens:
    """Token strings; ``ids`` maps each to its id. ``mask`` is None when the tokenizer has none."""

    bos: str
    eos: str
    pad: str
    unk: str
    mask: Optional[str]
    ids: dict


def read_tokenizer(folder: Path, what: str):
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer`` and its text, or None when
    there is none. It must resolve inside ``folder`` and load: a truncated or corrupt file is an
    error, never copied on. ``what`` names the folder in messages (e.g. "RUN")."""
    from tokenizers import Tokenizer
    path = inside(folder, TOKENIZER, f"{what}: {TOKENIZER}")
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        return Tokenizer.from_str(text), text
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON; UnicodeDecodeError
        raise InteropError(f"{folder / TOKENIZER} is damaged or not a tokenizer.json (it does not "
                           f"load: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def special_tokens(tok) -> SpecialTokens:
    """bos/eos/pad/unk/mask of ``tok``, each a token it really holds (see the module docstring)."""
    from moelab.data.tokenizer import EOS_CANDIDATES, MASK_CANDIDATES

    def first(candidates) -> Optional[str]:
        return next((t for t in candidates if tok.token_to_id(t) is not None), None)

    eos = first(EOS_CANDIDATES)
    if eos is None:
        raise InteropError(f"{TOKENIZER} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)}): "
                           "an exported model could never stop")
    bos, pad, unk = first(BOS_CANDIDATES) or eos, first(PAD_CANDIDATES) or eos, first(UNK_CANDIDATES) or eos
    mask = first(MASK_CANDIDATES)
    ids = {t: tok.token_to_id(t) for t in (bos, eos, pad, unk, mask) if t is not None}
    return SpecialTokens(bos=bos, eos=eos, pad=pad, unk=unk, mask=mask, ids=ids)


def config_token_ids(s: SpecialTokens) -> dict:
    """The token ids ``config.json`` carries (transformers copies them into generation)."""
    return {"bos_token_id": s.ids[s.bos], "eos_token_id": s.ids[s.eos], "pad_token_id": s.ids[s.pad]}


def tokenizer_files(tokenizer_json: str, s: SpecialTokens, max_seq_len: int) -> dict[str, dict]:
    """File name -> JSON object for ``tokenizer_config.json`` (a ``PreTrainedTokenizerFast``
    config), ``special_tokens_map.json`` and ``generation_config.json``."""
    names = {"bos_token": s.bos, "eos_token": s.eos, "pad_token": s.pad, "unk_token": s.unk}
    if s.mask is not None:
        names["mask_token"] = s.mask
    added = {}
    for entry in json.loads(tokenizer_json).get("added_tokens") or []:
        added[str(entry["id"])] = {k: entry[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                         "single_word", "special") if k in entry}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "model_max_length": max_seq_len,
        # the byte-level decoder reproduces spaces exactly; "cleaning" them would change the text
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
    }
    generation = {**config_token_ids(s), "max_length": max_seq_len}
    return {TOKENIZER_CONFIG: tokenizer_config, SPECIAL_TOKENS_MAP: dict(names), GENERATION_CONFIG: generation}


def check_fits(tok, vocab_size: int, source: str) -> None:
    """Every id the tokenizer can emit must have an embedding row."""
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise InteropError(f"{source} has {size} tokens but the model embeds only model.vocab_size = "
                           f"{vocab_size}: ids past it would index outside the embedding")
