"""Sparse upcycling: the dense FFNs of a trained model become MoE layers that start from them.

Legend: D width, H the dense FFN's hidden units, G granularity, Hs = H / G hidden units per
expert, E routed experts, C = E / G copies of the FFN, K experts per token, S shared experts.

``copy`` (Komatsuzaki et al. 2023, "Sparse Upcycling"): every expert is the dense FFN. With the
top-k weights renormalised the layer then computes exactly the dense FFN, whatever the router
chooses, so training continues from the dense loss.

``drop`` (Nakamura et al. 2025, "Drop-Upcycling"): as ``copy``, then in each expert a random
``drop_ratio`` of its hidden units is re-initialised (their rows of gate and up, their column of
down) from a normal distribution with the mean and standard deviation of the original matrix, a
different subset per expert, so that the experts can diverge instead of staying copies.

Granularity G > 1 (fine-grained upcycling, He et al. 2024, "Upcycling Large Language Models into
Mixture of Experts"): the FFN's hidden units are cut into G slices, expert ``e`` is slice
``e % G`` of copy ``e // G``, and the router gives the G slices of a copy one shared row (their
"virtual group"), so a token's top-k (K a multiple of G) takes whole copies; each token then sees
K / G copies of the FFN with weights summing to 1 / G, and down is scaled by G to keep the
function. Shared experts are each a full copy of the FFN; with S of them the routed and shared
parts are weighted S : K / G so their sum is still the FFN (scale factors below).

Everything here is a pure function of tensors except ``upcycle``, which reads the source run
folder (or Hugging Face folder) and writes the new run folder.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from moelab.config import Config, ConfigError, ModelConfig

METHODS = ("copy", "drop")
ROUTER_INITS = ("normal", "zero")
UPCYCLE_META_KEY = "upcycle"


@dataclass(frozen=True)
class UpcycleOptions:
    """What ``moelab upcycle`` was asked for; recorded in the new run's run_meta.json."""
    experts: int                   # routed experts per MoE layer (E)
    top_k: int                     # experts per token (K)
    method: str = "copy"           # "copy" | "drop"
    drop_ratio: float = 0.5        # drop: share of each expert's hidden units re-initialised
    granularity: int = 1           # G: slices of the FFN per copy (fine-grained experts)
    layers: str = "all"            # "all", "everyN" (every N-th layer) or "i,j,..."
    shared: int = 0                # S: shared experts, each a full copy of the FFN
    router_init: str = "normal"    # "normal" (N(0, init_std), shared within a virtual group) | "zero"
    seed: int = 0                  # router draws and drop subsets


# ---------------------------------------------------------------------------------------------
# options and the new config
# ---------------------------------------------------------------------------------------------

def parse_layers(text: str, n_layers: int) -> tuple[object, int]:
    """``--layers`` -> (MoEConfig.layers, MoEConfig.every): "all", "every2" (layers 1, 3, ...,
    MoEConfig's interleaving) or a list "0,2,5"."""
    t = str(text).strip().lower()
    if t == "all":
        return "all", 1
    m = re.fullmatch(r"every\s*(\d+)", t)
    if m:
        every = int(m.group(1))
        if not 1 <= every <= n_layers:
            raise ConfigError(f"--layers = {text!r} is invalid: every N needs N in [1, {n_layers}] "
                              f"(the model has {n_layers} layers)")
        return "all", every
    parts = [p.strip() for p in t.split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ConfigError(f"--layers = {text!r} is invalid: use all, everyN (e.g. every2) or a "
                          f"comma-separated list of layer indices (e.g. 1,3)")
    layers = tuple(int(p) for p in parts)
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise ConfigError(f"--layers = {text!r} is invalid: layer {bad[0]} is outside the model "
                          f"(indices 0 to {n_layers - 1})")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"--layers = {text!r} is invalid: a layer repeats")
    return tuple(sorted(layers)), 1


