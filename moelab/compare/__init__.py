"""`moelab compare`: train Dense, MoE and Hybrid models at matched sizes, over several seeds and
budgets, and report what the numbers support.

plan.py: units (model, seed, budget) and the plan file; matching.py: sizing models to equal
parameter counts; run.py: training the units (resumable); measure.py: validation losses per batch
and inference on the trained weights; analysis.py: numbers from run folders, summarised over
seeds; stats.py: the verdict rule; scaling.py: loss-vs-tokens fits and crossovers; findings.py:
the sentences; plots.py: the figures; report.py: report.md, results.json and the terminal tables.
"""

from moelab.compare.plan import (
    DEFAULT_BUDGET, DEFAULT_MATCH, DEFAULT_MODELS, DEFAULT_SEEDS, parse_budget, parse_budgets,
)

__all__ = ["DEFAULT_BUDGET", "DEFAULT_MATCH", "DEFAULT_MODELS", "DEFAULT_SEEDS", "parse_budget",
           "parse_budgets"]
