"""Generation: options, sampling, streaming, and the prefill/decode loop over the model's own
inference step.

Legend: B batch (prompts), T tokens in one step, D width, V vocabulary, K experts per token.

The loop follows gpt-fast's ``generate.py``: ``prefill`` runs the (left-padded) prompts once and
fills the static KV cache, ``decode_one`` feeds one token per row, ``stream`` samples and yields
step by step, and ``generate`` collects the stream. Both call ``Transformer.step``, the model's
inference step (dropless routing, no aux losses, only the last position projected to the
vocabulary), so there is one model and one forward per purpose; ``compile=True`` runs the decode
step under torch.compile (``_decode_step``), and ``dtype=`` / ``quantize=`` convert the model to
bf16 or int8 weight-only weights first (``moelab.quantize``). benchmarks/decode.py and
benchmarks/decode_bandwidth.py measure the loop against Hugging Face ``generate`` and the
memory-bandwidth limit (docs/inference.md).

This module sits above the model and gives ``Transformer`` its ``generate`` / ``stream``
methods when imported (``moelab.build`` and ``moelab.load`` import it), so the model itself never
imports the loop.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import torch

from moelab.config import OptionError
from moelab.model.moe.engines import uses_all_experts
from moelab.model.moe.experts import clear_expert_views
from moelab.model.transformer import Transformer

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

    from moelab.model.transformer import Cache

Prompts = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

class GenerationError(OptionError):
    """A bad generation option or prompt, named by its keyword (a ConfigError, so ``moelab``
    exits with status 2)."""


def _bad(option: str, value: Any, allowed: str) -> GenerationError:
    return GenerationError(option, f"{option} = {value!r} is invalid: {allowed}")


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """How to pick each new token. The filters run in this order on the logits: repetition
    penalty, temperature, top-k, top-p, min-p (Hugging Face's order); ``temperature=0`` is greedy
    (arg-max after the repetition penalty, filters unused)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: Optional[int] = None            # keep the k most likely tokens; None = all
    top_p: float = 1.0                     # nucleus: smallest set with this much probability
    min_p: float = 0.0                     # drop tokens below min_p * the top token's probability
    repetition_penalty: float = 1.0        # CTRL (Keskar et al. 2019); 1 = off
    seed: Optional[int] = None             # None = torch's global generator
    stop: tuple[str, ...] = ()             # stop strings (need a tokenizer); not part of the text
    stop_token_ids: tuple[int, ...] = ()   # stop tokens (the tokenizer's end-of-text is added)

    def validate(self) -> "SamplingOptions":
        """Check every option; raise GenerationError naming the first bad one. Returns self."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise _bad("max_new_tokens", self.max_new_tokens, "must be a positive integer")
        if not self.temperature >= 0:
            raise _bad("temperature", self.temperature, "must be >= 0 (0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise _bad("top_k", self.top_k, "must be a positive integer (or None for no limit)")
        if not 0 < self.top_p <= 1:
            raise _bad("top_p", self.top_p, "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise _bad("min_p", self.min_p, "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise _bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise _bad("seed", self.seed, "must be a non-negative integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise _bad("stop", list(self.stop), "stop strings must be non-empty strings")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_options(options: Optional[SamplingOptions] = None, **kwargs: Any) -> SamplingOptions:
    """Validated options from an object and/or keywords; an unknown keyword is named."""
    names = {f.name for f in dataclasses.fields(SamplingOptions)}
    for key in kwargs:
        if key not in names:
            raise GenerationError(key, f"{key} is not a generation option (options: {', '.join(sorted(names))})")
    if isinstance(kwargs.get("stop"), str):
        kwargs["stop"] = (kwargs["stop"],)
    for key in ("stop", "stop_token_ids"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    base = options if options is not None else SamplingOptions()
    return dataclasses.replace(base, **kwargs).validate()


# ---------------------------------------------------------------------------------------------
# The model's inference step: prefill and decode_one
# ---------------------------------------------------------------------------------------------

def prefill(model: "Transformer", prompts_BT: torch.Tensor,
            cache: "Cache") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """All prompt tokens at once into an empty cache: next-token logits (B, V) and each MoE
    layer's expert ids (B*T, K)."""
    return model.step(prompts_BT, cache)


def decode_one(model: "Transformer", tokens_B: torch.Tensor,
               cache: "Cache") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One token per row at the cache's next slot: next-token logits (B, V) and, per MoE layer,
    the experts these tokens went to (B, K)."""
    return model.step(tokens_B.view(-1, 1), cache)


_compiled_decode: Any = None     # torch.compile(decode_one), built on first use; False once it failed


def _routing_free_shapes(model: "Transformer", batch: int) -> bool:
    """Whether decoding ``batch`` rows has no shape that depends on the routing, so that one
    compiled graph serves every step: true for a dense model and for MoE layers that run every
    expert on the batch (``engines.uses_all_experts``)."""
    return all(uses_all_experts(moe.experts, batch, moe.cfg.top_k) for moe in model.moe_layers())


def _decode_step(compile: bool):
    """``decode_one``, under ``torch.compile`` when asked.

    On CPU, compiling fuses the small element-wise ops that dominate a batch-1 step, and the C++
    wrapper drops the Python call per kernel (1.5-2x faster in benchmarks/decode.py).
    ``dynamic=True`` keeps the cache position symbolic so one graph serves every step, and
    ``capture_scalar_outputs`` lets the chosen expert ids flow into the graph instead of breaking
    it. Callers ask only at batch 1, for a dense model, or where every MoE layer runs every
    expert on the batch (``_routing_free_shapes``): elsewhere a MoE layer's dispatch sizes depend
    on the routing and would recompile. If compiling fails (no C++ compiler, an unsupported
    platform), a warning says so and generation goes on eagerly.
    """
    global _compiled_decode
    if not compile or _compiled_decode is False:
        return decode_one
    if _compiled_decode is None:
        _compiled_decode = torch.compile(decode_one, dynamic=True, options={"cpp_wrapper": True})
    compiled = _compiled_decode

    def step(model: "Transformer", tokens_B: torch.Tensor, cache: "Cache"):
        global _compiled_decode
        if _compiled_decode is not False:
            pos = cache.pos
            try:
                with torch._dynamo.config.patch(capture_scalar_outputs=True):
                    return compiled(model, tokens_B, cache)
            except Exception as e:  # noqa: BLE001 - any compiler failure: degrade to eager
                warnings.warn(f"torch.compile of the decode step failed; running eagerly: {e}")
                _compiled_decode, cache.pos = False, pos
        return decode_one(model, tokens_B, cache)
    return step


# ---------------------------------------------------------------------------------------------
# Sampling: pure functions on (B, V) logits
# ---------------------------------------------------------------------------------------------

def repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on tokens already in the row: positive logits divided, negative multiplied."""
    penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalised, logits_BV)


