"""llama.cpp against moelab, measured, for every architecture the GGUF exporter writes, on an
imported Hugging Face model of the family (fast) and on a tiny trained run folder (slow):

- f32 GGUF: next-token logits of a 64-token prompt within 1e-3 relative (max abs difference over
  max abs logit) of moelab's float32 logits, and the same 32 greedy tokens;
- bf16 GGUF: the same 32 greedy tokens as moelab running the same bf16 weights;
- Q8_0 GGUF: llama.cpp's arg-max equals moelab's float32 greedy token at >= 90% of 32 positions
  (teacher-forced on moelab's tokens, so one early difference is not counted 32 times).

A tiny trained model's greedy continuation repeats a few tokens, which proves little, so the
arg-max is also compared along the 32 tokens of text that follow the prompt (bf16 and Q8_0, each
position a new context), and must agree at >= 90% of them as well.

The imported Hugging Face models have random weights (no download), whose logits and router
scores are much flatter than a trained model's: there a bf16 run may take the other side of a
near-tie (two experts' router probabilities within 1e-2, or two logits within 5e-2 standard
deviations, below what bf16 rounding moves them; measured, e.g. qwen2_moe: 4e-4 between the 2nd
and 3rd expert), and Q8_0 flips more
near-ties (measured 0.78-1.0 over the six families). For them a bf16 difference must be such a
measured near-tie, and Q8_0 must agree at >= 75%; the issue's exact criteria are asserted on the
trained run folders (docs/inference.md has the measured table).
"""

import pytest
import torch

from gguf_cases import CASES, IDS, measure_agreement, train_run

from hf_models import hf_model

import moelab
from moelab.interop import from_transformers
from moelab.interop.gguf import convert_to_gguf, export_gguf, load_source

PROMPT, NEW = 64, 32


def _check(result, random_weights: bool = False):
    assert result.f32_logits_rel < 1e-3, result
    assert result.f32_greedy_equal, result
    assert result.bf16_text_agreement >= 0.9, result
    if random_weights:
        assert result.bf16_greedy_equal or result.bf16_mismatch_is_near_tie, result
        assert min(result.q8_0_agreement, result.q8_0_text_agreement) >= 0.75, result
    else:
        assert result.bf16_greedy_equal, result
        assert min(result.q8_0_agreement, result.q8_0_text_agreement) >= 0.9, result


# two cases in the fast set (MoE expert stacking; MLA, groups and the selection bias), all in CI
FAST = ("llama-mixtral", "deepseek2-deepseek-v3")
HF_CASES = [pytest.param(c, id=i, marks=() if i in FAST else pytest.mark.slow) for c, i in zip(CASES, IDS)]


@pytest.mark.parametrize("case", HF_CASES)
def test_imported_hf_model(case, tmp_path):
    hf = hf_model(case.hf_family, case.hf)
    hf.save_pretrained(tmp_path / "hf")
    model, _, kind = load_source(tmp_path / "hf")            # the exporter's own HF reading
    assert kind == "hf"
    ref = from_transformers(hf)                               # the same weights, through transformers
    x = torch.randint(0, 96, (1, 8))
    assert torch.allclose(model(x).logits, ref(x).logits, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, hf.config.vocab_size, (PROMPT + NEW,), generator=g).tolist()
    result = measure_agreement(model, tokens, tmp_path, n=NEW)
    assert result.arch == case.arch
    _check(result, random_weights=True)


@pytest.mark.parametrize("preset,extra", [("dense", ["model.attn_bias=true", "model.n_kv_heads=2"]),
                                          ("moe", ["model.attn_bias=true", "model.moe.num_shared_experts=1",
                                                   "model.moe.shared_expert_gate=true", "model.moe.renormalize=false"])])
def test_qkv_biases(preset, extra, tmp_path):
    """q/k/v biases: permuted with their rows into llama's RoPE pair layout (NEOX qwen2moe: as they are)."""
    torch.manual_seed(0)
    model = moelab.build(preset, ["model.vocab_size=128", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                                  "model.ffn_hidden=96", "model.moe.num_experts=4", "model.moe.expert_hidden=32",
                                  *extra])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qkv.bias"):
                p.normal_(std=0.5)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (PROMPT + NEW,), generator=g).tolist()
    result = measure_agreement(model, tokens, tmp_path, n=NEW)
    assert result.f32_logits_rel < 1e-3 and result.f32_greedy_equal, result


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_linear_rope_scaling(family, tmp_path):
    """RoPE position interpolation (model.rope_scaling.kind = "linear") as llama.cpp's rope scale."""
    extra = dict(num_local_experts=4, num_experts_per_tok=2) if family == "mixtral" else {}
    hf = hf_model(family, dict(num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                               rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=4.0), **extra))
    hf.save_pretrained(tmp_path / "hf")
    model, _, _ = load_source(tmp_path / "hf")
    assert model.config.rope_scaling.kind == "linear"
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, hf.config.vocab_size, (PROMPT + NEW,), generator=g).tolist()
    _check(measure_agreement(model, tokens, tmp_path, n=NEW), random_weights=True)


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    return {i: train_run(c, root / i) for c, i in zip(CASES, IDS)}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trained_run_folder(case, trained_runs, tmp_path):
    from tokenizers import Tokenizer
    run = trained_runs[f"{case.arch}-{case.preset}"]
    model = moelab.load(run)
    tok_json = (run / "tokenizer.json").read_text()
    text = (moelab.__file__.rsplit("/", 1)[0] + "/generate.py")
    ids = Tokenizer.from_str(tok_json).encode(open(text).read()).ids[:PROMPT + NEW]   # real text
    result = measure_agreement(model, ids, tmp_path, tokenizer_json=tok_json, n=NEW)
    assert result.arch == case.arch
    _check(result)
    # the folder path (what `moelab convert --to-gguf` runs) writes the same file as the live model
    done = convert_to_gguf(run, tmp_path / "cli.gguf", "f32")
    live = export_gguf(model, tmp_path / "live.gguf", type="f32", tokenizer_json=tok_json, name=run.name)
    assert done.arch == case.arch and done.path.read_bytes() == live.path.read_bytes()
