"""Study files: a comparison written down as data, with the question it asks and the published
claim it tests, so that ``moelab compare --study FILE`` reruns it with one command.

    question = "Do finer experts help at equal total and active parameters?"
    budget = "300k"                       # or budgets = ["100k", "300k", "1M"]
    seeds = 3                             # or a list
    match = "none"                        # active | total | both | none
    reference = "g1"                      # verdicts against this model (default: first dense)
    report = ["val_loss", "val_loss@0.25", "load_cv"]   # the answer table's measures
    measured = "31 min on 2 cores (...)"  # how long it took, stated by whoever ran it

    [claim]
    text = "Finer experts lower the loss at equal compute"
    source = "Dai et al. 2024, DeepSeekMoE, Table 1"
    anchor = "published number, where there is one"
    [[claim.expect]]                      # what the claim predicts, judged after the run
    model = "g8"
    vs = "g1"                             # default: the reference
    measure = "val_loss"                  # any number of the report, or val_loss@F
    verdict = "ahead"                     # ahead | behind | within noise

    [set]                                 # applied to every model
    "model.d_model" = 128

    [models]
    dense = "dense"                       # a preset (or a config .toml beside the study)
    [models.g1]                           # or a table: a base plus its own overrides
    preset = "moe"
    "model.moe.top_k" = 1                 # dotted keys, or nested [models.g1.model.moe] tables

    [variants.lr1e-2]                     # optional: the whole comparison again with more settings,
    "train.lr" = 1e-2                     # each in its own compare folder
    models = ["dense", "moe"]             # optional subset
    domain = "mix"                        # optional: train on the two-domain corpus (code | prose | mix)

Every error names the file and the key: an unknown key in a model table, a missing question, a
budget that is not a budget, a config key the models do not have.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from moelab.compare.answer import VERDICTS, Expectation, parse_measure
from moelab.compare.matching import MATCH_MODES
from moelab.compare.plan import MAX_SEEDS, Budget, ModelSpec, parse_budget
from moelab.config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_KEYS = ("question", "claim", "models", "budget", "budgets", "seeds", "match", "reference", "set",
            "variants", "report", "measured")
CLAIM_KEYS = ("text", "source", "anchor", "expect")
EXPECT_KEYS = ("model", "vs", "measure", "verdict", "variant", "against_variants")
MODEL_KEYS = ("preset", "config", "description")
VARIANT_KEYS = ("models", "domain", "description")
CONFIG_SECTIONS = ("model", "train", "data", "parallel")
DOMAINS = ("code", "prose", "mix")
NAME = re.compile(r"[A-Za-z0-9_.+-]+")
DEFAULT_REPORT = ("val_loss",)


@dataclass(frozen=True)
class Variant:
    """The comparison again with ``overrides`` for every model (``models``: a subset, or all);
    ``domain``: train on one part of the two-domain corpus (``moelab.data.domains``)."""

    name: str
    overrides: tuple[str, ...] = ()
    models: Optional[tuple[str, ...]] = None
    domain: Optional[str] = None
    description: str = ""


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: str
    description: str                     # the file's leading comment
    question: str
    claim: dict                          # text, source, anchor
    expectations: tuple[Expectation, ...]
    models: tuple[ModelSpec, ...]        # each with the study's [set] before its own overrides
    budgets: tuple[str, ...]
    seeds: Any                           # a count or a list, as ``--seeds`` takes
    match: str
    reference: Optional[str]
    variants: tuple[Variant, ...]
    report: tuple[str, ...]
    measured: str = ""
    model_descriptions: dict = field(default_factory=dict)

    def public(self) -> dict:
        """What compare.json and results.json keep of the study."""
        return {"name": self.name, "file": self.path, "question": self.question, "claim": dict(self.claim),
                "expect": [e.public() for e in self.expectations], "report": list(self.report),
                "measured": self.measured, "description": self.description,
                "variants": [v.name for v in self.variants],
                "models": {m.name: self.model_descriptions.get(m.name, "") for m in self.models}}


# ---------------------------------------------------------------------------------------------
# finding a study
# ---------------------------------------------------------------------------------------------

def bundled_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "studies"


def study_names() -> list[str]:
    return sorted(p.stem for p in bundled_dir().glob("*.toml"))


def find_study(text: str) -> Path:
    """A study file: a path to a .toml, or the name of a bundled study (``moelab studies``)."""
    if text.endswith(".toml") or "/" in text or Path(text).is_file():
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"--study {text!r}: no such file")
        return path
    if text in study_names():
        return bundled_dir() / f"{text}.toml"
    close = difflib.get_close_matches(text, study_names(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"--study {text!r} is not a bundled study{hint} (bundled: {', '.join(study_names())}; "
                      f"or give a path to a .toml file)")


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------

def literal(value: Any) -> str:
    """A TOML value as the right-hand side of a ``--set key=value`` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "none" if value.strip().lower() in ("none", "null") else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    raise ConfigError(f"value {value!r} cannot be a config value")