def top_k_filter(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    kth_B1 = logits_BV.topk(min(k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches p (Holtzman et al. 2019); the
    top token always stays."""
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(dim=-1)
    mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV      # probability of the better tokens
    drop_BV = (mass_before_BV >= p).scatter(-1, order_BV, mass_before_BV >= p)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def min_p_filter(logits_BV: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one (Nguyen et al. 2024)."""
    probs_BV = logits_BV.softmax(dim=-1)
    floor_B1 = probs_BV.amax(dim=-1, keepdim=True) * min_p
    return logits_BV.masked_fill(probs_BV < floor_B1, float("-inf"))


def sample(logits_BV: torch.Tensor, opts: SamplingOptions, seen_BV: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row (B,) int64."""
    logits_BV = logits_BV.float()
    if opts.repetition_penalty != 1.0 and seen_BV is not None:
        logits_BV = repetition_penalty(logits_BV, seen_BV, opts.repetition_penalty)
    if opts.greedy:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / opts.temperature
    if opts.top_k is not None:
        logits_BV = top_k_filter(logits_BV, opts.top_k)
    if opts.top_p < 1.0:
        logits_BV = top_p_filter(logits_BV, opts.top_p)
    if opts.min_p > 0.0:
        logits_BV = min_p_filter(logits_BV, opts.min_p)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Text: incremental decoding with stop strings
# ---------------------------------------------------------------------------------------------

class TextStream:
    """The printable text of one row as tokens arrive. Holds back a tail that may still become a
    stop string or is an incomplete UTF-8 character, so what was printed never has to be taken
    back; ``stopped`` turns true when a stop string appears (the text ends before it)."""

    def __init__(self, tokenizer: "Tokenizer", stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        """Add a token; return the text that became final."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, full = True, full[:cut]
            safe = len(full)
        else:
            safe = len(full) - self._held_back(full)
        self.text = full
        delta, self.emitted = full[self.emitted:safe], max(self.emitted, safe)
        return delta

    def flush(self) -> str:
        """The rest of the text once the row is done."""
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta

    def _held_back(self, full: str) -> int:
        partial = len(full) - len(full.rstrip("\ufffd"))   # a character split across tokens
        if partial:
            return partial
        return max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if full.endswith(s[:n])),
                   default=0)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclass
class Step:
    """One decoding step. Per prompt row: the new token (None once the row has finished), the
    text that became printable, why the row finished ("stop", "length", "context"; None while it
    runs), and with ``trace_experts`` the experts the token went to in each MoE layer
    (``experts[row][i]`` for the i-th MoE layer; None for a finished row or when the context ran
    out before the token could be fed back)."""

    tokens: list[Optional[int]]
    text: list[str]
    finished: list[Optional[str]]
    experts: Optional[list[Optional[list[list[int]]]]] = None


@dataclass
class Generation:
    """What ``generate`` returns: new tokens (stop token included) and text (stop string
    excluded) per prompt, why each row finished, and the wall time including prefill."""

    tokens: list[list[int]]
    text: Optional[list[str]]
    finish_reasons: list[str]
    seconds: float
    experts: Optional[list[list[Optional[list[list[int]]]]]] = None  # [row][token][moe layer]

    @property
    def num_new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / max(self.seconds, 1e-9)


def encode_prompts(prompts: Prompts, tokenizer: Optional["Tokenizer"]) -> list[list[int]]:
    """Token-id lists from text (needs a tokenizer), one id list, many, or a (B, T) tensor."""
    if isinstance(prompts, torch.Tensor):
        return prompts.view(-1, prompts.shape[-1]).tolist() if prompts.dim() else [[int(prompts)]]
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        prompts = [prompts]
    rows = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise GenerationError("prompt", "prompt is text but no tokenizer was given "
                                      "(pass tokenizer=, or token ids)")
            p = tokenizer.encode(p).ids
        rows.append([int(t) for t in p])
    if not rows:
        raise GenerationError("prompt", "prompt is missing: give at least one prompt")
    return rows


def _check_prompts(rows: list[list[int]], model: "Transformer") -> None:
    cfg = model.config
    for i, row in enumerate(rows):
        name = "prompt" if len(rows) == 1 else f"prompt[{i}]"
        if not row:
            raise GenerationError("prompt", f"{name} is empty: give at least one token")
        if len(row) > cfg.max_seq_len:
            raise GenerationError("prompt", f"{name} has {len(row)} tokens, more than the model "
                                  f"context (model.max_seq_len = {cfg.max_seq_len})")
        bad = [t for t in row if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError("prompt", f"{name} has token ids outside the vocabulary "
                                  f"[0, {cfg.vocab_size}): {bad[:5]}")


def _eos_id(tokenizer: Optional["Tokenizer"]) -> Optional[int]:
    if tokenizer is None:
        return None
    from moelab.data.tokenizer import EOS_CANDIDATES
    return next((tokenizer.token_to_id(t) for t in EOS_CANDIDATES
                 if tokenizer.token_to_id(t) is not None), None)


@torch.inference_mode()
def stream(model: "Transformer", prompts: Prompts, options: Optional[SamplingOptions] = None, *,
           tokenizer: Optional["Tokenizer"] = None, trace_experts: bool = False,
           compile: bool = False, dtype: Union[None, str, torch.dtype] = None,
           quantize: Optional[str] = None, **kwargs: Any) -> Iterator[Step]:
    """Generate step by step, yielding a :class:`Step` as soon as each token is sampled.

    Prompts of different lengths are left-padded into one batch (``Cache(pad_B=...)``). A row
    finishes at a stop token, a stop string, ``max_new_tokens`` or the end of the context; the
    loop ends when every row has. The model runs in eval mode meanwhile (restored afterwards).
    ``compile=True`` runs the decode step under ``torch.compile`` (see ``_decode_step``).
    ``dtype`` ("float32" | "bfloat16") and ``quantize`` ("int8", weight-only, needs torchao)
    convert the model *in place* first, once (see :func:`moelab.quantize.prepare`).
    """
    opts = sampling_options(options, **kwargs)
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)     # what moelab.load attached, if any
    if opts.stop and tokenizer is None:
        raise GenerationError("stop", "stop strings need a tokenizer (pass tokenizer=)")
    rows = encode_prompts(prompts, tokenizer)
    _check_prompts(rows, model)
    if dtype is not None or quantize is not None:
        from moelab.quantize import prepare
        prepare(model, dtype, quantize)
    was_training = model.training
    model.eval()
    try:
        compile = compile and (len(rows) == 1 or _routing_free_shapes(model, len(rows)))
        yield from _decode_n(model, rows, opts, tokenizer, trace_experts, _decode_step(compile))
    finally:
        clear_expert_views(model)
        model.train(was_training)


def _decode_n(model: "Transformer", rows: list[list[int]], opts: SamplingOptions,
              tokenizer: Optional["Tokenizer"], trace: bool, decode=decode_one) -> Iterator[Step]:
    device = next(model.parameters()).device
    B, T = len(rows), max(map(len, rows))
    # The prompt fills T slots and every new token but the last is fed back (the last too when
    # tracing its experts); a full context ends generation early ("context").
    n_new = min(opts.max_new_tokens, model.config.max_seq_len - T + 1)
    max_len = min(T + n_new - 1 + int(trace), model.config.max_seq_len)
    pad_B = torch.tensor([T - len(r) for r in rows], device=device)
    prompts_BT = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=device)
    cache = model.new_cache(B, max_len, pad_B)

    stop_ids = set(opts.stop_token_ids) | ({_eos_id(tokenizer)} - {None})
    texts = [TextStream(tokenizer, opts.stop) for _ in rows] if tokenizer is not None else None
    generator = torch.Generator(device=device).manual_seed(opts.seed) if opts.seed is not None else None
    seen_BV = None
    if opts.repetition_penalty != 1.0:
        seen_BV = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            seen_BV[b, r] = True

    logits_BV, _ = prefill(model, prompts_BT, cache)
    finished: list[Optional[str]] = [None] * B
    for i in range(n_new):
        next_B = sample(logits_BV, opts, seen_BV, generator)                    # (B,)
        if seen_BV is not None:
            seen_BV.scatter_(1, next_B[:, None], True)
        tokens = [None if f else t for f, t in zip(finished, next_B.tolist())]
        text = [""] * B
        for b, t in enumerate(tokens):
            if t is None:
                continue
            if t in stop_ids:
                finished[b] = "stop"
            elif texts is not None:
                text[b] = texts[b].push(t)
                finished[b] = "stop" if texts[b].stopped else None
            if finished[b] is None and i == n_new - 1:
                finished[b] = "length" if n_new == opts.max_new_tokens else "context"
            if finished[b] is not None and texts is not None:
                text[b] += texts[b].flush()
        experts = None
        if (not all(finished) or trace) and cache.pos < cache.max_len:
            logits_BV, ids = decode(model, next_B, cache)                       # ids: (B, K) each
            if trace:
                per_layer = [x.tolist() for x in ids]
                experts = [None if t is None else [layer[b] for layer in per_layer]
                           for b, t in enumerate(tokens)]
        elif trace:
            experts = [None] * B
        yield Step(tokens, text, list(finished), experts)
        if all(finished):
            return


def generate(model: "Transformer", prompts: Prompts, options: Optional[SamplingOptions] = None, *,
             tokenizer: Optional["Tokenizer"] = None, trace_experts: bool = False,
             compile: bool = False, dtype: Union[None, str, torch.dtype] = None,
             quantize: Optional[str] = None, **kwargs: Any) -> Generation:
    """Generate for one prompt or a batch and collect the result; see :func:`stream`.

    ``generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16, temperature=0)`` or, with a
    tokenizer, ``generate(model, "def main(", tokenizer=tok, top_p=0.9, seed=0)``; add
    ``dtype="bfloat16"`` and/or ``quantize="int8"`` for the smaller, faster weight formats.
    Without ``tokenizer``, the model's own (``model.tokenizer``, which ``moelab.load`` attaches)
    is used when it has one.
    """
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    tokens: list[list[int]] = []
    text: list[str] = []
    experts: list[list[Any]] = []
    reasons: list[str] = []
    start = time.perf_counter()
    for step in stream(model, prompts, options, tokenizer=tokenizer, trace_experts=trace_experts,
                       compile=compile, dtype=dtype, quantize=quantize, **kwargs):
        if not tokens:
            B = len(step.tokens)
            tokens, text, experts, reasons = [[] for _ in range(B)], [""] * B, [[] for _ in range(B)], [""] * B
        for b, t in enumerate(step.tokens):
            if t is None:
                continue
            tokens[b].append(t)
            text[b] += step.text[b]
            reasons[b] = step.finished[b] or ""
            if trace_experts:
                experts[b].append(step.experts[b])
    seconds = time.perf_counter() - start
    return Generation(tokens, text if tokenizer is not None else None, reasons, seconds,
                      experts if trace_experts else None)


# ---------------------------------------------------------------------------------------------
# The model's methods
# ---------------------------------------------------------------------------------------------

def _generate_method(self: Transformer, prompts: Prompts, options: Optional[SamplingOptions] = None,
                     **kwargs: Any) -> Generation:
    """Sample continuations; see :func:`moelab.generate.generate`."""
    return generate(self, prompts, options, **kwargs)


def _stream_method(self: Transformer, prompts: Prompts, options: Optional[SamplingOptions] = None,
                   **kwargs: Any) -> Iterator[Step]:
    """Yield one :class:`moelab.generate.Step` per new token; see :func:`moelab.generate.stream`."""
    return stream(self, prompts, options, **kwargs)


Transformer.generate = _generate_method
Transformer.stream = _stream_method
