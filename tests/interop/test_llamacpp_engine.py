"""The llama.cpp engine: the export cache inside the run folder (reused, and redone when the weights
change), sampling and streaming with moelab's options, and the CLI (`moelab generate --engine
llama.cpp`, `moelab bench decode`)."""

import json

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

import moelab  # noqa: E402
from moelab.cli import main  # noqa: E402
from moelab.data.tokenizer import train_bpe  # noqa: E402
from moelab.generate import generate  # noqa: E402
from moelab.interop.llamacpp import CACHE_DIR, LlamaCpp, cached_gguf, open_run, stream  # noqa: E402
from moelab.runfolder import save as save_run  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer_json():
    text = open(moelab.__file__.rsplit("/", 1)[0] + "/generate.py", encoding="utf-8").read()
    return train_bpe([text], VOCAB).to_str()


def _save(run, tokenizer_json, seed=0, preset="mixtral"):
    cfg = moelab.resolve_config(preset, [f"model.vocab_size={VOCAB}", "model.d_model=64", "model.n_layers=2",
                                         "model.n_heads=4", "model.moe.num_experts=4", "model.moe.expert_hidden=64",
                                         "model.max_seq_len=96", "model.ffn_hidden=96"])
    torch.manual_seed(seed)
    model = moelab.build(cfg)
    with torch.no_grad():                 # sharper than the init so that sampled text is not flat noise
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    save_run(run, model, cfg, tokenizer_json)
    return moelab.load(run)


def test_cache_is_reused_and_redone_when_weights_change(tmp_path, tokenizer_json):
    run = tmp_path / "run"
    model = _save(run, tokenizer_json)
    first = cached_gguf(run, "f32")
    assert first.parent == run / CACHE_DIR and first.name.startswith("model-f32-")
    stamp = first.stat().st_mtime_ns
    assert cached_gguf(run, "f32") == first and first.stat().st_mtime_ns == stamp    # reused, not rewritten
    prompt = [5, 17, 42, 7]
    engine = LlamaCpp(first, 96, kv_f32=True)
    old = engine.prefill(prompt)
    engine.close()
    with torch.no_grad():
        assert torch.allclose(old, model(torch.tensor([prompt])).logits[0, -1], rtol=0, atol=1e-4)

    new_model = _save(run, tokenizer_json, seed=1)         # new weights in the same run folder
    second = cached_gguf(run, "f32")
    assert second != first and second.is_file() and not first.exists()
    engine = LlamaCpp(second, 96, kv_f32=True)
    new = engine.prefill(prompt)
    engine.close()
    with torch.no_grad():
        assert torch.allclose(new, new_model(torch.tensor([prompt])).logits[0, -1], rtol=0, atol=1e-4)
    assert not torch.allclose(new, old, atol=1e-2)
    cached_gguf(run, "bf16")
    assert sorted(p.name.split("-")[1] for p in (run / CACHE_DIR).glob("*.gguf")) == ["bf16", "f32"]


def test_sampling_options_mean_the_same(tmp_path, tokenizer_json):
    """Same logits (f32) + moelab's sampler and generator: the same sampled tokens as the torch
    engine, repetition penalty, top-k, top-p, min-p and stop strings included."""
    from tokenizers import Tokenizer
    run = tmp_path / "run"
    model = _save(run, tokenizer_json)
    tok = Tokenizer.from_str(tokenizer_json)
    engine, _ = open_run(run, "f32")
    try:
        for opts in (dict(temperature=0), dict(temperature=0.9, top_k=40, seed=3),
                     dict(temperature=1.0, top_p=0.8, min_p=0.02, repetition_penalty=1.3, seed=11)):
            ours = generate(model, "def main(", tokenizer=tok, max_new_tokens=24, **opts)
            steps = list(stream(engine, "def main(", tokenizer=tok, max_new_tokens=24, **opts))
            assert [s.tokens[0] for s in steps] == ours.tokens[0], opts
            assert "".join(s.text[0] for s in steps) == ours.text[0]
            assert steps[-1].finished[0] == ours.finish_reasons[0]
        text = generate(model, "def main(", tokenizer=tok, max_new_tokens=24, temperature=0).text[0]
        stop = text[len(text) // 2:len(text) // 2 + 2]
        ours = generate(model, "def main(", tokenizer=tok, max_new_tokens=24, temperature=0, stop=stop)
        steps = list(stream(engine, "def main(", tokenizer=tok, max_new_tokens=24, temperature=0, stop=stop))
        assert ours.finish_reasons[0] == steps[-1].finished[0] == "stop"
        assert "".join(s.text[0] for s in steps) == ours.text[0] and stop not in ours.text[0]
    finally:
        engine.close()


def test_generate_cli_engines_agree(tmp_path, tokenizer_json, capsys):
    run = tmp_path / "run"
    _save(run, tokenizer_json)
    args = ["generate", str(run), "--prompt", "def main(", "--max-new-tokens", "20", "--temperature", "0", "--json"]
    assert main(args) == 0
    torch_out = json.loads(capsys.readouterr().out)
    assert main(args + ["--engine", "llama.cpp"]) == 0          # f32 checkpoint -> f32 export by default
    cap = capsys.readouterr()
    llama_out = json.loads(cap.out)
    assert "exporting" in cap.err and llama_out["engine"] == "llama.cpp"
    assert llama_out["tokens"] == torch_out["tokens"] and llama_out["text"] == torch_out["text"]
    assert main(args + ["--engine", "llama.cpp", "--type", "q8_0"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 20
    # streamed (not --json): text on stdout, the summary on stderr
    assert main(args[:-1] + ["--engine", "llama.cpp"]) == 0
    cap = capsys.readouterr()
    assert cap.out.rstrip("\n") == torch_out["text"] and "tokens/s" in cap.err and "exporting" not in cap.err


@pytest.mark.parametrize("extra,message", [
    (["--engine", "llama.cpp", "--show-experts"], "--show-experts is for --engine torch"),
    (["--engine", "llama.cpp", "--quantize", "int8"], "--quantize is for --engine torch"),
    (["--engine", "llama.cpp", "--type", "q2"], "--type 'q2' is invalid"),
    (["--type", "q8_0"], "--type is for --engine llama.cpp"),
])
def test_generate_cli_refusals(tmp_path, tokenizer_json, capsys, extra, message):
    run = tmp_path / "run"
    _save(run, tokenizer_json)
    assert main(["generate", str(run), "--prompt", "x", "--max-new-tokens", "2", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (run / CACHE_DIR).exists() or not list((run / CACHE_DIR).glob("*.gguf"))


def test_int8_note_points_at_llama_cpp(tmp_path, tokenizer_json, capsys):
    pytest.importorskip("torchao")
    run = tmp_path / "run"
    _save(run, tokenizer_json)
    assert main(["generate", str(run), "--prompt", "x", "--max-new-tokens", "2", "--quantize", "int8"]) == 0
    assert "--engine llama.cpp --type q8_0" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_decode_both_engines(tmp_path, tokenizer_json, capsys):
    run = tmp_path / "run"
    _save(run, tokenizer_json)
    assert main(["bench", "decode", str(run), "--engine", "both", "--type", "f32", "--dtype", "float32",
                 "--new-tokens", "8", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["engines"]) == {"torch_float32", "llamacpp_f32"}
    for r in out["engines"].values():
        assert r["tokens_per_s"] > 0 and r["fraction_of_bf16_limit"] > 0
    assert out["greedy_agreement"] == 1.0 and out["bf16_limit_tokens_per_s"] > 0
    assert out["environment"]["llama_cpp_python"]
