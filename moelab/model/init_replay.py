"""The initial weights of an eager build, without the eager build: recorded on the meta device,
replayed one tensor at a time.

Why: ``torch.manual_seed(s); Transformer(cfg)`` draws every parameter from the global RNG, and
more than once (each ``nn.Linear`` / ``nn.Embedding`` runs its default initialisation while it is
constructed, then ``reset_parameters`` draws again), so the weights a run starts from, and the RNG
state it continues with, are functions of that whole stream. A model built on ``meta`` skips those
draws (``weights.materialize`` says so), which would change every seeded run. Instead,
``build_recorded`` builds on ``meta`` while noting every operation the build runs that draws from
the RNG or writes a parameter (the op, its arguments, the shape it writes), and
``InitRecipe.replay`` runs them again, in order, on real CPU tensors: each draw consumes the
generator exactly as it did in the eager build, and each parameter's final value is handed to a
callback the moment it is complete, then dropped. A rank keeps its shard of it; nothing ever holds
more than one full tensor (plus one scratch tensor the size of the draw being replayed).

What replays: factory ops (``torch.zeros``, ``torch.randn``, ...), in-place ops that overwrite a
tensor (``normal_``, ``uniform_``, ``fill_``, ``zero_``, ...) and in-place ops with scalar arguments
applied after one (``mul_``, ``clamp_``, ``erfinv_``: ``trunc_normal_``'s chain). A parameter whose
value would need anything else (a copy from another tensor, a write to part of it) is refused by
name when the recipe is built, so a model change that breaks the replay fails loudly, and the
test that compares a replayed build with an eager one for every preset catches the rest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

if TYPE_CHECKING:  # pragma: no cover
    from moelab.config import ModelConfig
    from moelab.model.transformer import Transformer

aten = torch.ops.aten

# in-place ops whose result does not depend on the tensor's previous values
_OVERWRITES = {
    aten.normal_.default, aten.uniform_.default, aten.fill_.Scalar, aten.zero_.default,
    aten.random_.default, getattr(aten.random_, "from"), aten.random_.to, aten.exponential_.default,
    aten.cauchy_.default, aten.log_normal_.default, aten.geometric_.default, aten.bernoulli_.float,
}


class ReplayError(RuntimeError):
    """The build writes a parameter in a way the replay cannot reproduce; the message names it."""


@dataclass(frozen=True)
class _Like:
    """Where a recorded op had a (meta) tensor: the layout a replay tensor must have."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> "_Like":
        return cls(tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)

    def new(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype)


