"""Traces: for each token of a prompt, the experts every MoE layer chose for it.

Printed as one line per token (expert ids coloured by id in a terminal, plain text otherwise) and
drawn as a layers x tokens grid coloured by first choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moelab.inspect.errors import InspectError
from moelab.model.transformer import Transformer

# one colour per expert id (modulo), distinguishable on dark and light terminals
PALETTE = ("red", "green", "yellow", "blue", "magenta", "cyan", "bright_red", "bright_green",
           "bright_yellow", "bright_blue", "bright_magenta", "bright_cyan", "dark_orange",
           "purple", "spring_green3", "deep_pink3")


@dataclass
class Trace:
    token_ids: list[int]
    tokens: list[str]                    # each token's text
    layers: list[int]                    # block index of each MoE layer
    experts: list[list[list[int]]]       # [layer][token] -> k expert ids, first choice first

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "token_ids": self.token_ids, "layers": self.layers,
                "experts": self.experts}


@torch.no_grad()
def trace_prompt(model: Transformer, tokenizer: Tokenizer, prompt: str) -> Trace:
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise InspectError("--prompt is empty after tokenisation: give some text")
    limit = model.config.max_seq_len
    if len(ids) > limit:
        raise InspectError(f"--prompt has {len(ids)} tokens; the model's context is {limit} "
                           "(model.max_seq_len): shorten it")
    device = next(model.parameters()).device
    out = model(torch.tensor([ids], device=device))
    experts = [s.expert_ids.cpu().tolist() for s in out.router_stats]       # [layer] (T, K)
    return Trace(token_ids=ids, tokens=[tokenizer.decode([i]) for i in ids],
                 layers=model.config.moe_layer_indices(), experts=experts)


def trace_lines(trace: Trace):
    """One rich ``Text`` per token: the token, then ``L<layer>:e,e`` per MoE layer, each expert
    id in its colour (first choice bold). A console that is not a terminal prints them plain."""
    from rich.text import Text
    width = min(18, max(len(repr(t)) for t in trace.tokens) + 1)
    lines = []
    for t, tok in enumerate(trace.tokens):
        line = Text(f"{tok!r:<{width}}")
        for layer, per_token in zip(trace.layers, trace.experts):
            line.append(f"  L{layer}:")
            for j, e in enumerate(per_token[t]):
                if j:
                    line.append(",")
                line.append(str(e), style=f"{'bold ' if j == 0 else ''}{PALETTE[e % len(PALETTE)]}")
        lines.append(line)
    return lines


def draw_trace(trace: Trace, path: Path) -> Path:
    """Layers x tokens grid; a cell's colour is the first-choice expert and its text all k."""
    import numpy as np

    from moelab.figures import pyplot, save
    plt = pyplot()

    T, L = len(trace.tokens), len(trace.layers)
    first = np.array([[per_token[t][0] for t in range(T)] for per_token in trace.experts])  # (L, T)
    E = int(first.max()) + 1
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * T + 1.5), max(2.2, 0.5 * L + 1.6)), dpi=110)
    ax.imshow(first, cmap=plt.get_cmap("tab20", max(E, 2)), vmin=-0.5, vmax=max(E, 2) - 0.5,
              aspect="auto")
    for li in range(L):
        for t in range(T):
            ax.text(t, li, ",".join(map(str, trace.experts[li][t])), ha="center", va="center",
                    fontsize=6)
    ax.set_xticks(range(T), [repr(s)[1:-1] or " " for s in trace.tokens], rotation=90, fontsize=7)
    ax.set_yticks(range(L), [f"layer {l}" for l in trace.layers])
    ax.set_title("Experts chosen per token (colour: first choice; text: all k)")
    return save(fig, path)
