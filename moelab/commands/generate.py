"""`moelab generate RUN`: sample text from a run folder's model, streamed as it is produced.

The weights are read straight into the compute dtype (``--dtype``; a bf16 checkpoint stays bf16)
and optionally quantised to int8 weight-only (``--quantize int8``); see docs/inference.md.
``--engine llama.cpp [--type q8_0]`` computes the logits with llama.cpp on the run's cached GGUF
export instead (``moelab.interop.llamacpp``; the sampling options mean the same)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from moelab.commands import check_device, raise_user


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a run folder's model")
    p.add_argument("run", metavar="RUN", help="run folder (config.json, model.safetensors, tokenizer.json), "
                                              "or a LoRA adapter folder from moelab finetune")
    p.add_argument("--base", default=None, metavar="BASE",
                   help="for an adapter folder: its base model, when the path it records has moved")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 text file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable); it is not printed")
    p.add_argument("--show-experts", action="store_true",
                   help="print, for each new token, the experts it went to in each MoE layer")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (slow first call, faster tokens at batch 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the checkpoint's; bfloat16 with --quantize int8)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8 weight-only weights (torchao; needs the quant extra): half the bytes of bf16")
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="torch (default): moelab's model; llama.cpp: the run exported to GGUF (cached in "
                        "RUN/gguf/) and run by llama-cpp-python, faster on CPU (needs the gguf extra)")
    p.add_argument("--type", default=None, metavar="TYPE",
                   help="with --engine llama.cpp: the GGUF weight type, f32, f16, bf16, q8_0 (int8), "
                        "q4_0, q4_k_m, q5_k_m, q6_k (default: the --dtype, else the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end, no streaming")
    p.set_defaults(func=run)


ENGINES = ("torch", "llama.cpp")
# shown with --quantize int8 (figures: benchmarks/RESULTS.md, docs/inference.md)
INT8_NOTE = ("note: torch's int8 weight-only decoding is not reliably faster than bf16 on CPU (measured "
             "0.61x to 1.57x of bf16 across hosts and library versions); llama.cpp's int8 is: "
             "--engine llama.cpp --type q8_0 (measured 3.4x torch's bf16; docs/inference.md)")


def _load(args):
    """Model and tokenizer of the run folder (or HF folder / Hub id); every failure names what is
    wrong."""
    from moelab.adapt.lora import is_adapter_folder, load_adapter_model
    from moelab.config import OptionError
    from moelab.runfolder import TOKENIZER_FILE, CheckpointError, load
    if args.base is not None and not is_adapter_folder(args.run):
        raise_user(f"--base applies to adapter folders only; {args.run!r} is not one")
    loader = load_adapter_model if is_adapter_folder(args.run) else load
    extra = {"base": args.base} if is_adapter_folder(args.run) else {}
    try:
        model = loader(args.run, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       note=lambda m: print(f"note: {m}", file=sys.stderr), **extra)
    except CheckpointError as e:
        raise_user(f"RUN: {e}")
    except OptionError as e:   # a bad --dtype, or --quantize without torchao
        raise_user(e.for_cli())
    except RuntimeError as e:   # e.g. an unavailable device
        raise_user(f"--device {args.device}: {e}")
    if model.tokenizer is None:
        raise_user(f"RUN: {args.run!r} has no {TOKENIZER_FILE}; generate needs the run's tokenizer")
    return model, model.tokenizer


def _check_memory(args) -> None:
    """Refuse, before reading any weight, a model the device cannot hold: its weights at the
    compute dtype (bf16 at least, int8 with --quantize) and the KV cache of the tokens to come."""
    from moelab.accounting import inference_bytes
    from moelab.resources import available_on, refuse_unless_fits
    from moelab.runfolder import CheckpointError, read_config
    try:
        cfg = read_config(args.run)
    except CheckpointError as e:
        raise_user(f"RUN: {e}")
    m = cfg.model
    weight_bytes = 1 if args.quantize else (4 if args.dtype == "float32" else 2)
    needed = inference_bytes(m, weight_bytes, cache_positions=min(args.max_new_tokens, m.max_seq_len)
                             if args.max_new_tokens > 0 else 0)
    refuse_unless_fits(needed, available_on(args.device), "generating with this model", args.device,
                       "use a smaller model, --quantize int8 or --dtype bfloat16")


def _prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    path = Path(args.prompt_file)
    if not path.is_file():
        raise_user(f"--prompt-file {args.prompt_file!r} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise_user(f"--prompt-file {args.prompt_file!r} is not UTF-8 text (byte {e.start}: {e.reason})")
    except OSError as e:
        raise_user(f"--prompt-file {args.prompt_file!r} cannot be read: {e.strerror}")


def _experts_line(token_text: str, experts, moe_layers: list[int]) -> str:
    if experts is None:
        return f"{token_text!r:<16} (not traced: the context is full)"
    per_layer = "  ".join(f"L{layer}:{','.join(map(str, ids))}" for layer, ids in zip(moe_layers, experts))
    return f"{token_text!r:<16} {per_layer}"


def _llamacpp_steps(args, opts, prompt: str):
    """The llama.cpp engine's steps, its tokenizer and what to close; refuses torch-only options."""
    from moelab.interop import InteropError
    from moelab.interop.gguf import check_type, require_gguf
    from moelab.interop.llamacpp import open_run, stream as llamacpp_stream
    from moelab.runfolder import TOKENIZER_FILE, CheckpointError, load_tokenizer
    for flag, used in (("--show-experts", args.show_experts), ("--compile", args.compile),
                       ("--quantize", args.quantize is not None), ("--device", args.device != "cpu")):
        if used:
            raise_user(f"{flag} is for --engine torch; with --engine llama.cpp pick the weights with --type "
                       "(q8_0 is llama.cpp's int8)")
    try:
        require_gguf(llama=True)
        gguf_type = check_type(args.type or _default_type(args))
    except InteropError as e:
        raise_user(str(e))
    try:
        tokenizer = load_tokenizer(args.run)
    except CheckpointError as e:
        raise_user(f"RUN: {e}")
    if tokenizer is None:
        raise_user(f"RUN: {args.run!r} has no {TOKENIZER_FILE}; generate needs the run's tokenizer")
    try:
        engine, _ = open_run(args.run, gguf_type, log=lambda s: print(s, file=sys.stderr))
    except InteropError as e:
        raise_user(str(e))
    return llamacpp_stream(engine, prompt, opts, tokenizer=tokenizer), tokenizer, engine


