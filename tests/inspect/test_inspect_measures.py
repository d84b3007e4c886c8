"""The measures of `moelab inspect` on a small trained run, each against an independent count."""

import contextlib
import dataclasses
import json
import shutil
from itertools import permutations

import numpy as np
import pytest
import torch

from moelab.inspect import InspectError, InspectOptions, inspect_run, summarize, summary_markdown
from moelab.inspect import ablation as A
from moelab.inspect import categories as C
from moelab.inspect.analyze import open_run
from moelab.inspect.collect import collect
from moelab.inspect.source import open_source
from moelab.inspect.specialization import PairCounts, vocab_specialization
from moelab.model.moe.router import Routing
from moelab.fileio import save_tensors, write_json
from moelab.runfolder import load_tensors, read_config

TOKENS = 4096


@pytest.fixture(scope="module")
def opened(moe_run):
    cfg, model = open_run(moe_run, InspectOptions(device="cpu"))
    return cfg, model, open_source(moe_run, cfg, max_tokens=TOKENS)


@pytest.fixture(scope="module")
def result(moe_run):
    return inspect_run(moe_run, InspectOptions(tokens=TOKENS, ablate="none", device="cpu"))


def _variant(run, dst, overrides, edit=None):
    """A copy of ``run`` with config overrides and (optionally) edited weights."""
    dst.mkdir()
    cfg = read_config(run).with_overrides(overrides).validate()
    write_json(dst / "config.json", cfg.to_dict())
    state = load_tensors(run / "model.safetensors")
    if edit is not None:
        edit(state)
    save_tensors(dst / "model.safetensors", state)
    shutil.copy(run / "tokenizer.json", dst / "tokenizer.json")
    return dst


def test_loads_sum_to_tokens_times_k(result):
    assert result["tokens"] == TOKENS and result["top_k"] == 2
    for layer in result["layers"]:
        assert sum(layer["tokens_per_expert"]) == TOKENS * 2
        assert np.isclose(sum(layer["normalized_load"]), layer["num_experts"])
        assert layer["dropped_fraction"] == 0.0
        assert layer["ablation_delta_loss"] == [None] * layer["num_experts"]   # --ablate none


def test_loads_count_only_kept_assignments_when_capacity_drops(moe_run, tmp_path):
    run = _variant(moe_run, tmp_path / "capped", ["model.moe.eval_capacity_factor=0.5"])
    out = inspect_run(run, InspectOptions(tokens=TOKENS, ablate="none", categories="none"))
    for layer in out["layers"]:
        kept = sum(layer["tokens_per_expert"])
        assert 0 < kept < TOKENS * 2
        # every batch holds the same number of tokens, so the token-weighted mean is exact
        assert kept == round(TOKENS * 2 * (1 - layer["dropped_fraction"]))


def test_coactivation_is_symmetric_and_matches_a_per_token_count(opened):
    cfg, model, src = opened
    got = collect(model, src.batches(512, 64, 4))
    E = got.layers[0].num_experts
    expected = np.zeros((E, E), dtype=np.int64)
    with torch.no_grad():
        for b in src.batches(512, 64, 4):
            for token_experts in model(b.x_BT).router_stats[0].expert_ids.tolist():
                for i in token_experts:
                    expected[i, i] += 1
                for i, j in permutations(token_experts, 2):
                    expected[i, j] += 1
    counts = got.layers[0].coact_EE.numpy()
    assert np.array_equal(counts, counts.T)
    assert np.array_equal(counts, expected)
    assert counts.sum() == 512 * 2 * 2      # k diagonal + k(k-1) off-diagonal counts per token


