"""One module per Hugging Face family: its key map and its config mapping, both ways."""

from __future__ import annotations

from types import ModuleType

from moelab.interop.families import deepseek_v3, llama, mixtral, olmoe, qwen2_moe, qwen3_moe

FAMILIES: dict[str, ModuleType] = {
    f.MODEL_TYPE: f for f in (llama, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3)
}

__all__ = ["FAMILIES"]
