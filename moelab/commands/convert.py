"""`moelab convert`: Hugging Face model folders <-> moelab run folders.

    moelab convert --from-hf HF_DIR --out RUN
    moelab convert --to-hf RUN --out HF_DIR --family mixtral

Nothing is written unless the whole conversion succeeds; bad input exits with status 2.
"""

from __future__ import annotations

import json
import sys

FAMILY_NAMES = ("llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="import or export Hugging Face checkpoints",
                       description="Convert a Hugging Face model folder (config.json + safetensors) into a "
                                   "moelab run folder, or a run folder into a Hugging Face folder.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face model folder to import")
    src.add_argument("--to-hf", metavar="RUN", help="moelab run folder to export")
    p.add_argument("--out", required=True, help="destination folder (must not exist or be empty)")
    p.add_argument("--family", choices=FAMILY_NAMES, help="Hugging Face family to export to (with --to-hf)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="with --to-hf: split weights into safetensors shards of at most SIZE "
                        "(e.g. 5GB, 500MB, bytes), with an index as transformers writes (default 5GB)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from moelab.commands import raise_user, refuse_unwritable
    from moelab.interop import InteropError, export_hf, import_hf
    from moelab.interop.folders import parse_size
    refuse_unwritable(args.out)
    try:
        if args.from_hf:
            if args.family:
                raise_user("--family is for --to-hf; an import reads the family from config.json")
            notes = import_hf(args.from_hf, args.out)
            summary = {"imported": args.from_hf, "run": args.out}
        else:
            if not args.family:
                raise_user(f"--to-hf needs --family ({', '.join(FAMILY_NAMES)})")
            notes = export_hf(args.to_hf, args.out, args.family, parse_size(args.max_shard_size))
            summary = {"exported": args.to_hf, "folder": args.out, "family": args.family}
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
