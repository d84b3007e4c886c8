"""Hugging Face interoperability: import and export Llama, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE
and DeepSeek-V3 checkpoints, and convert live ``transformers`` models both ways.

- ``keymap.py``: the declarative rule engine (our key <-> HF keys + transform);
- ``families/``: one module per family: its key map and config mapping, with refusals;
- ``hf.py``: configs, checkpoint reading and live models; ``folders.py``: run folder <-> HF
  folder files (shards, atomic writes).

``transformers`` is needed only for ``to_transformers`` / ``from_transformers``.
"""

from moelab.interop.errors import InteropError
from moelab.interop.folders import export_hf, import_hf
from moelab.interop.hf import from_transformers, to_transformers

__all__ = ["InteropError", "export_hf", "from_transformers", "import_hf", "to_transformers"]
