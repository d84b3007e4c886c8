"""Hugging Face interoperability: import and export Llama, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE
and DeepSeek-V3 checkpoints, and convert live ``transformers`` models both ways.

- ``keymap.py``: the declarative rule engine (our key <-> HF keys + transform);
- ``families/``: one module per family: its key map and config mapping, with refusals;
- ``hf.py``: folder I/O (safetensors, shards, atomic writes) and the public functions.

``transformers`` is needed only for ``to_transformers`` / ``from_transformers``.
"""

from moelab.interop.errors import InteropError
from moelab.interop.hf import export_hf, from_transformers, import_hf, to_transformers

__all__ = ["InteropError", "export_hf", "from_transformers", "import_hf", "to_transformers"]
