"""Run folders written by earlier moelab keep working: a tiny run folder and checkpoint written by
the code of 2026-12-03 (tests/fixtures/run-v1, 4 steps, checkpoint at step 2) must load with the
same logits and resume to the same losses; and each preset's state-dict keys stay what checkpoints
and the Hugging Face key maps were written against (tests/fixtures/state_dict_keys.json)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moelab
from moelab.runfolder import load_metrics
from moelab.train.trainer import resume_config, train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RUN_V1 = FIXTURES / "run-v1"


def test_a_v1_run_folder_loads_with_its_logits():
    expected = load_file(FIXTURES / "run-v1-expected.safetensors")
    model = moelab.load(RUN_V1)
    assert model.tokenizer is not None and model.tokenizer.get_vocab_size() <= 320
    with torch.no_grad():
        logits = model(expected["tokens"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)


def test_a_v1_checkpoint_resumes_to_the_recorded_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(RUN_V1, run)
    recorded = {r["step"]: r["loss"] for r in load_metrics(run) if r["kind"] == "train"}
    meta = json.loads((run / "run_meta.json").read_text())
    summary = train(resume_config(run, []), run, resume=True, show_progress=False, log=lambda m: None)
    assert summary["steps"] == 4
    resumed = {r["step"]: r["loss"] for r in load_metrics(run) if r["kind"] == "train"}
    assert sorted(resumed) == [1, 2, 3, 4]
    if summary["corpus_sha256"] != meta["corpus"]["sha256"]:
        pytest.skip("this Python's standard library is not the corpus the fixture was trained on")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(recorded[step], rel=1e-5), step


def _keys(preset: str) -> list[str]:
    with torch.device("meta"):
        return sorted(moelab.build(preset).state_dict())


def test_every_presets_state_dict_keys_are_the_recorded_ones():
    from moelab.presets import preset_names
    golden = json.loads((FIXTURES / "state_dict_keys.json").read_text())
    assert sorted(golden) == sorted(preset_names()), "a preset was added or removed: record its keys"
    for preset, keys in golden.items():
        assert _keys(preset) == keys, f"{preset}: a state-dict key changed (a rename breaks old checkpoints)"
