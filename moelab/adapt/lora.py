"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on moelab models,
with Hugging Face ``peft``: which tensors to adapt, adapter folders in peft's own format, merge.

Targets, by kind:

    attn      every nn.Linear of every attention block (GQA's fused qkv and out; MLA's projections)
    ffn       the dense SwiGLU of every dense layer (gate_up, down)
    shared    the shared experts' SwiGLU of every MoE layer (gate_up, down)
    experts   the routed experts' stacked weights w_gate_up (E, 2H, D) and w_down (E, D, H)
    router    the router weight (E, D)

``attn``, ``ffn`` and ``shared`` are modules (``LoraConfig.target_modules``); ``experts`` and
``router`` are parameters (``LoraConfig.target_parameters``, peft >= 0.17), one rank-r update per
expert of the stacked (E, out, in) tensors. The default is every kind the model has except the
router (QLoRA, Dettmers et al. 2023, found adapting all linear layers is what matches full
fine-tuning; the router decides which experts train at all and is left to an explicit choice).

peft applies a parameter target while the wrapped module's ``forward`` runs; moelab's MoE calls
its experts through ``forward_dispatched`` instead, so ``apply_lora`` gives each experts wrapper
that one method, running the base method with the adapter applied (``_bridge_experts``).
Inference on an adapter (eval, generate) merges it into the base weights first
(``load_adapter_model``): one code path, and the outputs equal those of the ``--merge`` folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch
from torch import nn

from moelab.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from moelab.model.transformer import Transformer

# peft's file names (peft.utils.CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME), so peft reads our folders
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MERGED_DIR = "merged"
TARGET_KINDS = ("attn", "ffn", "shared", "experts", "router")
DEFAULT_TARGETS = ("attn", "ffn", "shared", "experts")
PEFT_EXTRA = "pip install torch==2.13.0 'moelab[finetune]' (peft >= 0.18)"


def require_peft():
    """The peft module, or a ConfigError naming the extra that provides it (imported quietly: peft
    imports torchao when it is installed, which talks at import)."""
    from moelab.quiet_imports import quiet_import
    try:
        with quiet_import():
            import peft
    except ImportError:
        raise ConfigError(f"LoRA fine-tuning needs Hugging Face peft, which is not installed: "
                          f"{PEFT_EXTRA}") from None
    return peft


def is_adapter_folder(folder: Union[str, Path]) -> bool:
    return (Path(folder) / ADAPTER_CONFIG_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# what to adapt
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: Optional[float] = None            # None: 2 * rank (scaling alpha / rank = 2)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    explicit: bool = False                   # targets named by the user: an absent kind is an error

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)


