"""Parameter counts of real Hugging Face configs, without building anything.

The config.json files under hf_configs/ are the released ones (DeepSeek-V3, Mixtral-8x7B-v0.1,
Qwen3-30B-A3B, OLMoE-1B-7B-0924, Meta-Llama-3-8B), written out from the published values.
EXACT holds the parameter counts transformers 5.24 gives for them (``sum(p.numel())`` of
``AutoModelForCausalLM.from_config`` on the meta device; ``test_counts_equal_transformers``
recomputes them on layer-reduced copies); PUBLISHED holds the figures the model cards and papers
quote.
"""

import copy
import json
from decimal import Decimal
from pathlib import Path

import pytest
import torch

import moelab
from moelab.accounting import param_counts
from moelab.interop.errors import InteropError
from moelab.plan import count, load_hf, source_from_hf

CONFIGS = Path(__file__).parent / "hf_configs"

EXACT = {   # (total, active) from transformers on the meta device
    "deepseek-v3": (671_026_404_352, 37_552_282_624),
    "mixtral-8x7b": (46_702_792_704, 12_879_925_248),
    "qwen3-30b-a3b": (30_532_122_624, 3_353_032_704),
    "olmoe-1b-7b-0924": (6_919_161_856, 1_282_017_280),
    "llama-3-8b": (8_030_261_248, 8_030_261_248),
}
PUBLISHED = {   # (total, active) as quoted, in billions
    "deepseek-v3": ("671", "37"),          # DeepSeek-V3 technical report, without the MTP module
    "mixtral-8x7b": ("46.7", "12.9"),      # Mixtral of Experts / model card
    "qwen3-30b-a3b": ("30.5", "3.3"),      # Qwen3 model card
    "olmoe-1b-7b-0924": ("6.9", "1.3"),    # OLMoE paper
    "llama-3-8b": ("8.0", "8.0"),          # Llama 3 model card
}


def quoted_as(n: int, text: str) -> bool:
    """A quoted figure is the count rounded or truncated to the digits shown."""
    q = Decimal(text)
    unit = Decimal(1).scaleb(q.as_tuple().exponent)
    x = Decimal(n) / Decimal(10**9)
    return abs(x - q) <= unit / 2 or q <= x < q + unit


@pytest.mark.parametrize("name", sorted(EXACT))
def test_counts_are_exact_and_match_published_figures(name):
    src = load_hf(CONFIGS / name)
    c = count(src.config.model, 4096, src.mtp_layers)
    assert (c.total_params, c.active_params) == EXACT[name]
    total, active = PUBLISHED[name]
    assert quoted_as(c.total_params, total) and quoted_as(c.active_params, active)
    assert c.embedding_params == src.config.model.vocab_size * src.config.model.d_model == c.head_params
    assert sum(u.params + u.routed for u in c.units) == c.total_params


def test_quoted_as_can_fail():
    assert quoted_as(37_552_282_624, "37") and not quoted_as(37_552_282_624, "36")
    assert not quoted_as(12_879_925_248, "12.7")


def test_deepseek_v3_fp8_and_mtp_are_noted_not_fatal():
    data = json.loads((CONFIGS / "deepseek-v3" / "config.json").read_text())
    with pytest.raises(InteropError, match="quantization_config"):
        from moelab.interop.hf import config_from_hf
        config_from_hf(data)                            # the importer refuses an fp8 checkpoint
    src = source_from_hf(data, "deepseek-v3")
    assert any("quantization_config" in n for n in src.notes)
    assert any("num_nextn_predict_layers" in n for n in src.notes)
    c = count(src.config.model, 4096, src.mtp_layers)
    # the MTP module: one more MoE block + a 2D -> D projection + 3 norms (HF quotes 685B with it
    # and its copies of the embedding and head)
    assert 684e9 < c.total_params + c.mtp_params + 2 * c.embedding_params < 685.5e9


def test_refused_rope_variant_is_ignored_but_a_bias_is_not():
    data = json.loads((CONFIGS / "llama-3-8b" / "config.json").read_text())
    plain = count(source_from_hf(data).config.model, 4096)
    dynamic = copy.deepcopy(data)
    dynamic["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    src = source_from_hf(dynamic)
    assert any("rope_scaling" in n for n in src.notes)
    assert count(src.config.model, 4096).total_params == plain.total_params
    biased = copy.deepcopy(data)
    biased["attention_bias"] = True
    with pytest.raises(InteropError, match="attention_bias.*parameter count"):
        source_from_hf(biased)


@pytest.mark.parametrize("preset", ["dense", "mixtral", "deepseek-v3", "hybrid", "pr-moe"])
def test_counts_equal_the_built_model(preset):
    model = moelab.build(preset)
    c = count(model.config, 64)
    assert c.total_params == sum(p.numel() for p in model.parameters())
    assert c.active_params == param_counts(model.config)["active"]
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "shared" not in n)
    assert c.routed_expert_params == routed


@pytest.mark.slow   # transformers' first model build costs ~8 s of lazy imports (shared with tests/interop)
@pytest.mark.parametrize("name", sorted(EXACT))
def test_counts_equal_transformers(name):
    transformers = pytest.importorskip("transformers")
    data = json.loads((CONFIGS / name / "config.json").read_text())
    data["num_hidden_layers"] = 4 if name == "deepseek-v3" else 2      # 3 dense + 1 MoE for V3
    ours = count(source_from_hf(dict(data)).config.model, 4096).total_params
    data = {k: v for k, v in data.items() if k not in ("quantization_config", "auto_map")}
    cfg = transformers.AutoConfig.for_model(**data)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
    assert ours == sum(p.numel() for p in hf.parameters())
