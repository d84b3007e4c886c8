"""`moelab convert`: Hugging Face model folders <-> moelab run folders.

    moelab convert --from-hf HF_DIR --out RUN
    moelab convert --to-hf RUN --out HF_DIR [--family mixtral]
    moelab convert --to-gguf RUN_OR_HF_DIR --out model.gguf [--type bf16]   # llama.cpp (gguf extra)

The export reads and writes a tensor at a time (a run trained on several processes straight from
its newest sharded checkpoint), so it needs about one tensor of memory (``moelab.interop.sharded``).

Nothing is written unless the whole conversion succeeds; bad input exits with status 2.
"""

from __future__ import annotations

import json
import os
import sys

FAMILY_NAMES = ("llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="import or export Hugging Face checkpoints",
                       description="Convert a Hugging Face model folder (config.json + safetensors) into a "
                                   "moelab run folder, or a run folder into a Hugging Face folder.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face model folder to import")
    src.add_argument("--to-hf", metavar="RUN", help="moelab run folder to export")
    src.add_argument("--to-gguf", metavar="RUN_OR_HF_DIR",
                     help="run folder or Hugging Face folder to write as one GGUF file for llama.cpp "
                          "(needs the gguf extra; docs/inference.md)")
    p.add_argument("--out", required=True, help="destination folder (must not exist or be empty); "
                                                "with --to-gguf the .gguf file")
    p.add_argument("--type", default=None, metavar="TYPE",
                   help="with --to-gguf: f32, f16, bf16 (default), q8_0, or through llama.cpp's quantiser "
                        "q4_0, q4_k_m, q5_k_m, q6_k")
    p.add_argument("--family", choices=FAMILY_NAMES,
                   help="Hugging Face family to export to (with --to-hf; default: the one the run was "
                        "imported from, else the one its config maps to, e.g. llama for a dense model)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="with --to-hf: split weights into safetensors shards of at most SIZE "
                        "(e.g. 5GB, 500MB, bytes), with an index as transformers writes (default 5GB)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from moelab.commands import raise_user, refuse_unwritable
    from moelab.interop import InteropError, export_hf, import_hf
    from moelab.interop.folders import default_family, parse_size
    try:
        if args.type is not None and not args.to_gguf:
            raise_user("--type is for --to-gguf")
        if args.to_gguf:
            return _to_gguf(args)
        refuse_unwritable(args.out)
        if args.from_hf:
            if args.family:
                raise_user("--family is for --to-hf; an import reads the family from config.json")
            notes = import_hf(args.from_hf, args.out)
            summary = {"imported": args.from_hf, "run": args.out}
        else:
            family = args.family or default_family(args.to_hf)
            notes = export_hf(args.to_hf, args.out, family, parse_size(args.max_shard_size))
            if not args.family:
                notes.insert(0, f"family {family}: the family this run maps to (choose another with --family)")
            summary = {"exported": args.to_hf, "folder": args.out, "family": family}
    except InteropError as e:
        raise_user(str(e))
    except OSError as e:            # an unwritable or full --out folder
        raise_user(f"--out {args.out!r}: {e.filename or 'a file'}: {e.strerror or e}")
    summary["notes"] = notes
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


def _to_gguf(args) -> int:
    from moelab.commands import raise_user, refuse_unwritable
    from moelab.interop import InteropError
    from moelab.interop.gguf import check_type, convert_to_gguf
    if args.family:
        raise_user("--family is for --to-hf; --to-gguf picks the llama.cpp architecture from the model")
    if os.path.lexists(args.out):
        raise_user(f"--out {args.out!r} already exists; choose a new file name")
    refuse_unwritable(os.path.dirname(os.path.abspath(args.out)))
    try:
        gguf_type = check_type(args.type or "bf16")
        _check_memory(args.to_gguf)
        done = convert_to_gguf(args.to_gguf, args.out, gguf_type)
    except InteropError as e:
        raise_user(str(e))
    summary = {"exported": args.to_gguf, "gguf": str(done.path), "architecture": done.arch, "type": done.type,
               "tensors": done.tensors, "bytes": done.bytes, "notes": done.notes}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for note in done.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {done.path} (llama.cpp architecture {done.arch}, {done.type}, {done.bytes / 1e6:.1f} MB)")
    return 0


def _check_memory(source: str) -> None:
    """The GGUF export holds the whole model in memory (at least 2 bytes a weight, its stored
    dtype): refused before loading when this machine's RAM cannot hold it."""
    from moelab.accounting import param_counts
    from moelab.commands import raise_user
    from moelab.resources import available_ram, refuse_unless_fits
    from moelab.runfolder import CheckpointError, read_config
    try:
        cfg = read_config(source)
    except CheckpointError as e:
        raise_user(f"--to-gguf: {e}")
    refuse_unless_fits(param_counts(cfg.model)["total"] * 2, available_ram(), "exporting this model to GGUF",
                       "this machine", "export on a machine with more memory")
