"""Bundled study files (``moelab studies`` lists them; ``moelab compare --study NAME`` runs one).
Each is data: the models, budgets, seeds and matching of one comparison, the question it asks and
the published claim it tests; the format is described in ``moelab.compare.study``."""
