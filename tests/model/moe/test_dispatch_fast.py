"""The fused expert path (GroupedExperts.forward_dispatched and its autograd Function) against the
per-token reference and against itself across engines, tilings and combine modes."""

import itertools

import pytest
import torch

from moelab import MoE
from moelab.model.moe import engines as engines_mod
from moelab.model.moe import grouped_swiglu as swiglu_mod
from moelab.model.moe import tiles as tiles_mod
from moelab.model.moe.dispatch import permute, plan_dispatch, unpermute
from moelab.model.moe.engines import choose_engine, grouped_mm_supports
from moelab.model.moe.experts import GroupedExperts
from moelab.model.moe.tiles import Tile, loop_tiles

needs_grouped_mm = pytest.mark.skipif(not swiglu_mod.HAS_GROUPED_MM, reason="torch without grouped_mm")

OPTIONS = [
    dict(),                                                               # dropless softmax top-2
    dict(capacity_factor=0.5),                                            # drops
    dict(capacity_factor=1.0, drop_policy="score", num_shared_experts=1, shared_expert_gate=True),
    dict(router="sigmoid", n_groups=4, topk_groups=2, group_score="top2", routed_scaling=2.5),
    dict(router="softmax", renormalize=False, top_k=1),
]


def _layer(dtype=torch.float64, seed=0, **options):
    torch.manual_seed(seed)
    opts = dict(num_experts=8, top_k=2, expert_hidden=12)
    opts.update(options)
    return MoE(d_model=16, **opts).to(dtype).train()


def _grads(layer, x, out, g):
    return torch.autograd.grad((out * g).sum(), [x] + list(layer.parameters()), allow_unused=True)


def _assert_grads_close(a_list, b_list, **tol):
    for a, b in zip(a_list, b_list):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, **tol)


def _run(layer, x, g):
    out = layer(x).output
    return out, _grads(layer, x, out, g)


@pytest.mark.parametrize("options,tile_rows,deterministic",
                         list(itertools.product(OPTIONS, [1, 5, 10_000], [False, True])))
def test_cpu_engines_match_reference(monkeypatch, options, tile_rows, deterministic):
    """float64, the loop engine at every tiling (one expert per tile, several, all in one) and
    both combines equal the per-token reference, forward and all gradients (router, experts,
    shared, input)."""
    monkeypatch.setattr(tiles_mod, "TILE_ROWS", tile_rows)
    layer = _layer(**options)
    layer.experts.backend, layer.experts.deterministic = "loop", deterministic
    for shape in [(3, 5, 16), (6, 16), (1, 16)]:           # few tokens: some experts get none
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        g = torch.randn(*shape, dtype=torch.float64)
        out, grads = _run(layer, x, g)
        ref = layer.reference_forward(x)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        _assert_grads_close(grads, _grads(layer, x, ref, g), rtol=1e-9, atol=1e-10)


def test_unfused_permute_experts_unpermute_equals_fused():
    """The three-step path expert parallelism will use equals the fused one."""
    layer = _layer(capacity_factor=0.75)
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(20, 16, dtype=torch.float64)
    routing = layer.router(x)
    from moelab.model.moe.router import capacity, capacity_keep_mask
    keep = capacity_keep_mask(routing, 8, capacity(20, 8, 2, 0.75), "position")
    plan = plan_dispatch(routing, 8, keep)
    fused = layer.experts.forward_dispatched(x, plan)
    unfused = unpermute(layer.experts(permute(x, plan), plan.counts_E), plan)
    torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-12)
    params = [x, layer.router.gate, layer.experts.w_gate_up, layer.experts.w_down]
    _assert_grads_close(torch.autograd.grad((fused * g).sum(), params, retain_graph=True),
                        torch.autograd.grad((unfused * g).sum(), params), rtol=1e-10, atol=1e-12)


