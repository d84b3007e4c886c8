"""`convert --to-hf` writes a folder the Hugging Face ecosystem can use as is: the tokenizer's
special tokens in tokenizer_config.json / special_tokens_map.json, the ids in config.json and
generation_config.json, so that transformers' `generate` stops at end of text; the family defaults
to the one the model maps to."""

import json

import pytest

import moelab
from moelab.cli import main
from moelab.interop import InteropError, export_hf
from moelab.runfolder import save as save_run

from hf_models import transformers

TINY = {"model.vocab_size": 320, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
        "model.ffn_hidden": 64, "model.max_seq_len": 64, "model.moe.layers": "none"}
MOE = {"model.moe.layers": "all", "model.moe.num_experts": 4, "model.moe.top_k": 2, "model.moe.expert_hidden": 16}


def _bpe():
    from moelab.data.tokenizer import train_bpe
    return train_bpe(["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 30, 300)


def _run(tmp_path, overrides, tokenizer=True, name="run"):
    cfg = moelab.Config().with_overrides(overrides).validate()
    run = tmp_path / name
    save_run(run, moelab.build(cfg), cfg, tokenizer_json=_bpe().to_str() if tokenizer else None)
    return run


def test_autotokenizer_has_the_special_tokens(tmp_path):
    run = _run(tmp_path, {**TINY, **MOE})
    out = tmp_path / "hf"
    export_hf(run, out, "mixtral")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file(), name
    tok = transformers.AutoTokenizer.from_pretrained(out)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", eos) == ("<|endoftext|>", 0)
    assert tok.bos_token_id == eos and tok.pad_token_id == eos and tok.unk_token_id == eos
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == 1
    assert tok.model_max_length == 64
    text = "def f(x):\n    return  x\n"
    assert tok.decode(tok(text).input_ids) == text             # byte-level: exact, nothing added
    assert tok(text).input_ids == _bpe().encode(text).ids
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 0, 0)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((out / "special_tokens_map.json").read_text())["mask_token"] == "<|mask|>"


def test_a_users_tokenizer_keeps_its_own_spellings(tmp_path):
    from hf_models import tiny_tokenizer_json
    cfg = moelab.Config().with_overrides({**TINY, "model.vocab_size": 64}).validate()
    save_run(tmp_path / "run", moelab.build(cfg), cfg, tokenizer_json=tiny_tokenizer_json())
    export_hf(tmp_path / "run", tmp_path / "hf", "llama")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.pad_token == "</s>" and tok.mask_token is None


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    small = _bpe().get_vocab_size() - 1
    run = _run(tmp_path, {**TINY, "model.vocab_size": small})
    with pytest.raises(InteropError, match=f"model.vocab_size = {small}"):
        export_hf(run, tmp_path / "hf", "llama")
    assert not (tmp_path / "hf").exists()


def test_no_tokenizer_is_a_note(tmp_path):
    run = _run(tmp_path, TINY, tokenizer=False)
    notes = export_hf(run, tmp_path / "hf", "llama")
    assert any("no tokenizer.json" in n for n in notes)
    assert "eos_token_id" not in json.loads((tmp_path / "hf" / "config.json").read_text())


def test_family_defaults_to_the_one_the_config_maps_to(tmp_path, capsys):
    dense = _run(tmp_path, TINY, name="dense")
    assert main(["convert", "--to-hf", str(dense), "--out", str(tmp_path / "d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "llama"
    assert json.loads((tmp_path / "d" / "config.json").read_text())["model_type"] == "llama"
    moe = _run(tmp_path, {**TINY, **MOE}, name="moe")
    assert main(["convert", "--to-hf", str(moe), "--out", str(tmp_path / "m")]) == 0
    assert "family mixtral" in capsys.readouterr().err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "mixtral"


def test_no_family_fits_names_each_reason(tmp_path, capsys):
    run = _run(tmp_path, {**TINY, **MOE, "model.moe.layers": [1]})
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Hugging Face family can express this model") and err.count("\n") == 1
    for family in ("llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"):
        assert f"{family}:" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_transformers_generate_stops_at_eos_on_a_trained_model(tmp_path, monkeypatch):
    """Train a tiny model on documents that always end the same way, export it, and let
    transformers generate greedily: it must stop at end of text, before the token limit, with the
    tokens moelab's own generate produces."""
    from moelab.train.trainer import train
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "docs.jsonl"
    words = "one two three four five six seven eight nine ten".split()
    corpus.write_text("".join(json.dumps({"text": " ".join(words[i:])}) + "\n" for i in range(8)) * 40)
    cfg = moelab.Config().with_overrides({
        **TINY, "model.vocab_size": 300, "model.max_seq_len": 32,
        "data.corpus": str(corpus), "train.seq_len": 32, "train.batch_size": 8, "train.max_steps": 150,
        "train.lr": 1e-2, "train.warmup_steps": 10, "train.eval_every": 150, "train.save_every": 150,
        "train.log_every": 50}).validate()
    train(cfg, tmp_path / "run", show_progress=False, log=lambda m: None)
    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    prompt = tok("six seven", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    new = out[0, prompt.input_ids.shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id and len(new) < 24, tok.decode(new)
    assert tok.decode(new[:-1]).strip() == "eight nine ten"

    ours = moelab.load(tmp_path / "run")
    from tokenizers import Tokenizer
    mine = ours.generate("six seven", tokenizer=Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json")),
                         max_new_tokens=24, temperature=0)
    assert mine.tokens[0] == new                 # the stop token included
