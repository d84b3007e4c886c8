"""Inference weight formats: bf16 and int8 weight-only generation against float32, weight bytes,
loading straight into a dtype, and the errors for bad --dtype / --quantize.

Agreement with float32 is checked on a small model trained on real text (three modules of the
``json`` package's source), because a random model's next-token logits are near ties everywhere
and any rounding flips its arg-max. The tolerance: bf16 and int8 perturb a position's logits by
about 0.5% of their norm (measured; the test allows a median of 2% and a tenth of the positions
above 5%, since a token whose router scores nearly tie can change experts), so the arg-max can change only where float32's top-2
margin is small. Along float32's own greedy continuation (teacher-forced, so every position sees
the same prefix) every position whose float32 margin exceeds ``MARGIN`` logits (10x the typical
largest change) must pick the same token; free-running bf16/int8 generation must equal float32's
up to the first position below that margin. After it the sequences may diverge for good, because
every later step conditions on the different token: that is expected, not a defect.
"""

import copy
import inspect
import json
import json.decoder
import json.encoder
import json.scanner
import sys

import pytest
import torch

import moelab
from moelab.cli import main
from moelab.generate import generate
from moelab.model.weights import build_on_meta, materialize
from moelab.quantize import Int8Experts, Int8Linear, QuantizeError, prepare, quantize_rows, weight_bytes
from moelab.runfolder import load

torchao = pytest.importorskip("torchao", reason="int8 needs the quant extra (torchao)")

MARGIN = 1.0              # logit units; see the module docstring
TINY = ["model.n_layers=2", "model.d_model=64", "model.vocab_size=512", "model.max_seq_len=128",
        "model.ffn_hidden=96", "model.moe.expert_hidden=64", "model.n_heads=4", "model.n_kv_heads=2"]


@pytest.fixture(scope="module")
def corpus():
    from moelab.data.tokenizer import train_bpe
    text = "".join(inspect.getsource(m) for m in (json.decoder, json.encoder, json.scanner))
    return text, train_bpe([text], 512)


@pytest.fixture(scope="module")
def trained(corpus):
    """A 2-layer, 8-expert top-2 MoE trained for 150 steps on the corpus (about 5 s on 2 idle
    cores: the one slow fixture here, shared by the module): confident enough for the comparisons
    to mean something."""
    text, tok = corpus
    ids = torch.tensor(tok.encode(text).ids)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = moelab.build("mixtral", TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    T, B = 32, 16
    for _ in range(150):
        starts = torch.randint(0, len(ids) - T - 1, (B,), generator=g)
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        out = model(x, targets=y)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert out.loss.item() < 3.0, "the fixture model did not learn"
    return model.eval()


def _prompts(corpus) -> list[list[int]]:
    text, tok = corpus
    return [tok.encode(text[i:i + 60]).ids[:12] for i in (150, 2500, 6000, 9500)]


@torch.inference_mode()
def _teacher_forced(model, seq: list[int]) -> torch.Tensor:
    return model(torch.tensor([seq])).logits[0].float()                     # (T, V)


@pytest.mark.parametrize("dtype,quantize", [("bfloat16", None), ("bfloat16", "int8")])
def test_bf16_and_int8_agree_with_float32_greedy(trained, corpus, dtype, quantize):
    prompts = _prompts(corpus)
    ref = generate(trained, prompts, max_new_tokens=16, temperature=0).tokens
    low = prepare(copy.deepcopy(trained), dtype, quantize)
    got = generate(low, prompts, max_new_tokens=16, temperature=0).tokens
    confident_steps = 0
    for prompt, ref_row, got_row in zip(prompts, ref, got):
        seq = prompt + ref_row
        ref_logits, low_logits = _teacher_forced(trained, seq), _teacher_forced(low, seq)
        # the logits move by a small fraction of their size at almost every position; where a
        # token's router scores nearly tie, rounding can send it to another expert and move that
        # position's logits by far more (a router's discontinuity, not an error: measured once at
        # 30% of the norm, at one position of 28, when the other positions moved 0.2-1.5%)
        moved = (low_logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)    # (T,)
        assert moved.median() < 0.02 and (moved > 0.05).float().mean() <= 0.1, moved
        # ... so along float32's own continuation every confident choice is the same
        n = len(prompt) - 1
        top2 = ref_logits[n:n + len(ref_row)].topk(2, dim=-1).values
        confident = (top2[:, 0] - top2[:, 1]) > MARGIN
        picks = low_logits[n:n + len(ref_row)].argmax(-1)
        assert torch.equal(picks[confident], torch.tensor(ref_row)[confident])
        # and free-running generation is identical up to the first near-tie
        first_tie = int((~confident).nonzero()[0]) if not confident.all() else len(ref_row)
        assert got_row[:first_tie] == ref_row[:first_tie]
        confident_steps += int(confident.sum())
    assert confident_steps >= 12, "too few confident steps for the comparison to mean anything"


def test_int8_weights_take_about_half_the_bf16_bytes(trained):
    bf16 = prepare(copy.deepcopy(trained), "bfloat16")
    int8 = prepare(copy.deepcopy(trained), quantize="int8")
    # every quantised matrix: one byte per weight plus a bf16 scale per output row
    for name, module in int8.named_modules():
        if isinstance(module, Int8Linear):
            w = bf16.get_submodule(name).weight
            assert module.weight_int8.dtype == torch.int8 and module.weight_int8.shape == w.shape
            assert module.scale.numel() == w.shape[0]
        if isinstance(module, Int8Experts):
            assert module.w_gate_up_int8.dtype == module.w_down_int8.dtype == torch.int8
            assert module.w_gate_up_scale.shape == module.w_gate_up_int8.shape[:2]   # per expert, channel
    ratio = weight_bytes(int8) / weight_bytes(bf16)
    # the embedding (a token reads one row) and the norms stay bf16, the router float32
    assert 0.45 < ratio < 0.62, ratio
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.modules())