def test_experts_without_rows_get_exactly_zero_gradient():
    layer = _layer(num_experts=16, top_k=1)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    idle = (out.stats.tokens_per_expert == 0).nonzero().flatten()
    assert idle.numel() >= 13
    out.output.sum().backward()
    assert torch.all(layer.experts.w_gate_up.grad[idle] == 0)
    assert torch.all(layer.experts.w_down.grad[idle] == 0)
    busy = (out.stats.tokens_per_expert > 0).nonzero().flatten()
    assert torch.all(layer.experts.w_down.grad[busy].flatten(1).abs().sum(1) > 0)


def test_every_row_dropped_gives_zero_output_and_gradients():
    layer = _layer(num_experts=4, top_k=1)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    plan = plan_dispatch(layer.router(x), 4, torch.zeros(5, 1, dtype=torch.bool))
    out = layer.experts.forward_dispatched(x, plan)
    assert out.shape == (5, 16) and not out.any()
    out.sum().backward()
    assert not layer.experts.w_gate_up.grad.any() and not x.grad.any()


@needs_grouped_mm
@pytest.mark.parametrize("options", OPTIONS)
def test_grouped_mm_engine_matches_loop_engine(options):
    """grouped_mm has no float64 kernel: compare the two engines in float32 (the CUDA path's
    code, run on CPU)."""
    layer = _layer(dtype=torch.float32, expert_hidden=16, **options)
    x = torch.randn(4, 9, 16, requires_grad=True)
    g = torch.randn(4, 9, 16)
    layer.experts.backend = "loop"
    torch.manual_seed(3)
    out_loop, grads_loop = _run(layer, x, g)
    for deterministic in (False, True):
        layer.experts.backend, layer.experts.deterministic = "grouped_mm", deterministic
        assert choose_engine(layer.experts, x, None) == "grouped_mm"
        torch.manual_seed(3)
        out, grads = _run(layer, x, g)
        torch.testing.assert_close(out, out_loop, rtol=1e-5, atol=1e-6)
        _assert_grads_close(grads, grads_loop, rtol=1e-4, atol=1e-5)


@needs_grouped_mm
def test_grouped_mm_engine_with_idle_experts_and_unfused_path():
    layer = _layer(dtype=torch.float32, num_experts=16, top_k=1, expert_hidden=16)
    layer.experts.backend = "grouped_mm"
    x = torch.randn(3, 16, requires_grad=True)
    out = layer(x)
    idle = (out.stats.tokens_per_expert == 0).nonzero().flatten()
    out.output.sum().backward()
    assert idle.numel() >= 13 and torch.all(layer.experts.w_gate_up.grad[idle] == 0)
    plan = plan_dispatch(layer.router(x), 16)
    y_MD = layer.experts(permute(x, plan), plan.counts_E)
    layer.experts.backend = "loop"
    torch.testing.assert_close(y_MD, layer.experts(permute(x, plan), plan.counts_E))


@needs_grouped_mm
@pytest.mark.parametrize("options", [dict(), dict(router="sigmoid", bias_update_rate=0.001, seq_aux_loss_coef=0.01)])
def test_grouped_mm_dropless_path_never_reads_device_values_on_the_host(monkeypatch, options):
    """On CUDA a host read is a sync; on CPU we catch the reads themselves, and ``bincount``,
    which on CUDA reads the largest id back to size its output."""
    layer = _layer(dtype=torch.float32, expert_hidden=16, **options)
    layer.experts.backend = "grouped_mm"
    x = torch.randn(2, 7, 16, requires_grad=True)

    def host_read(*args, **kwargs):
        raise AssertionError("host read in the dropless grouped_mm path")

    with monkeypatch.context() as m:
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            m.setattr(torch.Tensor, name, host_read)
        m.setattr(torch, "bincount", host_read)
        out = layer(x)
        torch.autograd.backward([out.output, out.aux_loss], [torch.ones_like(out.output), torch.ones(())])


@needs_grouped_mm
def test_bf16_autocast_runs_grouped_engine_close_to_fp32():
    layer = _layer(dtype=torch.float32, expert_hidden=16)
    x = torch.randn(32, 16)
    ref = layer(x).output
    layer.experts.backend = "grouped_mm"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x).output
    out.float().sum().backward()
    assert layer.experts.w_gate_up.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.02)


