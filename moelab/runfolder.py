"""The run folder: the unit every moelab command passes around, and the one way to load a model.

    RUN/config.json          the full Config (model, train, data, parallel)
    RUN/model.safetensors    the latest weights (what ``load`` reads)
    RUN/tokenizer.json       the tokenizer, when the run has one
    RUN/metrics.jsonl        one JSON object per logged step (training and evaluation)
    RUN/summary.json         written when a training run finishes
    RUN/run_meta.json        how the run was started (command, corpus, machine, layout)
    RUN/ckpt-XXXXXXXX/       training checkpoints (``moelab.train.checkpoint``)
    RUN/.lock                held by the one process writing the folder (``moelab.lock``)

Every file is written atomically (``moelab.fileio``), so a crash during a save leaves the previous
file intact; tensors are safetensors and everything else JSON, so nothing here unpickles.

``load`` also takes a Hugging Face model folder (converted in memory, nothing written) or a Hub
id (``Qwen/Qwen3-30B-A3B``, fetched with ``huggingface_hub`` into its cache; ``HF_HUB_OFFLINE=1``
reads the cache only).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from moelab.config import Config, ConfigError, from_dict
from moelab.fileio import JSONFileError, read_json_object, save_tensors, write_json, write_text_atomic
from moelab.lock import LOCK_FILE  # noqa: F401  (listed here so every run file name has one home)

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

    from moelab.model.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RUN_META_FILE = "run_meta.json"
CKPT_PATTERN = re.compile(r"^ckpt-(\d{8})$")
# a Hub model id: owner/name (what huggingface_hub accepts as repo_id for models)
# What makes a folder someone's model or run: `train --out` and `finetune --out` refuse a folder
# holding any of these (train: unless --overwrite). The lock file alone is not a run: a refused or
# killed writer leaves it.
RUN_NAMES = {CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, METRICS_FILE, SUMMARY_FILE, RUN_META_FILE,
             "model.safetensors.index.json", "tokenizer_config.json", "generation_config.json",
             "adapter_config.json", "tb", "inspect"}
RUN_PATTERN = re.compile(r"^(damaged-)?ckpt-\d{8}(\.\d+)?$|^\..*\.tmp$|\.(safetensors|bin|pt|pth|gguf)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

PathLike = Union[str, Path]


class NotAFolder(ValueError):
    """A path that should be a folder is something else."""


def run_files(folder: PathLike) -> list[str]:
    """The names in ``folder`` that belong to a model or a run (sorted); [] for a missing or new
    folder. Raises NotAFolder when the path exists and is not a folder."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return []
    if not folder.is_dir():
        raise NotAFolder(str(folder))
    return sorted(p.name for p in folder.iterdir() if p.name in RUN_NAMES or RUN_PATTERN.search(p.name))


class CheckpointError(RuntimeError):
    """A run folder or checkpoint is missing, damaged or does not match the model."""


