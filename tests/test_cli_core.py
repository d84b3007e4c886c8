"""The CLI commands of the core issue, run as a user would (in-process)."""

import json
import subprocess
import sys

from moelab.cli import main
from moelab.presets import preset_names


def test_presets_json(capsys):
    assert main(["presets", "--json"]) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)]
    assert names == preset_names() and "deepseek-v3" in names and len(names) >= 12


def test_info_json_has_counts(capsys):
    assert main(["info", "--preset", "mixtral", "--set", "model.moe.top_k=1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] > info["active_params"] > 0
    assert info["flops_per_token"] > 0
    assert [layer["ffn"] for layer in info["layers"]] == ["moe"] * 4


def test_info_text_and_bad_values_exit_2(capsys):
    assert main(["info", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "MLA" in out and "active params" in out
    assert main(["info", "--preset", "mixtral", "--set", "model.moe.top_k=99"]) == 2
    assert "model.moe.top_k" in capsys.readouterr().err


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "moelab", "presets", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert "dense" in [p["name"] for p in json.loads(out)]
