"""GGUF export: a moelab model (run folder, Hugging Face folder or live model) as a file that
llama.cpp, and everything built on it, runs with the same numbers.

    export_gguf(model, "model.gguf", type="bf16", tokenizer_json=text)   # a live model
    convert_to_gguf("runs/olmoe", "model.gguf", type="q8_0")              # a run or HF folder

What decides what:

- the llama.cpp architecture and every refusal: ``gguf_arch.choose`` (read it for the list);
- the tokenizer metadata (vocab, merges, special ids, the named pre-tokenizer): ``gguf_vocab``;
- here: the tensors (names and layouts of the llama.cpp graphs, ``_tensors``), the hyperparameter
  keys (``_write_keys``), the weight types, and the writing itself with the ``gguf`` package,
  the writer llama.cpp maintains.

Types: ``f32``, ``f16``, ``bf16`` store the weight matrices as such (bf16 keeps bf16 weights bit
for bit) and ``q8_0`` quantises them with gguf's Q8_0 (a float16 scale per 32 weights). Norms,
biases and routers stay float32, as llama.cpp's own converter keeps them (router choices are
sensitive to rounding). ``q4_0``, ``q4_k_m``, ``q5_k_m`` and ``q6_k`` go through llama.cpp's own
quantiser (``llama_model_quantize``, exposed by llama-cpp-python) from an f32 or bf16 GGUF
written first, so the mixture of types per tensor is llama.cpp's, not one of ours.

Tensors are written one at a time (``add_tensor_info`` for all, then ``write_tensor_data`` per
tensor), so memory holds the model plus one converted tensor. The file is written under a
temporary name beside the destination and renamed at the end: a refusal or failure leaves
nothing behind, and every refusal happens before the file is opened.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Union

import torch

from moelab.config import ModelConfig
from moelab.interop.errors import InteropError
from moelab.interop.gguf_arch import Choice, GGUFRefusal, choose, refuse
from moelab.interop.gguf_vocab import Vocab, vocab_from_tokenizer_json, write_vocab

if TYPE_CHECKING:  # pragma: no cover
    from moelab.model.transformer import Transformer

PathLike = Union[str, Path]
GGUF_EXTRA = 'pip install "moelab[gguf]" (gguf + llama-cpp-python)'
# types written directly -> (matrix type, llama file type); the rest go through llama.cpp
DIRECT_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
                "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
LLAMA_QUANT_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                     "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
GGUF_TYPES = tuple(DIRECT_TYPES) + tuple(LLAMA_QUANT_TYPES)
# bump when the exporter's output changes, so cached exports (moelab.interop.llamacpp) are redone
EXPORTER_VERSION = "1"


def check_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise InteropError(f"--type {gguf_type!r} is invalid: must be one of {', '.join(GGUF_TYPES)}")
    return gguf_type


def require_gguf(llama: bool = False):
    """The ``gguf`` module (and llama_cpp with ``llama``), or an InteropError naming the extra."""
    try:
        import gguf
        if llama:
            import llama_cpp  # noqa: F401
    except ImportError as e:
        raise InteropError(f"GGUF export and the llama.cpp engine need the gguf extra: {GGUF_EXTRA} "
                           f"({e})") from None
    return gguf


def quiet_stderr():
    """llama-cpp-python's own file-descriptor level silencer (what it uses while loading): llama.cpp
    prints from C, past Python's streams."""
    try:
        from llama_cpp._utils import suppress_stdout_stderr
        return suppress_stdout_stderr(disable=False)
    except ImportError:   # a future layout: then llama.cpp's warnings show, nothing worse
        import contextlib
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# tensors: our state dict -> llama.cpp names and layouts
# ---------------------------------------------------------------------------------------------

@dataclass
class Tensor:
    """One GGUF tensor: its name, torch-order shape, whether it is a weight matrix (stored in the
    chosen type) or kept float32 (norms, biases, routers), and how to make it when it is written."""

    name: str
    shape: tuple[int, ...]
    matrix: bool
    make: Callable[[], torch.Tensor]


