"""Read back what wandb wrote in offline mode: the records of a ``run-<id>.wandb`` file.

wandb >= 0.19 writes this file from its Go core and ships no Python reader, so the test reads the
format itself: a 7-byte header (``:W&B``, magic 0xBEE1, version), then LevelDB log records in
32 KiB blocks (crc32c, length, type: full / first / middle / last), each payload one protobuf
``wandb.proto.wandb_internal_pb2.Record``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a wandb data file"
    pos, chunks = HEADER, []
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:                       # block trailer: padding
            pos += room
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if length == 0 and kind == 0:      # zero padding at the end of a block
            pos += room
            continue
        chunks.append(data[pos + 7: pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):                 # full, or last of a fragmented record
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def history(path: Path) -> list[dict]:
    """Every ``run.log`` call: {"_step": step, key: value, ...}."""
    out = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            out.append(row)
    return out


def run_info(path: Path) -> dict:
    """Name, project, group and config of the run."""
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in r.run.config.update}
            return {"id": r.run.run_id, "name": r.run.display_name, "project": r.run.project,
                    "group": r.run.run_group, "config": config}
    raise AssertionError("no run record")


def summary(path: Path) -> dict:
    out = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