def parse_targets(text: Optional[str]) -> tuple[tuple[str, ...], bool]:
    """``--lora-targets attn,experts`` -> (("attn", "experts"), True); None -> the default."""
    if text is None:
        return DEFAULT_TARGETS, False
    kinds = tuple(t.strip() for t in text.split(",") if t.strip())
    if not kinds:
        raise ConfigError(f"--lora-targets = {text!r} is invalid: name at least one of "
                          f"{', '.join(TARGET_KINDS)}")
    for k in kinds:
        if k not in TARGET_KINDS:
            raise ConfigError(f"--lora-targets: unknown target {k!r}: choose from {', '.join(TARGET_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"--lora-targets = {text!r} is invalid: a target repeats")
    return kinds, True


@dataclass
class Targets:
    modules: list[str] = field(default_factory=list)        # nn.Linear names (target_modules)
    parameters: list[str] = field(default_factory=list)     # nn.Parameter names (target_parameters)
    by_kind: dict[str, list[str]] = field(default_factory=dict)


def _matrix_dims(name: str, tensor: torch.Tensor) -> tuple[int, int]:
    """(out, in) of the matrix a LoRA update of ``tensor`` has: per expert for stacked weights."""
    return tuple(tensor.shape[-2:])  # type: ignore[return-value]


def resolve_targets(model: "Transformer", spec: LoraSpec) -> Targets:
    """The exact module and parameter names of ``spec.targets`` in ``model``; refuses a kind the
    model lacks (when named explicitly) and a rank above the smaller side of any target matrix."""
    found: dict[str, list[tuple[str, torch.Tensor, bool]]] = {k: [] for k in TARGET_KINDS}
    for i, block in enumerate(model.blocks):
        for name, module in block.attn.named_modules():
            if isinstance(module, nn.Linear):
                found["attn"].append((f"blocks.{i}.attn.{name}", module.weight, True))
        ffn = block.ffn
        if not block.is_moe:
            for part in ("gate_up", "down"):
                found["ffn"].append((f"blocks.{i}.ffn.{part}", getattr(ffn, part).weight, True))
            continue
        if ffn.shared is not None:
            for part in ("gate_up", "down"):
                found["shared"].append((f"blocks.{i}.ffn.shared.{part}", getattr(ffn.shared, part).weight, True))
        for part in ("w_gate_up", "w_down"):
            found["experts"].append((f"blocks.{i}.ffn.experts.{part}", getattr(ffn.experts, part), False))
        found["router"].append((f"blocks.{i}.ffn.router.gate", ffn.router.gate, False))
    targets = Targets()
    for kind in spec.targets:
        if not found[kind]:
            if spec.explicit:
                raise ConfigError(f"--lora-targets: this model has no {kind!r} tensors to adapt "
                                  f"({_absent_reason(kind)})")
            continue
        for name, tensor, is_module in found[kind]:
            out_dim, in_dim = _matrix_dims(name, tensor)
            if spec.rank > min(out_dim, in_dim):
                raise ConfigError(f"--lora-rank = {spec.rank} is invalid for {kind} target {name} "
                                  f"({out_dim} x {in_dim}{' per expert' if tensor.dim() == 3 else ''}): "
                                  f"must be <= {min(out_dim, in_dim)}, the smaller side of the matrix")
            (targets.modules if is_module else targets.parameters).append(name)
            targets.by_kind.setdefault(kind, []).append(name)
    if not targets.by_kind:
        raise ConfigError(f"--lora-targets: none of {', '.join(spec.targets)} exists in this model")
    return targets


def _absent_reason(kind: str) -> str:
    return {"ffn": "every layer is MoE", "shared": "its MoE layers have no shared experts",
            "experts": "it is a dense model", "router": "it is a dense model",
            "attn": "no attention"}[kind]


# ---------------------------------------------------------------------------------------------
# wrapping a model
# ---------------------------------------------------------------------------------------------

def lora_config(spec: LoraSpec, targets: Targets, base: Optional[str] = None):
    peft = require_peft()
    return peft.LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0, bias="none",
                           target_modules=list(targets.modules), target_parameters=list(targets.parameters),
                           base_model_name_or_path=base)


def apply_lora(model: "Transformer", spec: LoraSpec, base: Optional[str] = None):
    """``model`` wrapped by ``peft.get_peft_model`` with LoRA on ``spec.targets``: base weights
    frozen, adapters trainable (B = 0, so the wrapped model starts equal to the base)."""
    peft = require_peft()
    targets = resolve_targets(model, spec)
    peft_model = peft.get_peft_model(model, lora_config(spec, targets))
    # set afterwards: get_peft_model overwrites it with the model's (absent) ``name_or_path``
    peft_model.peft_config["default"].base_model_name_or_path = base
    return prepare_wrapped(peft_model)


def prepare_wrapped(peft_model):
    """What a peft-wrapped moelab model needs beyond peft: experts called through
    ``forward_dispatched``, and DeepSeek-V3 balancing biases kept frozen (they are base state,
    and an adapter folder holds the adapter alone)."""
    _bridge_experts(peft_model)
    peft_model.update_router_biases = lambda: None
    return peft_model


