"""The one error inspection raises for input a user can fix; the CLI prints it with status 2."""


class InspectError(ValueError):
    """Bad input to ``moelab inspect``: a run that is not MoE, a missing tokenizer, a bad option."""
