"""`moelab config` prints the full resolved config as a file `--config` reads back unchanged;
config files may be TOML, YAML or JSON and are never mistaken for presets; `moelab presets`
shows whole descriptions; `--version`; `--help` shows defaults; the CLI starts without torch."""

import json
import subprocess
import sys

import pytest

import moelab
from moelab.cli import main
from moelab.config import Config, valid_keys
from moelab.config_files import dump_config, load_config_file
from moelab.presets import preset_description, preset_names


def _out(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("fmt", ["toml", "json", "yaml"])
@pytest.mark.parametrize("preset", preset_names())
def test_round_trip_every_preset(preset, fmt, tmp_path, capsys):
    text = _out(capsys, ["config", "--preset", preset, "--format", fmt])
    path = tmp_path / f"cfg.{fmt}"
    path.write_text(text)
    assert load_config_file(path).validate() == moelab.resolve_config(preset)
    assert _out(capsys, ["config", "--config", str(path), "--format", fmt]) == text   # byte for byte


def test_every_key_is_printed_with_overrides_applied(tmp_path, capsys):
    text = _out(capsys, ["config", "--preset", "mixtral", "--set", "train.max_steps=7",
                         "--set", "model.n_kv_heads=none", "--format", "json"])
    data = json.loads(text)
    flat = set()

    def walk(d, prefix=""):
        for k, v in d.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.add(prefix + k)
    walk(data)
    assert flat == set(valid_keys())
    assert data["train"]["max_steps"] == 7 and data["model"]["n_kv_heads"] is None
    toml = _out(capsys, ["config", "--preset", "mixtral", "--set", "model.n_kv_heads=none"])
    assert 'n_kv_heads = "none"' in toml and "[model.moe]" in toml and "[parallel]" in toml


def test_none_survives_toml_for_a_field_whose_default_is_not_none(tmp_path, capsys):
    text = _out(capsys, ["config", "--set", "train.save_every_minutes=none"])
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert load_config_file(path).train.save_every_minutes is None
    assert Config().train.save_every_minutes is not None


def test_yaml_config_trains_the_same_model_as_toml(tmp_path):
    cfg = moelab.resolve_config("deepseek-v3", ["model.n_layers=2"])
    (tmp_path / "a.yaml").write_text(dump_config(cfg, "yaml"))
    (tmp_path / "a.toml").write_text(dump_config(cfg, "toml"))
    assert moelab.resolve_config(str(tmp_path / "a.yaml")) == moelab.resolve_config(tmp_path / "a.toml") == cfg


def test_config_files_are_never_presets(tmp_path, capsys, monkeypatch):
    err = _error(capsys, ["info", "--config", str(tmp_path / "x.yaml")])
    assert "does not exist" in err and "preset" not in err
    assert "TOML or YAML" in _error(capsys, ["info", "--config", str(tmp_path / "x.ini")])
    assert "not .ini" in _error(capsys, ["info", "--config", str(tmp_path / "x.ini")])
    assert "--preset mixtral" in _error(capsys, ["info", "--config", "mixtral"])
    assert "--config" in _error(capsys, ["info", "--preset", "x.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    assert "not valid YAML" in _error(capsys, ["info", "--config", str(bad)])
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert "table of sections" in _error(capsys, ["info", "--config", str(tmp_path / "list.yaml")])
    (tmp_path / "key.yaml").write_text("model:\n  n_layer: 2\n")
    assert "did you mean 'model.n_layers'" in _error(capsys, ["info", "--config", str(tmp_path / "key.yaml")])
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  n_layers: 3\n")
    monkeypatch.setitem(sys.modules, "yaml", None)          # PyYAML not installed
    err = _error(capsys, ["info", "--config", str(good)])
    assert "PyYAML" in err and "pip install" in err


def test_presets_show_whole_descriptions(capsys):
    text = _out(capsys, ["presets"])                  # captured: not a terminal, one line each
    assert "…" not in text
    for name in preset_names():
        whole = preset_description(name).split(": ", 1)[1]
        assert f"{name}  " in text and whole in text
    listed = json.loads(_out(capsys, ["presets", "--json"]))
    assert [p["name"] for p in listed] == preset_names()
    assert all(p["description"] and p["description"] in preset_description(p["name"]) for p in listed)


def test_version_and_help_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"moelab {moelab.__version__}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in text and "(default: 0.0)" in text and "(default cpu)" in text
    with pytest.raises(SystemExit):
        main(["config", "--help"])
    assert "(default: toml)" in capsys.readouterr().out


def test_help_and_presets_start_without_torch():
    """What makes `moelab --help` and `moelab presets` start in well under 1.5 s: no torch import
    (torch alone takes seconds on a loaded machine)."""
    code = ("import sys; from moelab.cli import main\n"
            "for argv in (['presets'], ['presets', '--json'], ['config', '--preset', 'mixtral']):\n"
            "    assert main(argv) == 0\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'numpy', 'transformers', 'rich.progress') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
