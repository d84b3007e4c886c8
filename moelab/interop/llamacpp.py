"""llama.cpp (through llama-cpp-python) as moelab's CPU inference engine.

``moelab generate RUN --engine llama.cpp [--type q8_0]`` runs here:

1. the run is exported to GGUF once and cached *inside the run folder*, as
   ``RUN/gguf/model-<type>-<key>.gguf`` where the key hashes the exporter version, config.json,
   tokenizer.json and model.safetensors: new weights give a new key, so a stale export is never
   used (older exports of the same type are deleted once the new one is written). The hash of the
   weights file is remembered by (size, mtime, inode) in ``RUN/gguf/hashes.json``, so a large run
   is read once, not at every call;
2. llama.cpp evaluates the prompt and each new token and returns next-token logits;
3. moelab's own sampling (``moelab.generate.sample``: repetition penalty, temperature, top-k,
   top-p, min-p, seeded generator) picks the token and ``TextStream`` produces the streamed text
   and stop strings, so ``--engine llama.cpp`` takes every sampling option of ``--engine torch``
   with the same meaning and, at temperature 0, the same greedy rule.

Why llama.cpp: batch-1 decoding reads every active weight once per token, and llama.cpp's CPU
kernels (bf16 and Q8_0 dot products, one fused MoE dispatch) get much closer to the memory
bandwidth than torch's eager kernels; benchmarks/decode_bandwidth.py measures both side by side.
One prompt at a time: llama-cpp-python's ``Llama`` holds one sequence.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import torch

from moelab.interop.containment import inside
from moelab.interop.errors import InteropError
from moelab.interop.gguf import EXPORTER_VERSION, check_type, convert_to_gguf, quiet_stderr, require_gguf

if TYPE_CHECKING:  # pragma: no cover
    from moelab.generate import Step

PathLike = Union[str, Path]
CACHE_DIR = "gguf"
HASHES_FILE = "hashes.json"
_CHUNK = 1 << 24


# ---------------------------------------------------------------------------------------------
# the export cache
# ---------------------------------------------------------------------------------------------

def _file_sha256(path: Path, memo: dict) -> str:
    """sha256 of a file, remembered by (size, mtime_ns, inode): an atomic rewrite changes all three."""
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    entry = memo.get(path.name)
    if entry and entry.get("stamp") == stamp:
        return entry["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    memo[path.name] = {"stamp": stamp, "sha256": h.hexdigest()}
    return memo[path.name]["sha256"]


def export_key(run_dir: PathLike) -> str:
    """16 hex digits naming what an export of the run depends on: the exporter version, the
    config, the tokenizer and the weights."""
    from moelab.runfolder import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
    from moelab.fileio import JSONFileError, read_json_object, write_json
    run_dir = Path(run_dir)
    cache = _cache_dir(run_dir)
    memo_path = cache / HASHES_FILE
    try:
        memo = read_json_object(memo_path) if memo_path.is_file() and not memo_path.is_symlink() else {}
    except (OSError, JSONFileError):
        memo = {}                      # a damaged memo only costs hashing again
    h = hashlib.sha256(f"moelab-gguf-{EXPORTER_VERSION}".encode())
    for name in (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE):
        path = inside(run_dir, name, f"RUN: {name}")      # never a file linked from outside the run
        h.update(name.encode())
        if path.is_file():
            h.update(_file_sha256(path, memo).encode())
    cache.mkdir(exist_ok=True)
    write_json(memo_path, memo)        # atomic: a link in its place is replaced, never followed
    return h.hexdigest()[:16]


def _cache_dir(run_dir: Path) -> Path:
    """RUN/gguf, refused when it is a symbolic link: the cache is written inside the run folder."""
    cache = run_dir / CACHE_DIR
    if cache.is_symlink() or (cache.exists() and not cache.is_dir()):
        raise InteropError(f"RUN: {cache} is a symbolic link or not a folder; the GGUF cache is written "
                           "only inside the run folder (remove it, and it is rebuilt)")
    return cache


def cached_gguf(run_dir: PathLike, gguf_type: str, log: Callable[[str], None] = lambda s: None) -> Path:
    """The run's GGUF export of ``gguf_type``, written first if the cache has none for its current
    weights. Exports of that type for older weights are removed."""
    check_type(gguf_type)
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise InteropError(f"RUN: {str(run_dir)!r} is not a run folder (no config.json)")
    key = export_key(run_dir)
    path = run_dir / CACHE_DIR / f"model-{gguf_type}-{key}.gguf"
    if path.is_symlink():              # a planted link would have llama.cpp read outside the run
        path.unlink()
    if path.is_file():
        return path
    log(f"exporting {run_dir} to {path} (once; cached while the weights stay the same)")
    convert_to_gguf(run_dir, path, gguf_type)
    for old in (run_dir / CACHE_DIR).glob(f"model-{gguf_type}-*.gguf"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------

class LlamaCpp:
    """One llama.cpp context over a GGUF file: ``prefill(ids)`` and ``step(id)`` return the
    next-token logits (V,) as a float32 tensor. ``kv_f32`` keeps the KV cache in float32
    (llama.cpp's default is float16), which an f32 export needs to match float32 logits."""

    def __init__(self, path: PathLike, n_ctx: int, *, threads: Optional[int] = None, kv_f32: bool = False,
                 n_batch: int = 512):
        require_gguf(llama=True)
        import llama_cpp
        threads = threads or torch.get_num_threads()
        kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if kv_f32 else {}
        try:
            # llama.cpp pads the context to a multiple of 256 and then warns that it exceeds the
            # model's; llama-cpp-python's verbose=False does not silence the context's warnings
            with quiet_stderr():
                self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx),
                                           n_ubatch=min(n_batch, n_ctx), n_threads=threads,
                                           n_threads_batch=threads, verbose=False, **kv)
        except ValueError as e:      # llama-cpp-python's "Failed to load model from file"
            raise InteropError(f"llama.cpp cannot load {path}: {e}") from None
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = n_ctx
        self._llama_cpp = llama_cpp

    def _logits(self) -> torch.Tensor:
        import numpy as np
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(list(ids))
        return self._logits()

    def step(self, token: int) -> torch.Tensor:
        self.llm.eval([int(token)])
        return self._logits()

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        """n greedy (arg-max) tokens after ``ids``: the decode loop benchmarks time."""
        out = [int(self.prefill(ids).argmax())]
        while len(out) < n:
            out.append(int(self.step(out[-1]).argmax()))
        return out

    def close(self) -> None:
        self.llm.close()


