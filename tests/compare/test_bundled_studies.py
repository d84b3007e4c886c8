"""Every bundled study, run through to its report at tiny sizes (--budget-scale 0.01, one seed,
2-layer models 32 wide): the report opens with the question and the answer, results.json holds
the study's question, claim and answer, and a study with variants gets one compare folder per
variant. Slow: 3 to 15 real training processes per study."""

import json

import pytest

from moelab.cli import main
from moelab.compare.study import find_study, load_study

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=512",
        "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
        "data.max_bytes=1500000", "data.val_fraction=0.1"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["granularity", "expert-count", "shared-expert", "stability", "balance",
                                  "capacity", "domains", "inference"])
def test_a_bundled_study_runs_to_its_report(tmp_path_factory, monkeypatch, name):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))
    out = tmp_path_factory.mktemp("study") / name
    spec = load_study(find_study(name))
    rc = main(["compare", "--study", name, "--budget-scale", "0.01", "--seeds", "1", "--out", str(out),
               "--no-progress", *sum((["--set", s] for s in TINY), [])])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    study = results["study"]
    assert study["question"] == spec.question and study["claim"]["text"] == spec.claim["text"]
    assert study["answer"] and study["verdict"] and len(study["expectations"]) == len(spec.expectations)
    report = (out / "report.md").read_text()
    head = report.split("## Answer", 1)
    assert len(head) == 2 and spec.question in head[0] and "## Results" not in head[0]
    assert "Verdict: **" in head[1].split("\n## ", 1)[0]
    for v in spec.variants:
        sub = json.loads((out / v.name / "results.json").read_text())
        assert sub["study"]["variant"] == v.name and (out / v.name / "report.md").is_file()
    if name == "domains":
        mix = json.loads((out / "mix" / "results.json").read_text())
        cats = mix["inspect"]["moe"]["categories"]["names"]
        assert set(cats) == {"code", "prose"}
