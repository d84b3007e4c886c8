"""Shared pieces of the GGUF / llama.cpp tests: one case per llama.cpp architecture the exporter
writes (a tiny moelab config to train, and a Hugging Face family to import), and the agreement
measurements the issue asks for (next-token logits, greedy tokens, Q8_0 agreement)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from moelab.generate import generate  # noqa: E402
from moelab.interop.gguf import export_gguf  # noqa: E402
from moelab.interop.llamacpp import LlamaCpp  # noqa: E402

TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=512",
        "model.max_seq_len=128", "model.ffn_hidden=128", "train.seq_len=64", "train.batch_size=8",
        "train.max_steps=40", "train.warmup_steps=5", "train.eval_every=1000", "train.save_every=1000",
        "train.log_every=1000", "data.max_bytes=400000", "data.val_fraction=0.3"]
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=64"]


@dataclass(frozen=True)
class Case:
    arch: str                      # the llama.cpp architecture the exporter must choose
    preset: str                    # trained run: preset + overrides
    overrides: tuple[str, ...]
    hf_family: str                 # imported Hugging Face model of the family
    hf_kwargs: dict

    @property
    def hf(self) -> dict:
        """The family's kwargs with room for a 64-token prompt and 32 new tokens."""
        return {"max_position_embeddings": 128, **self.hf_kwargs}


CASES = [
    Case("llama", "dense", ("model.n_kv_heads=2",), "llama",
         dict(num_key_value_heads=2, intermediate_size=80, rope_theta=5e5)),
    Case("llama", "mixtral", tuple(MOE) + ("model.n_kv_heads=2",), "mixtral",
         dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    Case("olmoe", "moe", tuple(MOE) + ("model.qk_norm=full", "model.moe.renormalize=false"), "olmoe",
         dict(num_key_value_heads=4, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
              norm_topk_prob=False)),
    Case("qwen3moe", "moe", tuple(MOE) + ("model.qk_norm=head", "model.n_kv_heads=2"), "qwen3_moe",
         dict(num_key_value_heads=2, head_dim=24, intermediate_size=48, moe_intermediate_size=24,
              num_experts=6, num_experts_per_tok=3, norm_topk_prob=True)),
    Case("qwen2moe", "moe", tuple(MOE) + ("model.moe.num_shared_experts=1", "model.moe.shared_expert_gate=true",
                                          "model.moe.renormalize=false"), "qwen2_moe",
         dict(num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=24,
              shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)),
    Case("deepseek2", "deepseek-v3", ("model.mla.kv_lora_rank=32", "model.mla.q_lora_rank=32",
                                      "model.mla.qk_nope_head_dim=16", "model.mla.qk_rope_head_dim=8",
                                      "model.mla.v_head_dim=16", "model.moe.num_experts=8",
                                      "model.moe.expert_hidden=32", "model.moe.n_groups=4",
                                      "model.moe.topk_groups=2", "model.n_layers=3"), "deepseek_v3",
         dict(num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
              num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1,
              routed_scaling_factor=2.5, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=8, v_head_dim=12, norm_topk_prob=True)),
]
IDS = [f"{c.arch}-{c.preset}" for c in CASES]


def train_run(case: Case, out: Path) -> Path:
    """Train a tiny run folder of ``case`` with the CLI (a few seconds of CPU)."""
    sets = [a for o in (*TINY, *case.overrides) for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "moelab", "train", "--preset", case.preset, *sets,
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------

def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: "within 1e-3 relative" over the whole logit vector."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def moelab_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].float()


def moelab_greedy(model, prompt: list[int], n: int) -> list[int]:
    return generate(model, [prompt], max_new_tokens=n, temperature=0).tokens[0]


def llama_argmax_along(engine: LlamaCpp, prompt: list[int], tokens: list[int]) -> list[int]:
    """llama.cpp's arg-max after ``prompt``, then after each prefix of ``tokens`` (teacher forcing)."""
    out, logits = [], engine.prefill(prompt)
    for i, t in enumerate(tokens):
        out.append(int(logits.argmax()))
        if i < len(tokens) - 1:
            logits = engine.step(t)
    return out


def moelab_argmax_along(model, prompt: list[int], tokens: list[int]) -> list[int]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    return logits.argmax(-1).tolist()


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


@dataclass
class Agreement:
    arch: str
    f32_logits_rel: float          # llama.cpp f32 vs moelab float32, next-token logits
    f32_greedy_equal: bool
    bf16_greedy_equal: bool        # llama.cpp bf16 vs moelab computing the same bf16 weights in float32
    bf16_first_mismatch: int       # -1: none
    bf16_torch_greedy_equal: bool  # vs moelab's own bf16 compute (information: torch rounds more)
    q8_0_agreement: float          # teacher-forced arg-max agreement with moelab float32 greedy tokens
    # teacher-forced arg-max agreement along the text that follows the prompt (real text for a
    # trained run): every position a different context, unlike a tiny model's repetitive greedy output
    bf16_text_agreement: float     # vs moelab float32 on the bf16 weights
    q8_0_text_agreement: float     # vs moelab float32
    # at the first bf16 mismatch (moelab float32 on the bf16 weights): the smallest gap, over MoE
    # layers, between the k-th and (k+1)-th router probability, and the top-2 logit gap over the
    # logit standard deviation; a tiny gap means a near-tie any rounding may flip
    bf16_mismatch_router_gap: float = float("inf")
    bf16_mismatch_logit_gap: float = float("inf")

    @property
    def bf16_mismatch_is_near_tie(self) -> bool:
        # bf16 rounding moves these models' logits by up to ~0.02 standard deviations (measured)
        return self.bf16_mismatch_router_gap < 1e-2 or self.bf16_mismatch_logit_gap < 5e-2


def near_tie_gaps(model, tokens: list[int], position: int) -> tuple[float, float]:
    """(router gap, relative logit gap) of ``model`` predicting ``tokens[position + 1]``."""
    from moelab.model.moe.router import Router
    probs = []
    hooks = [m.register_forward_hook(lambda mod, i, o: probs.append(o.probs_NE.detach()))
             for m in model.modules() if isinstance(m, Router)]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([tokens[:position + 1]])).logits[0, -1].float()
    finally:
        for h in hooks:
            h.remove()
    k = model.config.moe.top_k
    router = min((float(p[position].sort(descending=True).values[k - 1] - p[position].sort(descending=True).values[k])
                  for p in probs if p.shape[-1] > k), default=float("inf"))
    top = logits.topk(2).values
    return router, float((top[0] - top[1]) / logits.std())


def _first_mismatch(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), -1 if len(a) == len(b) else min(len(a), len(b)))