def run_file(folder: PathLike, name: str) -> Path:
    """``folder / name``, refused when it resolves outside ``folder`` (a symbolic link to a file
    elsewhere): what moelab reads from a run folder stays in it, as for Hugging Face folders
    (``moelab.interop.containment``, which also allows a Hub cache snapshot's links)."""
    from moelab.interop.containment import inside
    from moelab.interop.errors import InteropError
    try:
        inside(Path(folder), name, f"{folder}: {name}")
    except InteropError as e:
        raise CheckpointError(str(e)) from None
    return Path(folder) / name


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def load_tensors(path: PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped (pages are read as they are used)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged or not a safetensors file: {e}") from None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Persistent parameters and buffers; tied weights appear once (the LM head is absent)."""
    return dict(model.state_dict())


def save(run_dir: PathLike, model: torch.nn.Module, config: Config, tokenizer_json: str | None = None,
         metadata: dict[str, str] | None = None) -> Path:
    """Write config.json, model.safetensors and (optionally) tokenizer.json into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_FILE, config.to_dict())
    save_tensors(run_dir / WEIGHTS_FILE, model_state(model), {"format": "pt", "moelab": "1", **(metadata or {})})
    if tokenizer_json is not None:
        write_text_atomic(run_dir / TOKENIZER_FILE, tokenizer_json)
    return run_dir


# ---------------------------------------------------------------------------------------------
# what a folder is
# ---------------------------------------------------------------------------------------------

def resolve(source: PathLike) -> Path:
    """A local folder for a run folder, an HF folder or a Hub id. A Hub id is fetched (config,
    safetensors weights and tokenizer files only) with ``huggingface_hub.snapshot_download``,
    which honours ``HF_HUB_OFFLINE`` and the HF cache."""
    path = Path(source)
    if path.exists() or not HUB_ID.match(str(source)):
        if not path.is_dir():
            raise CheckpointError(f"run folder {str(source)!r} does not exist")
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{str(source)!r} is neither a folder nor a Hub id moelab can fetch: "
                              "Hub ids need huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id=str(source),
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{str(source)!r} is not a folder, and as a Hub id it is not in the "
                              "Hugging Face cache (HF_HUB_OFFLINE is set or the Hub is unreachable)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(source)!r} is not a folder, and the Hub cannot provide it: {e}") from None


def _config_json(folder: Path) -> dict:
    path = run_file(folder, CONFIG_FILE)
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} is not a moelab run folder or a Hugging Face model "
                              f"folder (no {CONFIG_FILE})")
    try:
        return read_json_object(path)
    except JSONFileError as e:
        raise CheckpointError(f"damaged: {e}") from None


def is_hf_folder(folder: PathLike) -> bool:
    """A Hugging Face model folder: its config.json has a ``model_type`` and no moelab sections."""
    try:
        data = _config_json(Path(folder))
    except CheckpointError:
        return False
    return "model_type" in data and "model" not in data


def read_config(source: PathLike) -> Config:
    """The Config of a run folder, or the translation of an HF folder's (or Hub id's) config."""
    folder = resolve(source)
    data = _config_json(folder)
    if "model_type" in data and "model" not in data:
        return _hf_import(folder)[0]
    try:
        return from_dict(Config, data).validate()
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {e}") from None


def _hf_import(folder: Path, with_state: bool = False):
    """(Config, state or None, notes) of an HF folder, converted in memory."""
    from moelab.interop import InteropError
    from moelab.interop.hf import hf_folder_config, hf_folder_state
    try:
        if with_state:
            return hf_folder_state(folder)
        imported = hf_folder_config(folder)
        return imported.config, None, imported.notes
    except InteropError as e:
        raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------

def load(source: PathLike, device: str | torch.device = "cpu", dtype: Union[None, str, torch.dtype] = None,
         quantize: Optional[str] = None, note: Optional[Callable[[str], None]] = None) -> "Transformer":
    """The model of a run folder (or one of its ``ckpt-XXXXXXXX`` folders), an HF folder or a Hub
    id, in eval mode, with its tokenizer as ``model.tokenizer`` (None when there is none).

    Built on the meta device, then each stored tensor becomes a parameter once, already in its
    final dtype: loading a bf16 folder as bf16 never holds a float32 copy. ``dtype``: "float32"
    or "bfloat16" (or a torch dtype); None keeps the stored dtype (routers and buffers stay
    float32 in every dtype). ``quantize``: "int8" weight-only (``moelab.quantize``; computes in
    bf16 unless ``dtype`` says otherwise). ``note`` receives one line when an HF folder is
    converted on the fly."""
    import moelab.generate  # noqa: F401  (models get their generate / stream methods there)
    from moelab.model.weights import StateMismatch, build_on_meta, fill
    from moelab.quantize import prepare, resolve_dtype, resolve_quantize

    target, quantize = resolve_dtype(dtype), resolve_quantize(quantize)
    folder = resolve(source)
    if is_hf_folder(folder):
        cfg, state, notes = _hf_import(folder, with_state=True)
        if note is not None:
            note(f"{folder}: a Hugging Face model folder, converted in memory (nothing written)"
                 + (f"; {'; '.join(notes)}" if notes else ""))
        shapes, get, where = {k: v.shape for k, v in state.items()}, state.__getitem__, str(folder)
    else:
        run = checkpoint_run(folder) or folder       # a checkpoint folder loads with its run's config
        cfg = read_config(run)
        state = load_tensors(run_file(folder, WEIGHTS_FILE))
        shapes, get, where = {k: v.shape for k, v in state.items()}, state.pop, str(folder / WEIGHTS_FILE)
    stored = state["embed.weight"].dtype if "embed.weight" in state else torch.float32
    if target is None:
        target = stored if stored in (torch.float32, torch.bfloat16) else torch.float32
        if quantize == "int8" and target == torch.float32:
            target = torch.bfloat16                  # the int8 kernel takes bf16 activations
    try:
        model = fill(build_on_meta(cfg.model), shapes, get, where, dtype=target, device=device)
    except StateMismatch as e:
        raise CheckpointError(str(e)) from None
    del state
    if quantize is not None:
        prepare(model, target, quantize)
    model.tokenizer = load_tokenizer(checkpoint_run(folder) or folder)
    return model


def checkpoint_run(folder: PathLike) -> Optional[Path]:
    """The run folder a ``ckpt-XXXXXXXX`` folder belongs to (it holds weights, its parent the
    config), or None when ``folder`` is not such a checkpoint."""
    folder = Path(folder)
    if (CKPT_PATTERN.match(folder.name) and not (folder / CONFIG_FILE).is_file()
            and (folder.parent / CONFIG_FILE).is_file()):
        return folder.parent
    return None


def load_tokenizer(source: PathLike) -> Optional["Tokenizer"]:
    """The tokenizer of a run folder, HF folder or Hub id, or None when it has none."""
    from tokenizers import Tokenizer
    path = run_file(resolve(source), TOKENIZER_FILE)
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"{path} is damaged or not a tokenizer: {e}") from None


# ---------------------------------------------------------------------------------------------
# what a training run left
# ---------------------------------------------------------------------------------------------

def checkpoint_dirs(run_dir: PathLike) -> list[Path]:
    """Checkpoint folders (renamed into place, so complete when written), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def _complete_lines(text: str) -> tuple[list[tuple[str, dict]], int]:
    """The complete (line, record) pairs of a metrics file and the length of the text they span.
    A last line torn by a full disk or a kill (no newline, or not valid JSON) is not a record."""
    lines, end = [], 0
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        if line.strip():
            try:
                lines.append((line, json.loads(line)))
            except json.JSONDecodeError:
                break
        end += len(line)
    return lines, end


