"""What the six families share: rule fragments of the key maps, a config.json reader that
remembers what it read, and the fields every decoder family spells the same way.

Each family module exposes ``MODEL_TYPE``, ``KEYMAP``, ``model_from_hf(c: HFConfig) -> dict``
(our ``model`` section) and ``model_to_hf(m: ModelConfig, notes) -> dict`` (its config.json),
and refuses with :class:`InteropError` whatever it cannot express exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from moelab.config import ModelConfig
from moelab.interop.errors import InteropError
from moelab.interop.keymap import Concat, Ctx, Dropped, Experts, Rule, ZeroBuffer

_MISSING = object()

# config.json keys that do not change what the model computes at inference
NON_COMPUTATIONAL = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "output_router_logits", "router_aux_loss_coef", "attention_dropout",
    "_name_or_path", "name_or_path", "auto_map", "tokenizer_class", "return_dict",
    "output_hidden_states", "output_attentions", "use_return_dict", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size",
    "finetuning_task", "task_specific_params", "prefix", "pretraining_tp",
    "_attn_implementation_autoset", "_commit_hash", "tf_legacy_loss", "pruned_heads",
    "torchscript", "use_bfloat16", "num_labels", "bad_words_ids", "ep_size", "aux_loss_alpha",
    "seq_aux", "router_jitter_noise", "_experts_implementation", "_attn_implementation",
}


def transformers_defaults(model_type: str) -> dict:
    """The default values transformers' config class for ``model_type`` gives every field, or {}
    when transformers (or the family) is not available."""
    try:
        import transformers
        return transformers.AutoConfig.for_model(model_type).to_dict()
    except Exception:  # noqa: BLE001 - transformers missing, or too old for the family
        return {}


# The JSON type each config.json field the families read must have (None is always allowed: a
# missing value falls back to a default or is refused by the family). A value of another type
# (``hidden_size: "abc"``, ``rope_parameters: "yarn"``) is refused by name, before any arithmetic.
_INT, _FLOAT, _BOOL, _STR, _DICT, _LIST = "an integer", "a number", "true or false", "a string", "an object", "a list"
FIELD_TYPES = {
    **dict.fromkeys((
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "head_dim", "num_experts_per_tok",
        "num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size",
        "shared_expert_intermediate_size", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "qk_head_dim", "first_k_dense_replace", "n_group",
        "topk_group", "n_shared_experts", "decoder_sparse_step", "moe_layer_freq", "sliding_window",
        "max_window_layers", "num_nextn_predict_layers"), _INT),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "initializer_range", "routed_scaling_factor",
                     "router_aux_loss_coef", "clip_qkv"), _FLOAT),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "norm_topk_prob", "qkv_bias",
                     "rope_interleave", "use_sliding_window"), _BOOL),
    **dict.fromkeys(("hidden_act", "scoring_func", "topk_method", "model_type"), _STR),
    **dict.fromkeys(("rope_parameters", "rope_scaling", "quantization_config"), _DICT),
    **dict.fromkeys(("mlp_only_layers", "layer_types"), _LIST),
}
# rope_parameters / rope_scaling entries that are numbers
ROPE_NUMBERS = {"rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
                "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "attention_factor", "partial_rotary_factor"}


def has_type(value: Any, kind: str) -> bool:
    """Whether a JSON value is of ``kind`` (one of the FIELD_TYPES descriptions); None always is."""
    if value is None:
        return True
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {_INT: number and float(value).is_integer(), _FLOAT: number, _BOOL: isinstance(value, bool),
            _STR: isinstance(value, str), _DICT: isinstance(value, dict),
            _LIST: isinstance(value, list)}[kind]


def check_type(family: str, key: str, value: Any, kind: Optional[str]) -> Any:
    """``value`` itself when it has the JSON type ``kind`` (whole floats become ints), else an
    InteropError naming the field, its value and the type it needs."""
    if kind is None or value is None:
        return value
    if not has_type(value, kind):
        text = repr(value)
        text = text if len(text) <= 60 else text[:57] + "..."
        raise InteropError(f"config.json ({family}): {key} = {text} has the wrong type: must be {kind}")
    return int(value) if kind == _INT else value


class HFConfig:
    """A Hugging Face config.json (a dict) that records which keys were read, so that keys nobody
    read can be reported instead of silently ignored, and checks each value's JSON type."""

    def __init__(self, data: dict, family: str):
        self.data, self.family = dict(data), family
        self.read: set[str] = set()
        self.defaults = transformers_defaults(family)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        self.read.add(key)
        value = self.data.get(key, _MISSING)
        if value is _MISSING and default is _MISSING and self.defaults.get(key) is not None:
            # transformers fills a missing field with its config class's default: so do we
            return self.defaults[key]
        if value is _MISSING or (value is None and default is not _MISSING and default is not None):
            if default is _MISSING:
                raise InteropError(f"config.json ({self.family}) has no {key!r}"
                                   + ("" if self.defaults else " (with transformers installed, its "
                                      "default for the family would be used)"))
            return default
        return check_type(self.family, key, value, FIELD_TYPES.get(key))

    def first(self, *keys: str) -> Any:
        """The first of several spellings that is present (transformers' attribute_map aliases)."""
        for key in keys:
            if self.data.get(key) is not None:
                self.read.update(keys)
                return check_type(self.family, key, self.data[key], FIELD_TYPES.get(key))
        raise InteropError(f"config.json ({self.family}) has none of {', '.join(map(repr, keys))}")

    def fail(self, key: str, value: Any, why: str) -> None:
        raise InteropError(f"config.json ({self.family}): {key} = {value!r} is not supported: {why}")

    def expect(self, key: str, ok: Callable[[Any], bool], why: str, default: Any = None) -> Any:
        value = self.get(key, default)
        if not ok(value):
            self.fail(key, value, why)
        return value

    def unread(self) -> list[str]:
        return sorted(k for k in self.data if k not in self.read and k not in NON_COMPUTATIONAL)


