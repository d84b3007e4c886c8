"""RoPE scalings: frequencies behave as each method defines them, and bad settings are named."""

import math

import pytest
import torch

import moelab
from moelab.config import ConfigError, RopeScalingConfig
from moelab.model.rope import inverse_frequencies, rope_tables, softmax_scale_factor


def _base(dim=16, theta=1e4):
    return inverse_frequencies(dim, theta)[0]


def test_linear_divides_every_frequency():
    inv, att = inverse_frequencies(16, 1e4, RopeScalingConfig(kind="linear", factor=4.0))
    torch.testing.assert_close(inv, _base() / 4)
    assert att == 1.0


def test_llama3_keeps_short_wavelengths_and_stretches_long_ones():
    s = RopeScalingConfig(kind="llama3", factor=8.0, original_max_seq_len=64, low_freq_factor=1.0,
                          high_freq_factor=4.0)
    inv, att = inverse_frequencies(32, 5e5, s)
    base = _base(32, 5e5)
    wavelen = 2 * math.pi / base
    short, long = wavelen < 64 / 4, wavelen > 64 / 1
    assert short.any() and long.any() and (~short & ~long).any()    # all three bands present
    torch.testing.assert_close(inv[short], base[short])
    torch.testing.assert_close(inv[long], base[long] / 8)
    mid = ~short & ~long                                            # strictly between the two
    assert ((inv[mid] < base[mid]) & (inv[mid] > base[mid] / 8)).all()
    assert att == 1.0


def test_yarn_ramps_from_kept_to_interpolated_and_scales_attention():
    s = RopeScalingConfig(kind="yarn", factor=4.0, original_max_seq_len=2048)
    inv, att = inverse_frequencies(16, 1e4, s)
    ratio = inv / _base()
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(0.25)     # fastest kept, slowest / factor
    assert (ratio[1:] <= ratio[:-1]).all()                          # monotone ramp in between
    assert att == pytest.approx(0.1 * math.log(4.0) + 1)
    cos, sin = rope_tables(16, 8, 1e4, s)
    assert cos[0, 0] == pytest.approx(att)                          # tables carry the factor


def test_deepseek_mscale_cancels_in_the_tables_and_sharpens_mla_softmax():
    s = RopeScalingConfig(kind="yarn", factor=40.0, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=1.0)
    assert inverse_frequencies(64, 1e4, s)[1] == 1.0
    assert softmax_scale_factor(s) == pytest.approx((0.1 * math.log(40.0) + 1) ** 2)
    assert softmax_scale_factor(RopeScalingConfig()) == 1.0


def test_scaled_rope_model_builds_and_differs_from_plain():
    over = ["model.n_layers=1", "model.max_seq_len=32"]
    plain = moelab.build("dense", over)
    yarn = moelab.build("dense", over + ["model.rope_scaling.kind=yarn", "model.rope_scaling.factor=4",
                                         "model.rope_scaling.original_max_seq_len=8"])
    assert not torch.allclose(plain.rope_cos, yarn.rope_cos)
    yarn.load_state_dict(plain.state_dict())
    x = torch.randint(0, 64, (1, 32))
    assert not torch.allclose(plain(x).logits, yarn(x).logits)


@pytest.mark.parametrize("overrides,fragment", [
    (["model.rope_scaling.kind=ntk"], "model.rope_scaling.kind = 'ntk'"),
    (["model.rope_scaling.kind=linear", "model.rope_scaling.factor=0.5"], "model.rope_scaling.factor = 0.5"),
    (["model.rope_scaling.kind=llama3", "model.rope_scaling.factor=8"], "original_max_seq_len = None"),
    (["model.rope_scaling.kind=llama3", "model.rope_scaling.factor=8", "model.rope_scaling.original_max_seq_len=64",
      "model.rope_scaling.high_freq_factor=1"], "high_freq_factor = 1"),
    (["model.rope_scaling.kind=yarn", "model.rope_scaling.factor=4", "model.rope_scaling.original_max_seq_len=64",
      "model.rope_scaling.beta_fast=0.5"], "beta_fast = 0.5"),
])
def test_bad_rope_scaling_names_the_field(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        moelab.resolve_config("dense", overrides)
