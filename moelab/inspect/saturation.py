"""Router saturation (OLMoE, section 5.1): how many of the same tokens' expert choices another
checkpoint already made.

For each MoE layer, over the same N tokens: top-1 saturation is the share of tokens whose first
choice is the same under both checkpoints; top-k saturation is |top-k set here & top-k set there|
/ k averaged over tokens. OLMoE compares each intermediate checkpoint against the final one; the
measure is symmetric, so ``moelab inspect RUN --against RUN/ckpt-00000100`` reads the same either
way round. A checkpoint against itself is 1.0 by construction.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moelab.inspect.errors import InspectError
from moelab.model.transformer import Transformer
from moelab.runfolder import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, checkpoint_run, load


def load_against(path: str | Path, model: Transformer) -> Transformer:
    """The model of a run folder or of one of its ``ckpt-XXXXXXXX`` folders (weights only; the
    config is the parent run's), checked to route like ``model``: same MoE layers, experts, k."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and checkpoint_run(path) is None:
        raise InspectError(f"--against {str(path)!r} is neither a run folder (config.json) nor "
                           f"a checkpoint folder of one (ckpt-XXXXXXXX with {WEIGHTS_FILE})")
    try:
        other = load(path, dtype=torch.float32)
    except CheckpointError as e:
        raise InspectError(f"--against {str(path)!r}: {e}") from None
    a, b = model.config, other.config
    layout_a = [(i, a.experts_in_layer(i)) for i in a.moe_layer_indices()]
    layout_b = [(i, b.experts_in_layer(i)) for i in b.moe_layer_indices()]
    if layout_a != layout_b or a.moe.top_k != b.moe.top_k:
        raise InspectError(f"--against {str(path)!r} routes differently from RUN: MoE layers and "
                           f"experts {layout_b} with top_k {b.moe.top_k} vs {layout_a} with top_k "
                           f"{a.moe.top_k}; compare checkpoints of the same architecture")
    return other.to(next(model.parameters()).device).eval()


def saturation(top1_matches: int, overlap: int, num_tokens: int, top_k: int) -> tuple[float, float]:
    """(top-1 saturation, top-k saturation) from the counts ``collect`` gathered."""
    n = max(num_tokens, 1)
    return top1_matches / n, overlap / (n * top_k)