def refuse(family: str, what: str, why: str) -> None:
    raise InteropError(f"cannot export to {family}: {what} ({why})")


# ---------------------------------------------------------------------------------------------
# config fields common to the GQA families
# ---------------------------------------------------------------------------------------------

# transformers' rope_parameters keys we understand; any other key would change the computation
ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
             "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate", "partial_rotary_factor"}


def read_rope(c: HFConfig, default_theta: float) -> tuple[float, dict]:
    """rope_theta and our ``rope_scaling`` fields from ``rope_parameters`` (transformers 5) or
    ``rope_theta``/``rope_scaling`` (older files). Plain, linear, llama3 and yarn RoPE are
    implemented; dynamic NTK and LongRoPE are refused."""
    params = c.get("rope_parameters", None) or {}
    legacy = c.get("rope_scaling", None) or {}
    for name, d in (("rope_parameters", params), ("rope_scaling", legacy)):
        for key in ROPE_NUMBERS & set(d):
            check_type(c.family, f"{name}.{key}", d[key], _FLOAT)
    theta = params.get("rope_theta", c.get("rope_theta", default_theta))
    scaling: dict = {}
    for name, d in (("rope_parameters", params), ("rope_scaling", legacy)):
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            c.fail(f"{name}.partial_rotary_factor", d["partial_rotary_factor"], "RoPE covers the whole head here")
        kind = d.get("rope_type", d.get("type", "default"))
        if kind in ("default", None):
            continue
        if kind not in ("linear", "llama3", "yarn"):
            c.fail(f"{name}.rope_type", kind, "implemented RoPE types: default, linear, llama3, yarn")
        unknown = sorted(set(d) - ROPE_KEYS)
        if unknown:
            c.fail(f"{name}.{unknown[0]}", d[unknown[0]], "not a RoPE parameter moelab implements")
        required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"), "yarn": ("original_max_position_embeddings",)}[kind]
        for key in required:
            if d.get(key) is None:
                c.fail(f"{name}.{key}", None, f"required for rope_type {kind!r}")
        scaling = _rope_scaling(c, kind, d)
    return float(theta), scaling


def _rope_scaling(c: HFConfig, kind: str, d: dict) -> dict:
    """transformers' names and defaults -> ``RopeScalingConfig`` fields."""
    out = {"kind": kind}
    original = d.get("original_max_position_embeddings")
    factor = d.get("factor")
    if factor is None and kind == "yarn" and original:         # DeepSeek: the context ratio
        factor = c.get("max_position_embeddings") / original
    out["factor"] = float(factor)
    if kind in ("llama3", "yarn"):
        out["original_max_seq_len"] = original
    if kind == "llama3":
        out["low_freq_factor"] = float(d["low_freq_factor"])
        out["high_freq_factor"] = float(d["high_freq_factor"])
    if kind == "yarn":
        out["beta_fast"] = float(d.get("beta_fast") or 32)
        out["beta_slow"] = float(d.get("beta_slow") or 1)
        out["mscale"] = float(d.get("mscale") or 0.0)
        out["mscale_all_dim"] = float(d.get("mscale_all_dim") or 0.0)
        if d.get("attention_factor") is not None:
            out["attention_factor"] = float(d["attention_factor"])
        out["truncate"] = bool(d.get("truncate", True))
    return out


