"""The examples are scripts, not a package: tests import them from examples/ (as the scripts
import each other) and run them as subprocesses, the way a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


def _run_example(script: str, args: list[str], cwd: Path) -> tuple[dict, str]:
    """Run ``python examples/<script> args --json F`` in ``cwd``; return the JSON and stdout."""
    out_json = cwd / "results.json"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args, "--json", str(out_json)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out_json.read_text()), proc.stdout


@pytest.fixture(scope="session")
def run_example():
    return _run_example


@pytest.fixture
def one_thread():
    """The examples train on one thread (their default); in-process runs match them only so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