def test_quantisation_is_torchaos_symmetric_per_row():
    w = torch.randn(2, 48, 64)
    values, scale = quantize_rows(w)
    assert values.dtype == torch.int8 and scale.shape == (2, 48)
    # a scale per (expert, output channel): the largest magnitude maps to the int8 range
    torch.testing.assert_close(scale, w.abs().amax(-1) / 127.5, rtol=1e-6, atol=0)
    assert ((values.float() * scale[..., None] - w).abs() <= scale[..., None] / 2 + 1e-6).all()


def test_int8_modules_match_their_dequantised_weights():
    torch.manual_seed(0)
    moe = moelab.MoE(d_model=64, num_experts=8, top_k=2, expert_hidden=32).eval()
    x = torch.randn(5, 64)
    experts = Int8Experts(moe.experts, torch.bfloat16)
    deq_gu = experts.w_gate_up_int8.float() * experts.w_gate_up_scale.float()[..., None]
    deq_d = experts.w_down_int8.float() * experts.w_down_scale.float()[..., None]
    for e in range(8):
        gate, up = (x @ deq_gu[e].T).chunk(2, dim=-1)
        ref = (torch.nn.functional.silu(gate) * up) @ deq_d[e].T
        torch.testing.assert_close(experts.expert_forward(e, x.bfloat16()).float(), ref, rtol=0.03, atol=0.02)
    # the whole layer through the dispatcher equals the per-token reference
    prepare_moe = copy.deepcopy(moe)
    prepare_moe.experts = experts
    with torch.inference_mode():
        out = prepare_moe(x.bfloat16()).output.float()
    torch.testing.assert_close(out, prepare_moe.reference_forward(x.bfloat16()).float(), rtol=0.03, atol=0.02)
    linear = torch.nn.Linear(64, 48)
    q = Int8Linear.from_linear(linear, torch.bfloat16)
    ref = x @ (q.weight_int8.float() * q.scale.float()[:, None]).T + linear.bias
    torch.testing.assert_close(q(x.bfloat16()).float(), ref, rtol=0.03, atol=0.03)


def test_int8_product_handles_every_width():
    """The int8 kernel needs K % 16 == 0 and aligned rows; other shapes take the dequantising
    product and still give the right numbers (the raw kernel gives wrong ones at K = 100)."""
    torch.manual_seed(0)
    for k in (16, 100, 40):
        linear = torch.nn.Linear(k, 24, bias=False)
        q = Int8Linear.from_linear(linear, torch.bfloat16)
        x = torch.randn(3, k)
        ref = x @ (q.weight_int8.float() * q.scale.float()[:, None]).T
        torch.testing.assert_close(q(x.bfloat16()).float(), ref, rtol=0.03, atol=0.03)
        offset = torch.cat([torch.zeros(3, 8), x], dim=1).bfloat16()[:, 8:]   # strided, unaligned
        torch.testing.assert_close(q(offset).float(), ref, rtol=0.03, atol=0.03)