def rope_to_hf(m: ModelConfig) -> dict:
    """Our RoPE settings as transformers 5 ``rope_parameters``."""
    s = m.rope_scaling
    out = {"rope_type": s.kind, "rope_theta": m.rope_theta}
    if s.kind != "default":
        out["factor"] = s.factor
    if s.kind in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = s.original_max_seq_len
    if s.kind == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.kind == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        if s.mscale:
            out["mscale"] = s.mscale
        if s.mscale_all_dim:
            out["mscale_all_dim"] = s.mscale_all_dim
        if s.attention_factor is not None:
            out["attention_factor"] = s.attention_factor
    return out


def read_common(c: HFConfig, *, default_theta: float = 10000.0) -> dict:
    """vocab, width, depth, heads, context, RoPE, norm eps, tying; checks the activation."""
    c.expect("hidden_act", lambda v: v == "silu", "only SwiGLU (silu) FFNs are implemented", "silu")
    heads = c.get("num_attention_heads")
    theta, scaling = read_rope(c, default_theta)
    kv = c.get("num_key_value_heads", heads)
    hidden = c.get("hidden_size")
    m = {
        "vocab_size": c.get("vocab_size"),
        "d_model": hidden,
        "n_layers": c.get("num_hidden_layers"),
        "n_heads": heads,
        "n_kv_heads": None if kv == heads else kv,
        "max_seq_len": c.get("max_position_embeddings"),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm_eps": float(c.get("rms_norm_eps")),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "init_std": float(c.get("initializer_range", 0.02)),
    }
    head_dim = c.get("head_dim", None)
    if head_dim is not None and head_dim != hidden // heads:
        m["head_dim"] = head_dim
    return m


def check_window(c: HFConfig, max_len: int) -> None:
    """Sliding-window attention is not implemented: a window narrower than the context would
    change the computation, so it is an error; a window at least as wide is plain attention."""
    use = c.get("use_sliding_window", True)
    window = c.get("sliding_window", None)
    types = c.get("layer_types", None) or []
    c.get("max_window_layers", None)
    if not use or not window:
        return
    if window < max_len and (not types or "sliding_attention" in types):
        c.fail("sliding_window", window, f"sliding-window attention is not implemented "
               f"(window narrower than max_position_embeddings={max_len})")


def common_to_hf(m: ModelConfig, family: str) -> dict:
    if not m.causal:
        refuse(family, "causal = false", "every family here is a causal decoder; an encoder's "
               "bidirectional attention would silently become causal")
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "max_position_embeddings": m.max_seq_len,
        "rope_parameters": rope_to_hf(m),
        "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def check_gqa(m: ModelConfig, family: str, *, qk_norm: str = "none", bias: bool = False) -> None:
    if m.attention != "gqa":
        refuse(family, f"attention = {m.attention!r}", "this family uses grouped-query attention")
    if m.qk_norm != qk_norm:
        refuse(family, f"qk_norm = {m.qk_norm!r}", f"this family's q/k norm is {qk_norm!r}")
    if m.attn_bias and not bias:
        refuse(family, "attn_bias = true", "this family's attention bias also covers the output "
               "projection, which moelab does not have")