@contextlib.contextmanager
def forced_routing(model, choose):
    """Every MoE layer routes by ``choose(token ids (N,)) -> expert ids (N, K)``, equal weights."""
    seen = {}
    hooks = [model.register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0].flatten()))]

    def route(router, inputs, routing: Routing) -> Routing:
        ids = choose(seen["tokens"])
        return dataclasses.replace(routing, ids_NK=ids, weights_NK=torch.full(ids.shape, 1 / ids.shape[1]))

    hooks += [moe.router.register_forward_hook(route) for moe in model.moe_layers()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def test_vocab_specialization_is_one_for_a_token_id_router_and_about_one_over_e_for_random(opened):
    cfg, model, src = opened
    E = cfg.model.moe.num_experts
    by_id = lambda t: torch.stack([(t + j) % E for j in range(2)], dim=1)         # noqa: E731
    with forced_routing(model, by_id):
        got = collect(model, src.batches(2048, 64, 16))
    v = vocab_specialization(got.layers[1].top1)
    assert v.num_ids > 20 and v.mean == 1.0

    # a uniform random router through the model: at the default count threshold the share
    # matches its simulated chance level (sampling noise, not specialisation) ...
    g = torch.Generator().manual_seed(0)
    uniform = lambda t: torch.rand(len(t), E, generator=g).topk(2, dim=1).indices   # noqa: E731
    with forced_routing(model, uniform):
        got = collect(model, src.batches(2048, 64, 16))
    v = vocab_specialization(got.layers[0].top1)
    assert v.num_ids > 20 and abs(v.mean - v.chance) < 0.03 and v.mean < 1.0

    # ... and for ids seen thousands of times it approaches 1/E
    counts = PairCounts(E)
    tokens = torch.from_numpy(np.random.default_rng(0).zipf(1.5, 200_000) % 64)
    counts.add(tokens, torch.randint(0, E, (len(tokens), 1), generator=g))
    frequent = vocab_specialization(counts, min_count=5000)
    assert frequent.num_ids >= 3 and abs(frequent.mean - 1 / E) < 0.02


def test_route_around_follows_the_layer_normalisation():
    ids = torch.tensor([[0, 1], [2, 3], [1, 0]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]]) * 2.5        # routed_scaling 2.5
    r = Routing(ids, w, torch.zeros(3, 4), torch.zeros(3, 4))
    renorm = A.route_around(r, 1, renormalize=True).weights_NK
    assert torch.allclose(renorm, torch.tensor([[2.5, 0.0], [1.75, 0.75], [0.0, 2.5]]))
    assert torch.equal(renorm[1], w[1])                                   # untouched row, bit for bit
    plain = A.route_around(r, 1, renormalize=False).weights_NK
    assert torch.allclose(plain, torch.tensor([[1.5, 0.0], [1.75, 0.75], [0.0, 0.25]]))
    top1 = Routing(ids[:, :1], w[:, :1], torch.zeros(3, 4), torch.zeros(3, 4))
    assert A.route_around(top1, 1, renormalize=True).weights_NK[2, 0] == 0


def test_ablating_an_expert_without_tokens_changes_the_loss_by_exactly_zero(moe_run, tmp_path):
    def kill_expert_1(state):                         # the bias only steers selection (DeepSeek-V3)
        state["blocks.0.ffn.router.expert_bias"][1] = -1e4
    run = _variant(moe_run, tmp_path / "dead", ["model.moe.bias_update_rate=0.001"], kill_expert_1)
    out = inspect_run(run, InspectOptions(tokens=1024, ablate="all", ablate_tokens=512,
                                          categories="none"))
    first = out["layers"][0]
    assert first["dead_experts"] == [1] and first["tokens_per_expert"][1] == 0
    assert first["ablation_delta_loss"][1] == 0.0
    assert all(d != 0.0 for e, d in enumerate(first["ablation_delta_loss"]) if e != 1)
    assert out["layers"][1]["dead_experts"] == []


def test_ablation_selection():
    assert A.parse_selection("none") is None
    items = A.parse_selection("top,bottom:2,3")
    assert A.select_experts(items, [5, 50, 20, 1, 7]) == [0, 1, 3]
    assert A.select_experts(["all"], [1, 2]) == [0, 1]
    for bad in ("top:0", "middle", ""):
        with pytest.raises(InspectError, match="--ablate"):
            A.parse_selection(bad)
    with pytest.raises(InspectError, match="out of range"):
        A.select_experts(["9"], [1, 2, 3])


