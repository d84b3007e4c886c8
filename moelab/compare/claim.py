"""The study a compare answers: the one its plan carries (``--study``), or for a plain compare the
usual claim its models stand for, so that every report opens with a question and an answer."""

from __future__ import annotations

from typing import Optional

from moelab.compare.analysis import Study
from moelab.compare.answer import Answer, Expectation, build_answer, describe_measure, judge_measure, verdict_phrase

CLAIMS = {
    "active": "a sparse model beats the dense one at equal active parameters (equal compute per token)",
    "total": "at equal total parameters a sparse model matches the dense one with less compute per token",
    "both": "a sparse model beats the dense one at equal active parameters (equal compute per token)",
}
CLAIM_SOURCE = "the usual account of MoE, e.g. Fedus et al. 2021 (Switch Transformer), Dai et al. 2024 (DeepSeekMoE)"


def default_study(plan: dict, study: Study) -> dict:
    """The question and claim of a compare started without ``--study``: which model has the lowest
    loss, and the usual claim that the sparse ones beat the dense reference."""
    names = [m["name"] for m in plan["models"]]
    match = plan["match"]
    matched = "trained as configured" if match == "none" else f"matched on {match} parameters"
    question = (f"Which of {', '.join(names)} reaches the lowest validation loss on the same tokens, "
                f"{matched}?")
    rows = {m.name: m for m in study.at()}
    ref = rows[study.reference]
    expect = []
    claim = None
    if ref.kind == "dense" and match in CLAIMS:
        expect = [Expectation(m.name, "ahead").public() for m in study.at() if m.kind != "dense"]
        if expect:
            claim = {"text": CLAIMS[match], "source": CLAIM_SOURCE, "anchor": ""}
    return {"name": None, "question": question, "claim": claim, "expect": expect, "report": ["val_loss"],
            "variants": [], "variant": None}


def expectations_of(spec: dict, variant: Optional[str]) -> list[Expectation]:
    """The predictions one compare folder can judge: those of its variant, without contrasts."""
    out = []
    for e in spec.get("expect") or []:
        if e.get("against_variants"):
            continue
        if (e.get("variant") or None) != (variant or None):
            continue
        out.append(Expectation(e["model"], e["verdict"], e.get("vs"), e.get("measure", "val_loss"),
                               e.get("variant"), tuple(e.get("against_variants") or ())))
    return out


def study_answer(spec: dict, study: Study, budget_words: str) -> Answer:
    variant = spec.get("variant")
    return build_answer(study, budget_words, expectations_of(spec, variant), spec.get("claim"))


def measures_table(spec: dict, study: Study) -> str:
    """Markdown: the study's report measures per model (mean ± sd over seeds), each with its
    verdict against the reference."""
    from moelab.compare.answer import run_values
    from moelab.compare import stats
    measures = list(spec.get("report") or ["val_loss"])
    rows = study.at()
    ref = next(m for m in rows if m.name == study.reference)
    head = "| model | " + " | ".join(describe_measure(m) for m in measures) + " |"
    rule = "|---|" + "---|" * len(measures)
    body = []
    for m in rows:
        cells = []
        for measure in measures:
            vals = run_values(m, measure)
            mean, sd = stats.mean(vals), stats.sd(vals)
            text = "-" if mean is None else _fmt(mean) + ("" if sd is None else f" ± {_fmt(sd)}")
            if m is not ref and mean is not None:
                j = judge_measure(m, ref, measure)
                if j is not None and j.verdict.basis != "none":
                    text += f" ({verdict_phrase(j)})"
            cells.append(text)
        body.append(f"| {m.name}{' (reference)' if m is ref else ''} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def _fmt(x: float) -> str:
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.4f}" if abs(x) < 1 or x != int(x) else f"{x:.0f}"
