"""`moelab info`: architecture, parameters, FLOPs per token and a memory estimate."""

from __future__ import annotations

import json

from moelab.commands import add_config_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show a model's architecture and cost")
    p.add_argument("run", nargs="?", help="a run folder (instead of --preset/--config)")
    add_config_args(p)
    p.add_argument("--batch", type=int, default=None, help="batch size for the memory estimate")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs and memory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def run(args) -> int:
    from moelab.accounting import describe
    for option, value in (("--batch", args.batch), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            from moelab.commands import raise_user
            raise_user(f"{option} = {value} is invalid: must be >= 1")
    if args.run:
        from moelab.commands import raise_user
        from moelab.runfolder import CheckpointError, read_config
        if args.preset or args.config:
            raise_user("give a run folder or --preset/--config, not both")
        try:
            cfg = read_config(args.run)
        except CheckpointError as e:
            raise_user(str(e))
        if args.overrides:
            cfg = cfg.with_overrides(args.overrides).validate()
    else:
        cfg = config_from_args(args)
    batch = args.batch or cfg.train.batch_size
    seq = args.seq_len or cfg.train.seq_len
    info = describe(cfg.model, batch=batch, seq_len=seq)
    info.update({"batch": batch, "seq_len": seq, "config": cfg.model.__class__.__name__})
    info["model"] = cfg.to_dict()["model"]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = cfg.model
    attn = (f"MLA (latent {m.mla.kv_lora_rank}, rope {m.mla.qk_rope_head_dim}, q rank {m.mla.q_lora_rank})"
            if m.attention == "mla" else f"GQA {m.n_heads} heads / {m.kv_heads} KV heads x {m.attn_head_dim}")
    print(f"d_model {m.d_model}, {m.n_layers} layers, vocab {m.vocab_size}, context {m.max_seq_len}; "
          f"attention: {attn}")
    for layer in info["layers"]:
        if layer["ffn"] == "moe":
            mo = m.moe
            ffn = (f"MoE {layer['experts']} experts x {mo.expert_hidden}, top-{mo.top_k} {mo.router}"
                   + (f", {mo.num_shared_experts} shared" if mo.num_shared_experts else "")
                   + (f", capacity {mo.capacity_factor}" if mo.capacity_factor else ", dropless"))
        else:
            ffn = f"dense SwiGLU {m.ffn_hidden}"
        print(f"  layer {layer['layer']:>2}: {ffn:<60} params {_human(layer['total'])} "
              f"(active {_human(layer['active'])})")
    print(f"total params      {info['total_params']:>14,}")
    print(f"active params     {info['active_params']:>14,}")
    print(f"FLOPs / token     {info['flops_per_token']:>14,}  (forward, seq {seq})")
    mem = info["memory_bytes"]
    print(f"memory (train, batch {batch} x {seq}, fp32 + AdamW): weights {_bytes(mem['weights'])}, "
          f"grads {_bytes(mem['gradients'])}, AdamW {_bytes(mem['adamw_states'])}, "
          f"activations ~{_bytes(mem['activations'])}, total ~{_bytes(mem['total'])}")
    if m.causal:
        print(f"KV cache / token  {_bytes(info['kv_cache_bytes_per_token'])} (bf16)")
    else:
        print("KV cache / token  none (an encoder, model.causal = false, does not decode)")
    return 0
