"""The human report of ``moelab plan``: Model, Layouts and Advice tables, then the verdict."""

from __future__ import annotations

from moelab.plan.planner import LayoutPlan, Plan
from moelab.plan.units import human_bytes, human_count, human_seconds, short_bytes

MAX_LAYOUT_ROWS = 14


PART_NAMES = {"params": "params", "gradients": "grads", "optimizer": "AdamW", "gathered": "gathered",
              "activations": "acts", "loss": "loss", "alltoall_buffers": "a2a buf", "backward_workspace": "bwd ws"}


def _fits_cell(p: LayoutPlan) -> str:
    if p.fits:
        return f"[green]yes[/] {short_bytes(p.headroom_bytes)} free"
    part, size = p.overflow_parts()[0]
    return f"[red]no[/] +{short_bytes(p.overflow_bytes)}, {PART_NAMES[part]} {short_bytes(size)}"


def _a2a_cell(p: LayoutPlan) -> str:
    a = p.alltoall
    if not a.bytes_per_layer:
        return "-"
    if a.inter_node_bytes_per_layer:
        return f"{short_bytes(a.bytes_per_layer)}, {short_bytes(a.inter_node_bytes_per_layer)} inter"
    return f"{short_bytes(a.bytes_per_layer)} intra"


def render(plan: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    if console is None:
        console = Console()
        if not console.is_terminal:          # a pipe or a file: no terminal to fit, keep rows whole
            console = Console(width=132)
    c, hw, wl = plan.counts, plan.hardware, plan.workload

    model = Table(title=f"Model: {plan.source.name}", show_header=False, title_justify="left")
    model.add_column("what")
    model.add_column("value", justify="right")
    model.add_column("note")
    model.add_row("total parameters", f"{c.total_params:,}", human_count(c.total_params))
    model.add_row("active parameters", f"{c.active_params:,}",
                  f"{human_count(c.active_params)} per token ({c.active_params / c.total_params:.1%})")
    model.add_row("  embedding", f"{c.embedding_params:,}", "in total and active")
    model.add_row("  LM head", f"{c.head_params:,}", "tied to the embedding" if not c.head_params else "in total and active")
    model.add_row("  routed experts", f"{c.routed_expert_params:,}",
                  f"{c.moe_layers} MoE + {c.dense_layers} dense layers")
    if c.mtp_params:
        model.add_row("  MTP modules (not counted)", f"{c.mtp_params:,}", "DeepSeek-V3 multi-token prediction")
    model.add_row("forward FLOPs / token", f"{c.forward_flops_per_token:,}",
                  f"{human_count(c.forward_flops_per_token)} at seq {wl.seq_len} "
                  f"(attention {c.attention_flops_per_token / c.forward_flops_per_token:.0%})")
    model.add_row("training FLOPs / token", f"{c.training_flops_per_token:,}", "3 x forward")
    model.add_row("KV cache / token", human_bytes(c.kv_cache_bytes_per_token), "bf16, all layers")
    console.print(model)
    for note in list(plan.source.notes) + list(plan.notes):
        console.print(f"[dim]note: {note}[/]")

    best = plan.best
    table = Table(title=f"Layouts on {hw.gpus} x {human_bytes(hw.gpu_memory)} ({hw.nodes} node"
                  f"{'s' if hw.nodes > 1 else ''} of {hw.gpus_per_node}), {human_count(wl.global_batch_tokens)} "
                  f"tokens/step at seq {wl.seq_len}, {wl.dtype}", title_justify="left")
    for col, just in (("shard x rep", "left"), ("ep", "right"), ("AC, mb x acc", "left"),
                      ("mem/GPU", "right"), ("fits", "left"), ("a2a/layer", "left"),
                      ("FSDP/step", "right"), ("step", "right"), ("MFU", "right"), ("tok/day", "right")):
        table.add_column(col, justify=just, no_wrap=col not in ("fits", "a2a/layer"))
    rows = plan.per_pair()
    for p in rows[:MAX_LAYOUT_ROWS]:
        lay = p.layout
        mark = "*" if best is not None and p is best else ""
        table.add_row(f"{mark}{lay.dp_shard}x{lay.dp_replicate}", str(lay.ep),
                      f"{'on' if lay.activation_checkpointing else 'off'}, {lay.micro_batch}x{p.grad_accum}",
                      short_bytes(p.memory.total), _fits_cell(p), _a2a_cell(p),
                      short_bytes(p.collectives.bytes_per_step), human_seconds(p.time.step_s),
                      f"{p.time.mfu:.0%}", human_count(plan.tokens_per_day(p)))
    console.print(table)
    console.print(f"[dim]* best. Per GPU; sizes binary (G = GiB); a2a = one MoE layer's forward all-to-all "
                  "leaving the GPU (dispatch + combine), FSDP = all-gathers + reduce-scatters of a step. "
                  f"{len(plan.layouts)} layouts evaluated (dp_shard x ep x checkpointing x micro-batch); "
                  f"one row per (dp_shard, ep) shown{', the first ' + str(MAX_LAYOUT_ROWS) if len(rows) > MAX_LAYOUT_ROWS else ''}"
                  "; --json lists all. Step time: compute at "
                  f"{hw.compute_efficiency:.0%} of {hw.peak_flops / 1e12:g} TFLOP/s, FSDP overlapped with compute, "
                  f"all-to-all not; fits = under {1 - hw.memory_margin:.0%} of GPU memory.[/]")
    if best is not None:
        b = best
        lay = b.layout
        console.print(f"best layout: {lay.label()}, checkpointing {'on' if lay.activation_checkpointing else 'off'}, "
                      f"{human_seconds(b.time.step_s)} per step, {human_bytes(b.memory.total)} per GPU; in moelab: "
                      f"--set parallel.dp_shard={lay.dp_shard} --set parallel.ep={lay.ep} --set "
                      f"parallel.activation_checkpointing={'true' if lay.activation_checkpointing else 'false'} "
                      f"--set train.batch_size={lay.micro_batch * lay.world} --set train.grad_accum={b.grad_accum} "
                      f"--set train.seq_len={wl.seq_len}")
    else:
        s = plan.smallest
        console.print(f"[red]no layout fits[/]: the smallest needs {human_bytes(s.memory.total)} per GPU "
                      f"({s.layout.label()}, checkpointing {'on' if s.layout.activation_checkpointing else 'off'}, "
                      f"micro-batch {s.layout.micro_batch})")

    if plan.advice:
        adv = plan.advice
        t = Table(title=f"Advice: {adv['basis']}", title_justify="left")
        for col, just in (("model", "left"), ("kind", "left"), ("total", "right"), ("active", "right"),
                          ("best layout", "left"), ("step", "right"), ("tok/day", "right"),
                          ("headroom", "right"), ("comm (a2a)", "right")):
            t.add_column(col, justify=just)
        for r in adv["rows"]:
            if r["fits"]:
                lay = r["best_layout"]
                t.add_row(r["name"], r["kind"], human_count(r["total_params"]), human_count(r["active_params"]),
                          f"{lay['dp_shard']}x{lay['dp_replicate']} ep{lay['ep']}"
                          f"{' AC' if lay['activation_checkpointing'] else ''}", human_seconds(r["step_time_s"]),
                          human_count(r["tokens_per_day"]), short_bytes(r["headroom_bytes"]),
                          f"{r['comm_share']:.0%} ({r['alltoall_share']:.0%})")
            else:
                t.add_row(r["name"], r["kind"], human_count(r["total_params"]), human_count(r["active_params"]),
                          f"[red]no fit[/]: needs {short_bytes(r['min_memory_bytes_per_gpu'])}", "-", "-", "-", "-")
        console.print(t)
        console.print("[bold]Verdict[/]")
        for line in adv["verdict"]:
            console.print(f"- {line}")