def check_options(opts: UpcycleOptions, model: ModelConfig) -> None:
    """Refuse options that cannot upcycle ``model``, naming the option, its value and the range."""
    if model.moe_layer_indices():
        raise ConfigError(f"the source has MoE layers {model.moe_layer_indices()}: upcycling starts "
                          f"from a dense model (model.moe.layers = 'none')")
    H, G, E, K, S = model.ffn_hidden, opts.granularity, opts.experts, opts.top_k, opts.shared
    if opts.method not in METHODS:
        raise ConfigError(f"--method = {opts.method!r} is invalid: must be one of {', '.join(METHODS)}")
    if opts.router_init not in ROUTER_INITS:
        raise ConfigError(f"--router-init = {opts.router_init!r} is invalid: must be one of "
                          f"{', '.join(ROUTER_INITS)}")
    if G < 1 or H % G:
        raise ConfigError(f"--granularity = {G} is invalid: must be >= 1 and divide the FFN's "
                          f"{H} hidden units (model.ffn_hidden)")
    if E < 2 or E % G:
        raise ConfigError(f"--experts = {E} is invalid: must be >= 2 and a multiple of "
                          f"--granularity ({G}): each copy of the FFN gives {G} experts")
    if not 1 <= K <= E:
        raise ConfigError(f"--top-k = {K} is invalid: must be between 1 and --experts ({E})")
    if G > 1 and K % G:
        raise ConfigError(f"--top-k = {K} is invalid with --granularity {G}: must be a multiple of "
                          f"{G}, so every token's experts make whole copies of the FFN")
    if G > 1 and opts.router_init == "zero":
        raise ConfigError(f"--router-init = zero is invalid with --granularity {G}: all experts "
                          f"would tie, top-k would pick slices of different copies and the layer "
                          f"would no longer compute the dense FFN; use --router-init normal")
    if S < 0:
        raise ConfigError(f"--shared = {S} is invalid: must be >= 0")
    if not 0.0 <= opts.drop_ratio <= 1.0:
        raise ConfigError(f"--drop-ratio = {opts.drop_ratio} is invalid: must be in [0, 1]")
    if opts.method == "copy" and opts.drop_ratio != UpcycleOptions.drop_ratio:
        raise ConfigError(f"--drop-ratio = {opts.drop_ratio} applies to --method drop only")


def upcycled_config(source: Config, opts: UpcycleOptions) -> Config:
    """The source's config with the chosen layers made MoE. Routing is fixed to what keeps the
    function (softmax top-k, renormalised, no groups, no bias, dropless); the source's balancing
    coefficients are kept."""
    m = source.model
    check_options(opts, m)
    layers, every = parse_layers(opts.layers, m.n_layers)
    moe = dataclasses.replace(
        m.moe, layers=layers, every=every, first_dense=0, num_experts=opts.experts,
        num_experts_per_layer=None, top_k=opts.top_k, expert_hidden=m.ffn_hidden // opts.granularity,
        router="softmax", renormalize=True, routed_scaling=1.0, n_groups=1, topk_groups=1,
        bias_update_rate=0.0, capacity_factor=None, eval_capacity_factor=None,
        num_shared_experts=opts.shared, shared_expert_hidden=m.ffn_hidden if opts.shared else None,
        shared_expert_gate=False)
    cfg = dataclasses.replace(source, model=dataclasses.replace(m, moe=moe)).validate()
    if not cfg.model.moe_layer_indices():
        raise ConfigError(f"--layers = {opts.layers!r} selects no layer of this "
                          f"{m.n_layers}-layer model")
    return cfg


def scales(opts: UpcycleOptions) -> tuple[float, float]:
    """(routed down scale, shared down scale) that keep the layer equal to the FFN.

    Renormalised top-k weights sum to 1 over K experts that form K/G whole copies, so the routed
    part alone computes FFN / G; shared experts add S copies. Weighting the two parts S : K/G
    gives routed scale K / (S + K/G) and shared scale 1 / (S + K/G); with S = 0 these are G and
    unused."""
    copies_per_token = opts.top_k / opts.granularity
    denominator = opts.shared + copies_per_token
    return opts.top_k / denominator, 1.0 / denominator


# ---------------------------------------------------------------------------------------------
# the weight transforms (pure)
# ---------------------------------------------------------------------------------------------

