"""The planner's formulas: all-to-all volumes (the issue's definition), FSDP volumes, memory terms,
layout rules and the step-time model, checked against hand computation."""

import dataclasses
from pathlib import Path

import pytest

import moelab
from moelab.config import ConfigError
from moelab.plan import Hardware, Layout, Workload, count, evaluate, load_hf, load_source, plan, predict
from moelab.plan.layouts import divisors, valid_ep

CONFIGS = Path(__file__).parent / "hf_configs"
GiB = 2**30


@pytest.fixture(scope="module")
def v3():
    return load_hf(CONFIGS / "deepseek-v3")


@pytest.fixture(scope="module")
def mixtral():
    return load_hf(CONFIGS / "mixtral-8x7b")


def test_alltoall_bytes_follow_the_issue_definition(mixtral):
    hw = Hardware(gpus=64, gpu_memory=80 * GiB)
    wl = Workload(seq_len=4096, global_batch_tokens=4e6, dtype="bf16")
    p = plan(mixtral, hw, wl)
    T, k, D = 4e6 / 64, 2, 4096
    for lp in p.layouts:
        e = lp.layout.ep
        assert lp.alltoall.bytes_per_layer == pytest.approx(2 * T * k * D * 2 * (e - 1) / e)
        assert lp.alltoall.bytes_per_layer_with_local == pytest.approx(2 * T * k * D * 2 if e > 1 else 0)
        a = lp.alltoall
        assert a.intra_node_bytes_per_layer + a.inter_node_bytes_per_layer == pytest.approx(a.bytes_per_layer)
        exchanges = 3 if lp.layout.activation_checkpointing else 2       # fwd + bwd (+ recompute)
        assert a.bytes_per_step == pytest.approx(a.bytes_per_layer * 32 * exchanges)
    assert {lp.layout.ep for lp in p.layouts} == {1, 2, 4, 8}          # ep divides the 8 experts
    d = p.to_dict()
    assert {"dp_shard", "ep", "memory_bytes_per_gpu", "fits", "alltoall_bytes_per_layer_per_gpu"} <= set(d["layouts"][0])


def test_node_limited_routing_halves_deepseek_v3_network_bytes(v3):
    hw = Hardware(gpus=64, gpu_memory=80 * GiB, gpus_per_node=8)
    wl = Workload(seq_len=4096, global_batch_tokens=64 * 4096)
    lp = evaluate(v3.config.model, count(v3.config.model, 4096), Layout(dp_shard=64, ep=64), hw, wl)
    T, D = 4096, 7168
    # 8 of 64 ranks share a node: 56/64 of each token's 8 rows cross the network
    assert lp.alltoall.inter_node_bytes_per_layer == pytest.approx(2 * T * 8 * D * 2 * 56 / 64)
    # 8 groups on 8 nodes, 4 chosen: a token reaches 7 * (1 - C(7,4)/C(8,4)) = 3.5 remote nodes
    assert lp.alltoall.inter_node_bytes_per_layer_once_per_node == pytest.approx(2 * T * D * 2 * 3.5)


