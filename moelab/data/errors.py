"""The one error type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """A corpus, tokenizer or token stream cannot be used as configured.

    The message names the option to change (``data.corpus``, ``data.text_field``,
    ``data.tokenizer``, ``data.max_bytes``, ``model.vocab_size``, ...), so a user can fix the
    config without reading a traceback.
    """
