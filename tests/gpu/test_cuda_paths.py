"""moelab's CUDA paths, each against its CPU or fp32 reference: bf16 autocast training, FSDP2
mixed precision, nccl expert parallelism, the grouped_mm engine's backward, the compiled decode
step. Marked ``gpu`` and skipped without CUDA; benchmarks/gpu_check.py runs them first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import moelab

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1",
        "model.vocab_size=512", "model.max_seq_len=64", "model.ffn_hidden=128", "model.moe.num_experts=4",
        "model.moe.expert_hidden=64", "train.batch_size=4", "train.seq_len=32", "train.max_steps=4",
        "train.log_every=1", "train.eval_every=100", "train.eval_batches=1", "train.warmup_steps=2",
        "train.min_lr_ratio=1.0", "data.max_bytes=500000"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def _losses(run):
    from moelab.runfolder import load_metrics
    return [r["loss"] for r in load_metrics(run) if r["kind"] == "train"]


def test_bf16_autocast_training_follows_fp32_cpu(tmp_path):
    from moelab.train.trainer import train
    for device in ("cuda", "cpu"):
        train(moelab.resolve_config("mixtral", TINY + [f"train.device={device}"]), tmp_path / device,
              show_progress=False, log=lambda m: None)
    cuda, cpu = _losses(tmp_path / "cuda"), _losses(tmp_path / "cpu")
    assert all(torch.isfinite(torch.tensor(cuda)))
    assert abs(cuda[0] - cpu[0]) < 2e-2 and abs(cuda[-1] - cpu[-1]) < 3e-2, (cuda, cpu)


def test_fsdp_gathers_bf16_parameters_and_reduces_fp32_gradients(monkeypatch):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from moelab.parallel.comm import CommMeter
    from moelab.parallel.fsdp import apply_fsdp
    from moelab.parallel.runtime import Meshes
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        torch.manual_seed(0)
        model = moelab.build("mixtral", TINY).cuda()
        apply_fsdp(model, Meshes(dp=mesh, experts=None, ep=None), torch.device("cuda"), CommMeter())
        seen = []
        model.blocks[0].attn.out.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
        x = torch.randint(0, 512, (2, 16), device="cuda")
        out = model(x, targets=x)
        (out.loss + out.aux_loss).backward()
        assert seen == [torch.bfloat16]
        assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.dtype == torch.float32
                   for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_expert_parallel_equals_one_process(tmp_path):
    args = ["--preset", "mixtral", "--no-progress"] + sum((["--set", s] for s in TINY + ["train.device=cuda"]), [])
    env = {**os.environ}
    one = subprocess.run([sys.executable, "-m", "moelab", "train", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "moelab", "train", *args, "--set", "parallel.ep=2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two")):
        assert abs(a - b) < 2e-2
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_grouped_mm_backward_equals_the_loop_engine(dtype, tol):
    from moelab import MoE
    from moelab.model.moe.engines import HAS_GROUPED_MM
    if not HAS_GROUPED_MM:
        pytest.skip(f"torch {torch.__version__} has no grouped_mm")
    torch.manual_seed(0)
    grouped = MoE(64, 8, 2, 128, backend="grouped_mm").cuda().to(dtype)
    loop = MoE(64, 8, 2, 128, backend="loop").cuda().to(dtype)
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(256, 64, device="cuda", dtype=dtype)
    results = []
    for layer in (grouped, loop):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        (out.output.float().square().sum() + out.aux_loss).backward()
        results.append([out.output, xi.grad, layer.experts.w_gate_up.grad, layer.experts.w_down.grad])
    for a, b in zip(*results):
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()) < tol


def test_compiled_decode_step_gives_the_eager_tokens():
    from moelab.generate import generate
    torch.manual_seed(0)
    model = moelab.build("mixtral", TINY).eval().cuda()
    prompts = torch.randint(0, 512, (1, 8))
    eager = generate(model, prompts, max_new_tokens=24, temperature=0, compile=False).tokens
    compiled = generate(model, prompts, max_new_tokens=24, temperature=0, compile=True).tokens
    assert compiled == eager
