"""`moelab compare`: train Dense, MoE and Hybrid models under one budget and report the numbers.

run.py: the plan, budgets and training runs (resumable); analysis.py: numbers from run folders;
plots.py: the figures; report.py: report.md, results.json and the terminal table.
"""

from moelab.compare.run import DEFAULT_BUDGET, DEFAULT_MODELS, parse_budget, run_compare

__all__ = ["DEFAULT_BUDGET", "DEFAULT_MODELS", "parse_budget", "run_compare"]
