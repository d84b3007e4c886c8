"""Ctrl-C at any moment of a `python -m moelab` process prints no traceback (issue 25, item 10):
during start-up it ends with "interrupted", and once the command has finished a further Ctrl-C
ends the process at once instead of raising inside an exit handler."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5, 3.0])
def test_ctrl_c_during_start_up_prints_no_traceback(tmp_path, delay):
    proc = subprocess.Popen([sys.executable, "-m", "moelab", "train", "--preset", "moe", "--out",
                             str(tmp_path / "run"), "--no-progress", "--set", "data.max_bytes=100000",
                             "--set", "data.val_fraction=0.3"],     # a valid run: only the Ctrl-C stops it
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode in (130, -signal.SIGINT, 75), (proc.returncode, err)


@pytest.mark.slow
def test_a_second_ctrl_c_while_exiting_ends_the_process_without_an_exit_handler_exception():
    # an exit handler that takes a while (TensorBoard's and torch's own run here too)
    script = ("import atexit, sys, time\n"
              "atexit.register(time.sleep, 30)\n"
              "sys.argv = ['moelab', 'presets']\n"
              "from moelab.cli import main\n"
              "code = main()\n"
              "print('finished', flush=True)\n"
              "raise SystemExit(code)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("finished") or not line:
            break
    time.sleep(0.5)                                   # inside the exit handler now
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Exception ignored" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode == -signal.SIGINT


# a Ctrl-C that lands while the package itself imports (before moelab.cli can catch anything), made
# deterministic: an import hook raises KeyboardInterrupt where the signal would
_INTERRUPT_IN_CONFIG = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "moelab.config":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = {argv!r}
import moelab
"""


@pytest.mark.parametrize("argv", [["-m", "presets"], ["/usr/local/bin/moelab", "presets"]])
def test_ctrl_c_while_the_package_imports_ends_with_interrupted(argv):
    proc = subprocess.run([sys.executable, "-c", _INTERRUPT_IN_CONFIG.format(argv=argv)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr == "interrupted\n", proc.stderr


def test_a_library_import_interrupted_still_raises():
    proc = subprocess.run([sys.executable, "-c", _INTERRUPT_IN_CONFIG.format(argv=["script.py"])],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 130 and "KeyboardInterrupt" in proc.stderr