def _bridge_experts(peft_model) -> None:
    from peft.tuners.lora.layer import ParamWrapper
    if not hasattr(ParamWrapper, "_activate_lora"):   # pragma: no cover - a peft without it
        raise ConfigError("this peft version has no ParamWrapper._activate_lora; moelab needs peft >= 0.18")
    for module in peft_model.modules():
        if isinstance(module, ParamWrapper) and hasattr(module.get_base_layer(), "forward_dispatched"):
            module.forward_dispatched = _DispatchedWithLora(module)


class _DispatchedWithLora:
    """``wrapper.forward_dispatched(x, plan)``: the wrapped experts' method with this wrapper's
    adapter applied, as peft's own ``ParamWrapper.forward`` applies it around ``forward``. Nested
    wrappers (one per adapted tensor) each add theirs on the way in."""

    def __init__(self, wrapper):
        self.wrapper = wrapper

    def __call__(self, x_ND: torch.Tensor, plan) -> torch.Tensor:
        w = self.wrapper
        inner = w.base_layer
        if w.disable_adapters or w.merged:
            return inner.forward_dispatched(x_ND, plan)
        with w._activate_lora(w.active_adapters):
            return inner.forward_dispatched(x_ND, plan)


# ---------------------------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------------------------

@dataclass
class ParamReport:
    total: int            # every parameter of the wrapped model (base + adapter)
    trainable: int        # the adapter's
    frozen: int           # the base's
    weights_bytes: int    # frozen base weights as held
    adapter_bytes: int    # trainable tensors as held
    gradient_bytes: int   # one gradient per trainable tensor
    optimizer_bytes: int  # AdamW: two float32 moments per trainable element

    def line(self) -> str:
        share = 100.0 * self.trainable / max(1, self.total)
        return (f"{self.trainable:,} trainable of {self.total:,} parameters ({share:.2f}%); memory: "
                f"base weights {_size(self.weights_bytes)} (frozen), adapter {_size(self.adapter_bytes)}, "
                f"gradients {_size(self.gradient_bytes)}, AdamW moments {_size(self.optimizer_bytes)}")


def param_report(model: nn.Module) -> ParamReport:
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_frozen = sum(p.numel() for p in frozen)
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    return ParamReport(total=n_train + n_frozen, trainable=n_train, frozen=n_frozen,
                       weights_bytes=sum(p.numel() * p.element_size() for p in frozen),
                       adapter_bytes=adapter_bytes, gradient_bytes=adapter_bytes,
                       optimizer_bytes=2 * 4 * n_train)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# adapter folders (peft's format)
# ---------------------------------------------------------------------------------------------

