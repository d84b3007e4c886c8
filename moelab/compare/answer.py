"""The short answer every compare report opens with, and the verdict on a study's claim.

A *measure* is a number of ``analysis.NUMBERS`` (``val_loss``, ``load_cv``, ``decode_tokens_per_s``,
...) or ``val_loss@F``: the validation loss after the fraction F of the budget, read off each
run's evaluation curve (linear between evaluations), so a study can ask about early training.

Every gap is judged by ``stats.judge``, paired by seed: on the difference ``model - reference``
for numbers where less is better, and on ``log(reference / model)`` for speeds and entropies
(``analysis.HIGHER_IS_BETTER``), so "ahead" always means better. A claim lists what it predicts
(``[[claim.expect]]``: model, against whom, measure, verdict); each prediction is then
*reproduces* (the predicted verdict came out), *contradicts* (the opposite came out) or *not
resolvable at this budget* (within noise where a difference was predicted, or no noise estimate),
and the claim as a whole takes the weakest of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from moelab.compare import stats
from moelab.compare.analysis import HIGHER_IS_BETTER, NUMBERS, ModelSummary, Study, compare, interpolate

VERDICTS = ("ahead", "behind", "within noise")
MAX_SEEDS_NEEDED = 1000


def parse_measure(text: str) -> tuple[str, Optional[float]]:
    """``"val_loss@0.25"`` -> ("val_loss", 0.25); ``"load_cv"`` -> ("load_cv", None). Raises
    ValueError naming the allowed forms."""
    key, at, frac = text.partition("@")
    if key not in NUMBERS:
        raise ValueError(f"measure {text!r} is not one of {', '.join(NUMBERS)} (or val_loss@F)")
    if not at:
        return key, None
    if key != "val_loss":
        raise ValueError(f"measure {text!r}: only val_loss can be read part way (val_loss@F)")
    try:
        f = float(frac)
    except ValueError:
        f = -1.0
    if not 0 < f <= 1:
        raise ValueError(f"measure {text!r}: F must be a fraction of the budget in (0, 1]")
    return key, f


def describe_measure(measure: str) -> str:
    key, frac = parse_measure(measure)
    if frac is not None:
        return f"validation loss at {frac:.0%} of the budget"
    return {"val_loss": "validation loss", "tokens_per_s": "training tokens/s",
            "prefill_tokens_per_s": "prefill tokens/s", "decode_tokens_per_s": "decode tokens/s (batch 1)",
            "decode_tokens_per_s_batch8": "decode tokens/s (batch 8)", "load_cv": "expert load CV",
            "load_cv_early": "expert load CV in the first quarter", "dropped_fraction": "dropped share",
            "loss_spikes": "loss spikes", "max_spike": "largest spike (loss / recent mean)",
            "nonfinite_steps": "non-finite steps", "router_entropy": "router entropy (fraction of log E)",
            "router_entropy_min": "lowest router entropy (fraction of log E)",
            "dead_experts": "dead experts", "val_loss_at_equal_time": "loss at equal training time",
            }.get(key, key.replace("_", " "))


def run_values(m: ModelSummary, measure: str) -> list[Optional[float]]:
    """One value per seed (``m.runs`` order)."""
    key, frac = parse_measure(measure)
    if frac is None:
        return m.seeds_of(key)
    out = []
    for r in m.runs:
        curve = r.eval_curve
        target = frac * (r["tokens"] or 0)
        out.append(interpolate([e["tokens"] for e in curve], [e["val_loss"] for e in curve], target)
                   if curve else None)
    return out


@dataclass(frozen=True)
class Judged:
    """``model`` against ``reference`` on ``measure``: the verdict and the paired samples."""

    model: str
    reference: str
    measure: str
    verdict: stats.Verdict
    gaps: list
    log_ratio: bool                      # gaps are log(reference / model), else model - reference

    @property
    def seeds_needed(self) -> Optional[int]:
        """Seeds that would make the measured mean gap exceed the threshold at the measured spread
        (None when the spread is unknown or the gap is zero)."""
        v = self.verdict
        if v.se is None or v.basis != "seeds" or v.gap == 0:
            return None
        spread = v.se * math.sqrt(v.n)
        if spread == 0:
            return v.n
        for n in range(2, MAX_SEEDS_NEEDED + 1):
            if stats.t_critical(n - 1) * spread / math.sqrt(n) < abs(v.gap):
                return n
        return MAX_SEEDS_NEEDED + 1

    def public(self) -> dict:
        return {"model": self.model, "reference": self.reference, "measure": self.measure,
                "paired_gaps": self.gaps, "gap_is_log_ratio": self.log_ratio,
                "seeds_needed": self.seeds_needed, **self.verdict.public()}


def judge_measure(model: ModelSummary, ref: ModelSummary, measure: str) -> Optional[Judged]:
    """The paired verdict of ``model`` against ``ref`` on ``measure``; None without numbers."""
    key, frac = parse_measure(measure)
    if key == "val_loss" and frac is None:
        c = compare(model, ref, "val_loss")
        return None if c is None else Judged(model.name, ref.name, measure, c.verdict, c.gaps, False)
    a, b = run_values(model, measure), run_values(ref, measure)
    log_ratio = key in HIGHER_IS_BETTER
    if log_ratio:
        gaps = [math.log(y / x) for x, y in zip(a, b) if x and y and x > 0 and y > 0]
    else:
        gaps = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if not gaps:
        return None
    return Judged(model.name, ref.name, measure, stats.judge(gaps, "seeds" if len(gaps) >= 2 else "none"),
                  gaps, log_ratio)


def verdict_phrase(j: Judged) -> str:
    """"ahead" / "behind" / "within noise" said for the measure: lower loss, faster, ..."""
    v = j.verdict.verdict
    key, _ = parse_measure(j.measure)
    if v not in ("ahead", "behind") or key.startswith("val_loss"):
        return v
    if key in HIGHER_IS_BETTER:
        return "higher" if v == "ahead" else "lower"
    return "lower" if v == "ahead" else "higher"


def gap_text(j: Judged) -> str:
    v = j.verdict
    if j.log_ratio:
        ratio = math.exp(-v.gap)
        need = "" if v.threshold is None else f"; needed a ratio beyond {math.exp(v.threshold):.3f}x either way"
        return f"{ratio:.3f}x{need}"
    unit = " nats" if parse_measure(j.measure)[0].startswith("val_loss") else ""
    need = "" if v.threshold is None else f"; needed beyond ±{v.threshold:.4f}{unit}"
    return f"{v.gap:+.4f}{unit}{need}"


def seeds_text(j: Judged) -> str:
    n = j.seeds_needed
    v = j.verdict
    if v.verdict != "within noise" or n is None:
        return ""
    if n > MAX_SEEDS_NEEDED:
        return "; no practical number of seeds resolves a gap this small at this spread"
    return f"; about {n} seeds at this spread would resolve a gap this size"


def judged_line(j: Judged) -> str:
    """One line: "moe vs dense: +0.0712 nats (needed beyond ±0.0904), within noise; about 7 seeds ..."."""
    v = j.verdict
    what = "" if j.measure == "val_loss" else f" on {describe_measure(j.measure)}"
    if v.basis == "none":
        return f"{j.model} vs {j.reference}{what}: {gap_text(j)}, no verdict (no noise estimate: one seed)"
    basis = "" if v.basis == "seeds" else f" (over {v.basis}: evaluation noise only)"
    return f"{j.model} vs {j.reference}{what}: {gap_text(j)}, **{verdict_phrase(j)}**{basis}{seeds_text(j)}"


# ---------------------------------------------------------------------------------------------
# claims
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expectation:
    """What a claim predicts: ``model`` against ``vs`` (None: the reference) on ``measure`` comes
    out ``verdict``; ``variant`` for studies with variants; with ``against_variants`` the
    prediction is about the difference of gaps: the gap in ``variant`` minus the mean gap in those
    variants, paired by seed (does the model gain more in one setting than in the others?)."""

    model: str
    verdict: str
    vs: Optional[str] = None
    measure: str = "val_loss"
    variant: Optional[str] = None
    against_variants: tuple = ()

    def describe(self, reference: str) -> str:
        what = describe_measure(self.measure)
        vs = self.vs or reference
        where = f" in {self.variant}" if self.variant else ""
        if self.against_variants:
            return (f"{self.model}'s {what} gap to {vs}{where} smaller than in "
                    f"{' and '.join(self.against_variants)} ({self.verdict})")
        word = {"ahead": "better than", "behind": "worse than", "within noise": "within noise of"}[self.verdict]
        return f"{self.model} {word} {vs} on {what}{where}"

    def public(self) -> dict:
        return {"model": self.model, "vs": self.vs, "measure": self.measure, "verdict": self.verdict,
                "variant": self.variant, "against_variants": list(self.against_variants)}


OUTCOMES = ("reproduces", "contradicts", "not resolvable at this budget")


def outcome_of(expected: str, observed: Optional[str]) -> str:
    if observed in (None, "no noise estimate"):
        return "not resolvable at this budget"
    if expected == "within noise":
        return "reproduces" if observed == "within noise" else "contradicts"
    if observed == expected:
        return "reproduces"
    return "contradicts" if observed in ("ahead", "behind") else "not resolvable at this budget"


def overall(outcomes: Sequence[str]) -> str:
    """The claim's verdict from its predictions' outcomes."""
    if not outcomes:
        return "no prediction stated"
    if "contradicts" in outcomes:
        return "contradicts" if "reproduces" not in outcomes else "mixed: partly reproduces, partly contradicts"
    if all(o == "reproduces" for o in outcomes):
        return "reproduces"
    if "reproduces" in outcomes:
        return "partly reproduces (the rest not resolvable at this budget)"
    return "not resolvable at this budget"


@dataclass
class ExpectationResult:
    expectation: Expectation
    judged: Optional[Judged]
    outcome: str
    line: str

    def public(self) -> dict:
        return {**self.expectation.public(), "outcome": self.outcome, "line": self.line,
                "observed": None if self.judged is None else self.judged.public()}


def _by_name(study: Study, name: str) -> Optional[ModelSummary]:
    return study.by_budget[study.headline].get(name)


def evaluate(exp: Expectation, studies: dict) -> ExpectationResult:
    """Judge one prediction on ``studies`` (variant name -> analysis.Study; "" for a study without
    variants)."""
    key = exp.variant or ""
    study = studies.get(key)
    if study is None and not exp.variant and len(studies) == 1:
        study = next(iter(studies.values()))
    if study is None:
        return ExpectationResult(exp, None, "not resolvable at this budget",
                                 f"{exp.describe('the reference')}: variant not run")
    ref_name = exp.vs or study.reference
    if exp.against_variants:
        return _evaluate_contrast(exp, studies, ref_name)
    m, ref = _by_name(study, exp.model), _by_name(study, ref_name)
    j = None if m is None or ref is None else judge_measure(m, ref, exp.measure)
    outcome = outcome_of(exp.verdict, None if j is None else j.verdict.verdict)
    body = "no numbers" if j is None else judged_line(j).split(": ", 1)[1]
    return ExpectationResult(exp, j, outcome, f"{exp.describe(ref_name)}: {outcome} ({body})")


def _evaluate_contrast(exp: Expectation, studies: dict, ref_name: str) -> ExpectationResult:
    """Difference of paired gaps between variants, seed by seed."""
    def gaps(variant: str) -> Optional[list]:
        s = studies.get(variant)
        if s is None:
            return None
        m, ref = _by_name(s, exp.model), _by_name(s, ref_name)
        j = None if m is None or ref is None else judge_measure(m, ref, exp.measure)
        return None if j is None or j.verdict.basis != "seeds" else j.gaps
    main = gaps(exp.variant)
    others = [gaps(v) for v in exp.against_variants]
    if main is None or any(o is None for o in others) or len({len(main), *map(len, others)}) != 1:
        return ExpectationResult(exp, None, "not resolvable at this budget",
                                 f"{exp.describe(ref_name)}: not resolvable (needs the same two or more seeds in every variant)")
    diffs = [g - sum(o[i] for o in others) / len(others) for i, g in enumerate(main)]
    j = Judged(exp.model, ref_name, exp.measure, stats.judge(diffs, "seeds"), diffs, False)
    outcome = outcome_of(exp.verdict, j.verdict.verdict)
    v = j.verdict
    return ExpectationResult(exp, j, outcome, (
        f"{exp.describe(ref_name)}: {outcome} (gap in {exp.variant} minus the mean gap in "
        f"{', '.join(exp.against_variants)}: {v.gap:+.4f}, needed beyond ±{v.threshold:.4f}, "
        f"{v.verdict}{seeds_text(j)})"))


# ---------------------------------------------------------------------------------------------
# the short answer
# ---------------------------------------------------------------------------------------------

@dataclass
class Answer:
    lines: list                          # markdown, a few lines
    verdict: str                         # the claim's verdict (see ``overall``)
    expectations: list = field(default_factory=list)     # ExpectationResult
    judged: list = field(default_factory=list)           # Judged, each model vs the reference

    def text(self) -> str:
        return " ".join(line.replace("**", "") for line in self.lines)

    def public(self) -> dict:
        return {"answer": self.text(), "answer_lines": self.lines, "verdict": self.verdict,
                "expectations": [e.public() for e in self.expectations],
                "gaps": [j.public() for j in self.judged]}


def ranking_line(study: Study, budget_words: str) -> str:
    rows = sorted(study.at(), key=lambda m: (m.mean("val_loss") is None, m.mean("val_loss") or 0.0))
    parts = []
    for m in rows:
        mean, sd = m.mean("val_loss"), m.sd("val_loss")
        parts.append(f"{m.name} {'-' if mean is None else f'{mean:.4f}'}" + ("" if sd is None else f" ± {sd:.4f}"))
    n = len(study.seeds)
    return (f"At {budget_words} per model and seed ({n} seed{'s' if n != 1 else ''}), validation loss "
            f"(nats, lower is better, mean ± sd over seeds): " + ", ".join(parts) + ".")


def model_lines(study: Study) -> tuple[list[str], list[Judged]]:
    """Each model against the reference on the final validation loss."""
    rows = {m.name: m for m in study.at()}
    ref = rows[study.reference]
    lines, judged = [], []
    for name in study.models:
        if name == study.reference:
            continue
        j = judge_measure(rows[name], ref, "val_loss")
        if j is not None:
            judged.append(j)
            lines.append(judged_line(j))
    return lines, judged


def build_answer(study: Study, budget_words: str, expectations: Sequence[Expectation] = (),
                 claim: Optional[dict] = None) -> Answer:
    """The answer of one compare (a study without variants, or the default compare)."""
    head = ranking_line(study, budget_words)
    lines, judged = model_lines(study)
    results = [evaluate(e, {"": study}) for e in expectations]
    verdict = overall([r.outcome for r in results])
    out = [head] + [f"- {line}" for line in lines]
    if claim:
        out.append(claim_line(claim, verdict))
        out += [f"  - {r.line}" for r in results]
    return Answer(out, verdict, results, judged)


def claim_line(claim: dict, verdict: str) -> str:
    source = f" ({claim['source']})" if claim.get("source") else ""
    return f"- Claim{source}: {claim['text'].rstrip('.')}. Verdict: **{verdict}**."
