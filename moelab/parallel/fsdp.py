"""FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per transformer block, the embeddings,
final norm and LM head in the root unit, and, under expert parallelism, each MoE layer's experts in
a unit of their own on the mesh EP leaves (so expert weights are sharded over ep and FSDP at once).

On CUDA the parameters are all-gathered in bf16 and gradients reduced in fp32; on CPU everything
stays fp32. Gradients are summed, not averaged (see ``moelab.parallel.runtime``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from moelab.parallel.comm import CommMeter, MeteredAllGather, MeteredReduceScatter


def apply_fsdp(model: nn.Module, meshes, device: torch.device, meter: CommMeter) -> nn.Module:
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for block in model.blocks:
        if block.is_moe and meshes.experts is not None:
            fully_shard(block.ffn.experts, mesh=meshes.experts, mp_policy=mp)
        fully_shard(block, mesh=meshes.dp, mp_policy=mp)
    fully_shard(model, mesh=meshes.dp, mp_policy=mp)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # plain sums (no AVG, no pre-multiplied sum, which gloo lacks); the loss is pre-scaled
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
            module.set_custom_all_gather(MeteredAllGather(meter))
            module.set_custom_reduce_scatter(MeteredReduceScatter(meter))
    return model


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """The global gradient norm over every shard, and clipping to ``max_norm``.

    Parameters live on different meshes (dense ones on the data-parallel mesh, expert weights on
    the 2-D ep x FSDP one), and torch's ``clip_grad_norm_`` cannot stack norms across meshes, so
    each mesh's norm is reduced to a plain number first (torchtitan does the same)."""
    from torch.distributed.tensor import DTensor
    groups: dict = {}
    for p in model.parameters():
        if p.grad is not None:
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(id(mesh), []).append(p)
    norms = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0) if norms else torch.zeros(())
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)
