"""Generation: cached decoding equals full recomputation, batching, sampling, the CLI."""

import json

import pytest
import torch

import moelab
from moelab.cli import main
from moelab.generate import (GenerationError, TextStream, decode_one, generate, min_p_filter,
                             prefill, repetition_penalty, sampling_options, top_k_filter,
                             top_p_filter)
from moelab.model.attention import cache_bytes_per_token

SMALL = ["model.n_layers=2", "model.d_model=64", "model.vocab_size=300", "model.max_seq_len=64",
         "model.ffn_hidden=96", "model.moe.expert_hidden=48"]
MODELS = {
    "dense": ("dense", []),
    "mixtral": ("mixtral", []),
    # MLA, group-limited routing, 2 shared experts, first layer dense
    "deepseek-v2": ("deepseek-v2", []),
    # capacity 0.5 in training *and* eval: generation must still be dropless
    "capacity": ("switch", ["model.moe.capacity_factor=0.5", "model.moe.eval_capacity_factor=0.5"]),
    "shared-gate": ("mixtral", ["model.moe.num_shared_experts=1", "model.moe.shared_expert_gate=true"]),
}


def small_model(name: str, extra=()) -> torch.nn.Module:
    preset, overrides = MODELS[name]
    return moelab.build(preset, SMALL + overrides + list(extra)).eval()


def dropless_twin(model):
    """The same weights with capacity switched off: what generation must compute."""
    import dataclasses
    cfg = model.config
    twin = moelab.Transformer(dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=None, eval_capacity_factor=None)))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@torch.no_grad()
def full_recompute_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    seq, logits = list(prompt), []
    for _ in range(n):
        out = model(torch.tensor([seq])).logits[0, -1]
        logits.append(out)
        seq.append(int(out.argmax()))
    return seq[len(prompt):], logits


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_greedy_equals_full_recompute(name):
    model = small_model(name)
    prompt = torch.randint(0, 300, (11,)).tolist()
    out = generate(model, prompt, max_new_tokens=8, temperature=0)
    ref, ref_logits = full_recompute_greedy(dropless_twin(model), prompt, 8)
    assert out.tokens == [ref] and out.finish_reasons == ["length"]
    # and the logits themselves, step by step
    with torch.inference_mode():
        cache = model.new_cache(1, 32)
        logits, _ = prefill(model, torch.tensor([prompt]), cache)
        for t, expected in zip(ref, ref_logits):
            torch.testing.assert_close(logits[0], expected, atol=1e-5, rtol=1e-5)
            logits, _ = decode_one(model, torch.tensor([t]), cache)


def test_capacity_would_drop_in_the_plain_forward():
    """The capacity case above is meaningful: the eval forward really drops at this setting."""
    model = small_model("capacity")
    out = model(torch.randint(0, 300, (1, 16)))
    assert float(out.router_stats[0].dropped_fraction) > 0


@pytest.mark.parametrize("name", ["mixtral", "deepseek-v2"])
def test_left_padded_batch_matches_each_prompt_alone(name):
    model = small_model(name)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (7, 13, 2)]
    batch = generate(model, prompts, max_new_tokens=10, temperature=0)
    for row, prompt in zip(batch.tokens, prompts):
        assert row == generate(model, prompt, max_new_tokens=10, temperature=0).tokens[0]


@pytest.mark.slow
def test_compiled_decode_matches_eager_or_degrades():
    model = small_model("mixtral")
    prompt = torch.randint(0, 300, (5,)).tolist()
    eager = generate(model, prompt, max_new_tokens=6, temperature=0)
    compiled = generate(model, prompt, max_new_tokens=6, temperature=0, compile=True)
    assert compiled.tokens == eager.tokens


def test_all_experts_path_equals_the_dispatcher():
    """What a compiled batch decode step runs (every expert on every row, zero weight where not
    chosen) equals the grouped engine's dispatch."""
    from moelab.model.moe.engines import all_experts as _all_experts
    from moelab.model.moe.dispatch import plan_dispatch
    moe = small_model("mixtral").blocks[0].ffn
    x = torch.randn(8, 64)
    with torch.inference_mode():
        r = moe.router(x)
        torch.testing.assert_close(_all_experts(moe.experts, x, r.ids_NK, r.weights_NK),
                                   moe.experts.forward_dispatched(x, plan_dispatch(r, moe.num_experts)))


@pytest.mark.slow
def test_compiled_batch_decode_matches_eager():
    model = small_model("mixtral")
    prompts = torch.randint(0, 300, (8, 5))
    eager = generate(model, prompts, max_new_tokens=5, temperature=0)
    compiled = generate(model, prompts, max_new_tokens=5, temperature=0, compile=True)
    assert compiled.tokens == eager.tokens


def test_show_experts_traces_every_new_token():
    model = small_model("deepseek-v2")          # MoE in layer 1 only, top-4
    out = generate(model, [1, 2, 3], max_new_tokens=5, temperature=0, trace_experts=True)
    assert len(out.experts[0]) == 5
    for per_layer in out.experts[0]:
        assert len(per_layer) == 1 and len(per_layer[0]) == 4
        assert all(0 <= e < 16 for e in per_layer[0])
    # the traced experts are the ones the plain forward routes the same token to
    seq = [1, 2, 3] + out.tokens[0]
    stats = model(torch.tensor([seq])).router_stats[0]
    assert stats.expert_ids[3].tolist() == out.experts[0][0][0]