def test_saturation_of_a_checkpoint_against_itself_is_one(moe_run):
    itself = inspect_run(moe_run, InspectOptions(tokens=1024, ablate="none", categories="none",
                                                 against=str(moe_run)))
    early = inspect_run(moe_run, InspectOptions(tokens=1024, ablate="none", categories="none",
                                                against=str(moe_run / "ckpt-00000006")))
    for same, other in zip(itself["layers"], early["layers"]):
        assert same["saturation_top1"] == 1.0 and same["saturation_topk"] == 1.0
        assert 0.0 < other["saturation_top1"] < 1.0
        assert 0.0 < other["saturation_topk"] < 1.0


def test_python_categories_come_from_tokenize():
    text = 'def f(x):\n    """Doc."""\n    return x + 1.5  # note\ns = "a"\n'
    cats = C.python_char_categories(text)

    def at(fragment):
        return C.PYTHON_CATEGORIES[cats[text.index(fragment)]]
    assert [at(s) for s in ("def", "f(", "(x", '"""', "return", "1.5", "# note", '"a"')] == \
        ["keyword", "identifier", "operator", "docstring", "keyword", "number", "comment", "string"]
    assert cats[text.index("\n")] == C.INDENT
    # a document cut in the middle of a string still labels what came before
    cut = C.python_char_categories('x = 1\ns = """never closed')
    assert C.PYTHON_CATEGORIES[cut[0]] == "identifier" and cut[-1] == C.OTHER
    assert C.token_categories(cats, [(0, 3), (3, 5), (9, 13)]).tolist() == [C.KEYWORD, C.IDENTIFIER, C.INDENT]


def test_category_shares_and_the_shuffled_baseline(result):
    names = result["categories"]["names"]
    assert result["categories"]["kind"] == "python" and "docstring" in names
    for layer in result["layers"]:
        for share in layer["category_share"].values():
            assert np.isclose(sum(share), 2.0)            # each token has k experts
        assert layer["category_mi_chance_bits"] < layer["category_mi_bits"]
        assert layer["category_specialised"] == (layer["category_mi_z"] > 3)


def test_user_corpus_categories_are_source_files(moe_run, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "prose.txt").write_text("The cat sat on the mat and looked at the door. " * 60)
    (corpus / "numbers.txt").write_text(" ".join(str(i * 7919 % 1000) for i in range(600)))
    out = inspect_run(moe_run, InspectOptions(tokens=1500, corpus=str(corpus), ablate="none"))
    assert out["categories"]["kind"] == "file"
    assert set(out["categories"]["names"]) == {"prose.txt", "numbers.txt"}
    assert sum(out["categories"]["tokens"]) == out["tokens"]


def test_user_corpus_categories_can_be_a_jsonl_field(moe_run, tmp_path):
    rows = [{"text": f"def f{i}(x):\n    return x * {i}\n" if i % 2 else f"The value {i} is small. " * 4,
             "kind": "code" if i % 2 else "prose"} for i in range(40)]
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = inspect_run(moe_run, InspectOptions(tokens=800, corpus=str(corpus), categories="field:kind",
                                              ablate="none"))
    assert sorted(out["categories"]["names"]) == ["code", "prose"]
    assert all(t > 0 for t in out["categories"]["tokens"])


def test_pair_counts_merge_like_a_plain_count(monkeypatch):
    import moelab.inspect.specialization as S
    monkeypatch.setattr(S, "MIN_PENDING", 64)               # merge many times
    rng = np.random.default_rng(0)
    counts, expected = PairCounts(5), np.zeros((30, 5), dtype=np.int64)
    for _ in range(40):
        tokens, experts = rng.integers(0, 30, 50), rng.integers(0, 5, (50, 2))
        counts.add(torch.from_numpy(tokens), torch.from_numpy(experts))
        for t, row in zip(tokens, experts):
            for e in row:
                expected[t, e] += 1
    t, e, c = counts.table()
    got = np.zeros_like(expected)
    got[t, e] = c
    assert np.array_equal(got, expected) and len(t) == np.count_nonzero(expected)


def test_summary_for_compare(result):
    s = summarize(result)
    assert s["moe_layers"] == 2 and s["num_dead_experts"] == 0
    assert s["min_normalized_load"] <= 1.0 <= s["max_normalized_load"]
    assert s["strongest_category"]["vs_uniform"] >= 1.0
    md = summary_markdown(s, "moe")
    assert "dead experts: none" in md and "strongest specialisation" in md
