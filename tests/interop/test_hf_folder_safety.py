"""An HF folder is read only inside itself, and a malformed one is one clean error line.

Shard names in ``model.safetensors.index.json`` that climb out (``..``) or are absolute, and
symlinks whose target resolves outside the folder, are refused before anything is opened; bad
types in the index or in ``config.json`` exit 2 with one ``error:`` line, never a traceback; an
export never copies a tokenizer.json that does not load."""

import json
import os

import pytest

import moelab
from moelab.cli import main
from moelab.runfolder import save as save_run

from hf_models import hf_model

MIXTRAL = dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    d = tmp_path_factory.mktemp("tpl") / "mixtral"
    hf_model("mixtral", MIXTRAL).save_pretrained(d)
    return d


@pytest.fixture
def hf_dir(template, tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    for p in template.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    return d


def _sharded(folder, weight_map):
    """Turn the single-file folder into a one-shard folder with the given (bad) weight map."""
    os.rename(folder / "model.safetensors", folder / SHARD)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _one_error(capsys, argv, *fragments):
    """The CLI exits 2 with exactly one stderr line, starting 'error:', no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _import(capsys, src, out, *fragments):
    line = _one_error(capsys, ["convert", "--from-hf", str(src), "--out", str(out)], *fragments)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return line


# ---- item 4: nothing outside the folder is read ---------------------------------------------

def test_shard_name_climbing_out_is_refused(hf_dir, tmp_path, capsys):
    outside = tmp_path / "outside.safetensors"
    os.rename(hf_dir / "model.safetensors", outside)
    keys = json.loads(json.dumps(list(__import__("safetensors").safe_open(str(outside), "pt").keys())))
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(keys, "../outside.safetensors")}))
    _import(capsys, hf_dir, tmp_path / "run", "../outside.safetensors", "outside")


def test_absolute_shard_name_is_refused(hf_dir, tmp_path, capsys):
    outside = tmp_path / "elsewhere" / "w.safetensors"
    outside.parent.mkdir()
    os.rename(hf_dir / "model.safetensors", outside)
    keys = list(__import__("safetensors").safe_open(str(outside), "pt").keys())
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(keys, str(outside))}))
    _import(capsys, hf_dir, tmp_path / "run", str(outside))


def test_weights_symlinked_outside_are_refused(hf_dir, tmp_path, capsys):
    outside = tmp_path / "real.safetensors"
    os.rename(hf_dir / "model.safetensors", outside)
    (hf_dir / "model.safetensors").symlink_to(outside)
    _import(capsys, hf_dir, tmp_path / "run", "model.safetensors", "outside")


def test_tokenizer_symlinked_outside_is_not_copied(hf_dir, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (hf_dir / "tokenizer.json").symlink_to(secret)
    _import(capsys, hf_dir, tmp_path / "run", "tokenizer.json", "outside")


def test_config_symlinked_outside_is_refused(hf_dir, tmp_path, capsys):
    real = tmp_path / "config-elsewhere.json"
    os.rename(hf_dir / "config.json", real)
    (hf_dir / "config.json").symlink_to(real)
    _import(capsys, hf_dir, tmp_path / "run", "config.json", "outside")


def test_symlinks_inside_the_folder_are_fine(hf_dir, tmp_path):
    os.rename(hf_dir / "model.safetensors", hf_dir / "blob")
    (hf_dir / "model.safetensors").symlink_to("blob")
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0


def test_hub_cache_snapshot_may_link_into_its_blobs(template, tmp_path):
    """The Hugging Face cache stores files once under ``models--org--name/blobs/`` and links them
    from ``snapshots/<rev>/``: those links stay inside the repository's cache folder."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in template.iterdir():
        blob = repo / "blobs" / f"sha-{p.name}"
        blob.write_bytes(p.read_bytes())
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    assert main(["convert", "--from-hf", str(snap), "--out", str(tmp_path / "run")]) == 0
    # ... but not out of the repository's folder
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "tok").write_text("{}")
    (snap / "tokenizer.json").symlink_to(os.path.relpath(other / "tok", snap))
    assert main(["convert", "--from-hf", str(snap), "--out", str(tmp_path / "run2")]) == 2