def expert_weights(gate_up_2HD: torch.Tensor, down_DH: torch.Tensor, experts: int, granularity: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert weights from a SwiGLU FFN: (w_gate_up (E, 2Hs, D), w_down (E, D, Hs)).
    Expert e holds slice e % G of the hidden units (gate rows first, as ``GroupedExperts``)."""
    D, H = down_DH.shape
    G = granularity
    Hs = H // G
    gate_GHsD = gate_up_2HD[:H].reshape(G, Hs, D)
    up_GHsD = gate_up_2HD[H:].reshape(G, Hs, D)
    slices_G2HsD = torch.cat([gate_GHsD, up_GHsD], dim=1)                    # (G, 2Hs, D)
    down_GDHs = down_DH.reshape(D, G, Hs).permute(1, 0, 2)                   # (G, D, Hs)
    copies = experts // G
    w_gate_up = slices_G2HsD.repeat(copies, 1, 1).contiguous()               # (E, 2Hs, D)
    w_down = (down_GDHs.repeat(copies, 1, 1) * scale).contiguous()           # (E, D, Hs)
    return w_gate_up, w_down


def drop_units(hidden: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """round(ratio * hidden) distinct hidden-unit indices, sorted."""
    n = int(round(ratio * hidden))
    return torch.randperm(hidden, generator=generator)[:n].sort().values


def drop_reinit(w_gate_up_E2HD: torch.Tensor, w_down_EDH: torch.Tensor, gate_up_2HD: torch.Tensor,
                down_DH: torch.Tensor, ratio: float, scale: float,
                generator: torch.Generator) -> list[torch.Tensor]:
    """Drop-Upcycling, in place: in every expert re-draw ``ratio`` of its hidden units (rows of
    gate and up, columns of down) from N(mean, std) of the original gate, up and down matrices
    (the down draw then takes the routed ``scale`` like the rest of the expert). Returns the
    re-drawn unit indices of each expert."""
    E, two_hs, D = w_gate_up_E2HD.shape
    Hs = two_hs // 2
    H = down_DH.shape[1]
    stats = [(t.float().mean().item(), t.float().std().item())
             for t in (gate_up_2HD[:H], gate_up_2HD[H:], down_DH)]
    (g_mean, g_std), (u_mean, u_std), (d_mean, d_std) = stats
    dropped = []
    for e in range(E):
        idx = drop_units(Hs, ratio, generator)
        n = idx.numel()
        dtype = w_gate_up_E2HD.dtype
        gate = torch.randn(n, D, generator=generator) * g_std + g_mean
        up = torch.randn(n, D, generator=generator) * u_std + u_mean
        down = (torch.randn(D, n, generator=generator) * d_std + d_mean) * scale
        w_gate_up_E2HD[e, idx] = gate.to(dtype)
        w_gate_up_E2HD[e, Hs + idx] = up.to(dtype)
        w_down_EDH[e][:, idx] = down.to(dtype)
        dropped.append(idx)
    return dropped


def shared_weights(gate_up_2HD: torch.Tensor, down_DH: torch.Tensor, shared: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """S full copies of the FFN as one SwiGLU of width S*H (gate rows of every copy first):
    (gate_up (2*S*H, D), down (D, S*H) times ``scale``)."""
    H = down_DH.shape[1]
    gate, up = gate_up_2HD[:H], gate_up_2HD[H:]
    gate_up = torch.cat([gate] * shared + [up] * shared, dim=0)              # (2SH, D)
    down = torch.cat([down_DH] * shared, dim=1) * scale                       # (D, SH)
    return gate_up.contiguous(), down.contiguous()


def router_gate(experts: int, d_model: int, granularity: int, init: str, std: float,
                generator: torch.Generator) -> torch.Tensor:
    """The router weight (E, D), float32: zeros, or N(0, std) with one row per copy repeated over
    its G slices (virtual groups)."""
    if init == "zero":
        return torch.zeros(experts, d_model)
    rows_CD = torch.randn(experts // granularity, d_model, generator=generator) * std
    return rows_CD.repeat_interleave(granularity, dim=0)                     # (E, D)


def moe_tensors(ffn_gate_up: torch.Tensor, ffn_down: torch.Tensor, opts: UpcycleOptions, d_model: int,
                init_std: float, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], list]:
    """The tensors of one upcycled MoE layer by their names inside ``MoE`` (router, experts,
    shared), computed in float32, and the drop subsets (empty for ``copy``)."""
    gate_up, down = ffn_gate_up.float(), ffn_down.float()
    routed_scale, shared_scale = scales(opts)
    out = {"router.gate": router_gate(opts.experts, d_model, opts.granularity, opts.router_init,
                                      init_std, generator),
           "router.expert_bias": torch.zeros(opts.experts)}
    w_gate_up, w_down = expert_weights(gate_up, down, opts.experts, opts.granularity, routed_scale)
    dropped = []
    if opts.method == "drop":
        dropped = drop_reinit(w_gate_up, w_down, gate_up, down, opts.drop_ratio, routed_scale, generator)
    out["experts.w_gate_up"], out["experts.w_down"] = w_gate_up, w_down
    if opts.shared:
        out["shared.gate_up.weight"], out["shared.down.weight"] = shared_weights(
            gate_up, down, opts.shared, shared_scale)
    return out, dropped


# ---------------------------------------------------------------------------------------------
# models and run folders
# ---------------------------------------------------------------------------------------------

@dataclass
class Upcycled:
    model: torch.nn.Module        # the new Transformer, eval mode
    config: Config
    dropped: dict[int, list]      # layer -> per-expert re-drawn hidden units (drop only)
    notes: list[str]


def upcycle_model(source_model, source_cfg: Config, opts: UpcycleOptions) -> Upcycled:
    """The upcycled Transformer of a dense ``source_model``: every tensor outside the chosen
    layers' FFNs is the source's own (same dtype); the new MoE tensors are made in float32 and
    stored in the source's dtype (routers stay float32)."""
    from moelab.model.weights import build_on_meta, fill

    cfg = upcycled_config(source_cfg, opts)
    src_state = source_model.state_dict()
    stored = source_model.embed.weight.dtype
    generator = torch.Generator().manual_seed(opts.seed)
    new_state: dict[str, torch.Tensor] = {}
    dropped: dict[int, list] = {}
    moe_layers = cfg.model.moe_layer_indices()
    for i in moe_layers:
        ffn = source_model.blocks[i].ffn
        tensors, subsets = moe_tensors(ffn.gate_up.weight.detach(), ffn.down.weight.detach(), opts,
                                       cfg.model.d_model, cfg.model.init_std, generator)
        for name, t in tensors.items():
            new_state[f"blocks.{i}.ffn.{name}"] = t if name.startswith("router.") else t.to(stored)
        if subsets:
            dropped[i] = subsets
    for name, t in src_state.items():
        layer = _ffn_layer(name)
        if layer is None or layer not in moe_layers:
            new_state[name] = t
    model = build_on_meta(cfg.model)
    model = fill(model, {k: v.shape for k, v in new_state.items()}, new_state.__getitem__,
                 "the upcycled tensors")
    notes = []
    if opts.top_k == 1:
        notes.append("top-1 routing keeps the router probability as the expert's weight (Switch), "
                     "so the upcycled layers start from p * FFN, not from the dense function")
    return Upcycled(model, cfg, dropped, notes)


def _ffn_layer(name: str) -> Optional[int]:
    m = re.match(r"blocks\.(\d+)\.ffn\.", name)
    return int(m.group(1)) if m else None


def upcycle(source: str | Path, opts: UpcycleOptions, out: str | Path, command: str = "",
            log: Callable[[str], None] = print) -> Path:
    """Read the dense run folder (or Hugging Face folder) ``source``, upcycle it and write the
    new run folder ``out`` (config.json, model.safetensors, tokenizer.json and run_meta.json,
    which names the parent and the options). ``out`` must not exist or be empty."""
    from moelab.accounting import describe
    from moelab.fileio import write_json, write_text_atomic
    from moelab.lock import FolderLock
    from moelab.runfolder import (RUN_META_FILE, TOKENIZER_FILE, is_hf_folder, load,
                                  read_config, resolve, save)

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} already exists and is not empty: name a new folder")
    folder = resolve(source)
    source_cfg = read_config(folder)
    upcycled_config(source_cfg, opts)                 # refuse bad options before loading weights
    notes: list[str] = []
    model = load(folder, note=notes.append)
    result = upcycle_model(model, source_cfg, opts)
    del model
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, "upcycle").acquire()
    try:
        tokenizer = folder / TOKENIZER_FILE
        save(out, result.model, result.config)
        if tokenizer.is_file():
            write_text_atomic(out / TOKENIZER_FILE, tokenizer.read_text(encoding="utf-8"))
        info = describe(result.config.model, 1, 1)
        write_json(out / RUN_META_FILE, {
            "command": command, "parent": str(folder.resolve()),
            "parent_kind": "huggingface" if is_hf_folder(folder) else "moelab",
            UPCYCLE_META_KEY: dataclasses.asdict(opts),
            "moe_layers": result.config.model.moe_layer_indices(),
            "total_params": info["total_params"], "active_params": info["active_params"],
            "notes": notes + result.notes})
    except BaseException:
        lock.release()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    lock.release()
    for n in notes + result.notes:
        log(f"note: {n}")
    return out


def read_parent(run_dir: str | Path) -> Optional[str]:
    """The folder a run started from, as its run_meta.json records it (``parent`` for upcycled
    folders and fine-tunes, ``init_from`` for ``moelab train --init-from``), or None."""
    import json

    from moelab.runfolder import RUN_META_FILE
    path = Path(run_dir) / RUN_META_FILE
    if not path.is_file():
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    return meta.get("parent") or meta.get("init_from")


__all__ = ["UpcycleOptions", "Upcycled", "check_options", "drop_reinit", "drop_units", "expert_weights",
           "moe_tensors", "parse_layers", "read_parent", "router_gate", "scales", "shared_weights",
           "upcycle", "upcycle_model", "upcycled_config"]
