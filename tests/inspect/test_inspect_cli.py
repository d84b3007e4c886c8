"""`moelab inspect` as a user runs it: files, the JSON interface, errors, imported models."""

import json
import shutil

import pytest

import moelab
from moelab.cli import main
from moelab.inspect import InspectOptions, inspect_run
from moelab.runfolder import save as save_run

LAYER_KEYS = {"layer", "tokens_per_expert", "normalized_load", "dead_experts", "entropy", "coactivation",
              "vocab_specialization", "category_share", "ablation_delta_loss"}


@pytest.fixture(scope="module")
def cli_run(moe_run, tmp_path_factory):
    """One full CLI inspection: every analysis, a trace and a saturation comparison."""
    import io
    from contextlib import redirect_stdout
    out = tmp_path_factory.mktemp("cli") / "inspect"
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        code = main(["inspect", str(moe_run), "--tokens", "2048", "--out", str(out), "--json",
                     "--ablate", "top,bottom,2", "--ablate-tokens", "512",
                     "--against", str(moe_run / "ckpt-00000006"), "--prompt", "def main(argv):\n    return 0"])
    return code, stdout.getvalue(), out


def test_json_interface_report_and_pngs(cli_run):
    code, stdout, out = cli_run
    assert code == 0
    printed = json.loads(stdout)
    assert printed == json.loads((out / "inspect.json").read_text())
    assert printed["tokens"] == 2048 and printed["top_k"] == 2 and len(printed["layers"]) == 2
    for layer in printed["layers"]:
        assert LAYER_KEYS <= set(layer)
        E = len(layer["tokens_per_expert"])
        assert len(layer["normalized_load"]) == E and len(layer["coactivation"]) == E
        assert len(layer["ablation_delta_loss"]) == E
        # the most loaded, the least loaded and expert 2 were ablated, the others skipped
        load = layer["tokens_per_expert"]
        order = sorted(range(E), key=lambda e: (-load[e], e))
        ablated = {e for e, d in enumerate(layer["ablation_delta_loss"]) if d is not None}
        assert ablated == {order[0], order[-1], 2}
        assert 0 <= layer["saturation_top1"] <= 1 and 0 <= layer["saturation_topk"] <= 1
    assert printed["trace"]["tokens"][0] and len(printed["trace"]["experts"]) == 2
    report = (out / "report.md").read_text()
    for section in ("## Load", "## Co-activation", "## Vocabulary specialisation",
                    "## Category specialisation", "## Expert ablation", "## Router saturation", "## Trace"):
        assert section in report
    for png in ("load_heatmap", "coactivation", "transitions", "category_share", "specialization",
                "ablation", "saturation", "trace"):
        path = out / f"{png}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_dense_run_is_a_clear_error(tmp_path, capsys):
    cfg = moelab.resolve_config("dense", ["model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                                          "model.vocab_size=512", "model.ffn_hidden=64"])
    save_run(tmp_path / "dense", moelab.Transformer(cfg.model), cfg)
    assert main(["inspect", str(tmp_path / "dense")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "dense model" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--tokens", "0"], "--tokens = 0"),
    (["--ablate", "sideways"], "--ablate"),
    (["--categories", "colour"], "--categories"),
    (["--set", "model.moe.top_k=1"], "only data.* and train.*"),
    (["--against", "/nonexistent"], "--against"),
])
def test_bad_options_exit_2(moe_run, tmp_path, capsys, args, message):
    assert main(["inspect", str(moe_run), "--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_tokenizer_is_named(moe_run, tmp_path, capsys):
    run = tmp_path / "notok"
    shutil.copytree(moe_run, run, ignore=shutil.ignore_patterns("ckpt-*", "tb", "tokenizer.json"))
    assert main(["inspect", str(run)]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_imported_hugging_face_model(moe_run, data_overrides, tmp_path, capsys):
    from tests.interop.hf_models import hf_model
    hf = hf_model("mixtral", dict(vocab_size=512, num_key_value_heads=2, intermediate_size=32,
                                  num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128))
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy(moe_run / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    # inspect_run is what the command runs, less the figures (drawn and checked above)
    result = inspect_run(tmp_path / "run", InspectOptions(tokens=1024, ablate="top", ablate_tokens=256,
                                                          overrides=tuple(data_overrides)))
    assert result["moe_layers"] == [0, 1, 2] and result["categories"]["kind"] == "python"
    for layer in result["layers"]:
        assert sum(layer["tokens_per_expert"]) == 1024 * 2
        assert sum(d is not None for d in layer["ablation_delta_loss"]) == 1