def _pairs_perm(heads: int, dim: int) -> torch.Tensor:
    """Row order that turns our RoPE layout (each head's first half rotates with its second half)
    into llama.cpp's "normal" layout (adjacent pairs rotate together), as llama.cpp's converter
    permutes Hugging Face Llama q/k: per head [0, d/2, 1, d/2+1, ...]."""
    half = torch.arange(dim // 2)
    per_head = torch.stack([half, half + dim // 2], dim=1).flatten()       # (dim,)
    return (torch.arange(heads).unsqueeze(1) * dim + per_head).flatten()    # (heads * dim,)


def _rope_rows_to_pairs(t: torch.Tensor, start: int, groups: int, stride: int, rope: int) -> torch.Tensor:
    """Permute, inside each of ``groups`` row groups of ``stride`` rows, the ``rope`` rows starting
    at ``start`` from halves to adjacent pairs (MLA: the RoPE part of q heads and of the shared key)."""
    perm = torch.arange(t.shape[0])
    local = _pairs_perm(1, rope)
    for g in range(groups):
        base = g * stride + start
        perm[base:base + rope] = base + local
    return t[perm]


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float()


def _tensors(model: "Transformer", choice: Choice) -> Iterator[Tensor]:
    """Every tensor of the GGUF file, in llama.cpp's names, built lazily from the model."""
    cfg: ModelConfig = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}

    def t(name: str, src: Callable[[], torch.Tensor], shape, matrix: bool = True) -> Tensor:
        return Tensor(name, tuple(int(s) for s in shape), matrix, src)

    V, D = cfg.vocab_size, cfg.d_model
    yield t("token_embd.weight", lambda: state["embed.weight"], (V, D))
    yield t("output_norm.weight", lambda: state["norm.weight"], (D,), False)
    head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
    yield t("output.weight", lambda: state[head], (V, D))          # written even when tied: every arch reads it
    for i in range(cfg.n_layers):
        p, b = f"blk.{i}.", f"blocks.{i}."
        yield t(p + "attn_norm.weight", lambda b=b: state[b + "attn_norm.weight"], (D,), False)
        yield from (_mla if cfg.attention == "mla" else _gqa)(state, b, p, cfg, choice, t)
        yield t(p + "ffn_norm.weight", lambda b=b: state[b + "ffn_norm.weight"], (D,), False)
        if i in choice.moe_layers:
            yield from _moe(state, b, p, cfg, choice, t, i)
        else:
            F = cfg.ffn_hidden
            yield t(p + "ffn_gate.weight", lambda b=b: state[b + "ffn.gate_up.weight"][:F], (F, D))
            yield t(p + "ffn_up.weight", lambda b=b: state[b + "ffn.gate_up.weight"][F:], (F, D))
            yield t(p + "ffn_down.weight", lambda b=b: state[b + "ffn.down.weight"], (D, F))


def _gqa(state, b, p, cfg: ModelConfig, choice: Choice, t) -> Iterator[Tensor]:
    H, G, Dh, D = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim, cfg.d_model
    sizes = [H * Dh, G * Dh, G * Dh]

    def part(key: str, j: int) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            x = state[b + key].split(sizes, dim=0)[j]
            if choice.rope_pairs and j < 2:
                x = x[_pairs_perm(H if j == 0 else G, Dh)]
            return x
        return make

    for j, name in enumerate(("attn_q", "attn_k", "attn_v")):
        yield t(f"{p}{name}.weight", part("attn.qkv.weight", j), (sizes[j], D))
        if cfg.attn_bias:
            yield t(f"{p}{name}.bias", part("attn.qkv.bias", j), (sizes[j],), False)
    yield t(p + "attn_output.weight", lambda: state[b + "attn.out.weight"], (D, H * Dh))
    if cfg.qk_norm != "none":
        q_len, k_len = (Dh, Dh) if cfg.qk_norm == "head" else (H * Dh, G * Dh)
        yield t(p + "attn_q_norm.weight", lambda: state[b + "attn.q_norm.weight"], (q_len,), False)
        yield t(p + "attn_k_norm.weight", lambda: state[b + "attn.k_norm.weight"], (k_len,), False)


def _mla(state, b, p, cfg: ModelConfig, choice: Choice, t) -> Iterator[Tensor]:
    """DeepSeek-V2 attention in llama.cpp's deepseek2 layout: RoPE rows as adjacent pairs, and the
    KV up-projection split into k_b (transposed, so queries absorb it) and v_b, as its converter
    writes them (MLA with the absorption optimisation; the cache holds the latent only)."""
    a, H, D = cfg.mla, cfg.n_heads, cfg.d_model
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim

    def q_rows(key: str) -> Callable[[], torch.Tensor]:
        return lambda: _rope_rows_to_pairs(state[b + key], a.qk_nope_head_dim, H, qk, a.qk_rope_head_dim)

    if a.q_lora_rank is None:
        yield t(p + "attn_q.weight", q_rows("attn.q_proj.weight"), (H * qk, D))
    else:
        yield t(p + "attn_q_a.weight", lambda: state[b + "attn.q_down.weight"], (a.q_lora_rank, D))
        yield t(p + "attn_q_a_norm.weight", lambda: state[b + "attn.q_norm.weight"], (a.q_lora_rank,), False)
        yield t(p + "attn_q_b.weight", q_rows("attn.q_up.weight"), (H * qk, a.q_lora_rank))
    R = a.kv_lora_rank
    yield t(p + "attn_kv_a_mqa.weight",
            lambda: _rope_rows_to_pairs(state[b + "attn.kv_down.weight"], R, 1, R + a.qk_rope_head_dim,
                                        a.qk_rope_head_dim), (R + a.qk_rope_head_dim, D))
    yield t(p + "attn_kv_a_norm.weight", lambda: state[b + "attn.kv_norm.weight"], (R,), False)

    def kv_up() -> tuple[torch.Tensor, torch.Tensor]:
        kv = state[b + "attn.kv_up.weight"].view(H, a.qk_nope_head_dim + a.v_head_dim, R)
        return kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=1)        # (H, nope, R), (H, v, R)

    yield t(p + "attn_k_b.weight", lambda: kv_up()[0].transpose(1, 2), (H, R, a.qk_nope_head_dim))
    yield t(p + "attn_v_b.weight", lambda: kv_up()[1], (H, a.v_head_dim, R))
    yield t(p + "attn_output.weight", lambda: state[b + "attn.out.weight"], (D, H * a.v_head_dim))


def _moe(state, b, p, cfg: ModelConfig, choice: Choice, t, layer: int) -> Iterator[Tensor]:
    moe, D = cfg.moe, cfg.d_model
    E, F = choice.experts, moe.expert_hidden
    bias = state[b + "ffn.router.expert_bias"]
    if choice.uses_bias:
        yield t(p + "exp_probs_b.bias", lambda: bias, (E,), False)
    elif (moe.router == "sigmoid" or moe.bias_update_rate > 0) and torch.count_nonzero(bias):
        refuse(f"blocks.{layer}.ffn.router.expert_bias", "non-zero", f"llama.cpp's {choice.arch} has no "
               "selection bias (aux-loss-free balancing), so its expert choices would differ")
    yield t(p + "ffn_gate_inp.weight", lambda: state[b + "ffn.router.gate"], (E, D), False)
    yield t(p + "ffn_gate_exps.weight", lambda: state[b + "ffn.experts.w_gate_up"][:, :F], (E, F, D))
    yield t(p + "ffn_up_exps.weight", lambda: state[b + "ffn.experts.w_gate_up"][:, F:], (E, F, D))
    yield t(p + "ffn_down_exps.weight", lambda: state[b + "ffn.experts.w_down"], (E, D, F))
    if moe.num_shared_experts:
        S = moe.num_shared_experts * (moe.shared_expert_hidden or F)
        yield t(p + "ffn_gate_shexp.weight", lambda: state[b + "ffn.shared.gate_up.weight"][:S], (S, D))
        yield t(p + "ffn_up_shexp.weight", lambda: state[b + "ffn.shared.gate_up.weight"][S:], (S, D))
        yield t(p + "ffn_down_shexp.weight", lambda: state[b + "ffn.shared.down.weight"], (D, S))
        if moe.shared_expert_gate:
            yield t(p + "ffn_gate_inp_shexp.weight", lambda: state[b + "ffn.shared_gate.weight"][0], (D,), False)


# ---------------------------------------------------------------------------------------------
# hyperparameters
# ---------------------------------------------------------------------------------------------

def _write_keys(w, gguf, cfg: ModelConfig, choice: Choice, file_type) -> None:
    moe = cfg.moe
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling.kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    w.add_file_type(file_type)
    # llama and olmoe size their (expert) FFN with feed_forward_length; the others have both keys
    expert_ffn_in_main_key = choice.arch in ("llama", "olmoe") and choice.moe_layers
    w.add_feed_forward_length(moe.expert_hidden if expert_ffn_in_main_key else cfg.ffn_hidden)
    if choice.moe_layers:
        w.add_expert_count(choice.experts)
        w.add_expert_used_count(moe.top_k)
        if not expert_ffn_in_main_key:
            w.add_expert_feed_forward_length(moe.expert_hidden)
        if moe.n_groups > 1 and moe.topk_groups < moe.n_groups:   # all groups kept = no limit
            w.add_expert_group_count(moe.n_groups)
            w.add_expert_group_used_count(moe.topk_groups)
    if choice.arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden))
    if cfg.attention == "mla":
        a = cfg.mla
        w.add_head_count_kv(1)                          # MLA absorbed: one latent "head" (the converter's choice)
        w.add_q_lora_rank(a.q_lora_rank or 0)
        w.add_kv_lora_rank(a.kv_lora_rank)
        w.add_key_length(a.kv_lora_rank + a.qk_rope_head_dim)
        w.add_value_length(a.kv_lora_rank)
        w.add_key_length_mla(a.qk_nope_head_dim + a.qk_rope_head_dim)
        w.add_value_length_mla(a.v_head_dim)
        w.add_rope_dimension_count(a.qk_rope_head_dim)
        w.add_leading_dense_block_count(choice.leading_dense)
        w.add_expert_shared_count(choice.shared_experts)
        if not choice.moe_layers:
            w.add_expert_feed_forward_length(moe.expert_hidden)
        w.add_expert_weights_scale(moe.routed_scaling)
        w.add_expert_weights_norm(choice.norm_topk)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if choice.gating == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
    else:
        w.add_head_count_kv(cfg.kv_heads)
        w.add_key_length(cfg.attn_head_dim)
        w.add_value_length(cfg.attn_head_dim)
        w.add_rope_dimension_count(cfg.attn_head_dim)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

