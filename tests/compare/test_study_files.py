"""Study files: the bundled ones parse and plan, malformed ones are refused by name, and the pieces
behind a study's answer (claim outcomes, seeds needed, the two-domain split) do what they say."""

import json
import math

import pytest

from moelab.cli import main
from moelab.compare import stats
from moelab.compare.answer import Judged, outcome_of, overall, parse_measure
from moelab.compare.study import find_study, literal, load_study, study_names
from moelab.compare.study_run import plan_study
from moelab.config import ConfigError
from moelab.data.domains import split_source

BUNDLED = ("granularity", "expert-count", "shared-expert", "stability", "balance", "capacity", "domains",
           "inference")

GOOD = '''
question = "Does it?"
budget = "2k"
seeds = 2
[claim]
text = "It does"
source = "Someone et al. 2024"
[models]
dense = "dense"
[models.small]
preset = "moe"
"model.moe.top_k" = 1
'''


def test_every_bundled_study_is_listed_parses_and_states_its_run_time():
    assert set(BUNDLED) <= set(study_names())
    for name in BUNDLED:
        spec = load_study(find_study(name))
        assert spec.question.endswith("?") and spec.claim["text"] and spec.claim["source"]
        assert spec.measured, f"{name}.toml must state its measured run time"
        assert spec.expectations, f"{name}.toml must say what its claim predicts"


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_study_plans_every_unit(tmp_path, name):
    spec = load_study(find_study(name))
    plans = plan_study(spec, tmp_path / name, overrides=[], seeds=None, budget_scale=1.0, nproc=1, command="t")
    assert set(plans) == ({v.name for v in spec.variants} or {""})
    for variant, plan in plans.items():
        assert plan["study"]["question"] == spec.question and plan["study"]["variant"] == (variant or None)
        assert all(u["run_dir"] == f"runs/{u['id']}" for u in plan["units"])
        assert plan["budgets"] == list(spec.budgets)


def test_studies_command_lists_them(capsys):
    assert main(["studies", "--json"]) == 0
    listed = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert set(BUNDLED) <= set(listed) and listed["domains"]["variants"] == ["code", "prose", "mix"]


