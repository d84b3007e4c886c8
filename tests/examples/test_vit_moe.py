"""examples/vit_moe.py: the --quick run a user would type, the layer it uses, and V-MoE's claim
that Batch Prioritized Routing at capacity 1.0 loses nothing against dropless routing."""

from __future__ import annotations

import math

import pytest

import moelab
from moelab.model.ffn import SwiGLU

import vit_moe

TEST_IMAGES = 360


def noise_tolerance(accuracy: float) -> float:
    """Two standard errors of the difference of two accuracies measured on the 360 test images:
    2 * sqrt(2 p (1 - p) / 360): 0.027 (10 images) at p = 0.967."""
    return 2.0 * math.sqrt(2.0 * accuracy * (1.0 - accuracy) / TEST_IMAGES)


@pytest.fixture(scope="module")
def quick(run_example, tmp_path_factory):
    """``python examples/vit_moe.py --quick --json F``, run once for the tests below."""
    folder = tmp_path_factory.mktemp("vit_quick")
    results, stdout = run_example("vit_moe.py", ["--quick", "--png", str(folder / "vit.png")], folder)
    return results, stdout, folder


@pytest.mark.slow   # the example's --quick run: ~30 s of CPU
def test_quick_run_reports_finite_metrics_with_the_documented_keys(quick):
    results, stdout, folder = quick
    assert set(results) == {"dense", "moe"}
    for name in ("dense", "moe"):
        r = results[name]
        for key in ("accuracy_mean", "accuracy_sd", "total_params", "active_params"):
            assert key in r, f"{name} lacks {key}"
            assert math.isfinite(r[key])
        assert 0.0 <= r["accuracy_mean"] <= 1.0 and r["accuracy_sd"] >= 0.0
        assert len(r["accuracies"]) == 3                      # three seeds
        # a few epochs on 1,437 images already beat chance (0.1) by far
        assert r["accuracy_mean"] > 0.6
    dense, moe = results["dense"], results["moe"]
    assert dense["active_params"] == dense["total_params"]
    assert moe["total_params"] > moe["active_params"]
    # matched: the MoE is active on exactly the dense weights plus its routers (E x D per MoE block)
    cfg = vit_moe.ViTConfig()
    routers = (cfg.n_layers // 2) * cfg.num_experts * cfg.d_model
    assert moe["active_params"] == dense["active_params"] + routers
    assert (folder / "vit.png").stat().st_size > 10_000
    assert "test accuracy" in stdout and "active params" in stdout


def test_the_moe_blocks_are_moelab_moe_in_every_other_block():
    moe_model = vit_moe.ViT(vit_moe.ViTConfig(moe=True))
    kinds = [type(block.ffn) for block in moe_model.blocks]
    assert kinds == [SwiGLU, moelab.MoE, SwiGLU, moelab.MoE]
    dense_model = vit_moe.ViT(vit_moe.ViTConfig(moe=False))
    assert all(type(block.ffn) is SwiGLU for block in dense_model.blocks)
    # each expert is 1/top_k of the dense width
    layer = moe_model.blocks[1].ffn
    assert layer.cfg.expert_hidden * layer.cfg.top_k == dense_model.blocks[1].ffn.hidden


# Long enough for the router to settle: after 3 epochs (--quick) 17% of the assignments overflow
# at capacity 1.0 and accuracy sat 3.3 points below dropless, a hair inside the tolerance; after 6
# epochs 11% overflow and the two were equal (seed 0, 0.9667 each).
CAPACITY_TEST_EPOCHS = 6


@pytest.mark.slow   # two 6-epoch trainings: ~20 s of CPU
def test_capacity_one_with_priority_matches_dropless_on_a_fixed_seed(one_thread):
    """V-MoE: with Batch Prioritized Routing, capacity 1.0 keeps dropless accuracy. Same seed, so
    the same initial weights and batch order; only the dropped tokens differ. On digits the MoE
    blocks carry little (docs/examples.md), so this guards gross breakage, not a subtle bias."""
    data, train = vit_moe.load_digits_split(), vit_moe.TrainConfig(epochs=CAPACITY_TEST_EPOCHS)
    dropless = vit_moe.train_and_evaluate(vit_moe.ViTConfig(moe=True), train, seed=0, data=data)
    cfg = vit_moe.ViTConfig(moe=True, capacity_factor=1.0, drop_policy="score")
    run = vit_moe.train_and_evaluate(cfg, train, seed=0, data=data)
    assert dropless.dropped_fraction == 0.0
    assert run.dropped_fraction > 0.01, "capacity 1.0 dropped nothing: the comparison would be empty"
    assert abs(run.accuracy - dropless.accuracy) <= noise_tolerance(dropless.accuracy), \
        (run.accuracy, dropless.accuracy)


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1"], "--seeds = 1 is invalid"),
    (["--capacity", "1.5"], "--capacity = 1.5 is invalid"),
    (["--top-k", "3"], "--top-k = 3 is invalid"),
])
def test_bad_options_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        vit_moe.parse_args(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
