"""`moelab search` input handling that needs no training: Optuna missing, options it refuses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moelab.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_without_optuna_the_command_exits_2_naming_the_extra_in_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)        # `import optuna` now raises ImportError
    assert main(["search", "--out", str(tmp_path / "out"), "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert "Optuna" in err and 'pip install "moelab[search]"' in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow                      # a fresh interpreter importing torch: seconds, more on a busy machine
def test_without_optuna_the_command_exits_2_naming_the_extra(tmp_path):
    # a real import failure: None in sys.modules makes `import optuna` raise ImportError
    code = ("import sys; sys.modules['optuna'] = None\n"
            "from moelab.cli import build_parser, main\n"
            "build_parser()                      # the CLI itself still loads\n"
            f"sys.exit(main(['search', '--out', {str(tmp_path / 'out')!r}, '--trials', '1']))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Optuna" in proc.stderr and 'moelab[search]' in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_resume_refuses_new_settings_and_time_budgets_are_refused(tmp_path, capsys):
    assert main(["search", "--resume", str(tmp_path), "--trials", "5"]) == 2
    assert "drop --trials" in capsys.readouterr().err
    assert main(["search", "--resume", str(tmp_path)]) == 2
    assert "not a search folder" in capsys.readouterr().err
    assert main(["search", "--budget-per-trial", "10m", "--out", str(tmp_path / "s")]) == 2
    assert "--budget-per-trial = '10m' is invalid" in capsys.readouterr().err
    assert main(["search", "--trials", "0", "--out", str(tmp_path / "s")]) == 2
    assert "--trials = 0 is invalid" in capsys.readouterr().err
    assert main(["search", "--storage", "search.db", "--out", str(tmp_path / "s")]) == 2
    assert "--storage = 'search.db' is invalid" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