def _eos_id(tokenizer) -> Optional[int]:
    from moelab.data.tokenizer import EOS_CANDIDATES
    if tokenizer is None:
        return None
    return next((tokenizer.token_to_id(t) for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)


def stream(engine: LlamaCpp, prompt, options=None, *, tokenizer=None, max_seq_len: Optional[int] = None,
           **kwargs) -> Iterator["Step"]:
    """Generate for one prompt with llama.cpp computing the logits and moelab sampling them;
    yields ``moelab.generate.Step`` objects exactly as ``moelab.generate.stream`` does."""
    from moelab.generate import GenerationError, Step, TextStream, encode_prompts, sample, sampling_options
    opts = sampling_options(options, **kwargs)
    if opts.stop and tokenizer is None:
        raise GenerationError("stop", "stop strings need a tokenizer (pass tokenizer=)")
    rows = encode_prompts(prompt, tokenizer)
    if len(rows) != 1:
        raise GenerationError("prompt", "the llama.cpp engine takes one prompt at a time")
    row = rows[0]
    context = max_seq_len or engine.n_ctx
    if not row:
        raise GenerationError("prompt", "prompt is empty: give at least one token")
    if len(row) > context:
        raise GenerationError("prompt", f"prompt has {len(row)} tokens, more than the model context "
                              f"(model.max_seq_len = {context})")
    bad = [t for t in row if not 0 <= t < engine.n_vocab]
    if bad:
        raise GenerationError("prompt", f"prompt has token ids outside the vocabulary [0, {engine.n_vocab}): {bad[:5]}")
    n_new = min(opts.max_new_tokens, context - len(row) + 1)
    stop_ids = set(opts.stop_token_ids) | ({_eos_id(tokenizer)} - {None})
    text_stream = TextStream(tokenizer, opts.stop) if tokenizer is not None else None
    generator = torch.Generator().manual_seed(opts.seed) if opts.seed is not None else None
    seen = None
    if opts.repetition_penalty != 1.0:
        seen = torch.zeros(1, engine.n_vocab, dtype=torch.bool)
        seen[0, row] = True

    logits = engine.prefill(row)
    for i in range(n_new):
        token = int(sample(logits.unsqueeze(0), opts, seen, generator)[0])
        if seen is not None:
            seen[0, token] = True
        finished, text = None, ""
        if token in stop_ids:
            finished = "stop"
        elif text_stream is not None:
            text = text_stream.push(token)
            finished = "stop" if text_stream.stopped else None
        if finished is None and i == n_new - 1:
            finished = "length" if n_new == opts.max_new_tokens else "context"
        if finished is not None and text_stream is not None:
            text += text_stream.flush()
        if finished is None:
            logits = engine.step(token)
        yield Step([token], [text], [finished])
        if finished is not None:
            return


def open_run(run_dir: PathLike, gguf_type: str, *, threads: Optional[int] = None,
             log: Callable[[str], None] = lambda s: None) -> tuple[LlamaCpp, Path]:
    """The run's cached export of ``gguf_type`` opened in llama.cpp, with the model's context."""
    from moelab.runfolder import CheckpointError, read_config
    try:
        cfg = read_config(run_dir)
    except CheckpointError as e:
        raise InteropError(str(e)) from None
    path = cached_gguf(run_dir, gguf_type, log)
    return LlamaCpp(path, cfg.model.max_seq_len, threads=threads, kv_f32=gguf_type == "f32"), path
