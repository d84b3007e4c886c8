"""moelab.runfolder: the one loader (run folder, checkpoint folder, HF folder, Hub id; any dtype,
no float32 detour), the tokenizer it attaches, and the metrics reader that survives a torn line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moelab
from moelab import runfolder
from moelab.quantize import prepare
from moelab.runfolder import CheckpointError, load, load_metrics, repair_metrics, save

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=300",
        "model.ffn_hidden=48", "model.moe.expert_hidden=16", "model.moe.num_experts=4", "model.max_seq_len=32"]


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.BPE(vocab={chr(97 + i): i for i in range(26)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


@pytest.fixture
def run(tmp_path):
    cfg = moelab.resolve_config("mixtral", TINY)
    model = moelab.build(cfg)
    save(tmp_path / "run", model, cfg, _tokenizer_json())
    return tmp_path / "run", model


def test_load_keeps_the_values_in_the_asked_dtype(run):
    path, model = run
    loaded = load(path)
    assert loaded.embed.weight.dtype == torch.float32 and not loaded.training
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    bf16 = load(path, dtype=torch.bfloat16)
    floats = {n: p.dtype for n, p in bf16.named_parameters()}
    assert {d for n, d in floats.items() if ".router." not in n} == {torch.bfloat16}
    assert {d for n, d in floats.items() if ".router." in n} == {torch.float32}   # routers stay fp32
    assert bf16.rope_cos.dtype == torch.float32
    x = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(bf16(x).logits.float(), prepare(model, "bfloat16")(x).logits.float())


def test_the_tokenizer_comes_with_the_model_and_generation_uses_it(run):
    path, _ = run
    model = load(path)
    assert model.tokenizer is not None and model.tokenizer.token_to_id("c") == 2
    out = model.generate("a b c", max_new_tokens=3, temperature=0)
    assert out.text is not None and len(out.tokens[0]) == 3
    assert moelab.load_tokenizer(path).get_vocab() == model.tokenizer.get_vocab()
    (path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match="tokenizer.json is damaged"):
        load(path)


def test_a_checkpoint_folder_loads_with_its_runs_config(run):
    path, model = run
    ckpt = path / "ckpt-00000005"
    ckpt.mkdir()
    weights = {k: v + 1 for k, v in model.state_dict().items() if v.is_floating_point()}
    runfolder.save_tensors(ckpt / runfolder.WEIGHTS_FILE, {**model.state_dict(), **weights})
    loaded = load(ckpt)
    assert torch.equal(loaded.embed.weight, model.embed.weight + 1)
    assert loaded.tokenizer is not None


def test_errors_name_what_is_wrong(tmp_path, run):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path / "empty")
    path, _ = run
    other = moelab.resolve_config("mixtral", TINY + ["model.d_model=64"])
    runfolder.write_json(path / "config.json", other.to_dict())
    with pytest.raises(CheckpointError, match=r"does not match the model: .*wrong shape"):
        load(path)


@pytest.fixture
def hf_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(_tokenizer_json())
    return tmp_path / "hf", hf


def test_an_hf_folder_loads_in_memory_and_writes_nothing(hf_folder):
    path, hf = hf_folder
    before = sorted(p.name for p in path.iterdir())
    notes = []
    model = load(path, note=notes.append)
    assert sorted(p.name for p in path.iterdir()) == before
    assert len(notes) == 1 and "converted in memory" in notes[0]
    x = torch.randint(0, 300, (1, 11))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max() < 1e-4
    assert model.tokenizer is not None
    assert runfolder.read_config(path).model.moe.num_experts == 4


def test_a_hub_id_resolves_from_the_offline_cache(hf_folder, tmp_path, monkeypatch):
    """A Hub id is read through huggingface_hub's cache; offline, a cached snapshot is used and
    a missing one is a clear error (no network here)."""
    pytest.importorskip("huggingface_hub")
    path, hf = hf_folder
    cache = tmp_path / "hub"
    repo = cache / "models--tiny--mixtral"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in path.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    model = load("tiny/mixtral")
    x = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max() < 1e-4
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        load("tiny/absent")


def test_metrics_reader_skips_a_torn_line_and_repair_cuts_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "st')
    assert load_metrics(tmp_path) == records
    message = repair_metrics(tmp_path, after_step=2)
    assert "incomplete record" in message
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records[:2])
    assert repair_metrics(tmp_path) is None


LOAD_RSS = """
import resource, sys, torch, tokenizers, safetensors
import moelab, moelab.generate, moelab.model.weights, moelab.quantize, moelab.runfolder
# the interpreter's baseline: libraries loaded and their one-time set-up done (a first model built
# on the meta device initialises ~35 MB of torch internals, whatever the model's size)
moelab.model.weights.build_on_meta(moelab.resolve_config("dense", ["model.n_layers=1"]).model)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = moelab.runfolder.load(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():
    total = sum(float(p.sum()) for p in model.parameters())   # read every weight (pages resident)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - base)
"""


@pytest.mark.slow
def test_loading_bf16_as_bf16_never_holds_a_float32_copy(tmp_path):
    """A run folder of ~60 MB of bf16 weights loads with its peak RSS over the interpreter's
    baseline within 1.25x the weight bytes (a float32 detour would need 3x)."""
    cfg = moelab.resolve_config("mixtral", ["model.n_layers=4", "model.d_model=512", "model.vocab_size=8192",
                                            "model.moe.expert_hidden=512", "model.moe.num_experts=8"])
    from moelab.model.weights import build_on_meta, materialize
    model = materialize(build_on_meta(cfg.model), dtype=torch.bfloat16)
    save(tmp_path / "run", model, cfg)
    weight_bytes = (tmp_path / "run" / "model.safetensors").stat().st_size
    assert weight_bytes > 50 * 2**20
    del model
    env = {**os.environ, "PYTHONPATH": str(Path(moelab.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", LOAD_RSS, str(tmp_path / "run")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.strip().splitlines()[-1])
    assert peak < 1.25 * weight_bytes, f"peak {peak:,} bytes over baseline for {weight_bytes:,} bytes of bf16"


def test_commands_take_an_hf_folder_where_a_run_folder_goes(hf_folder, capsys):
    from moelab.cli import main
    path, _ = hf_folder
    before = sorted(p.name for p in path.iterdir())
    assert main(["generate", str(path), "--prompt", "a b", "--max-new-tokens", "3", "--temperature", "0",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["new_tokens"] == 3
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] > 0
    assert sorted(p.name for p in path.iterdir()) == before
