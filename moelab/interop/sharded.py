"""Models larger than one process, at the Hugging Face boundary: reading each rank's rows of an
HF folder through the family key map, and writing an HF folder tensor by tensor.

``open_rows(source)``: what ``moelab train --init-from SOURCE`` reads (``moelab.parallel.load``
asks it for the rows of dim 0 a rank keeps): a run folder's or checkpoint's
``model.safetensors``, or an HF folder / Hub id, whose tensors are renamed and re-laid-out by the
family's key map (per-expert checkpoint layout or fused module layout) while they are read, with
safetensors' lazy slicing: an expert-parallel rank reads only its experts' tensors, an FSDP shard
only its rows. Nothing is loaded whole unless a transform needs the whole tensor (DeepSeek-V3's
RoPE row permutation): then one tensor, never the model.

``RunWeights``, ``planned_hf_tensors`` and ``write_hf_shards``: how ``moelab.interop.export_hf``
writes an HF folder: each of our tensors is read alone (assembled from the newest sharded
checkpoint's chunks when several processes wrote it, else read from the run's model.safetensors),
converted by ``ours_to_hf``, and its bytes appended to the output file, whose header was planned
from the shapes beforehand. Peak memory: about one tensor, whatever the model's size.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Optional

import torch

from moelab.interop.errors import InteropError
from moelab.interop.hf import Checkpoint, PathLike, _mtp_keys, expected_state, hf_folder_config
from moelab.interop.keymap import Concat, Ctx, Experts, KeyMap, Same, hf_to_ours, ours_to_hf
from moelab.runfolder import WEIGHTS_FILE, CheckpointError, checkpoint_dirs, is_hf_folder, resolve

# ---------------------------------------------------------------------------------------------
# reading rows
# ---------------------------------------------------------------------------------------------


class HFRows:
    """The tensors of an HF folder under our names, readable by rows of dim 0 (``RowSource``)."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        imported = hf_folder_config(self.folder)
        self.cfg, self.keymap = imported.config.model, imported.family.KEYMAP
        self.interleave, self.notes = imported.rope_interleave, list(imported.notes)
        from moelab.parallel.tensorfile import TensorFile
        ckpt = Checkpoint(self.folder)              # validates the index and the shards' headers
        self.files = {name: TensorFile(self.folder / name) for name in ckpt.handles}
        self.where = dict(ckpt.where)
        del ckpt                                    # its memory maps: reads here are plain reads
        available = set(self.where)
        mtp = _mtp_keys(available, self.cfg.n_layers)
        if mtp and getattr(imported.family, "EXTRA_LAYERS_ARE_MTP", False):
            available = available - mtp
        fused = {self.keymap.layer_prefix.format(i=i) + r.module for i in range(self.cfg.n_layers)
                 for r in self.keymap.layer if r.module and isinstance(r.transform, Experts)}
        self.layout = "module" if available & fused else "checkpoint"
        # every check of the in-memory import (missing, unexpected, mis-shaped), on meta tensors
        state = hf_to_ours(self.keymap, self.cfg, expected_state(self.cfg), available, self._meta,
                           layout=self.layout, rope_interleave=self.interleave)
        self._shapes = {k: v.shape for k, v in state.items()}

    def _file(self, key: str):
        return self.files[self.where[key]]

    def _meta(self, key: str) -> torch.Tensor:
        f = self._file(key)
        return torch.empty(f.shape(key), dtype=f.dtype(key), device="meta")

    def _get(self, key: str) -> torch.Tensor:
        return self._file(key).get(key)

    def shapes(self) -> dict[str, torch.Size]:
        return dict(self._shapes)

    def describe(self) -> str:
        return str(self.folder)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        rule, layer = self.keymap.rule(name)
        ctx = Ctx(self.cfg, layer, self.interleave)
        keys = self.keymap.hf_keys(rule, ctx, self.layout)
        kind = type(rule.transform)
        if (self.layout == "module" and rule.module is not None) or (kind is Same and len(keys) == 1):
            return self._file(keys[0]).rows(keys[0], start, stop)
        if kind is Concat:
            return self._concat_rows(keys, start, stop)
        if kind is Experts:
            n = rule.transform.parts
            if stop <= start:
                return torch.empty((0, *self._shapes[name][1:]), dtype=self._meta(keys[0]).dtype)
            return torch.stack([torch.cat([self._get(k) for k in keys[e * n:(e + 1) * n]])
                                for e in range(start, stop)])
        # a transform that needs the whole tensor (RoPE row permutation, zero buffers): one tensor
        return rule.transform.to_ours([self._get(k) for k in keys], ctx)[start:stop]

    def _concat_rows(self, keys: list[str], start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the row-wise concatenation of ``keys``, reading only the rows
        that fall inside."""
        out, offset = [], 0
        for key in keys:
            n = self._file(key).shape(key)[0]
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                out.append(self._file(key).rows(key, lo, hi))
            offset += n
        return torch.cat(out) if out else self._file(keys[0]).rows(keys[0], 0, 0)


def open_rows(source: PathLike):
    """The ``RowSource`` of a run folder, checkpoint folder, HF folder or Hub id; CheckpointError
    for anything else, naming it."""
    from moelab.parallel.load import SafetensorsRows
    folder = resolve(source)
    if is_hf_folder(folder):
        try:
            return HFRows(folder)
        except InteropError as e:
            raise CheckpointError(str(e)) from None
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{str(source)!r} has no {WEIGHTS_FILE} (not a run, checkpoint or Hugging "
                              "Face folder)")
    try:
        return SafetensorsRows(weights)
    except Exception as e:  # SafetensorError: truncated or not safetensors
        raise CheckpointError(f"{weights} is damaged or not a safetensors file: {e}") from None


# ---------------------------------------------------------------------------------------------
# writing safetensors a tensor at a time
# ---------------------------------------------------------------------------------------------

_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}


class StreamedSafetensors:
    """A safetensors file whose header is written first, from the names, dtypes and shapes of
    every tensor, and whose tensors are then appended one by one in that order (the format: an
    8-byte little-endian header length, the JSON header padded to 8 bytes, the raw bytes)."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Optional[dict[str, str]] = None):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self.order = []
        for name, dtype, shape in plan:
            size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.order.append((name, dtype, tuple(shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        expected = self.order[self.next]
        if (name, t.dtype, tuple(t.shape)) != expected:
            raise RuntimeError(f"streamed safetensors: got {name} {t.dtype} {tuple(t.shape)}, planned {expected}")
        self.next += 1
        t = t.detach().contiguous().cpu()
        if t.numel():
            self.file.write(memoryview(t.view(torch.uint8).numpy() if t.dtype != torch.bool else t.numpy()))

    def close(self) -> None:
        import os
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.next != len(self.order):
            raise RuntimeError(f"streamed safetensors: {len(self.order) - self.next} planned tensors not written")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------------------------------------
# the streamed export
# ---------------------------------------------------------------------------------------------

def newest_sharded(run_dir: PathLike) -> Optional[Path]:
    """The model shards of a run's newest checkpoint when several processes wrote it, else None
    (``moelab convert --to-hf`` then streams from them)."""
    from moelab.parallel.checkpoint import MODEL_DIR, SHARDED
    ckpts = checkpoint_dirs(run_dir) if Path(run_dir).is_dir() else []
    if ckpts and (ckpts[-1] / MODEL_DIR / SHARDED).is_dir():
        return ckpts[-1] / MODEL_DIR / SHARDED
    return None


class RunWeights:
    """Our tensors of a run, one at a time: from its newest sharded checkpoint (``sharded``) or
    from a safetensors file of full tensors."""

    def __init__(self, run_dir: Path, source: str):
        from moelab.parallel.checkpoint import ShardedTensors
        sharded = newest_sharded(run_dir)
        if source == "sharded" or (source == "auto" and sharded):
            if not sharded:
                raise InteropError(f"{run_dir}: its newest checkpoint is not sharded (one process wrote it)")
            self.reader = ShardedTensors(sharded)
            self.where = str(sharded)
            self._shapes, self._dtype, self._get = self.reader.shapes(), self.reader.dtype, self.reader.get
        else:
            from moelab.parallel.tensorfile import TensorFile
            path = run_dir / WEIGHTS_FILE
            if not path.is_file():
                raise InteropError(f"{path} is missing")
            f = TensorFile(path)
            self._shapes = {k: f.shape(k) for k in f.keys()}
            self._dtype, self._get, self.where = f.dtype, f.get, str(path)

    def shapes(self) -> dict[str, torch.Size]:
        return self._shapes

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype(key)

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)


def _hf_parts(keymap: KeyMap, cfg, key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The HF tensors our tensor ``key`` becomes (``ours_to_hf`` on that one tensor; a tensor the
    family does not store gives none)."""
    rule, layer = keymap.rule(key)
    if not keymap.hf_keys(rule, Ctx(cfg, layer, True), "checkpoint") and t.is_meta:
        return {}
    return ours_to_hf(keymap, cfg, {key: t}, rope_interleave=True)


def planned_hf_tensors(fam, cfg, weights: "RunWeights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every HF tensor the export writes, as a meta tensor of its dtype and shape (nothing read),
    and the name of ours each is made from. Tensors the family does not store are run through
    its checks (a router bias that must stay zero is refused now, before anything is written)."""
    planned: dict[str, torch.Tensor] = {}
    made_from: dict[str, str] = {}
    shapes = weights.shapes()
    for key, shape in shapes.items():
        for name, part in _hf_parts(fam.KEYMAP, cfg, key,
                                    torch.empty(shape, dtype=weights.dtype(key), device="meta")).items():
            planned[name], made_from[name] = part, key
    for key in sorted(set(shapes) - set(made_from.values())):
        _hf_parts(fam.KEYMAP, cfg, key, weights.get(key))       # its checks (a zero bias stays zero)
    return planned, made_from


def write_hf_shards(folder: Path, files: list[str], shards: list[list[str]], planned: dict[str, torch.Tensor],
                    made_from: dict[str, str], fam, cfg, weights: "RunWeights",
                    progress: Optional[Callable[[str], None]] = None) -> None:
    """Write ``shards`` (HF tensor names per file) into ``files`` in ``folder``: each of our
    tensors is read once, converted by ``ours_to_hf``, and its parts appended to the file their
    header planned. Peak memory: about one tensor."""
    pending: dict[str, torch.Tensor] = {}          # the HF parts of the tensor being written
    for file_name, names in zip(files, shards):
        out = StreamedSafetensors(folder / file_name, [(n, planned[n].dtype, tuple(planned[n].shape)) for n in names],
                                  {"format": "pt"})
        for name in names:
            if name not in pending:                # convert the whole of our tensor once
                key = made_from[name]
                pending = dict(_hf_parts(fam.KEYMAP, cfg, key, weights.get(key)))
                if progress is not None:
                    progress(key)
            out.write(name, pending.pop(name))
        out.close()