# ---- item 9: malformed index and config values ----------------------------------------------

@pytest.mark.parametrize("weight_map,fragment", [
    (["model.embed_tokens.weight"], "weight_map"),
    ({"model.embed_tokens.weight": [SHARD]}, "model.embed_tokens.weight"),
    ({"model.embed_tokens.weight": 3}, "model.embed_tokens.weight"),
    ({"model.embed_tokens.weight": ""}, "model.embed_tokens.weight"),
])
def test_malformed_index(hf_dir, tmp_path, capsys, weight_map, fragment):
    _sharded(hf_dir, weight_map)
    _import(capsys, hf_dir, tmp_path / "run", "model.safetensors.index.json", fragment)


def test_index_that_is_not_an_object(hf_dir, tmp_path, capsys):
    _sharded(hf_dir, {})
    (hf_dir / "model.safetensors.index.json").write_text("[1, 2]")
    _import(capsys, hf_dir, tmp_path / "run", "model.safetensors.index.json")


@pytest.mark.parametrize("changes,fragment", [
    (dict(hidden_size="abc"), "hidden_size = 'abc'"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers = 2.5"),
    (dict(num_attention_heads=True), "num_attention_heads = True"),
    (dict(rope_parameters="yarn"), "rope_parameters = 'yarn'"),
    (dict(rope_scaling=["linear"]), "rope_scaling = ['linear']"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": "x"}), "rope_parameters.rope_theta = 'x'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": "4"}), "rope_parameters.factor = '4'"),
    (dict(rms_norm_eps="x"), "rms_norm_eps = 'x'"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings = 'no'"),
    (dict(num_local_experts=None, num_experts=None), "num_local_experts"),
    (dict(hidden_act=3), "hidden_act = 3"),
])
def test_config_fields_of_the_wrong_type(hf_dir, tmp_path, capsys, changes, fragment):
    _edit_config(hf_dir, **changes)
    _import(capsys, hf_dir, tmp_path / "run", "config.json", fragment)


def test_plan_reports_wrong_types_in_one_line(hf_dir, capsys):
    _edit_config(hf_dir, rope_parameters="yarn")
    _one_error(capsys, ["plan", "--hf-config", str(hf_dir / "config.json"), "--gpus", "1", "--gpu-memory", "80GiB"], "rope_parameters")


# ---- item 9: export never copies a tokenizer that does not load ------------------------------

def _tiny_run(tmp_path, tokenizer_text: str):
    cfg = moelab.Config().with_overrides({"model.vocab_size": 64, "model.d_model": 32, "model.n_layers": 1,
                                          "model.n_heads": 4, "model.ffn_hidden": 48, "model.max_seq_len": 32,
                                          "model.moe.num_experts": 4, "model.moe.expert_hidden": 16}).validate()
    run = tmp_path / "run"
    save_run(run, moelab.build(cfg), cfg, tokenizer_json=tokenizer_text)
    return run


def test_export_refuses_a_truncated_tokenizer(tmp_path, capsys):
    from moelab.data.tokenizer import train_bpe
    text = train_bpe(["def f(x):\n    return x\n"] * 20, 300).to_str()
    run = _tiny_run(tmp_path, text[: len(text) // 2])
    out = tmp_path / "out"
    _one_error(capsys, ["convert", "--to-hf", str(run), "--out", str(out), "--family", "mixtral"],
               "tokenizer.json")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_export_refuses_a_tokenizer_linked_outside_the_run(tmp_path, capsys):
    from moelab.data.tokenizer import train_bpe
    text = train_bpe(["def f(x):\n    return x\n"] * 20, 300).to_str()
    run = _tiny_run(tmp_path, text)
    elsewhere = tmp_path / "elsewhere.json"
    os.rename(run / "tokenizer.json", elsewhere)
    (run / "tokenizer.json").symlink_to(elsewhere)
    _one_error(capsys, ["convert", "--to-hf", str(run), "--out", str(tmp_path / "out"), "--family", "mixtral"],
               "tokenizer.json", "outside")
