"""`moelab search`: which layers are MoE and how big their experts are, searched with Optuna under a
fixed active-parameter budget (the neural-architecture-search question behind "Hybrid-MoE").

space.py: the search space, its TOML file and the names Optuna sees; candidate.py: a point of the
space as a model config sized to the budget, and the fixed patterns it is judged against;
tomlfile.py: a config written back as TOML; trialrun.py: one trial's training processes, followed
through metrics.jsonl and stopped when pruned; objective.py: one Optuna trial end to end; study.py:
settings, storage, sampler, pruner and the worker loop (resume, several workers on one storage);
driver.py: one worker from its settings to its report (``run_search``, ``write_report``); retrain.py: the best pattern and the fixed ones retrained over seeds by `moelab compare`'s own
code; findings.py, plots.py, report.py: report.md, results.json and the figures.

Optuna is an optional dependency (the ``search`` extra); :func:`require_optuna` says how to install it.
"""

from __future__ import annotations

EXTRA = "search"
INSTALL_HINT = (f"moelab search needs Optuna, an optional dependency: install the '{EXTRA}' extra "
                f"with pip install \"moelab[{EXTRA}]\" (from a checkout: pip install -e \".[{EXTRA}]\")")


def require_optuna():
    """The optuna module, or a UserError (exit status 2) that names the extra to install."""
    try:
        import optuna
    except ImportError:
        from moelab.commands import raise_user
        raise_user(INSTALL_HINT)
    optuna.logging.set_verbosity(optuna.logging.WARNING)     # moelab prints its own lines
    return optuna
