"""Routing analytics over a run folder: which experts are used, what each specialises in, which
ones matter, and how routing settles. ``moelab inspect RUN`` is the command; in Python::

    from moelab.inspect import InspectOptions, inspect_run, summary
    result = inspect_run("runs/moe", InspectOptions(tokens=65536))   # what inspect.json holds
    s = summary("runs/moe")                                           # short, for reports

Modules, one concern each: ``source`` (tokens and their categories), ``categories`` (Python
``tokenize`` labels, or file / folder / field), ``collect`` (one streaming pass), ``load``,
``coactivation``, ``specialization``, ``ablation``, ``saturation``, ``trace``, ``analyze`` (the
pipeline), ``summary``, ``plots`` and ``report`` (files and console).
"""

from moelab.inspect.analyze import InspectOptions, inspect_run
from moelab.inspect.errors import InspectError
from moelab.inspect.summary import summarize, summary, summary_markdown

__all__ = ["InspectError", "InspectOptions", "inspect_run", "summarize", "summary", "summary_markdown"]