def _default_type(args) -> str:
    """bf16 or f32, after --dtype, else the checkpoint's dtype (read from the safetensors header)."""
    if args.dtype is not None:
        return "bf16" if args.dtype == "bfloat16" else "f32"
    from safetensors import safe_open

    from moelab.runfolder import WEIGHTS_FILE
    try:
        with safe_open(str(Path(args.run) / WEIGHTS_FILE), framework="pt") as f:
            return "bf16" if f.get_slice("embed.weight").get_dtype() == "BF16" else "f32"
    except Exception:  # noqa: BLE001 - a missing or damaged file is reported by the export
        return "f32"


def run(args) -> int:
    from moelab.generate import GenerationError, sampling_options, stream
    if args.type is not None and args.engine != "llama.cpp":
        raise_user("--type is for --engine llama.cpp (with --engine torch use --dtype / --quantize)")
    try:
        opts = sampling_options(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            seed=args.seed, stop=tuple(args.stop))
    except GenerationError as e:
        raise_user(e.for_cli())
    prompt = _prompt(args)
    check_device(args.device)
    engine = None
    if args.engine == "llama.cpp":
        steps, tokenizer, engine = _llamacpp_steps(args, opts, prompt)
        moe_layers, trace = [], False
    else:
        _check_memory(args)
        if args.quantize == "int8":
            print(INT8_NOTE, file=sys.stderr)
        model, tokenizer = _load(args)
        moe_layers = model.config.moe_layer_indices()
        trace = args.show_experts and bool(moe_layers)
        steps = stream(model, prompt, opts, tokenizer=tokenizer, trace_experts=trace, compile=args.compile)
    out = sys.stdout
    tokens: list[int] = []
    text, experts, reason = "", [], "length"
    start = time.perf_counter()
    try:
        for step in steps:
            token = step.tokens[0]
            if token is None:
                break
            tokens.append(token)
            text += step.text[0]
            reason = step.finished[0] or reason
            if trace:
                experts.append(step.experts[0])
            if args.json:
                continue
            if trace:
                print(_experts_line(tokenizer.decode([token]), step.experts[0], moe_layers), file=out)
            else:
                out.write(step.text[0])
                out.flush()
    except GenerationError as e:
        raise_user(e.for_cli())
    finally:
        if engine is not None:
            engine.close()
    seconds = time.perf_counter() - start
    rate = len(tokens) / max(seconds, 1e-9)
    if args.json:
        result = {"text": text, "tokens": tokens, "finish_reason": reason, "new_tokens": len(tokens),
                  "seconds": round(seconds, 4), "tokens_per_s": round(rate, 1), "engine": args.engine}
        if trace:
            result["experts"] = experts
            result["moe_layers"] = moe_layers
        print(json.dumps(result))
        return 0
    if trace:
        print(text, file=out)
    elif not text.endswith("\n"):
        out.write("\n")
    print(f"[{len(tokens)} tokens in {seconds:.2f} s, {rate:.1f} tokens/s, stopped: {reason}]",
          file=sys.stderr)
    return 0