@dataclass
class Exported:
    """What an export wrote: the file, the llama.cpp architecture, the type and notes."""

    path: Path
    arch: str
    type: str
    tensors: int
    bytes: int
    notes: list[str] = field(default_factory=list)


def _encode(gguf, x: torch.Tensor, qtype):
    """Tensor -> the bytes of a GGUF tensor of ``qtype`` (numpy uint8, byte shape)."""
    Q = gguf.GGMLQuantizationType
    x = x.detach().contiguous()
    if qtype == Q.F32:
        arr = x.float().numpy()
    elif qtype == Q.F16:
        arr = x.half().numpy()
    elif qtype == Q.BF16:
        arr = x.to(torch.bfloat16).view(torch.int16).numpy()
    else:
        arr = gguf.quants.quantize(x.float().numpy(), qtype)
    return arr.view("uint8")


def _type_of(gguf, tensor: Tensor, matrix_type):
    """The stored type: float32 for vectors and routers; the chosen type for weight matrices, where
    a quantised type falls back to float32 for rows its blocks do not divide."""
    Q = gguf.GGMLQuantizationType
    if not tensor.matrix:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[matrix_type]
    return matrix_type if tensor.shape[-1] % block == 0 else Q.F32


def _write(model: "Transformer", choice: Choice, vocab: Optional[Vocab], path: Path, gguf_type: str,
           name: Optional[str]) -> int:
    import numpy as np
    gguf = require_gguf()
    matrix_name, file_type = DIRECT_TYPES[gguf_type]
    matrix_type = getattr(gguf.GGMLQuantizationType, matrix_name)
    specs = list(_tensors(model, choice))         # runs the value checks (biases) before any write
    known = {n.format(bid=i) for kind in gguf.MODEL_TENSORS[_arch_enum(gguf, choice.arch)]
             for n in [gguf.TENSOR_NAMES[kind]] for i in range(model.config.n_layers)}
    unknown = [s.name for s in specs if s.name.rsplit(".", 1)[0] not in known]
    if unknown:   # a bug guard: llama.cpp would refuse to load the file
        raise InteropError(f"internal: tensors {unknown[:4]} are not {choice.arch} tensors in gguf")
    w = gguf.GGUFWriter(str(path), choice.arch)
    try:
        if name:
            w.add_name(name)
        _write_keys(w, gguf, model.config, choice, getattr(gguf.LlamaFileType, file_type))
        write_vocab(w, vocab, model.config.vocab_size)
        types = [_type_of(gguf, s, matrix_type) for s in specs]
        for s, qtype in zip(specs, types):
            byte_shape = gguf.quant_shape_to_byte_shape(s.shape, qtype)
            nbytes = int(torch.Size(byte_shape).numel())
            w.add_tensor_info(s.name, byte_shape, np.uint8, nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for s, qtype in zip(specs, types):
            w.write_tensor_data(_encode(gguf, s.make(), qtype))
    finally:
        w.close()
    return len(specs)


def _arch_enum(gguf, arch: str):
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def _llama_quantize(src: Path, dst: Path, gguf_type: str) -> None:
    """llama.cpp's own quantiser (``llama_model_quantize``) from an f32/bf16 GGUF."""
    require_gguf(llama=True)
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANT_TYPES[gguf_type])
    params.nthread = torch.get_num_threads()
    with quiet_stderr():      # it prints a line per tensor; the types it chose are noted instead
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise InteropError(f"llama.cpp's quantiser failed on {src} (type {gguf_type}, status {rc})")