def test_build_and_load_straight_into_bf16(tmp_path, trained, corpus):
    from moelab.runfolder import save as save_run
    model = materialize(build_on_meta(trained.config), dtype=torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "router" not in n} == {torch.bfloat16}
    assert model.rope_cos.dtype == torch.float32 and model.blocks[0].ffn.router.gate.dtype == torch.float32
    # a bf16 run folder loads as bf16 by default, the values unchanged
    cfg = moelab.resolve_config("mixtral", TINY)
    bf16 = prepare(copy.deepcopy(trained), "bfloat16")
    save_run(tmp_path / "run", bf16, cfg, corpus[1].to_str())
    loaded = load(tmp_path / "run")
    assert loaded.embed.weight.dtype == torch.bfloat16
    for (name, a), b in zip(bf16.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert load(tmp_path / "run", dtype="float32").embed.weight.dtype == torch.float32
    assert isinstance(load(tmp_path / "run", quantize="int8").blocks[0].attn.qkv, Int8Linear)


def test_generate_api_takes_dtype_and_quantize(trained):
    model = copy.deepcopy(trained)
    out = model.generate([[5, 6, 7]], max_new_tokens=3, temperature=0, dtype="bfloat16", quantize="int8")
    assert len(out.tokens[0]) == 3 and isinstance(model.blocks[0].ffn.experts, Int8Experts)
    assert model.embed.weight.dtype == torch.bfloat16
    with pytest.raises(QuantizeError, match="dtype = 'float16' is invalid: must be one of float32, bfloat16"):
        generate(model, [[1]], max_new_tokens=1, dtype="float16")
    with pytest.raises(QuantizeError, match="quantize = 'int4' is invalid"):
        generate(trained, [[1]], max_new_tokens=1, quantize="int4")
    with pytest.raises(QuantizeError, match="cannot be applied to an int8 model"):
        generate(model, [[1]], max_new_tokens=1, dtype="float32")


def test_missing_torchao_names_the_extra(monkeypatch, trained):
    monkeypatch.setitem(sys.modules, "torchao.quantization.quant_primitives", None)
    with pytest.raises(QuantizeError, match=r"moelab\[quant\]"):
        prepare(copy.deepcopy(trained), quantize="int8")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, trained, corpus):
    from moelab.runfolder import save as save_run
    cfg = moelab.resolve_config("mixtral", TINY)
    return str(save_run(tmp_path_factory.mktemp("run"), trained, cfg, corpus[1].to_str()))


def test_cli_dtype_and_quantize(run_dir, capsys):
    for extra in ([], ["--dtype", "bfloat16"], ["--quantize", "int8"], ["--dtype", "float32", "--quantize", "int8"]):
        assert main(["generate", run_dir, "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0",
                     "--json"] + extra) == 0
        assert json.loads(capsys.readouterr().out)["new_tokens"] >= 1


@pytest.mark.parametrize("args,names", [(["--dtype", "float16"], "--dtype"), (["--quantize", "int4"], "--quantize")])
def test_cli_bad_dtype_or_quantize_exits_2(run_dir, capsys, args, names):
    with pytest.raises(SystemExit) as e:
        main(["generate", run_dir, "--prompt", "x"] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert names in err and "invalid choice" in err and "Traceback" not in err


def test_cli_quantize_without_torchao_exits_2(run_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization.quant_primitives", None)
    assert main(["generate", run_dir, "--prompt", "x", "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--quantize" in err and "moelab[quant]" in err and "Traceback" not in err


@pytest.mark.slow
def test_compiled_int8_decode_matches_eager(trained):
    model = prepare(copy.deepcopy(trained), quantize="int8")
    eager = generate(model, [[5, 6, 7, 8]], max_new_tokens=6, temperature=0)
    compiled = generate(model, [[5, 6, 7, 8]], max_new_tokens=6, temperature=0, compile=True)
    assert compiled.tokens == eager.tokens