def test_fsdp_volumes_and_expert_sharding(mixtral):
    m = mixtral.config.model
    c = count(m, 4096)
    hw = Hardware(gpus=8, gpu_memory=80 * GiB)
    wl = Workload(seq_len=4096, global_batch_tokens=8 * 4096)
    one = evaluate(m, c, Layout(dp_shard=8, ep=1), hw, wl)
    # ring all-gather in bf16 (blocks for the forward and the backward, the root once) and
    # reduce-scatter in fp32, 7/8 of the full size each
    root = c.units[0].params
    assert root == 2 * 32000 * 4096 + 4096
    assert one.collectives.allgather_bytes == pytest.approx((2 * c.total_params - root) * 2 * 7 / 8)
    assert one.collectives.reduce_scatter_bytes == pytest.approx(c.total_params * 4 * 7 / 8)
    ep8 = evaluate(m, c, Layout(dp_shard=8, ep=8), hw, wl)
    # ep = dp_shard: each rank owns its experts whole; only the rest is gathered
    assert ep8.collectives.allgather_bytes == pytest.approx((2 * c.non_expert_params - root) * 2 * 7 / 8)
    # the model states are divided by dp_shard either way; EP shrinks the unsharded unit
    assert ep8.memory.params == one.memory.params == -(-c.total_params * 4 // 8)
    assert ep8.memory.optimizer == 2 * ep8.memory.params
    assert ep8.memory.gathered < one.memory.gathered / 4
    assert ep8.memory.alltoall_buffers > 0 == one.memory.alltoall_buffers


def test_checkpointing_and_micro_batch_move_activation_memory(mixtral):
    m = mixtral.config.model
    c = count(m, 4096)
    hw = Hardware(gpus=8, gpu_memory=80 * GiB)
    wl = Workload(seq_len=4096, global_batch_tokens=64 * 4096)
    off = evaluate(m, c, Layout(dp_shard=8, micro_batch=2), hw, wl)
    on = evaluate(m, c, Layout(dp_shard=8, micro_batch=2, activation_checkpointing=True), hw, wl)
    small = evaluate(m, c, Layout(dp_shard=8, micro_batch=1), hw, wl)
    assert on.memory.activations < off.memory.activations / 10
    assert small.memory.activations * 2 == off.memory.activations
    assert (off.grad_accum, small.grad_accum) == (4, 8)
    assert on.time.compute_s == pytest.approx(off.time.compute_s * 4 / 3)      # recomputed forward


def test_single_gpu_dense_step_is_pure_compute():
    src = load_source("dense")
    hw = Hardware(gpus=1, gpu_memory=80 * GiB, compute_efficiency=0.4)
    p = plan(src, hw, Workload(seq_len=256, global_batch_tokens=2**16, dtype="fp32"))
    c = p.counts
    for lp in p.layouts:
        assert lp.memory.gathered == 0                     # fp32, one rank: nothing to gather
        assert lp.collectives.bytes_per_step == 0 and lp.alltoall.bytes_per_layer == 0
        if not lp.layout.activation_checkpointing:
            assert lp.time.step_s == pytest.approx(3 * c.forward_flops_per_token * 2**16 / (989e12 * 0.4))
            assert lp.time.mfu == pytest.approx(0.4)
    assert p.best is not None and not p.best.layout.activation_checkpointing


def test_layout_rules():
    cfg = moelab.resolve_config("deepseek-v3").model        # 16 experts
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert valid_ep(cfg, 12) == [1, 2, 4]
    dense = moelab.resolve_config("dense").model
    assert valid_ep(dense, 8) == [1]
    p = plan(load_source("deepseek-v3"), Hardware(gpus=6, gpu_memory=80 * GiB),
             Workload(seq_len=256, global_batch_tokens=6 * 256))
    assert {(lp.layout.dp_shard, lp.layout.ep) for lp in p.layouts} == {
        (1, 1), (2, 1), (2, 2), (3, 1), (6, 1), (6, 2)}
    assert all(lp.layout.world == 6 for lp in p.layouts)


def test_nothing_fits_on_a_tiny_gpu(v3):
    p = plan(v3, Hardware(gpus=8, gpu_memory=80 * GiB), Workload())
    assert p.best is None and p.to_dict()["best_layout"] is None
    assert all(lp.overflow_bytes > 0 for lp in p.layouts)
    assert p.smallest.overflow_parts()[0][0] in ("optimizer", "params")


def test_predict_matches_the_logged_formula():
    cfg = moelab.resolve_config("mixtral", ["parallel.ep=2", "train.batch_size=4", "train.seq_len=32",
                                            "train.grad_accum=3", "model.moe.top_k=2"])
    pr = predict(cfg, 2)
    m = cfg.model
    # 2 (fwd + bwd) x MoE layers x grad_accum x [2 x T_local_micro x k x d_model x 4]
    expected = 2 * m.n_layers * 3 * (2 * (4 * 32 // 2) * 2 * m.d_model * 4)
    assert pr.alltoall_bytes_with_local_per_rank == [expected, expected]
    assert pr.alltoall_bytes_per_rank == [expected // 2] * 2
    assert pr.exact_alltoall and pr.layout == Layout(dp_shard=2, ep=2, micro_batch=2)
    assert pr.memory_bytes_per_rank[0] == pr.memory.total > 0
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=3))
    with pytest.raises(ConfigError, match="train.batch_size"):
        predict(bad, 2)
    with pytest.raises(ConfigError, match="parallel.ep"):
        predict(cfg.with_overrides(["parallel.ep=3"]), 3)
