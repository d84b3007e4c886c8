"""Typed, frozen configuration for models and training, validated in one place.

Everything that makes a model Dense, MoE or Hybrid is a field here. A config is built from
defaults, a preset or a TOML file, then dotted overrides (``model.moe.top_k=1``) are applied; the
result goes through :meth:`Config.validate`, which names the bad field, its value and the allowed
range. Unknown keys are errors that suggest the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field."""


class OptionError(ConfigError):
    """A bad keyword option of a function (generation, weight formats). ``option`` is its keyword
    name; the CLI shows it as a flag (``top_p`` -> ``--top-p``)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option

    def for_cli(self) -> str:
        flag = "--" + self.option.replace("_", "-")
        text = str(self)
        return flag + text[len(self.option):] if text.startswith(self.option) else f"{flag}: {text}"


RouterKind = Literal["softmax", "noisy", "sigmoid", "hash", "expert_choice", "sinkhorn", "reinforce", "relu"]
GroupScore = Literal["max", "top2"]
GroupRouter = Literal["score", "learned"]
HashKind = Literal["balanced", "random"]
AttentionKind = Literal["gqa", "mla"]
QKNorm = Literal["none", "head", "full"]
DropPolicy = Literal["position", "score"]
RopeKind = Literal["default", "linear", "llama3", "yarn"]
BalanceScope = Literal["micro", "global"]
Objective = Literal["clm", "mlm"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]

ROUTER_KINDS = typing.get_args(RouterKind)

# Upper bounds on every size and count a user or a file can set: about ten times the largest
# released models' (DeepSeek-V3: vocab 129,280, d_model 7,168, 61 layers, 128 heads, 256 experts,
# FFN 18,432, 163,840 positions, 14.8T training tokens), so no real model is refused, while a typo
# or a hostile config.json is refused by name before anything is allocated or looped over.
MAX_VOCAB = 2**21            # tokens in the vocabulary
MAX_WIDTH = 2**18            # d_model, FFN and expert widths, MLA ranks
MAX_LAYERS = 1024
MAX_HEADS = 2048             # attention heads (and KV heads)
MAX_HEAD_DIM = 4096
MAX_EXPERTS = 4096           # routed or shared experts per layer, groups, expert-parallel degree
MAX_SEQ_LEN = 2**24          # positions (Llama 4 Scout: 10M)
MAX_BATCH = 2**20            # sequences per batch, micro-batches, evaluation batches
MAX_STEPS = 10**9            # optimiser steps (and step intervals)
MAX_TOKENS = 10**15          # a token budget
MAX_MINUTES = 10**7          # a time budget (19 years)
MAX_BYTES = 2**50            # data.max_bytes (1 PiB)
MAX_PROCESSES = 2**20        # parallel.dp_shard
MAX_SEED = 2**63 - 1         # what torch.manual_seed and numpy accept
MAX_TIMEOUT_S = 7 * 24 * 3600
# Routers whose choice for one token depends on the other tokens of its batch or sequence (expert
# choice, Zhou et al. 2022: each expert takes its top-scoring tokens). In a causal decoder future
# tokens would steer past ones in training, and generation has no future to look at, so these
# need model.causal = false. Named before they are implemented, so that adding one to RouterKind
# brings this rule with it.
SEQUENCE_ROUTER_KINDS = ("expert_choice",)
# Routers that give each token a varying number of experts (expert choice: zero or several; ReLU
# gates: every expert whose gate is positive), rather than exactly top_k.
VARIABLE_ROUTER_KINDS = ("expert_choice", "relu")
# Routers without learned scores to balance, rescale or group: hash routing is a fixed function of
# the token id.
SCORELESS_ROUTER_KINDS = ("hash",)
ATTENTION_KINDS = typing.get_args(AttentionKind)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The mixture-of-experts FFN and where it sits in the stack.

    Layer pattern: ``layers="all"`` (every layer), ``"none"`` (a dense model), or an explicit list
    of layer indices. With ``"all"``, ``first_dense`` leading layers stay dense and then every
    ``every``-th layer is MoE (layer ``i`` is MoE when ``i >= first_dense`` and
    ``(i - first_dense + 1) % every == 0``), which covers GLaM/Switch interleaving and
    DeepSeek's ``first_k_dense_replace``.
    """

    # Which layers are MoE: "all" (then first_dense and every apply), "none" (a dense model) or a
    # list of layer indices
    layers: Union[str, tuple[int, ...]] = "all"
    every: int = 1                    # with layers = "all": every every-th layer is MoE (2 = GLaM/Switch)
    first_dense: int = 0              # with layers = "all": this many leading layers stay dense
    num_experts: int = 8              # routed experts per MoE layer
    # One count per MoE layer, in layer order (DeepSpeed PR-MoE pyramid); None = num_experts each.
    num_experts_per_layer: Optional[tuple[int, ...]] = None
    # Experts per token; for "relu" the target average (ReMoE), for "expert_choice" the average
    # that sets each expert's capacity (Zhou et al. 2022).
    top_k: int = 2
    # Hidden width of each routed expert's SwiGLU: one width for all, or a list with one width per
    # routed expert (heterogeneous experts, HMoE, Wang et al. 2024), e.g. [128, 128, 256, 256].
    expert_hidden: Union[int, tuple[int, ...]] = 512
    # How experts are scored: "softmax" (top-k over softmax probabilities), "noisy" (learned noise
    # added to the logits in training, Shazeer et al. 2017), "sigmoid" (DeepSeek-V3 affinities),
    # "hash" (a fixed function of the token id, Roller et al. 2021), "expert_choice" (each expert
    # picks its tokens, Zhou et al. 2022; encoders only), "sinkhorn" (S-BASE, Clark et al. 2022),
    # "reinforce" (RL-R, Clark et al. 2022), "relu" (ReMoE, Wang et al. 2025); docs/routers.md
    router: RouterKind = "softmax"
    # hash router: "balanced" assigns token ids to experts greedily by their frequency in the training
    # tokens so that loads are equal there (fitted once when training starts, saved with the
    # weights); "random" is a fixed random function of the token id (its own seed, the same in every run).
    hash: HashKind = "balanced"
    sinkhorn_iters: int = 3           # sinkhorn router: Sinkhorn iterations balancing the training assignment
    # reinforce router: weight of the policy-gradient loss (at 0.1 the router's gradient norm at
    # initialisation is about the softmax router's; at 1 it is 14x that, a large share of the clip)
    reinforce_coef: float = 0.1
    # reinforce router: decay of the running baseline of the per-token loss that the reward is
    # measured against (baseline = decay * baseline + (1 - decay) * the step's mean loss).
    reinforce_baseline_decay: float = 0.99
    # relu router: starting coefficient of the L1 sparsity loss; it then adapts every optimiser step
    # (ReMoE starts at 1e-8 for runs of tens of thousands of steps; 1e-6 reaches the target sooner).
    relu_l1_coef: float = 1e-6
    # relu router: the L1 coefficient is multiplied by this factor after a step with more active
    # experts per token than top_k, and divided by it after a step with fewer (ReMoE's alpha).
    relu_l1_factor: float = 1.2
    # Renormalise the top-k weights to sum to one (Mixtral). Applies for top_k > 1 only: a top-1
    # weight stays the router probability (Switch), since a constant 1 would give the router no
    # gradient from the task loss.
    renormalize: bool = True
    routed_scaling: float = 1.0       # DeepSeek routed_scaling_factor, applied to routed weights
    n_groups: int = 1                 # group-limited routing (DeepSeek-V2/V3); 1 = off
    topk_groups: int = 1              # groups each token may use (DeepSeek topk_group)
    group_score: GroupScore = "max"   # V2 scores a group by its best expert, V3 by its top-2 sum
    # How the topk_groups groups are chosen: "score" from the expert scores (DeepSeek-V2/V3, see
    # group_score); "learned" by a separate group gate (hierarchical MoE, Shazeer et al. 2017), whose
    # probability multiplies the expert's probability within its group.
    group_router: GroupRouter = "score"
    bias_update_rate: float = 0.0     # DeepSeek-V3 aux-loss-free balancing speed (gamma); 0 = off
    capacity_factor: Optional[float] = None       # None = dropless (training)
    eval_capacity_factor: Optional[float] = None  # None = dropless in eval / generation
    # With a capacity: which assignments are dropped first when an expert is over capacity,
    # "position" (later tokens in the batch, Switch) or "score" (lowest router weight)
    drop_policy: DropPolicy = "position"
    # Switch load-balancing loss (hash, expert_choice and relu routers balance by other means and
    # do not use it).
    aux_loss_coef: float = 0.01
    seq_aux_loss_coef: float = 0.0    # DeepSeek-V3 sequence-wise balance loss
    z_loss_coef: float = 0.0          # ST-MoE router z-loss
    # Over which tokens the balance loss counts expert frequencies: "micro" = this process's
    # micro-batch; "global" = the micro-batch of every data-parallel rank (the frequencies are
    # all-reduced before the loss, Qiu et al. 2025, "Demons in the Detail"). In one process the
    # two are the same; "global" is what makes an N-process run equal the 1-process run.
    balance_scope: BalanceScope = "global"
    num_shared_experts: int = 0       # always-on experts every token goes through (DeepSeekMoE)
    shared_expert_hidden: Optional[int] = None  # per shared expert; None = expert_hidden (one width)
    shared_expert_gate: bool = False  # Qwen2-MoE sigmoid gate on the shared expert
    # HMoE's parameter penalty (Wang et al. 2024): the balance loss with each expert's load weighted
    # by its relative width, so routing favours narrow experts; needs a list expert_hidden.
    size_penalty_coef: float = 0.0

    @property
    def heterogeneous(self) -> bool:
        """True when expert_hidden lists one width per routed expert."""
        return isinstance(self.expert_hidden, tuple)

    def expert_widths(self, num_experts: int) -> tuple[int, ...]:
        """The hidden width of each of ``num_experts`` routed experts."""
        if isinstance(self.expert_hidden, tuple):
            return self.expert_hidden
        return (self.expert_hidden,) * num_experts

    @property
    def mean_expert_hidden(self) -> float:
        """The routed experts' mean width (their common width when homogeneous)."""
        if isinstance(self.expert_hidden, tuple):
            return sum(self.expert_hidden) / len(self.expert_hidden)
        return float(self.expert_hidden)


@dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Multi-head Latent Attention sizes (DeepSeek-V2): compressed KV, optional low-rank Q."""

    kv_lora_rank: int = 64                # width of the compressed KV latent (what the cache holds)
    q_lora_rank: Optional[int] = None     # low-rank query compression width; none = full-rank queries
    qk_nope_head_dim: int = 32            # per-head query/key width without RoPE
    qk_rope_head_dim: int = 16            # per-head width of the decoupled RoPE query/key part
    v_head_dim: int = 32                  # per-head value width


@dataclass(frozen=True, kw_only=True)
class RopeScalingConfig:
    """Context extension by rescaling RoPE frequencies, as released checkpoints configure it.

    "linear": every frequency divided by ``factor`` (position interpolation, Chen et al. 2023).
    "llama3": low frequencies divided by ``factor``, high ones kept, a smooth blend between,
    with wavelength bounds ``original_max_seq_len`` / ``low_freq_factor`` and / ``high_freq_factor``
    (Llama 3.1). "yarn": per-dimension blend of interpolated and original frequencies over the
    ramp set by ``beta_fast``/``beta_slow`` rotations, plus cos/sin scaled by an attention factor
    (YaRN, Peng et al. 2023); ``mscale``/``mscale_all_dim`` are DeepSeek-V3's variant of that
    factor, and for MLA ``mscale_all_dim`` also rescales the softmax. The tables are static:
    the scaling applies at every position, as in the released models.
    """

    kind: RopeKind = "default"                   # "default" = plain RoPE, else one of the scalings above
    factor: float = 1.0                          # context extension factor (new / original length)
    original_max_seq_len: Optional[int] = None   # llama3 / yarn: the pre-training context
    # llama3: wavelengths above original_max_seq_len / low_freq_factor are divided by factor
    low_freq_factor: float = 1.0
    # llama3: wavelengths below original_max_seq_len / high_freq_factor keep their frequency
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0                      # yarn: rotations where the ramp ends (faster dims kept)
    beta_slow: float = 1.0                       # yarn: rotations where the ramp starts (slower dims interpolated)
    mscale: float = 0.0                          # yarn (DeepSeek); 0 = unset
    mscale_all_dim: float = 0.0                  # yarn (DeepSeek); 0 = unset
    attention_factor: Optional[float] = None     # yarn: None = derived from factor (and mscales)
    truncate: bool = True                        # yarn: round the ramp's ends to whole dims


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The transformer: sizes, attention, positions, and which FFN each layer gets (``moe``)."""

    vocab_size: int = 4096             # embedding rows; a trained BPE gets at most this many tokens
    d_model: int = 256                 # residual stream width
    n_layers: int = 4                  # transformer blocks
    n_heads: int = 4                   # query heads
    n_kv_heads: Optional[int] = None   # None = n_heads (MHA); 1 = MQA
    head_dim: Optional[int] = None     # None = d_model // n_heads
    ffn_hidden: int = 704              # dense SwiGLU width
    max_seq_len: int = 256             # longest sequence the model (and its KV cache) handles
    rope_theta: float = 10000.0        # RoPE base frequency
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5             # RMSNorm epsilon
    tie_embeddings: bool = False       # the LM head reuses the input embedding matrix
    attention: AttentionKind = "gqa"   # "gqa" (grouped-query; MHA/MQA as cases) or "mla" (DeepSeek-V2)
    attn_bias: bool = False            # bias on q/k/v projections (Qwen2)
    qk_norm: QKNorm = "none"           # RMSNorm on q and k: per head (Qwen3) or whole (OLMoE)
    init_std: float = 0.02             # standard deviation of the normal weight initialisation
    # Causal (decoder) attention; false = bidirectional (an encoder, BERT-style, for train.objective
    # = "mlm"). Generation and the KV cache need a causal model.
    causal: bool = True
    mla: MLAConfig = field(default_factory=MLAConfig)     # used when attention = "mla"
    moe: MoEConfig = field(default_factory=MoEConfig)

    # ---- derived, used by the model and accounting ----
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def moe_layer_indices(self) -> list[int]:
        moe = self.moe
        if moe.layers == "none":
            return []
        if isinstance(moe.layers, tuple):
            return sorted(moe.layers)
        return [
            i for i in range(self.n_layers)
            if i >= moe.first_dense and (i - moe.first_dense + 1) % moe.every == 0
        ]

    def experts_in_layer(self, layer: int) -> int:
        """Number of routed experts in ``layer`` (0 for a dense layer)."""
        moe_layers = self.moe_layer_indices()
        if layer not in moe_layers:
            return 0
        if self.moe.num_experts_per_layer is not None:
            return self.moe.num_experts_per_layer[moe_layers.index(layer)]
        return self.moe.num_experts


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop: budget, batch, AdamW with warmup + cosine, evaluation, checkpoints and
    logging. The run stops at the first budget reached (steps, tokens or minutes)."""

    max_steps: int = 200               # stop after this many optimiser steps
    max_tokens: Optional[int] = None   # stop after this many training tokens
    max_minutes: Optional[float] = None  # stop after this much wall-clock time
    batch_size: int = 8                # sequences per optimiser step, over all processes (global batch)
    seq_len: int = 128                 # tokens per training sequence (<= model.max_seq_len)
    grad_accum: int = 1                # micro-batches accumulated per optimiser step
    lr: float = 3e-3                   # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1          # the cosine schedule ends at lr x this
    warmup_steps: int = 20             # linear warmup from 0 to lr over this many steps
    weight_decay: float = 0.1          # AdamW weight decay, on matrices only (not norms, biases, embedding)
    beta1: float = 0.9                 # AdamW first-moment decay
    beta2: float = 0.95                # AdamW second-moment decay
    grad_clip: float = 1.0             # clip the global gradient norm to this; 0 = no clipping
    seed: int = 1337                   # seeds the initial weights and the training batches
    eval_every: int = 50               # validate every this many steps (and at the end)
    eval_batches: int = 8              # validation batches per evaluation
    save_every: int = 100              # checkpoint every this many steps (and at the end)
    # also checkpoint when this much training time has passed since the last save (whichever of
    # save_every / save_every_minutes comes first); none = steps only
    save_every_minutes: Optional[float] = 5.0
    keep_checkpoints: int = 2          # newest checkpoints kept; older ones are deleted
    log_every: int = 10                # write a metrics.jsonl record every this many steps
    skip_nonfinite: bool = False       # skip a batch with a non-finite loss or gradient instead of stopping
    device: str = "auto"               # "auto" (CUDA when available), "cpu" or "cuda"
    compile: bool = False              # torch.compile attention and norms (MoE layers stay eager)
    # "clm": next-token prediction (decoders); "mlm": BERT's masked LM (needs model.causal = false):
    # mlm_probability of the tokens are selected, of those 80% become the mask token, 10% a random
    # token and 10% stay; the loss is taken on the selected positions only (Devlin et al. 2019)
    objective: Objective = "clm"
    mlm_probability: float = 0.15      # train.objective = "mlm": fraction of tokens selected
    # Experiment trackers that get every scalar metrics.jsonl gets, plus the config and summary:
    # "tensorboard" (events in RUN/tb), "wandb", "mlflow" (pip install 'moelab[trackers]'); [] = none
    trackers: tuple[Tracker, ...] = ("tensorboard",)
    # Run name in wandb / MLflow (none = the run folder's name); project, entity, experiment and
    # tracking URI come from the libraries' own variables (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME, ...)
    run_name: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How a run spreads over processes (torchrun). With one process every field is ignored.

    ``dp_shard``: FSDP2 sharding degree; -1 = all ranks. Ranks beyond it replicate (HSDP):
    world size = dp_replicate * dp_shard. ``ep``: expert-parallel degree; each MoE layer's experts
    are split evenly over ``ep`` ranks taken from the sharding dimension, and expert weights are
    sharded by FSDP over what is left of it (dp_shard / ep), as torchtitan lays out its 2-D mesh.
    """

    ep: int = 1                        # expert-parallel degree (ranks each MoE layer's experts split over)
    dp_shard: int = -1                 # FSDP2 sharding degree; -1 = all ranks; beyond it ranks replicate
    # seconds any collective may wait for the other processes before the run stops with an
    # error naming this key (a stopped, hung or lost process); passed to init_process_group
    timeout_s: float = 300.0
    # recompute each block's activations in the backward (torch.utils.checkpoint): less memory,
    # about a third more compute
    activation_checkpointing: bool = False


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What to train on: the built-in corpus or your own text, and the tokenizer."""

    corpus: str = "stdlib"             # "stdlib" or a file, folder, glob, .jsonl or .parquet
    text_field: str = "text"           # field / column for .jsonl and .parquet
    tokenizer: Optional[str] = None    # path to a tokenizer.json; None = train BPE on the corpus
    val_fraction: float = 0.05         # share of documents held out for validation (chosen by path hash)
    max_bytes: Optional[int] = None    # use only the first N bytes of the corpus (quick runs)


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run: the model, its training, its data and how it spreads over processes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "Config":
        """Check every field; raise ConfigError naming the first bad one. Returns self."""
        _validate_model(self.model)
        _validate_train(self.train)
        _validate_data(self.data)
        _validate_parallel(self.parallel)
        _validate_expert_parallel(self.parallel, self.model)
        if self.train.objective == "mlm" and self.model.causal:
            _fail("train.objective", self.train.objective,
                  "needs a bidirectional model: set model.causal = false")
        if self.parallel.ep > 1 and self.model.moe.heterogeneous and self.model.moe_layer_indices():
            _fail("parallel.ep", self.parallel.ep, "must be 1 with heterogeneous experts (a list "
                  "model.moe.expert_hidden): experts of different widths are not split over ranks")
        return self

    def validate_for_training(self) -> "Config":
        """``validate`` plus the checks that only matter when this config trains (an imported
        model's run folder keeps default train settings it will never use). Returns self."""
        self.validate()
        if self.train.seq_len > self.model.max_seq_len:
            _fail("train.seq_len", self.train.seq_len,
                  f"must be <= model.max_seq_len ({self.model.max_seq_len}): the model has no "
                  "positions beyond it")
        if self.train.objective == "clm" and not self.model.causal:
            _fail("train.objective", self.train.objective,
                  "next-token prediction needs model.causal = true (a bidirectional model sees "
                  "the token it must predict); train an encoder with train.objective = 'mlm'")
        return self

    def to_dict(self) -> dict:
        return to_dict(self)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "Config":
        return apply_overrides(self, overrides)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{path} = {value!r} is invalid: {allowed}")


def _positive(path: str, value: float) -> None:
    if not value > 0:
        _fail(path, value, "must be > 0")


def _at_least(path: str, value: float, low: float) -> None:
    if not value >= low:
        _fail(path, value, f"must be >= {low}")


def _at_most(path: str, value: float, high: float) -> None:
    if value > high:
        _fail(path, value, f"must be <= {high:,}")


def _in_range(path: str, value: float, high: float) -> None:
    """A positive size or count no larger than ``high``."""
    if not 0 < value <= high:
        _fail(path, value, f"must be > 0 and <= {high:,}")


def _one_of(path: str, value: Any, options: tuple) -> None:
    if value not in options:
        _fail(path, value, f"must be one of {', '.join(map(str, options))}")


def _validate_model(m: ModelConfig, p: str = "model") -> None:
    for name, high in (("vocab_size", MAX_VOCAB), ("d_model", MAX_WIDTH), ("n_layers", MAX_LAYERS),
                       ("n_heads", MAX_HEADS), ("ffn_hidden", MAX_WIDTH), ("max_seq_len", MAX_SEQ_LEN)):
        _in_range(f"{p}.{name}", getattr(m, name), high)
    _positive(f"{p}.rope_theta", m.rope_theta)
    _positive(f"{p}.norm_eps", m.norm_eps)
    _positive(f"{p}.init_std", m.init_std)
    _one_of(f"{p}.attention", m.attention, ATTENTION_KINDS)
    _one_of(f"{p}.qk_norm", m.qk_norm, typing.get_args(QKNorm))
    if m.head_dim is None:
        if m.d_model % m.n_heads:
            _fail(f"{p}.n_heads", m.n_heads, f"must divide d_model ({m.d_model})")
    else:
        _in_range(f"{p}.head_dim", m.head_dim, MAX_HEAD_DIM)
    if m.attention == "gqa" and m.attn_head_dim > MAX_HEAD_DIM:
        _fail(f"{p}.head_dim", m.attn_head_dim, f"must be <= {MAX_HEAD_DIM:,}")
    if m.attention == "gqa" and m.attn_head_dim % 2:
        _fail(f"{p}.head_dim", m.attn_head_dim, "must be even for RoPE")
    if m.n_kv_heads is not None:
        _in_range(f"{p}.n_kv_heads", m.n_kv_heads, MAX_HEADS)
        if m.n_heads % m.n_kv_heads:
            _fail(f"{p}.n_kv_heads", m.n_kv_heads, f"must divide n_heads ({m.n_heads})")
    if m.attention == "mla":
        _validate_mla(m.mla, f"{p}.mla")
    _validate_rope_scaling(m.rope_scaling, f"{p}.rope_scaling")
    _validate_moe(m, f"{p}.moe")


def _validate_rope_scaling(r: RopeScalingConfig, p: str) -> None:
    _one_of(f"{p}.kind", r.kind, typing.get_args(RopeKind))
    if r.kind == "default":
        return
    _at_least(f"{p}.factor", r.factor, 1.0)
    if r.kind in ("llama3", "yarn"):
        if r.original_max_seq_len is None:
            _fail(f"{p}.original_max_seq_len", None, f"must be set (> 0) for kind = {r.kind!r}")
        _in_range(f"{p}.original_max_seq_len", r.original_max_seq_len, MAX_SEQ_LEN)
    if r.kind == "llama3":
        _positive(f"{p}.low_freq_factor", r.low_freq_factor)
        if not r.high_freq_factor > r.low_freq_factor:
            _fail(f"{p}.high_freq_factor", r.high_freq_factor, f"must be > low_freq_factor ({r.low_freq_factor})")
    if r.kind == "yarn":
        _positive(f"{p}.beta_slow", r.beta_slow)
        if not r.beta_fast > r.beta_slow:
            _fail(f"{p}.beta_fast", r.beta_fast, f"must be > beta_slow ({r.beta_slow})")
        _at_least(f"{p}.mscale", r.mscale, 0.0)
        _at_least(f"{p}.mscale_all_dim", r.mscale_all_dim, 0.0)
        if r.attention_factor is not None:
            _positive(f"{p}.attention_factor", r.attention_factor)


def _validate_mla(a: MLAConfig, p: str) -> None:
    _in_range(f"{p}.kv_lora_rank", a.kv_lora_rank, MAX_WIDTH)
    if a.q_lora_rank is not None:
        _in_range(f"{p}.q_lora_rank", a.q_lora_rank, MAX_WIDTH)
    _in_range(f"{p}.qk_nope_head_dim", a.qk_nope_head_dim, MAX_HEAD_DIM)
    _in_range(f"{p}.qk_rope_head_dim", a.qk_rope_head_dim, MAX_HEAD_DIM)
    if a.qk_rope_head_dim % 2:
        _fail(f"{p}.qk_rope_head_dim", a.qk_rope_head_dim, "must be even for RoPE")
    _in_range(f"{p}.v_head_dim", a.v_head_dim, MAX_HEAD_DIM)


def _validate_moe(m: ModelConfig, p: str) -> None:
    moe = m.moe
    if isinstance(moe.layers, str):
        _one_of(f"{p}.layers", moe.layers, ("all", "none"))
    else:
        for i in moe.layers:
            if not 0 <= i < m.n_layers:
                _fail(f"{p}.layers", list(moe.layers),
                      f"layer index {i} is outside the model: must be in [0, {m.n_layers - 1}]")
        if len(set(moe.layers)) != len(moe.layers):
            _fail(f"{p}.layers", list(moe.layers), "must not repeat a layer index")
    _in_range(f"{p}.every", moe.every, MAX_LAYERS)
    if not 0 <= moe.first_dense <= m.n_layers:
        _fail(f"{p}.first_dense", moe.first_dense, f"must be in [0, n_layers={m.n_layers}]")
    _in_range(f"{p}.num_experts", moe.num_experts, MAX_EXPERTS)
    if moe.heterogeneous:
        for i, width in enumerate(moe.expert_hidden):
            _in_range(f"{p}.expert_hidden[{i}]", width, MAX_WIDTH)
    else:
        _in_range(f"{p}.expert_hidden", moe.expert_hidden, MAX_WIDTH)
    _one_of(f"{p}.router", moe.router, ROUTER_KINDS)
    if moe.router in SEQUENCE_ROUTER_KINDS and m.causal:
        _fail(f"{p}.router", moe.router, "routes each token by looking at the whole batch or "
              "sequence, which a causal decoder must not: it needs model.causal = false")
    _one_of(f"{p}.group_score", moe.group_score, typing.get_args(GroupScore))
    _one_of(f"{p}.group_router", moe.group_router, typing.get_args(GroupRouter))
    _one_of(f"{p}.hash", moe.hash, typing.get_args(HashKind))
    _one_of(f"{p}.drop_policy", moe.drop_policy, typing.get_args(DropPolicy))
    _one_of(f"{p}.balance_scope", moe.balance_scope, typing.get_args(BalanceScope))
    if moe.top_k < 1:
        _fail(f"{p}.top_k", moe.top_k, "must be >= 1")
    _in_range(f"{p}.n_groups", moe.n_groups, MAX_EXPERTS)    # before it divides below
    n_moe = len(m.moe_layer_indices())
    counts = [moe.num_experts] if moe.num_experts_per_layer is None else list(moe.num_experts_per_layer)
    if moe.num_experts_per_layer is not None and len(counts) != n_moe:
        _fail(f"{p}.num_experts_per_layer", counts,
              f"needs one count per MoE layer ({n_moe} MoE layers)")
    for e in counts:
        field_name = "num_experts" if moe.num_experts_per_layer is None else "num_experts_per_layer"
        if not 1 <= e <= MAX_EXPERTS:
            _fail(f"{p}.{field_name}", e, f"must be >= 1 and <= {MAX_EXPERTS:,}")
        if moe.top_k > e:
            _fail(f"{p}.top_k", moe.top_k, f"must be between 1 and num_experts ({e})")
        if e % moe.n_groups:
            _fail(f"{p}.n_groups", moe.n_groups, f"must divide num_experts ({e})")
        if moe.top_k > moe.topk_groups * (e // moe.n_groups):
            _fail(f"{p}.top_k", moe.top_k,
                  f"must be <= topk_groups * experts per group ({moe.topk_groups * (e // moe.n_groups)})")
    if not 1 <= moe.topk_groups <= moe.n_groups:
        _fail(f"{p}.topk_groups", moe.topk_groups, f"must be between 1 and n_groups ({moe.n_groups})")
    if moe.group_score == "top2" and moe.n_groups > 1 and min(counts) // moe.n_groups < 2:
        _fail(f"{p}.group_score", moe.group_score, "needs at least 2 experts per group")
    _positive(f"{p}.routed_scaling", moe.routed_scaling)
    for name in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(moe, name)
        if value is not None and not value > 0:
            _fail(f"{p}.{name}", value, "must be > 0 (or none for dropless)")
    for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate",
                 "num_shared_experts"):
        _at_least(f"{p}.{name}", getattr(moe, name), 0)
    _at_most(f"{p}.num_shared_experts", moe.num_shared_experts, MAX_EXPERTS)
    if moe.shared_expert_hidden is not None:
        _in_range(f"{p}.shared_expert_hidden", moe.shared_expert_hidden, MAX_WIDTH)
    _validate_router_kind(m, p, counts)
    _validate_heterogeneous(m, p, counts)


def _validate_router_kind(m: ModelConfig, p: str, counts: list[int]) -> None:
    """The new routers' own fields, and the compositions that have no meaning for them."""
    moe = m.moe
    kind = moe.router
    _at_least(f"{p}.sinkhorn_iters", moe.sinkhorn_iters, 1)
    _positive(f"{p}.reinforce_coef", moe.reinforce_coef)
    if not 0 <= moe.reinforce_baseline_decay < 1:
        _fail(f"{p}.reinforce_baseline_decay", moe.reinforce_baseline_decay, "must be in [0, 1)")
    _positive(f"{p}.relu_l1_coef", moe.relu_l1_coef)
    if not moe.relu_l1_factor > 1:
        _fail(f"{p}.relu_l1_factor", moe.relu_l1_factor, "must be > 1 (1 would never adapt)")
    _at_least(f"{p}.size_penalty_coef", moe.size_penalty_coef, 0)
    if moe.group_router == "learned":
        if moe.n_groups < 2:
            _fail(f"{p}.group_router", moe.group_router, "needs n_groups >= 2 (a gate over one group "
                  "picks nothing)")
        if kind not in ("softmax", "noisy"):
            _fail(f"{p}.group_router", moe.group_router, f"multiplies two softmax gates; router "
                  f"{kind!r} has no within-group softmax: use router = 'softmax' or 'noisy'")
    why = {
        "hash": "has no router scores (a fixed function of the token id)",
        "expert_choice": "lets each expert pick its tokens",
        "sinkhorn": "balances the assignment by Sinkhorn iterations",
        "reinforce": "samples its experts as a policy",
        "relu": "gates every expert by a ReLU",
    }.get(kind)
    if why is None:
        return
    if moe.n_groups > 1 and moe.group_router == "score":
        _fail(f"{p}.n_groups", moe.n_groups, f"group-limited routing needs router softmax, noisy or "
              f"sigmoid: router {kind!r} {why}")
    if moe.bias_update_rate > 0:
        _fail(f"{p}.bias_update_rate", moe.bias_update_rate, f"the DeepSeek-V3 selection bias needs "
              f"router softmax, noisy or sigmoid: router {kind!r} {why}")
    if moe.routed_scaling != 1.0 and kind in ("hash", "relu"):
        _fail(f"{p}.routed_scaling", moe.routed_scaling, f"must be 1: router {kind!r} {why}")
    if kind in SCORELESS_ROUTER_KINDS:
        for name in ("z_loss_coef", "seq_aux_loss_coef", "size_penalty_coef"):
            if getattr(moe, name) > 0:
                _fail(f"{p}.{name}", getattr(moe, name), f"must be 0: router {kind!r} {why}")
    if kind in VARIABLE_ROUTER_KINDS and moe.seq_aux_loss_coef > 0:
        _fail(f"{p}.seq_aux_loss_coef", moe.seq_aux_loss_coef, f"must be 0: router {kind!r} gives "
              "tokens a varying number of experts, which the sequence-wise loss does not count")
    if kind == "relu":
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(moe, name) is not None:
                _fail(f"{p}.{name}", getattr(moe, name), "must be none: ReLU routing is dropless "
                      "(its number of active experts varies per token)")
    if kind == "expert_choice":
        if moe.size_penalty_coef > 0:
            _fail(f"{p}.size_penalty_coef", moe.size_penalty_coef, "must be 0: with expert choice "
                  "every expert takes the same number of tokens, so no penalty can favour narrow ones")
    if kind == "reinforce" and not m.causal:
        _fail(f"{p}.router", kind, "its reward is each token's own next-token loss, which a masked "
              "LM (model.causal = false) scores for ~15% of the tokens only: use it in a decoder")


def _validate_heterogeneous(m: ModelConfig, p: str, counts: list[int]) -> None:
    moe = m.moe
    if not moe.heterogeneous:
        if moe.size_penalty_coef > 0:
            _fail(f"{p}.size_penalty_coef", moe.size_penalty_coef, "needs experts of different widths: "
                  "give model.moe.expert_hidden as a list, one width per routed expert")
        return
    widths = list(moe.expert_hidden)
    for e in counts:
        if len(widths) != e:
            _fail(f"{p}.expert_hidden", widths, f"lists {len(widths)} widths; every MoE layer has {e} "
                  "routed experts, and it needs one width per routed expert")
    if moe.num_shared_experts and moe.shared_expert_hidden is None:
        _fail(f"{p}.shared_expert_hidden", None, "must be set when expert_hidden is a list: the "
              "routed experts have no single width for the shared experts to copy")


def _validate_train(t: TrainConfig, p: str = "train") -> None:
    for name, high in (("max_steps", MAX_STEPS), ("batch_size", MAX_BATCH), ("seq_len", MAX_SEQ_LEN),
                       ("grad_accum", MAX_BATCH), ("eval_every", MAX_STEPS), ("eval_batches", MAX_BATCH),
                       ("save_every", MAX_STEPS), ("keep_checkpoints", MAX_STEPS), ("log_every", MAX_STEPS)):
        _in_range(f"{p}.{name}", getattr(t, name), high)
    _positive(f"{p}.lr", t.lr)
    if not 0 <= t.min_lr_ratio <= 1:
        _fail(f"{p}.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    _at_least(f"{p}.warmup_steps", t.warmup_steps, 0)
    _at_most(f"{p}.warmup_steps", t.warmup_steps, MAX_STEPS)
    if not 0 <= t.seed <= MAX_SEED:
        _fail(f"{p}.seed", t.seed, f"must be in [0, {MAX_SEED:,}]")
    _at_least(f"{p}.weight_decay", t.weight_decay, 0)
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            _fail(f"{p}.{name}", getattr(t, name), "must be in [0, 1)")
    _at_least(f"{p}.grad_clip", t.grad_clip, 0)
    if t.save_every_minutes is not None:
        _in_range(f"{p}.save_every_minutes", t.save_every_minutes, MAX_MINUTES)
    _one_of(f"{p}.objective", t.objective, typing.get_args(Objective))
    if not 0 < t.mlm_probability < 1:
        _fail(f"{p}.mlm_probability", t.mlm_probability, "must be in (0, 1)")
    if t.max_tokens is not None:
        _in_range(f"{p}.max_tokens", t.max_tokens, MAX_TOKENS)
    if t.max_minutes is not None:
        _in_range(f"{p}.max_minutes", t.max_minutes, MAX_MINUTES)
    _one_of(f"{p}.device", t.device, ("auto", "cpu", "cuda"))
    for tracker in t.trackers:
        _one_of(f"{p}.trackers", tracker, typing.get_args(Tracker))
    if len(set(t.trackers)) != len(t.trackers):
        _fail(f"{p}.trackers", list(t.trackers), "must not name a tracker twice")
    if t.run_name is not None and not t.run_name.strip():
        _fail(f"{p}.run_name", t.run_name, "must be a non-empty name, or none for the run folder's name")


def _validate_parallel(par: ParallelConfig, p: str = "parallel") -> None:
    """Field ranges only; whether a layout fits a world size and the model is checked by
    ``moelab.parallel.layout`` once the number of processes is known."""
    _in_range(f"{p}.ep", par.ep, MAX_EXPERTS)
    if par.dp_shard != -1 and not 1 <= par.dp_shard <= MAX_PROCESSES:
        _fail(f"{p}.dp_shard", par.dp_shard, f"must be >= 1 and <= {MAX_PROCESSES:,}, or -1 for all ranks")
    _in_range(f"{p}.timeout_s", par.timeout_s, MAX_TIMEOUT_S)


def _validate_expert_parallel(par: ParallelConfig, m: ModelConfig) -> None:
    """An expert-parallel degree no world size can run is refused at once, even by a
    one-process run that would ignore it (its checkpoint would resume nowhere with it)."""
    if par.ep == 1:
        return
    layers = m.moe_layer_indices()
    if not layers:
        _fail("parallel.ep", par.ep, "the model has no MoE layers (use parallel.ep = 1 for a dense model)")
    for layer in layers:
        experts = m.experts_in_layer(layer)
        if experts % par.ep:
            _fail("parallel.ep", par.ep, f"must divide the expert count of every MoE layer "
                  f"(layer {layer} has {experts})")


def _validate_data(d: DataConfig, p: str = "data") -> None:
    if not 0 < d.val_fraction < 1:
        _fail(f"{p}.val_fraction", d.val_fraction, "must be in (0, 1)")
    if d.max_bytes is not None:
        _in_range(f"{p}.max_bytes", d.max_bytes, MAX_BYTES)
    if not d.corpus:
        _fail(f"{p}.corpus", d.corpus, "must name 'stdlib' or a path")


# --------------------------------------------------------------------------------------------
# dict / TOML / overrides
# --------------------------------------------------------------------------------------------

def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def valid_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. ``model.moe.top_k``."""
    cls = cls or Config
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(t):
            keys += valid_keys(t, path + ".")
        else:
            keys.append(path)
    return keys


def _unknown_key(path: str) -> ConfigError:
    close = difflib.get_close_matches(path, valid_keys(), n=1, cutoff=0.5)
    if not close:  # try matching the last component alone
        leaf = path.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid_keys()}
        hit = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[hit[0]]] if hit else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{path}'{hint}")


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check ``value`` against a type hint, converting where TOML/JSON lose the type."""
    origin = typing.get_origin(hint)
    if origin is Union:
        args = typing.get_args(hint)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None                 # TOML has no null: "none" stands for it
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path} = {value!r} has the wrong type: expected {_type_name(hint)}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            _fail(path, value, f"must be one of {', '.join(map(str, typing.get_args(hint)))}")
        return value
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if isinstance(value, str) and (item is str or typing.get_origin(item) is Literal):
            value = [v.strip() for v in value.split(",") if v.strip()]   # --set train.trackers=a,b
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} = {value!r} has the wrong type: expected a list")
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return from_dict(hint, value, path)
    raise ConfigError(f"{path} = {value!r} has the wrong type: expected {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Union:
        return " or ".join("none" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin is tuple:
        return "a list"
    return getattr(hint, "__name__", str(hint))


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build a (nested) config dataclass from a plain dict, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in names:
            raise _unknown_key(full)
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """Parse an override's right-hand side as a TOML value; bare words stay strings."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Apply ``a.b.c=value`` overrides; returns a new (unvalidated) Config."""
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    data = to_dict(cfg)
    keys = set(valid_keys())
    for key, value in items:
        if key not in keys:
            raise _unknown_key(key)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        parsed = _parse_value(value) if isinstance(value, str) else value
        if parsed is None and isinstance(value, str) and not _accepts_none(key):
            parsed = value          # "none" is a word here (model.moe.layers = "none"), not null
        node[leaf] = parsed
    return from_dict(Config, data)


def _accepts_none(key: str) -> bool:
    """Whether the field at dotted ``key`` is Optional."""
    cls: Any = Config
    *parents, leaf = key.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    hint = typing.get_type_hints(cls)[leaf]
    return typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)


def _split(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key=value, e.g. model.moe.top_k=1")
    key, value = override.split("=", 1)
    return key.strip(), value.strip()


def load_toml(path: str | Path) -> Config:
    """Read a config TOML: ``[model]``, ``[model.moe]``, ``[train]``, ``[data]`` and ``[parallel]``
    tables."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    return from_dict(Config, data)


def model_config(**overrides: Any) -> ModelConfig:
    """Convenience: a validated ModelConfig from keyword overrides (``moe={...}`` nests)."""
    cfg = from_dict(Config, {"model": overrides})
    cfg.validate()
    return cfg.model