def _write(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace('preset = "moe"', 'presett = "moe"'), "models.small.presett is not a known key; did you mean 'preset'"),
    (lambda t: t.replace('question = "Does it?"\n', ""), "question is missing"),
    (lambda t: t.replace('budget = "2k"', 'budget = "lots"'), "budget = 'lots' is not a budget"),
    (lambda t: t.replace('budget = "2k"', "budget = 2000"), "budget = 2000 is not a budget"),
    (lambda t: t.replace('budget = "2k"', 'budgets = ["2k", "1k"]'), "increasing order"),
    (lambda t: t.replace('"model.moe.top_k" = 1', '"model.moe.topk" = 1'), "models.small: unknown config key 'model.moe.topk'"),
    (lambda t: t.replace('"model.moe.top_k" = 1', '"model.moe.top_k" = 99'), "models.small: model.moe.top_k = 99 is invalid"),
    (lambda t: t.replace('"model.moe.top_k" = 1', 'colour = "red"'), "models.small.colour is not a known key"),
    (lambda t: t + 'seedz = 3\n', "seedz is not a known key"),
    (lambda t: t.replace('source = "Someone et al. 2024"\n', ""), "claim.source is missing"),
    (lambda t: t.replace("seeds = 2", "seeds = 0"), "seeds = 0 is invalid"),
    (lambda t: t + '[[claim.expect]]\nmodel = "big"\nverdict = "ahead"\n', "claim.expect[0].model = 'big' is not one of the models"),
    (lambda t: t + '[[claim.expect]]\nmodel = "small"\nverdict = "better"\n', "claim.expect[0].verdict = 'better' is invalid"),
    (lambda t: t.replace("seeds = 2", 'seeds = 2\nreference = "huge"'), "reference = 'huge' is not one of the models"),
    (lambda t: t.replace("seeds = 2", 'seeds = 2\nreport = ["val_loss@2"]'), "report is invalid"),
    (lambda t: t + '[variants.x]\ndomain = "music"\n', "variants.x.domain = 'music' is invalid"),
    (lambda t: t.replace("[models]\ndense = \"dense\"", "[models]\ndense = \"densee\""), "unknown preset 'densee'"),
])
def test_a_malformed_study_is_refused_by_name(tmp_path, capsys, edit, needle):
    path = _write(tmp_path, edit(GOOD))
    with pytest.raises(ConfigError) as e:
        load_study(path)
    assert needle in str(e.value) and str(path) in str(e.value)
    out = tmp_path / "out"
    assert main(["compare", "--study", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study ") and needle in err and "Traceback" not in err
    assert not out.exists()


def test_study_options_that_conflict_are_refused(tmp_path, capsys):
    path = _write(tmp_path, GOOD)
    assert main(["compare", "--study", str(path), "--models", "dense"]) == 2
    assert "drop --models" in capsys.readouterr().err
    assert main(["compare", "--study", "granularty"]) == 2
    assert "did you mean 'granularity'" in capsys.readouterr().err
    assert main(["compare", "--study", str(path), "--budget-scale", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--budget-scale" in capsys.readouterr().err


def test_a_study_plans_with_scaled_budgets_and_its_own_models(tmp_path):
    spec = load_study(_write(tmp_path, GOOD))
    plans = plan_study(spec, tmp_path / "o", overrides=["model.n_layers=2"], seeds=None, budget_scale=0.5,
                       nproc=1, command="t")
    plan = plans[""]
    assert plan["budgets"] == ["1k"] and plan["budget_tokens"] == [1000] and plan["seeds"] == [1337, 1338]
    small = next(u for u in plan["units"] if u["model"] == "small")
    args = small["train_args"]
    assert args[:2] == ["--preset", "moe"]
    # the model's own setting, then the command line's --set, then what compare adds
    assert args.index("model.moe.top_k=1") < args.index("model.n_layers=2") < args.index("train.seed=1337")


def test_values_become_override_literals():
    assert literal(True) == "true" and literal(3e-3) == "0.003" and literal(8) == "8"
    assert literal("none") == "none" and literal("all") == '"all"' and literal([0, 2]) == "[0, 2]"


def test_claim_outcomes_and_the_seeds_a_gap_would_need():
    assert outcome_of("ahead", "ahead") == "reproduces"
    assert outcome_of("ahead", "behind") == "contradicts"
    assert outcome_of("ahead", "within noise") == "not resolvable at this budget"
    assert outcome_of("within noise", "within noise") == "reproduces"
    assert outcome_of("within noise", "ahead") == "contradicts"
    assert overall(["reproduces", "not resolvable at this budget"]).startswith("partly reproduces")
    assert overall(["reproduces", "contradicts"]).startswith("mixed")
    assert parse_measure("val_loss@0.25") == ("val_loss", 0.25)
    with pytest.raises(ValueError):
        parse_measure("load_cv@0.5")
    gaps = [-0.01, -0.03, 0.005]                       # mean -0.0117, sd 0.0176: within noise at n = 3
    j = Judged("a", "b", "val_loss", stats.judge(gaps, "seeds"), gaps, False)
    assert j.verdict.verdict == "within noise"
    n = j.seeds_needed
    sd = stats.sd(gaps)
    assert stats.t_critical(n - 1) * sd / math.sqrt(n) < abs(j.verdict.gap)
    assert stats.t_critical(n - 2) * sd / math.sqrt(n - 1) >= abs(j.verdict.gap)


def test_the_two_domain_split_separates_code_from_prose():
    source = '''"""Module docstring: what this module is for, in a sentence or two of prose."""
import os  # a short comment

# A comment block that explains, in English, why the function below
# exists and what it returns to its caller.
def f(x):
    """Return x doubled, which is a docstring long enough to be kept as prose."""
    s = "a string that is code, not a docstring"
    return 2 * x
'''
    split = split_source(source)
    assert "def f(x):" in split.code and '"a string that is code' in split.code
    assert "docstring" not in split.code.replace("not a docstring", "") and "#" not in split.code
    assert split.prose[0].startswith("Module docstring") and "explains, in English" in split.prose[1]
    assert split.prose[2].startswith("Return x doubled") and len(split.prose) == 3   # the short comment is dropped
