"""The one error type of Hugging Face interop: bad input or a model a family cannot express."""

from __future__ import annotations


class InteropError(ValueError):
    """A Hugging Face folder, config or model cannot be converted; the message says which field,
    tensor (name and shape) or file, and why. The CLI turns it into exit status 2."""