def adapter_tensors(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (``get_peft_model_state_dict``)."""
    from peft import get_peft_model_state_dict
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_adapter(peft_model, folder: Union[str, Path]) -> None:
    """adapter_config.json + adapter_model.safetensors, as ``PeftModel.save_pretrained`` writes
    them (without its model card), each file atomically."""
    from moelab.fileio import save_tensors, write_json
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / ADAPTER_WEIGHTS_FILE, adapter_tensors(peft_model), {"format": "pt"})
    config = peft_model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    write_json(folder / ADAPTER_CONFIG_FILE, config)


def read_adapter_config(folder: Union[str, Path]) -> dict:
    from moelab.runfolder import CheckpointError
    path = Path(folder) / ADAPTER_CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{str(folder)!r} is not an adapter folder (no {ADAPTER_CONFIG_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} is not a LoRA adapter config (peft_type {data.get('peft_type')!r})")
    return data


def load_adapter_tensors(peft_model, folder: Union[str, Path]) -> None:
    """Put the adapter tensors of ``folder`` into ``peft_model``; every tensor must fit exactly."""
    from peft import set_peft_model_state_dict

    from moelab.model.weights import StateMismatch, check_shapes
    from moelab.runfolder import CheckpointError, load_tensors
    tensors = load_tensors(Path(folder) / ADAPTER_WEIGHTS_FILE)
    expected = adapter_tensors(peft_model)
    try:
        check_shapes({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in tensors.items()},
                     str(Path(folder) / ADAPTER_WEIGHTS_FILE), "the adapter of this base model")
    except StateMismatch as e:
        raise CheckpointError(str(e)) from None
    set_peft_model_state_dict(peft_model, tensors)


def base_of(folder: Union[str, Path], base: Optional[Union[str, Path]] = None) -> str:
    """The base model of an adapter folder: ``base`` when given, else the path its
    adapter_config.json records."""
    from moelab.runfolder import CheckpointError
    recorded = read_adapter_config(folder).get("base_model_name_or_path")
    chosen = base if base is not None else recorded
    if not chosen:
        raise CheckpointError(f"{str(folder)!r} records no base model; pass --base BASE")
    if base is None and not Path(chosen).exists():
        raise CheckpointError(f"{str(folder)!r} records base model {chosen!r}, which does not exist "
                              f"here; pass --base BASE")
    return str(chosen)


def load_adapter_model(folder: Union[str, Path], base: Optional[Union[str, Path]] = None,
                       device: Union[str, torch.device] = "cpu", dtype=None, quantize: Optional[str] = None,
                       note: Optional[Callable[[str], None]] = None) -> "Transformer":
    """The model of an adapter folder: its base loaded in float32, the adapter applied with peft's
    own ``PeftModel.from_pretrained`` and merged, then cast to ``dtype`` / quantised as
    ``moelab.load`` would; ``model.tokenizer`` from the folder (else the base's)."""
    from peft import PeftModel

    from moelab.model.weights import build_on_meta, fill
    from moelab.quantize import prepare, resolve_dtype, resolve_quantize
    from moelab.runfolder import load, load_tokenizer

    require_peft()
    base_path = base_of(folder, base)
    model = load(base_path, dtype=torch.float32, note=note)
    peft_model = PeftModel.from_pretrained(model, str(folder))
    load_adapter_tensors(peft_model, folder)          # strict: names what does not fit the base
    merged = peft_model.merge_and_unload()
    target, quantize = resolve_dtype(dtype), resolve_quantize(quantize)
    if quantize == "int8" and target in (None, torch.float32):
        target = torch.bfloat16
    state = merged.state_dict()
    model = fill(build_on_meta(merged.config), {k: v.shape for k, v in state.items()}, state.__getitem__,
                 str(folder), dtype=target, device=device)
    if quantize is not None:
        prepare(model, target, quantize)
    model.tokenizer = load_tokenizer(folder) or load_tokenizer(base_path)
    if note is not None:
        note(f"{folder}: LoRA adapter on {base_path}, merged in memory")
    return model


def merge_folder(folder: Union[str, Path], out: Union[str, Path], base: Optional[Union[str, Path]] = None) -> Path:
    """Write the adapter folder's merged model as a normal run folder ``out`` (config.json of the
    fine-tune, model.safetensors, tokenizer.json, run_meta.json naming base and adapter)."""
    from moelab.fileio import write_json
    from moelab.runfolder import RUN_META_FILE, read_config, save
    model = load_adapter_model(folder, base)
    cfg = read_config(folder)
    tokenizer = model.tokenizer.to_str() if model.tokenizer is not None else None
    save(out, model, cfg, tokenizer)
    write_json(Path(out) / RUN_META_FILE, {"command": "merge", "parent": str(Path(folder).resolve()),
                                            "base": base_of(folder, base), "merged_adapter": True})
    return Path(out)


__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "DEFAULT_TARGETS", "LoraSpec", "MERGED_DIR",
           "ParamReport", "TARGET_KINDS", "Targets", "adapter_tensors", "apply_lora", "base_of",
           "is_adapter_folder", "load_adapter_model", "load_adapter_tensors", "lora_config", "merge_folder",
           "param_report", "parse_targets", "read_adapter_config", "require_peft", "resolve_targets",
           "prepare_wrapped", "save_adapter"]
