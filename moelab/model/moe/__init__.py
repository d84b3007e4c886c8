"""Mixture-of-experts layer: router, dispatch, grouped experts, balancing losses."""

from moelab.model.moe.layer import MoE, MoEOutput, RouterStats

__all__ = ["MoE", "MoEOutput", "RouterStats"]
