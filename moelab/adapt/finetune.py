"""`moelab finetune`: LoRA fine-tuning of a run folder or Hugging Face folder on new text, run by
the ordinary trainer (``moelab.train.trainer.train``) so that resume, SIGTERM, the run-folder lock,
metrics and validation behave as for training.

The new folder is a training run whose checkpoints hold the adapter instead of the weights:

    NEW/config.json, tokenizer.json, metrics.jsonl, run_meta.json (parent = the base), summary.json
    NEW/adapter_config.json, adapter_model.safetensors   peft's format, the newest checkpoint's
    NEW/ckpt-XXXXXXXX/  adapter + optimizer.safetensors + trainer_state.json (RNG, loop position)
    NEW/merged/         with --merge: base + adapter merged, a normal run folder

The base weights are read from the base folder at every start and resume and never copied.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Union

from moelab.adapt.lora import (
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MERGED_DIR, LoraSpec, apply_lora, base_of,
    load_adapter_tensors, merge_folder, param_report, prepare_wrapped, read_adapter_config, require_peft,
    save_adapter,
)
from moelab.config import Config, ConfigError

FINETUNE_KEYS = ("train.", "data.")


class LoraRun:
    """The trainer's ``adapter``: wraps the built model with LoRA and is what its checkpoints hold
    (``moelab.train.checkpoint.FullWeights`` is the protocol: files, write, verify, restore)."""

    files = (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE)

    def __init__(self, base: str, spec: Optional[LoraSpec] = None, saved: Optional[Path] = None):
        if (spec is None) == (saved is None):
            raise ValueError("LoraRun takes a spec (a new run) or a saved adapter folder (a resume)")
        self.base, self.spec, self.saved = base, spec, saved

    def wrap(self, model, log: Callable[[str], None]):
        if self.spec is not None:
            peft_model = apply_lora(model, self.spec, self.base)
            cfg = peft_model.peft_config["default"]
        else:
            from peft import LoraConfig, get_peft_model
            cfg = LoraConfig.from_pretrained(str(self.saved))
            cfg.inference_mode = False
            peft_model = prepare_wrapped(get_peft_model(model, cfg))
            peft_model.peft_config["default"].base_model_name_or_path = self.base
        names = sorted(set(cfg.target_modules or ()) | set(cfg.target_parameters or ()))
        log(f"LoRA r={cfg.r}, alpha={cfg.lora_alpha:g} on {len(names)} tensors of {self.base}: "
            + param_report(peft_model).line())
        return peft_model

    def write(self, folder: Path, model) -> None:
        save_adapter(model, folder)

    def verify(self, folder: Path) -> None:
        from moelab.runfolder import load_tensors
        read_adapter_config(folder)
        load_tensors(folder / ADAPTER_WEIGHTS_FILE)

    def restore(self, folder: Path, model) -> None:
        load_adapter_tensors(model, folder)


def finetune_config(base: Union[str, Path], corpus: str, overrides: list[str]) -> Config:
    """The base's config with ``data.corpus = corpus``, the base's tokenizer (token ids must mean
    what the embeddings learned) and ``train.*`` / ``data.*`` overrides; the model is the base's."""
    from moelab.runfolder import TOKENIZER_FILE, read_config, resolve
    for o in overrides:
        if not o.strip().startswith(FINETUNE_KEYS):
            raise ConfigError(f"--set {o.split('=')[0]}: fine-tuning keeps the base model; only "
                              f"train.* and data.* keys may be set")
    folder = resolve(base)
    cfg = read_config(folder)
    tokenizer = folder / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise ConfigError(f"{str(base)!r} has no {TOKENIZER_FILE}: fine-tuning needs the base's "
                          f"tokenizer so token ids mean what the embeddings learned")
    data = dataclasses.replace(cfg.data, corpus=corpus, tokenizer=str(tokenizer.resolve()))
    cfg = dataclasses.replace(cfg, data=data)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return cfg.validate_for_training()


def _supported(cfg: Config) -> None:
    """What LoRA runs refuse: several processes and torch.compile (neither is wired or tested
    with peft's wrappers)."""
    from moelab.parallel.layout import layout_from_env
    if layout_from_env(cfg).distributed:
        raise ConfigError("moelab finetune runs in one process: LoRA over FSDP2 / expert "
                          "parallelism is not supported; run it without torchrun / --nproc")
    if cfg.train.compile:
        raise ConfigError("train.compile = true is not supported by moelab finetune (LoRA layers "
                          "are not wired for torch.compile); set train.compile=false")


def finetune(base: Union[str, Path], spec: LoraSpec, corpus: str, out: Union[str, Path],
             overrides: Optional[list[str]] = None, merge: bool = False, command: str = "",
             show_progress: Optional[bool] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Train a LoRA adapter on ``base`` into the new run folder ``out``; returns the run summary
    (plus ``merged``: the merged folder with ``merge``)."""
    from moelab.adapt.lora import resolve_targets
    from moelab.model.weights import build_on_meta
    from moelab.runfolder import NotAFolder, checkpoint_dirs, resolve, run_files
    from moelab.train.trainer import train

    require_peft()
    if spec.rank < 1:
        raise ConfigError(f"--lora-rank = {spec.rank} is invalid: must be >= 1")
    if spec.alpha is not None and not spec.alpha > 0:
        raise ConfigError(f"--lora-alpha = {spec.alpha} is invalid: must be > 0")
    cfg = finetune_config(base, corpus, list(overrides or []))
    _supported(cfg)
    resolve_targets(build_on_meta(cfg.model), spec)          # refuse bad targets before any data work
    out = Path(out)
    try:
        found = run_files(out)
    except NotAFolder:
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder") from None
    if checkpoint_dirs(out) or (out / ADAPTER_CONFIG_FILE).exists():
        raise ConfigError(f"--out {str(out)!r} already holds a run; continue it with "
                          f"moelab finetune --resume {out}, or choose another folder")
    if found:                 # someone's model or run: never written over
        raise ConfigError(f"--out {str(out)!r} already holds a model or run ({', '.join(found[:6])}); "
                          "choose another folder")
    base_path = str(resolve(base).resolve())
    summary = train(cfg, out, init_from=base_path, command=command, show_progress=show_progress,
                    log=log, adapter=LoraRun(base_path, spec=spec))
    if merge:
        summary["merged"] = str(merge_folder(out, out / MERGED_DIR))
    return summary


def resume_finetune(out: Union[str, Path], overrides: Optional[list[str]] = None, base=None,
                    merge: bool = False, strict_resume: bool = False, command: str = "",
                    show_progress: Optional[bool] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Continue the LoRA run in ``out`` from its newest intact checkpoint (adapter, optimizer,
    RNG and position), bit for bit as if it had not stopped."""
    from moelab.train.trainer import resume_config, train

    require_peft()
    out = Path(out)
    cfg = resume_config(out, list(overrides or []))
    _supported(cfg)
    base_path = base_of(out, base)
    summary = train(cfg, out, resume=True, strict_resume=strict_resume, init_from=base_path,
                    command=command, show_progress=show_progress, log=log,
                    adapter=LoraRun(base_path, saved=out))
    if merge:
        summary["merged"] = str(merge_folder(out, out / MERGED_DIR, base))
    return summary


__all__ = ["LoraRun", "finetune", "finetune_config", "resume_finetune", "save_adapter"]