@dataclass
class _Step:
    func: Any                          # an aten OpOverload
    args: tuple
    kwargs: dict
    seeded: bool                       # draws from the RNG
    writes: Optional[int] = None       # storage written (in-place target or factory output)
    target: Optional[_Like] = None     # layout written
    overwrites: bool = False           # the result does not depend on the previous value
    has_other_tensors: bool = False    # tensor arguments besides the written one

    def run(self, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Execute on CPU: into ``into`` (in place), or on a fresh tensor of the recorded layout,
        or (factories) creating one."""
        args = tree_map(lambda a: a.new() if isinstance(a, _Like) else a, self.args)
        kwargs = {k: (torch.device("cpu") if k == "device" else v) for k, v in self.kwargs.items()}
        kwargs = tree_map(lambda a: a.new() if isinstance(a, _Like) else a, kwargs)
        if self.target is not None and args and isinstance(self.args[0], _Like):
            args = (into if into is not None else args[0],) + tuple(args[1:])
            self.func(*args, **kwargs)
            return args[0]
        return self.func(*args, **kwargs)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Recorder(TorchDispatchMode):
    """Notes every op that draws from the RNG, writes a tensor in place or creates one from
    nothing. The meta tensors it saw stay referenced, so no storage address is reused while
    recording."""

    def __init__(self):
        super().__init__()
        self.steps: list[_Step] = []
        self._alive: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        written = _written(func, args, kwargs)
        seeded = torch.Tag.nondeterministic_seeded in func.tags
        factory = not tensors and isinstance(out, torch.Tensor)
        if not (seeded or written or factory):
            return out
        step = _Step(func, tree_map(_like, args), tree_map(_like, kwargs), seeded)
        if written:
            if len(written) > 1 or written[0] is not (args[0] if args else None):
                step.writes, step.has_other_tensors = _storage(written[0]), True   # out= forms
            else:
                step.writes = _storage(written[0])
                step.target = _Like.of(written[0])
                step.overwrites = func in _OVERWRITES
                step.has_other_tensors = len(tensors) > 1
        elif factory:
            step.writes, step.target, step.overwrites = _storage(out), _Like.of(out), True
        self.steps.append(step)
        self._alive.append((args, kwargs, out))
        return out


def _like(a: Any) -> Any:
    return _Like.of(a) if isinstance(a, torch.Tensor) else a


def _written(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments ``func``'s schema says it writes."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out += [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]
    return out


@dataclass
class InitRecipe:
    """The recorded build: its steps, and for every parameter the steps that give its final
    value (the last overwrite and the in-place steps after it)."""
    steps: list[_Step]
    chains: dict[str, list[int]] = field(default_factory=dict)     # parameter -> step indices

    def replay(self, take: Callable[[str, torch.Tensor], None]) -> int:
        """Run the build's RNG draws in order on CPU, consuming the global generator as the eager
        build did, and call ``take(name, tensor)`` with each parameter's full initial value as
        soon as it is final (the tensor is dropped after the call). Returns the largest number of
        bytes the replay held at once (its own tensors, not what ``take`` keeps)."""
        owner = {i: name for name, idx in self.chains.items() for i in idx}
        last = {idx[-1]: name for name, idx in self.chains.items()}
        live: dict[str, torch.Tensor] = {}
        peak = 0
        for i, step in enumerate(self.steps):
            name = owner.get(i)
            if name is None:
                if step.seeded:                  # a draw whose value nobody keeps: its RNG use
                    scratch = step.run()
                    peak = max(peak, _held(live) + _nbytes(scratch))
                    del scratch
                continue
            live[name] = step.run(live.get(name))
            peak = max(peak, _held(live))
            if i in last:
                take(name, live.pop(name))
        return peak


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _held(live: dict[str, torch.Tensor]) -> int:
    return sum(_nbytes(t) for t in live.values())


def _chains(model: torch.nn.Module, steps: list[_Step]) -> dict[str, list[int]]:
    """Per parameter, the indices of the steps that make its final value; ReplayError for any
    parameter whose value they cannot reproduce."""
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(_storage(p), (name, _Like.of(p)))
    writes: dict[str, list[int]] = {}
    for i, step in enumerate(steps):
        if step.writes in names:
            writes.setdefault(names[step.writes][0], []).append(i)
    chains = {}
    for key, (name, layout) in names.items():
        idx = writes.get(name, [])
        start = max((i for i in idx if steps[i].overwrites), default=None)
        if start is None:
            raise ReplayError(f"parameter {name!r}: the build never gives it a value the replay can "
                              "reproduce (no factory or overwriting in-place op)")
        chain = [i for i in idx if i >= start]
        for i in chain:
            step = steps[i]
            if step.target != layout:
                raise ReplayError(f"parameter {name!r}: {step.func} writes part of it "
                                  f"({step.target} vs {layout}); the replay writes whole tensors")
            if step.has_other_tensors:
                raise ReplayError(f"parameter {name!r}: its value comes from {step.func} with other "
                                  "tensors as inputs, which the replay does not have")
        if steps[start].func in (aten.empty.memory_format, aten.empty_strided.default) and len(chain) == 1:
            raise ReplayError(f"parameter {name!r} is never initialised in the build (torch.empty)")
        chains[name] = chain
    return chains


def record_build(build: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, InitRecipe]:
    """``build()`` run on the meta device, and the recipe that reproduces, from the RNG state at
    this call, the parameters an eager ``build()`` would give. ReplayError names a parameter the
    replay cannot reproduce."""
    recorder = _Recorder()
    with torch.device("meta"), _refuse_meta_no_ops(), recorder:
        model = build()
    return model, InitRecipe(recorder.steps, _chains(model, recorder.steps))


# torch.nn.init functions that return at once on a meta tensor (nothing drawn, nothing to record)
_META_NO_OPS = ("_no_grad_trunc_normal_", "orthogonal_", "sparse_", "dirac_")


@contextlib.contextmanager
def _refuse_meta_no_ops():
    """While recording, those initialisers raise ReplayError instead of silently drawing nothing."""
    import torch.nn.init as init
    saved = {name: getattr(init, name) for name in _META_NO_OPS}

    def refuse(name):
        def call(tensor, *args, **kwargs):
            if tensor.is_meta:
                raise ReplayError(f"torch.nn.init.{name.removeprefix('_no_grad_')} draws nothing on the "
                                  "meta device, so its draws cannot be recorded; write it with in-place "
                                  "ops (uniform_, erfinv_, mul_, ...) or initialise after the build")
            return saved[name](tensor, *args, **kwargs)
        return call

    try:
        for name in _META_NO_OPS:
            setattr(init, name, refuse(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def build_recorded(config: "ModelConfig") -> tuple["Transformer", InitRecipe]:
    """The model of ``config`` on the meta device, and the recipe that reproduces the weights an
    eager ``Transformer(config)`` would get from the current RNG state. Call ``replay`` with the
    RNG where it was when this was called (normally just after ``torch.manual_seed``)."""
    from moelab.model.transformer import Transformer
    return record_build(lambda: Transformer(config))