def check_moe_export(m: ModelConfig, family: str, notes: list[str], *, router: str = "softmax") -> None:
    """Refuse what an HF MoE family cannot express; note what is training-only and dropped."""
    moe = m.moe
    if not m.moe_layer_indices():
        return
    if moe.num_experts_per_layer is not None and len(set(moe.num_experts_per_layer)) > 1:
        refuse(family, f"num_experts_per_layer = {list(moe.num_experts_per_layer)}",
               "the family has one expert count for every MoE layer")
    kind = "sigmoid" if moe.router == "sigmoid" else "softmax"
    if kind != router:
        refuse(family, f"moe.router = {moe.router!r}", f"this family's router is {router}")
    if moe.router == "noisy":
        notes.append("moe.router = 'noisy': the learned noise acts only in training and is dropped; "
                     "inference routing is the same softmax top-k")
    if moe.eval_capacity_factor is not None:
        refuse(family, f"moe.eval_capacity_factor = {moe.eval_capacity_factor}",
               "capacity dropping at inference; Hugging Face MoE layers are dropless")
    if moe.capacity_factor is not None:
        notes.append(f"moe.capacity_factor = {moe.capacity_factor} is training-only (inference is dropless) and is dropped")
    if moe.n_groups > 1 and router != "sigmoid":
        refuse(family, f"moe.n_groups = {moe.n_groups}", "group-limited routing exists only in deepseek_v3")
    for name in ("seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        if getattr(moe, name) > 0:
            notes.append(f"moe.{name} = {getattr(moe, name)} is training-only and is dropped")


def moe_layers(m: ModelConfig) -> list[int]:
    return m.moe_layer_indices()


def experts_in_moe_layers(m: ModelConfig) -> int:
    layers = m.moe_layer_indices()
    return m.experts_in_layer(layers[0]) if layers else m.moe.num_experts


def layer_pattern(n_layers: int, moe: list[int]) -> dict:
    """Our MoE layer pattern for an explicit set of MoE layers: "all"/"none" when it is, else the
    explicit list (HF's decoder_sparse_step + mlp_only_layers, or first_k_dense_replace, are
    resolved to indices so that nothing depends on matching conventions)."""
    if len(moe) == n_layers:
        return {"layers": "all"}
    if not moe:
        return {"layers": "none"}
    return {"layers": list(moe)}


# ---------------------------------------------------------------------------------------------
# key-map fragments
# ---------------------------------------------------------------------------------------------

def qkv_rows(ctx: Ctx) -> list[int]:
    c = ctx.cfg
    return [c.n_heads * c.attn_head_dim, c.kv_heads * c.attn_head_dim, c.kv_heads * c.attn_head_dim]


TOP = (
    Rule("embed.weight", ("model.embed_tokens.weight",)),
    Rule("norm.weight", ("model.norm.weight",)),
    Rule("lm_head.weight", ("lm_head.weight",)),
)

NORMS = (
    Rule("attn_norm.weight", ("input_layernorm.weight",)),
    Rule("ffn_norm.weight", ("post_attention_layernorm.weight",)),
)

GQA = (
    Rule("attn.qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
         Concat(qkv_rows)),                                    # (H + 2G) Dh x D  =  q | k | v
    Rule("attn.qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
         Concat(qkv_rows)),
    Rule("attn.out.weight", ("self_attn.o_proj.weight",)),
    Rule("attn.q_norm.weight", ("self_attn.q_norm.weight",)),
    Rule("attn.k_norm.weight", ("self_attn.k_norm.weight",)),
)

DENSE_MLP = (
    Rule("ffn.gate_up.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), Concat()),  # 2F x D = gate | up
    Rule("ffn.down.weight", ("mlp.down_proj.weight",)),
)


def moe_rules(*, prefix: str = "mlp", gate: str = "gate_proj", up: str = "up_proj",
              down: str = "down_proj", bias: Optional[str] = None) -> tuple[Rule, ...]:
    """Router and routed experts. Checkpoints keep one (F, D) gate, up and (D, F) down per expert
    under ``{prefix}.experts.{e}``; the live module keeps ``mlp.experts.gate_up_proj`` (E, 2F, D)
    and ``mlp.experts.down_proj`` (E, D, F), exactly our w_gate_up / w_down."""
    rules = [
        Rule("ffn.router.gate", (f"{prefix}.gate.weight",), module="mlp.gate.weight"),
        Rule("ffn.experts.w_gate_up", (f"{prefix}.experts.{{e}}.{gate}.weight", f"{prefix}.experts.{{e}}.{up}.weight"),
             Experts(parts=2), module="mlp.experts.gate_up_proj"),
        Rule("ffn.experts.w_down", (f"{prefix}.experts.{{e}}.{down}.weight",), Experts(parts=1),
             module="mlp.experts.down_proj"),
        Rule("ffn.router.noise", (), Dropped()),
    ]
    if bias is None:
        rules.append(Rule("ffn.router.expert_bias", (), ZeroBuffer()))
    else:
        rules.append(Rule("ffn.router.expert_bias", (f"{prefix}.gate.{bias}",)))
    return tuple(rules)


def shared_rules(name: str, gate: Optional[str] = None) -> tuple[Rule, ...]:
    rules = [
        Rule("ffn.shared.gate_up.weight", (f"mlp.{name}.gate_proj.weight", f"mlp.{name}.up_proj.weight"), Concat()),
        Rule("ffn.shared.down.weight", (f"mlp.{name}.down_proj.weight",)),
    ]
    if gate is not None:
        rules.append(Rule("ffn.shared_gate.weight", (f"mlp.{gate}.weight",)))
    return tuple(rules)
