"""Model building blocks: attention, FFN, MoE and the transformer that stacks them."""

from moelab.model.transformer import Cache, ModelOutput, Transformer

__all__ = ["Cache", "ModelOutput", "Transformer"]