def load_metrics(run_dir: PathLike) -> list[dict]:
    """The records of metrics.jsonl, oldest first; a torn last line is left out."""
    path = run_file(run_dir, METRICS_FILE)
    if not path.is_file():
        return []
    return [record for _, record in _complete_lines(path.read_text(encoding="utf-8", errors="replace"))[0]]


def repair_metrics(run_dir: PathLike, after_step: Optional[int] = None) -> Optional[str]:
    """Make metrics.jsonl read as one uninterrupted run before a resume: cut a torn last line and,
    with ``after_step``, the records of steps after the checkpoint resumed from (a killed run may
    have logged steps it will now redo). Returns a message when a torn line was cut."""
    path = run_file(run_dir, METRICS_FILE)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    lines, end = _complete_lines(text)
    keep = [line for line, record in lines if after_step is None or record.get("step", 0) <= after_step]
    torn = end < len(text)
    if torn or len(keep) != len(lines):
        write_text_atomic(path, "".join(keep))
    if torn:
        return (f"{path.name} ended in an incomplete record ({len(text) - end} bytes, a write cut "
                f"short); truncated to its last complete record")
    return None


def read_summary(run_dir: PathLike) -> Optional[dict]:
    """summary.json of a finished training run, or None when the run has not finished."""
    path = run_file(run_dir, SUMMARY_FILE)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None