def test_loop_tiles_cut_whole_experts_and_skip_empty_ones():
    counts = torch.tensor([3, 0, 2, 6, 0, 1])
    tiles = loop_tiles(counts, rows=5)
    assert [(t.start, t.end, t.segments) for t in tiles] == [
        (0, 5, [(0, 0, 3), (2, 3, 5)]),
        (5, 11, [(3, 0, 6)]),                 # one expert over the budget gets its own tile
        (11, 12, [(5, 0, 1)]),
    ]
    assert loop_tiles(torch.zeros(4, dtype=torch.long)) == []
    assert isinstance(tiles[0], Tile)


@needs_grouped_mm
def test_cpu_auto_engine_uses_grouped_mm_only_for_small_gradient_free_batches():
    """Inference with a few rows per expert runs grouped_mm (faster there, see
    ``engines.choose_engine``) and gives the loop engine's outputs; training and single tokens
    keep the loop."""
    layer = _layer(dtype=torch.float32, num_experts=8, top_k=2, expert_hidden=16)
    experts = layer.experts
    x = torch.randn(20, 16)
    assert experts.backend == "auto"
    with torch.no_grad():
        assert choose_engine(experts, x, 40) == "grouped_mm"      # 5 rows per expert
        assert choose_engine(experts, x, 2) == "loop"             # one token: 2 of 8 experts
        assert choose_engine(experts, x, 8 * 33) == "loop"        # many rows per expert
        out_auto = layer(x).output
        experts.backend = "loop"
        out_loop = layer(x).output
    torch.testing.assert_close(out_auto, out_loop, rtol=1e-5, atol=1e-6)
    experts.backend = "auto"
    assert choose_engine(experts, x, 40) == "loop"                # gradients: the loop


def test_backend_choice_and_fallbacks(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        GroupedExperts(4, 16, 16, backend="triton")
    experts = GroupedExperts(4, 16, 12, backend="grouped_mm")
    x64 = torch.zeros(2, 16, dtype=torch.float64)
    assert choose_engine(experts, x64, None) == "loop"             # no float64 kernel
    assert engines_mod.default_backend(torch.device("cpu")) == "loop"
    assert not grouped_mm_supports(torch.float32, 16, 6)           # 24-byte strides
    assert not grouped_mm_supports(torch.bfloat16, 16, 12)
    # a torch build without any grouped_mm (torch 2.9 CPU wheels may lack F.grouped_mm)
    monkeypatch.setattr(engines_mod, "HAS_GROUPED_MM", False)
    monkeypatch.setattr(swiglu_mod, "_GROUPED_MM", None)
    assert engines_mod.default_backend(torch.device("cuda")) == "loop"
    assert choose_engine(experts, torch.zeros(2, 16), None) == "loop"


@pytest.mark.parametrize("extra", [dict(), dict(capacity_factor=0.5), dict(num_shared_experts=1)])
def test_threaded_groups_match_reference_and_are_deterministic(monkeypatch, extra):
    """The loop engine's tiles split over worker threads (forced here at any size) give the
    per-token reference's outputs and gradients, and the same bits on every run."""
    monkeypatch.setattr(tiles_mod, "PARALLEL_MIN_EXPERTS", 2)
    monkeypatch.setattr(tiles_mod, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(tiles_mod, "TILE_ROWS", 8)          # many tiles, several per thread
    torch.set_num_threads(2)
    torch.manual_seed(0)
    layer = MoE(d_model=16, num_experts=8, top_k=2, expert_hidden=12, **extra).double().train()
    x = torch.randn(5, 9, 16, dtype=torch.float64, requires_grad=True)
    assert len(tiles_mod.thread_groups(tiles_mod.loop_tiles(torch.tensor([30] * 8)), x, 12)) == 2
    torch.manual_seed(1)
    out = layer(x).output
    torch.manual_seed(1)
    ref = layer.reference_forward(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad((out * g).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.manual_seed(1)
    again = layer(x).output
    assert torch.equal(again, out)
    assert torch.get_num_threads() == 2                          # restored after the workers