def tensor_types(path: PathLike) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF file holds, e.g. {"Q4_K": 20, "F32": 9}."""
    gguf = require_gguf()
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def plan(model: "Transformer", tokenizer_json: Optional[str] = None) -> tuple[Choice, Optional[Vocab]]:
    """The architecture and vocabulary an export would write, with every config and tokenizer
    refusal raised (the value checks on tensors run when the tensors are listed)."""
    cfg = model.config
    choice = choose(cfg)
    vocab = None
    if tokenizer_json is not None:
        from tokenizers import Tokenizer

        from moelab.data.tokenizer import find_eos_id
        try:
            eos = find_eos_id(Tokenizer.from_str(tokenizer_json), "tokenizer.json")
        except Exception as e:  # noqa: BLE001 - DataError, or tokenizers' bare Exception on bad JSON
            raise GGUFRefusal(f"cannot export to GGUF: {e}") from None
        vocab = vocab_from_tokenizer_json(tokenizer_json, cfg.vocab_size, eos)
    return choice, vocab


def export_gguf(model: "Transformer", out: PathLike, *, type: str = "bf16",
                tokenizer_json: Optional[str] = None, name: Optional[str] = None) -> Exported:
    """Write ``model`` (a moelab Transformer) as a GGUF file at ``out``; see the module docstring.
    Refusals (InteropError subclasses) name the field and the reason and leave no file."""
    check_type(type)
    require_gguf(llama=type in LLAMA_QUANT_TYPES)
    choice, vocab = plan(model, tokenizer_json)
    notes = [] if vocab is not None else ["no tokenizer: the GGUF file holds token ids only "
                                          "(tokenizer model 'none'); pass token ids to llama.cpp"]
    if model.config.moe.router == "noisy":
        notes.append("moe.router = 'noisy': the learned noise acts only in training; llama.cpp runs the "
                     "same softmax top-k")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad():
            if type in DIRECT_TYPES:
                count = _write(model, choice, vocab, tmp, type, name)
            else:
                source_type = "f32" if _all_float32(model) else "bf16"
                mid = tmp.with_suffix(".src.gguf")
                try:
                    count = _write(model, choice, vocab, mid, source_type, name)
                    _llama_quantize(mid, tmp, type)
                finally:
                    mid.unlink(missing_ok=True)
        if type in LLAMA_QUANT_TYPES:
            mix = ", ".join(f"{k.lower()} x{v}" for k, v in tensor_types(tmp).items())
            notes.append(f"llama.cpp's quantiser chose the tensor types ({mix}; rows its blocks do not "
                         "divide fall back to other types)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return Exported(out, choice.arch, type, count, out.stat().st_size, notes)


def _all_float32(model: "Transformer") -> bool:
    return all(p.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------

def load_source(path: PathLike) -> tuple["Transformer", Optional[str], str]:
    """The model (in its stored dtype), tokenizer.json text (or None) and kind ("run" | "hf") of a
    moelab run folder or a Hugging Face model folder (converted in memory, nothing written)."""
    from moelab.runfolder import TOKENIZER_FILE, CheckpointError, is_hf_folder, load, resolve
    try:
        folder = resolve(path)
        model = load(folder)
    except CheckpointError as e:
        raise InteropError(str(e)) from None
    tok = folder / TOKENIZER_FILE
    tokenizer_json = tok.read_text(encoding="utf-8") if tok.is_file() else None
    return model, tokenizer_json, "hf" if is_hf_folder(folder) else "run"


def convert_to_gguf(source: PathLike, out: PathLike, type: str = "bf16") -> Exported:
    """``moelab convert --to-gguf``: a run folder or Hugging Face folder -> one GGUF file."""
    check_type(type)
    require_gguf(llama=type in LLAMA_QUANT_TYPES)
    model, tokenizer_json, _ = load_source(source)
    return export_gguf(model, out, type=type, tokenizer_json=tokenizer_json, name=Path(source).resolve().name)