def measure_agreement(model, tokens: list[int], tmp: Path, tokenizer_json=None, n: int = 32) -> Agreement:
    """Export ``model`` (float32) as f32, bf16 and q8_0 and measure llama.cpp against moelab:
    ``tokens`` is a 64-token prompt followed by ``n`` tokens of text to teacher-force along.

    The bf16 file holds the bf16-rounded weights; llama.cpp's bf16 tokens are compared with moelab
    running exactly those weights in float32 (the rounding of the weights is then the same on both
    sides, and what is compared is the computation), and, for information, with moelab's own bf16
    computation (which also rounds activations and the residual stream to bf16)."""
    import copy

    from moelab.quantize import cast_parameters_
    model = model.float().eval()
    ctx = model.config.max_seq_len
    prompt, text = tokens[:-n], tokens[-n:]
    want_logits = moelab_logits(model, prompt)
    want_tokens = moelab_greedy(model, prompt, n)

    f32 = export_gguf(model, tmp / "f32.gguf", type="f32", tokenizer_json=tokenizer_json)
    engine = LlamaCpp(f32.path, ctx, kv_f32=True)
    rel = relative_error(engine.prefill(prompt), want_logits)
    f32_tokens = engine.greedy(prompt, n)
    engine.close()

    bf16_model = cast_parameters_(copy.deepcopy(model), torch.bfloat16)
    bf16_weights_f32 = cast_parameters_(copy.deepcopy(bf16_model), torch.float32)
    bf16_want = moelab_greedy(bf16_weights_f32, prompt, n)
    bf16_torch = moelab_greedy(bf16_model, prompt, n)
    bf16 = export_gguf(bf16_model, tmp / "bf16.gguf", type="bf16", tokenizer_json=tokenizer_json)
    engine = LlamaCpp(bf16.path, ctx)
    bf16_tokens = engine.greedy(prompt, n)
    bf16_text = agreement(llama_argmax_along(engine, prompt, text), moelab_argmax_along(bf16_weights_f32, prompt, text))
    engine.close()

    q8 = export_gguf(model, tmp / "q8_0.gguf", type="q8_0", tokenizer_json=tokenizer_json)
    engine = LlamaCpp(q8.path, ctx)
    agree = agreement(llama_argmax_along(engine, prompt, want_tokens), want_tokens)
    q8_text = agreement(llama_argmax_along(engine, prompt, text), moelab_argmax_along(model, prompt, text))
    engine.close()
    mismatch = _first_mismatch(bf16_tokens, bf16_want)
    gaps = near_tie_gaps(bf16_weights_f32, prompt + bf16_want, len(prompt) - 1 + mismatch) if mismatch >= 0 \
        else (float("inf"), float("inf"))
    return Agreement(f32.arch, rel, f32_tokens == want_tokens, bf16_tokens == bf16_want, mismatch,
                     bf16_tokens == bf16_torch, agree, bf16_text, q8_text, *gaps)