class _File:
    """Error messages that name the study file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str):
        raise ConfigError(f"study {self.path}: {key} {message}")

    def unknown(self, where: str, key: str, allowed: tuple) -> None:
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        self.fail(f"{where}{key}" if where else key, f"is not a known key{hint} (allowed: {', '.join(allowed)})")


def _config_overrides(f: _File, table: dict, where: str, skip: tuple = ()) -> list[str]:
    """Dotted-key or nested config settings -> ``key=value`` overrides, in file order; the first
    part of every key must be a config section."""
    out = []

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if not prefix and key in skip:
                continue
            full = f"{prefix}{key}"
            if not prefix and full.split(".")[0] not in CONFIG_SECTIONS:
                f.unknown(where, key, (*skip, *(f"{s}.*" for s in CONFIG_SECTIONS)))
            if isinstance(value, dict):
                walk(value, full + ".")
            else:
                out.append(f"{full}={literal(value)}")
    walk(table, "")
    return out


def _string(f: _File, data: dict, key: str, where: str = "", required: bool = True) -> str:
    value = data.get(key)
    if value is None:
        if required:
            f.fail(f"{where}{key}", "is missing" + (": say what the study asks, e.g. question = "
                                                   "\"Do finer experts help at equal compute?\""
                                                   if key == "question" else ""))
        return ""
    if not isinstance(value, str) or not value.strip():
        f.fail(f"{where}{key}", f"= {value!r} is invalid: must be a non-empty string")
    return value.strip()


def _budgets(f: _File, data: dict) -> tuple[str, ...]:
    if "budget" in data and "budgets" in data:
        f.fail("budget", "and budgets are both given: use one")
    if "budgets" in data:
        texts = data["budgets"]
        if not isinstance(texts, list) or len(texts) < 2:
            f.fail("budgets", f"= {texts!r} is invalid: give a list of two or more token budgets "
                              f"(or budget = \"300k\" for one)")
        budgets = [_one_budget(f, "budgets", t) for t in texts]
        if any(b.tokens is None for b in budgets):
            f.fail("budgets", f"= {texts!r} is invalid: scaling budgets must be token counts, not times")
        tokens = [b.tokens for b in budgets]
        if tokens != sorted(set(tokens)):
            f.fail("budgets", f"= {texts!r} is invalid: list them in increasing order, without repeats")
        return tuple(str(t) for t in texts)
    if "budget" not in data:
        f.fail("budget", "is missing: how much each model trains, e.g. budget = \"300k\" (tokens) or \"10m\"")
    _one_budget(f, "budget", data["budget"])
    return (str(data["budget"]),)


def _one_budget(f: _File, key: str, text: Any) -> Budget:
    if not isinstance(text, str):
        f.fail(key, f"= {text!r} is not a budget: write it as a string, tokens (\"300k\", \"1M\") or time (\"10m\")")
    try:
        return parse_budget(text, key)
    except ConfigError as e:
        f.fail(key, f"= {text!r} is not a budget: {str(e).split('is invalid: ', 1)[-1]}")
        raise


def _seeds(f: _File, data: dict) -> Any:
    seeds = data.get("seeds", 3)
    if isinstance(seeds, bool):
        f.fail("seeds", f"= {seeds!r} is invalid: a count or a list of seeds")
    if isinstance(seeds, int):
        if not 1 <= seeds <= MAX_SEEDS:
            f.fail("seeds", f"= {seeds} is invalid: must be between 1 and {MAX_SEEDS}")
        return seeds
    if isinstance(seeds, list) and len(seeds) >= 2 and all(isinstance(s, int) and not isinstance(s, bool)
                                                           and s >= 0 for s in seeds):
        if len(set(seeds)) != len(seeds):
            f.fail("seeds", f"= {seeds} is invalid: a seed repeats")
        return ",".join(map(str, seeds))
    f.fail("seeds", f"= {seeds!r} is invalid: a count (3) or a list of two or more non-negative seeds")


def _model(f: _File, name: str, value: Any, base_dir: Path, common: list[str]) -> tuple[ModelSpec, str]:
    where = f"models.{name}."
    if not NAME.fullmatch(name):
        f.fail(f"models.{name}", "cannot name a folder: use letters, digits and . _ + -")
    if isinstance(value, str):
        table = {"preset": value} if not value.endswith(".toml") else {"config": value}
    elif isinstance(value, dict):
        table = value
    else:
        f.fail(f"models.{name}", f"= {value!r} is invalid: a preset name or a table")
    for key in table:
        if key not in MODEL_KEYS and key.split(".")[0] not in CONFIG_SECTIONS:
            f.unknown(where, key, (*MODEL_KEYS, *(f"{s}.*" for s in CONFIG_SECTIONS)))
    if ("preset" in table) == ("config" in table):
        f.fail(f"models.{name}", "needs one of preset = \"...\" or config = \"file.toml\"")
    if "preset" in table:
        spec = _string(f, table, "preset", where)
    else:
        spec = str((base_dir / _string(f, table, "config", where)).resolve())
        if not spec.endswith(".toml"):
            f.fail(f"{where}config", f"= {table['config']!r} is invalid: must be a .toml file")
    own = _config_overrides(f, table, where, skip=MODEL_KEYS)
    return ModelSpec(name, spec, tuple(common + own)), str(table.get("description", ""))


def _variant(f: _File, name: str, value: Any, model_names: list[str]) -> Variant:
    where = f"variants.{name}."
    if not NAME.fullmatch(name):
        f.fail(f"variants.{name}", "cannot name a folder: use letters, digits and . _ + -")
    if not isinstance(value, dict):
        f.fail(f"variants.{name}", f"= {value!r} is invalid: must be a table")
    for key in value:
        if key not in VARIANT_KEYS and key.split(".")[0] not in CONFIG_SECTIONS:
            f.unknown(where, key, (*VARIANT_KEYS, *(f"{s}.*" for s in CONFIG_SECTIONS)))
    models = value.get("models")
    if models is not None:
        if not isinstance(models, list) or not models or any(m not in model_names for m in models):
            f.fail(f"{where}models", f"= {models!r} is invalid: a list of the study's models "
                                      f"({', '.join(model_names)})")
        models = tuple(models)
    domain = value.get("domain")
    if domain is not None and domain not in DOMAINS:
        f.fail(f"{where}domain", f"= {domain!r} is invalid: must be one of {', '.join(DOMAINS)}")
    return Variant(name, tuple(_config_overrides(f, value, where, skip=VARIANT_KEYS)), models, domain,
                   str(value.get("description", "")))


def _expectation(f: _File, i: int, e: Any, models: list[str], variants: list[str]) -> Expectation:
    where = f"claim.expect[{i}]."
    if not isinstance(e, dict):
        f.fail(f"claim.expect[{i}]", "must be a table ([[claim.expect]])")
    for key in e:
        if key not in EXPECT_KEYS:
            f.unknown(where, key, EXPECT_KEYS)
    for key in ("model", "vs"):
        if key in e and e[key] not in models:
            f.fail(f"{where}{key}", f"= {e[key]!r} is not one of the models ({', '.join(models)})")
    if "model" not in e:
        f.fail(f"{where}model", "is missing")
    verdict = e.get("verdict")
    if verdict not in VERDICTS:
        f.fail(f"{where}verdict", f"= {verdict!r} is invalid: must be one of {', '.join(VERDICTS)}")
    measure = e.get("measure", "val_loss")
    try:
        parse_measure(measure)
    except ValueError as err:
        f.fail(f"{where}measure", f"is invalid: {err}")
    variant = e.get("variant")
    against = e.get("against_variants", [])
    if variants and variant is None:
        f.fail(f"{where}variant", f"is missing: this study has variants ({', '.join(variants)})")
    for v in ([variant] if variant is not None else []) + list(against):
        if v not in variants:
            f.fail(f"{where}variant", f"{v!r} is not one of the variants ({', '.join(variants) or 'none'})")
    return Expectation(e["model"], verdict, e.get("vs"), measure, variant, tuple(against))


def leading_comment(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(x for x in lines if x)


def load_study(path: str | Path) -> StudySpec:
    """Read and check a study file; every model (in every variant) is resolved, so a config key
    that does not exist or a value out of range is named before anything runs."""
    from moelab import resolve_config
    path = Path(path)
    f = _File(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"study {path}: cannot be read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"study {path}: not valid TOML: {e}") from None
    for key in data:
        if key not in TOP_KEYS:
            f.unknown("", key, TOP_KEYS)
    question = _string(f, data, "question")
    claim = data.get("claim")
    if not isinstance(claim, dict):
        f.fail("claim", "is missing: a [claim] table with text = \"...\" and source = \"...\"")
    for key in claim:
        if key not in CLAIM_KEYS:
            f.unknown("claim.", key, CLAIM_KEYS)
    claim_text = _string(f, claim, "text", "claim.")
    source = _string(f, claim, "source", "claim.")
    anchor = _string(f, claim, "anchor", "claim.", required=False)

    common = _config_overrides(f, data.get("set", {}), "set.") if isinstance(data.get("set", {}), dict) \
        else f.fail("set", "must be a table of config keys")
    models_table = data.get("models")
    if not isinstance(models_table, dict) or not models_table:
        f.fail("models", "is missing: a [models] table naming at least one model")
    parsed = [_model(f, name, value, path.parent, common) for name, value in models_table.items()]
    models = tuple(m for m, _ in parsed)
    names = [m.name for m in models]
    variants_table = data.get("variants", {})
    if not isinstance(variants_table, dict):
        f.fail("variants", "must be a table of [variants.NAME] tables")
    variants = tuple(_variant(f, n, v, names) for n, v in variants_table.items())
    match = data.get("match", "active")
    if match not in MATCH_MODES:
        f.fail("match", f"= {match!r} is invalid: must be one of {', '.join(MATCH_MODES)}")
    reference = data.get("reference")
    if reference is not None and reference not in names:
        f.fail("reference", f"= {reference!r} is not one of the models ({', '.join(names)})")
    for v in variants:
        if reference is not None and v.models is not None and reference not in v.models:
            f.fail(f"variants.{v.name}.models", f"leaves out the reference {reference!r}")
    report = data.get("report", list(DEFAULT_REPORT))
    if not isinstance(report, list) or not report:
        f.fail("report", f"= {report!r} is invalid: a list of measures")
    for m in report:
        try:
            parse_measure(m)
        except (ValueError, TypeError) as err:
            f.fail("report", f"is invalid: {err}")
    expect = claim.get("expect", [])
    if not isinstance(expect, list):
        f.fail("claim.expect", "must be an array of tables ([[claim.expect]])")
    expectations = tuple(_expectation(f, i, e, names, [v.name for v in variants]) for i, e in enumerate(expect))
    spec = StudySpec(
        name=path.stem, path=str(path), description=leading_comment(text), question=question,
        claim={"text": claim_text, "source": source, "anchor": anchor}, expectations=expectations,
        models=models, budgets=_budgets(f, data), seeds=_seeds(f, data), match=match,
        reference=reference, variants=variants, report=tuple(report),
        measured=_string(f, data, "measured", required=False),
        model_descriptions={m.name: d for m, d in parsed})
    for v in variants or (Variant(""),):
        for m in models:
            if v.models is not None and m.name not in v.models:
                continue
            try:
                resolve_config(m.spec, [*m.overrides, *v.overrides])
            except ConfigError as e:
                where = f"models.{m.name}" + (f" in variants.{v.name}" if v.name else "")
                raise ConfigError(f"study {path}: {where}: {e}") from None
    return spec
