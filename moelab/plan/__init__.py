"""`moelab plan`: Dense vs MoE vs Hybrid at the user's scale, on paper, before a GPU is rented.

Parameters, FLOPs, memory per GPU, all-to-all and FSDP bytes and an estimated step time for every
FSDP2 x expert-parallel layout moelab can run on N GPUs, from the config alone (nothing is built),
and ``predict`` for the one layout a real run uses. Formulas and sources: docs/plan.md.
"""

from moelab.plan.counts import ModelCounts, count
from moelab.plan.inputs import Hardware, Layout, Workload
from moelab.plan.planner import LayoutPlan, Plan, Prediction, evaluate, plan, predict
from moelab.plan.source import ModelSource, load_hf, load_source, source_from_hf

__all__ = ["Hardware", "Layout", "LayoutPlan", "ModelCounts", "ModelSource", "Plan", "Prediction", "Workload",
           "count", "evaluate", "load_hf", "load_source", "plan", "predict", "source_from_hf"]
