"""Sizes, bandwidths and counts as people write them."""

import pytest

from moelab.config import ConfigError
from moelab.plan.units import human_bytes, parse_bandwidth, parse_bytes, parse_count, parse_tflops, short_bytes


def test_parsing():
    assert parse_bytes("80GiB", "--m") == 80 * 2**30
    assert parse_bytes("141 GB", "--m") == 141 * 10**9
    assert parse_bytes("1.5TiB", "--m") == int(1.5 * 2**40)
    assert parse_bandwidth("450GB/s", "--b") == 450e9
    assert parse_bandwidth("400Gb/s", "--b") == 50e9              # bits
    assert parse_bandwidth("25GiB/s", "--b") == 25 * 2**30
    assert parse_count("4M", "--n") == 4e6 and parse_count("4Mi", "--n") == 4 * 2**20
    assert parse_count("512k", "--n") == 512e3 and parse_count("1e6", "--n") == 1e6
    assert parse_tflops("989", "--p") == 989e12 and parse_tflops("1.979PFLOPS", "--p") == 1.979e15


@pytest.mark.parametrize("fn, text", [
    (parse_bytes, "80"), (parse_bytes, "-1GB"), (parse_bytes, "80Gb"), (parse_bandwidth, "450GB"),
    (parse_bandwidth, "0GB/s"), (parse_count, "4X"), (parse_count, "0"), (parse_tflops, "nan"),
])
def test_bad_values_name_the_option(fn, text):
    with pytest.raises(ConfigError, match="--opt"):
        fn(text, "--opt")


def test_human():
    assert human_bytes(80 * 2**30) == "80.0 GiB" and short_bytes(1.5 * 2**30) == "1.5G"
    assert short_bytes(342.5 * 2**30) == "342G" and human_bytes(-2**20) == "-1.0 MiB"
