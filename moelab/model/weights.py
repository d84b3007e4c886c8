"""A model's weights in memory: building a model that holds no weights yet (the meta device),
filling it from tensors in the dtype asked for, and one report of tensors that do not fit.

Why a meta build: a model constructed normally allocates and initialises every parameter in
float32, which a loader would then overwrite; for a bf16 checkpoint that float32 copy is twice
the weights' size. Built on ``meta`` the model's parameters cost nothing, and each tensor read
from a file becomes a parameter once, already in its final dtype. Routers are the exception to
the dtype: their parameters stay float32 (their top-k choices are sensitive to rounding), as do
buffers (RoPE tables, balancing biases).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from moelab.config import ModelConfig
    from moelab.model.transformer import Transformer


class StateMismatch(ValueError):
    """A set of tensors does not fit a model; the message names what is missing, unexpected or
    mis-shaped."""


def describe_mismatch(missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                      wrong_shape: Iterable[str] = (), limit: int = 5) -> Optional[str]:
    """One line naming the first ``limit`` missing, unexpected and mis-shaped tensors (with
    ``...`` when there are more), or None when all three are empty. The one wording every loader
    uses: run folders, checkpoints and Hugging Face imports."""
    parts = []
    for label, items in (("missing", list(missing)), ("unexpected", list(unexpected)),
                         ("wrong shape", list(wrong_shape))):
        if items:
            more = " ..." if len(items) > limit else ""
            parts.append(f"{label} {items[:limit]}{more}")
    return "; ".join(parts) or None


def check_shapes(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Size], source: str,
                 what: str = "the model") -> None:
    """Raise StateMismatch unless ``found`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: file {tuple(found[k])} vs {what} {tuple(expected[k])}"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    problem = describe_mismatch(missing, unexpected, wrong)
    if problem:
        raise StateMismatch(f"{source} does not match {what}: {problem}")


def expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Shapes of the persistent tensors a checkpoint of ``model`` holds (meta models included)."""
    return {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}


def build_on_meta(config: "ModelConfig") -> "Transformer":
    """The model of ``config`` with every parameter and buffer on the meta device: no memory, no
    initialisation. ``materialize`` or ``fill`` gives it real tensors."""
    from moelab.model.transformer import Transformer
    with torch.device("meta"):
        return Transformer(config)


def _keeps_float32(model: nn.Module) -> set[int]:
    """Parameters that stay float32 in every dtype: the routers'."""
    from moelab.model.moe.router import Router
    return {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}


def target_dtype(param: torch.Tensor, keep_float32: bool, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a parameter is stored in when the model computes in ``dtype`` (None: as is)."""
    if dtype is None or not param.is_floating_point():
        return param.dtype
    return torch.float32 if keep_float32 else dtype


def fill(model: "Transformer", shapes: Mapping[str, Iterable[int]], get: Callable[[str], torch.Tensor],
         source: str, dtype: Optional[torch.dtype] = None,
         device: torch.device | str = "cpu") -> "Transformer":
    """Give a meta-built ``model`` its tensors. ``shapes`` names every tensor the source holds
    with its shape (read from a file's header, nothing loaded), checked against the model first;
    then ``get(name)`` loads each one, which is converted once to its final dtype and device and
    becomes the parameter itself (no second copy). ``dtype`` None keeps each tensor's own dtype.
    Non-persistent buffers (RoPE tables) are computed on ``device``. Returns the model in eval
    mode."""
    expected = model.state_dict(keep_vars=True)
    check_shapes({k: v.shape for k, v in expected.items()}, shapes, source)
    keep = _keeps_float32(model)
    state = {}
    for name, slot in expected.items():
        t = get(name)
        if isinstance(slot, nn.Parameter):
            kind = target_dtype(t, id(slot) in keep, dtype)
        else:
            kind = slot.dtype                          # buffers keep the dtype the model gave them
        state[name] = t.to(device=device, dtype=kind)
        del t
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers(device)
    return model.eval()


def materialize(model: "Transformer", device: torch.device | str = "cpu",
                dtype: Optional[torch.dtype] = None) -> "Transformer":
    """Allocate a meta-built ``model`` on ``device``, its parameters created in ``dtype``
    directly (routers float32), and initialise it (``reset_parameters``). A 1B-parameter bf16
    model takes 2 GB while it is built, not 4 (benchmarks build large models this way). The draws
    differ from an eagerly built model's: construction there also runs each layer's default
    initialisation first (``moelab.model.init_replay`` reproduces those draws exactly, which is
    how training builds its models)."""
    keep = _keeps_float32(model)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                kind = target_dtype(p, id(p) in keep, dtype)
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=kind, device=device),
                                                        requires_grad=p.requires_grad)
    model.init_buffers(device)
    model.reset_parameters()
    return model
