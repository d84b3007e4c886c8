"""One module per Hugging Face family: its key map and its config mapping, both ways."""

from __future__ import annotations

from types import ModuleType
from typing import Optional

from moelab.config import ModelConfig
from moelab.interop.errors import InteropError
from moelab.interop.families import deepseek_v3, llama, mixtral, olmoe, qwen2_moe, qwen3_moe

# also the order ``family_for`` tries them in: llama for a dense model, then the MoE families
FAMILIES: dict[str, ModuleType] = {
    f.MODEL_TYPE: f for f in (llama, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3)
}


def family_for(m: ModelConfig, prefer: Optional[str] = None) -> str:
    """The first family (``prefer`` first, e.g. the one a run was imported from) whose config
    mapping accepts ``m``; refuses with every family's reason when none does."""
    order = ([prefer] if prefer in FAMILIES else []) + [f for f in FAMILIES if f != prefer]
    reasons = []
    for name in order:
        try:
            FAMILIES[name].model_to_hf(m, [])
            return name
        except InteropError as e:
            reasons.append(f"{name}: {str(e).split(': ', 1)[-1]}")
    raise InteropError("no Hugging Face family can express this model (" + "; ".join(reasons) + ")")


__all__ = ["FAMILIES", "family_for"]
