"""`moelab plan`: parameters, memory, communication and step time per layout, on paper."""

from __future__ import annotations

import dataclasses
import json

from moelab.commands import raise_user


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="plan a training run on N GPUs: layouts, memory, communication, advice")
    src = p.add_argument_group("model (one of)")
    src.add_argument("--preset", help="preset name (see `moelab presets`)")
    src.add_argument("--config", help="a config TOML file")
    src.add_argument("--hf-config", metavar="PATH", help="a Hugging Face config.json or the folder holding it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.moe.top_k=4 (repeatable)")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--gpus", required=True, help="number of GPUs (>= 1)")
    hw.add_argument("--gpu-memory", required=True, metavar="SIZE", help="memory per GPU, e.g. 80GiB, 141GB")
    hw.add_argument("--gpus-per-node", default="8", help="GPUs per node sharing NVLink (default 8)")
    hw.add_argument("--intra-node-bw", default="450GB/s", metavar="BW",
                    help="per-GPU bandwidth inside a node, each way (default 450GB/s, H100 NVLink)")
    hw.add_argument("--inter-node-bw", default="50GB/s", metavar="BW",
                    help="per-GPU bandwidth between nodes, each way (default 50GB/s = 400Gb/s)")
    hw.add_argument("--peak-tflops", default="989", metavar="TFLOPS",
                    help="dense peak TFLOP/s per GPU at --dtype (default 989, H100 SXM bf16)")
    hw.add_argument("--compute-efficiency", default="0.5", metavar="F",
                    help="fraction of peak the step's FLOPs run at (default 0.5)")
    hw.add_argument("--memory-margin", default="0.1", metavar="F",
                    help="fraction of GPU memory kept free for the CUDA context, NCCL and fragmentation (default 0.1)")
    wl = p.add_argument_group("workload")
    wl.add_argument("--seq-len", default="4096", help="tokens per sequence (default 4096)")
    wl.add_argument("--global-batch-tokens", default="4M", metavar="N",
                    help="tokens per optimizer step over all GPUs (default 4M = 4,000,000; 4Mi = 4 x 2^20)")
    wl.add_argument("--dtype", default="bf16", help="training precision: bf16, fp16 or fp32 (default bf16)")
    p.add_argument("--compare", metavar="A,B,C",
                   help="advise between these models (presets, config TOMLs or config.json paths) "
                        "instead of Dense/MoE/Hybrid variants of the planned model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _int(text: str, option: str, low: int = 1) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise_user(f"{option} = {text!r} is invalid: expected a whole number >= {low}")
    if value < low:
        raise_user(f"{option} = {value} is invalid: must be >= {low}")
    return value


def _fraction(text: str, option: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise_user(f"{option} = {text!r} is invalid: expected a number in ({low}, {high})")
    if not low < value < high:
        raise_user(f"{option} = {value} is invalid: must be in ({low}, {high})")
    return value


def hardware_and_workload(args):
    from moelab.plan import Hardware, Workload
    from moelab.plan.inputs import PRECISIONS
    from moelab.plan.units import parse_bandwidth, parse_bytes, parse_count, parse_tflops
    gpus = _int(args.gpus, "--gpus")
    hw = Hardware(gpus=gpus, gpu_memory=parse_bytes(args.gpu_memory, "--gpu-memory"),
                  gpus_per_node=_int(args.gpus_per_node, "--gpus-per-node"),
                  intra_node_bw=parse_bandwidth(args.intra_node_bw, "--intra-node-bw"),
                  inter_node_bw=parse_bandwidth(args.inter_node_bw, "--inter-node-bw"),
                  peak_flops=parse_tflops(args.peak_tflops, "--peak-tflops"),
                  compute_efficiency=_fraction(args.compute_efficiency, "--compute-efficiency", 0, 1.0000001),
                  memory_margin=_fraction(args.memory_margin, "--memory-margin", -1e-9, 1))
    if args.dtype not in PRECISIONS:
        raise_user(f"--dtype = {args.dtype!r} is invalid: must be one of {', '.join(PRECISIONS)}")
    wl = Workload(seq_len=_int(args.seq_len, "--seq-len"),
                  global_batch_tokens=parse_count(args.global_batch_tokens, "--global-batch-tokens"),
                  dtype=args.dtype)
    return hw, wl


def source_from_args(args):
    from moelab.plan import load_hf, load_source
    given = [x for x in (args.preset, args.config, args.hf_config) if x]
    if len(given) > 1:
        raise_user("give one of --preset, --config or --hf-config")
    if args.hf_config:
        return load_hf(args.hf_config, args.overrides)
    if args.config:                  # a moelab config file (TOML, YAML, JSON), never a preset
        from pathlib import Path

        from moelab import resolve_config
        from moelab.config_files import load_config_file
        from moelab.plan.source import ModelSource
        return ModelSource(Path(args.config).stem, resolve_config(load_config_file(args.config), args.overrides))
    if args.preset:
        return load_source(args.preset, args.overrides)
    if args.compare:
        return None
    raise_user("name the model: --preset NAME, --config F.toml or --hf-config PATH (or --compare A,B,C)")


def run(args) -> int:
    from moelab.interop.errors import InteropError
    from moelab.plan import plan
    from moelab.plan.advice import advise, compare_sources, matched_variants
    from moelab.plan.render import render

    hw, wl = hardware_and_workload(args)
    try:
        source = source_from_args(args)
        if args.compare:
            sources = compare_sources(args.compare.split(","), args.overrides)
            source = source or sources[0]
            basis = "your models (--compare)"
        else:
            sources = matched_variants(source)
            basis = f"Dense, MoE and Hybrid at {source.name}'s active parameters"
    except InteropError as e:
        raise_user(str(e))
    main = plan(source, hw, wl)
    own = {main.source.name: main}
    for s in sources:                         # the user's own model in the variants: reuse its plan
        if s.config == source.config:
            own[s.name] = main
    advice = advise(sources, hw, wl, basis, own, None if args.compare else source.name)
    main = dataclasses.replace(main, advice=advice)
    if args.json:
        print(json.dumps(main.to_dict(), indent=1))
        return 0
    render(main)
    return 0