def test_model_generate_and_stream_api_restore_training_mode():
    model = small_model("mixtral").train()
    out = model.generate([[5, 6, 7]], max_new_tokens=4, temperature=0)
    steps = list(model.stream([5, 6, 7], max_new_tokens=4, temperature=0))
    assert [s.tokens[0] for s in steps] == out.tokens[0]
    assert steps[-1].finished == ["length"] and model.training


def test_seed_reproduces_sampling_and_context_limit():
    model = small_model("dense")
    a = generate(model, [1, 2], max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, [1, 2], max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3)
    c = generate(model, [1, 2], max_new_tokens=20, temperature=1.0, top_p=0.9, seed=4)
    assert a.tokens == b.tokens != c.tokens
    near_full = generate(model, list(range(60)), max_new_tokens=20, temperature=0)
    assert len(near_full.tokens[0]) == 64 - 60 + 1 and near_full.finish_reasons == ["context"]


# ---- sampling filters ------------------------------------------------------------------------

def test_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, True, False, False, False]]
    p = logits.softmax(-1)[0]
    # top-p keeps the smallest prefix whose mass reaches p; the best token always survives
    kept = torch.isfinite(top_p_filter(logits, float(p[0] + p[1]) - 1e-4))
    assert kept.tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1e-6)).sum() == 1
    kept = torch.isfinite(min_p_filter(logits, float(p[2] / p[0]) - 1e-4))
    assert kept.tolist() == [[True, True, True, False, False]]
    seen = torch.tensor([[True, False, False, False, True]])
    pen = repetition_penalty(torch.tensor([[2.0, 1.0, 0.0, 0.0, -1.0]]), seen, 2.0)
    assert pen.tolist() == [[1.0, 1.0, 0.0, 0.0, -2.0]]


@pytest.mark.parametrize("key,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
                                       ("max_new_tokens", 0), ("top_k", 0), ("min_p", 2.0),
                                       ("repetition_penalty", 0.0), ("bogus", 1)])
def test_bad_options_name_the_option(key, value):
    with pytest.raises(GenerationError, match=key):
        sampling_options(**{key: value})


# ---- text, stop strings and the CLI ----------------------------------------------------------

TEXT = ("def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # émoji ✓\n" * 20)


@pytest.fixture(scope="module")
def tokenizer():
    from moelab.data.tokenizer import train_bpe
    return train_bpe([TEXT], 300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    from moelab.runfolder import save as save_run
    torch.manual_seed(0)
    cfg = moelab.resolve_config("mixtral", SMALL)
    model = moelab.Transformer(cfg.model)
    return str(save_run(tmp_path_factory.mktemp("run"), model, cfg, tokenizer.to_str()))


def test_text_stream_holds_back_stop_prefixes(tokenizer):
    ids = tokenizer.encode("print(add(1, 2))  # émoji").ids
    stream = TextStream(tokenizer, stop=["(1,"])
    deltas = [stream.push(t) for t in ids if not stream.stopped]
    assert "".join(deltas) == "print(add" and stream.stopped
    assert all("(1" not in d for d in deltas)
    # a character split across byte-level tokens is never printed half-way
    stream = TextStream(tokenizer)
    deltas = [stream.push(t) for t in tokenizer.encode("émoji ✓ 😀").ids]   # 😀: 4 byte tokens
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == "émoji ✓ 😀"


def test_stop_string_ends_generation(tokenizer):
    model = small_model("mixtral")
    free = generate(model, "def add(", tokenizer=tokenizer, max_new_tokens=16, temperature=0)
    text = free.text[0]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = generate(model, "def add(", tokenizer=tokenizer, max_new_tokens=16, temperature=0, stop=stop)
    assert cut.text[0] == text[: text.index(stop)] and cut.finish_reasons == ["stop"]


def test_cli_generate_streams_and_reports_speed(run_dir, capsys, tmp_path):
    assert main(["generate", run_dir, "--prompt", "def add(", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert "tokens/s" in out.err and out.out.strip()
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("def add(", encoding="utf-8")
    assert main(["generate", run_dir, "--prompt-file", str(prompt_file), "--max-new-tokens", "8",
                 "--temperature", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 1 <= result["new_tokens"] <= 8 and result["tokens_per_s"] > 0
    assert result["finish_reason"] in ("length", "stop")
    assert out.out.rstrip("\n") == result["text"]          # the streamed text is the same text


def test_cli_show_experts(run_dir, capsys):
    assert main(["generate", run_dir, "--prompt", "x", "--max-new-tokens", "3", "--seed", "1",
                 "--top-k", "5", "--show-experts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("L0:" in ln and "L1:" in ln for ln in lines) == 3


@pytest.mark.parametrize("args,names", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "x" * 400], "--prompt"),
])
def test_cli_bad_input_exits_2(run_dir, capsys, args, names):
    argv = ["generate", run_dir] + (["--prompt", "hi"] if "--prompt" not in args else []) + args
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err


def test_cli_unknown_run_folder(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["mixtral", "deepseek-v2"])
def test_info_kv_cache_bytes_match_the_cache_buffers(preset):
    model = moelab.build(preset, ["model.n_layers=2"])
    cache = model.new_cache(2, 10)
    cache_bytes = sum(b.numel() * b.element_size() for layer in cache.layers for b in layer.buffers())
    assert cache_bytes_per_token(model.config, bytes_per_elem=4) == cache_bytes // (2 * 10)
