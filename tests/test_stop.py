"""GracefulStop: which repeated signals are one request."""

import signal
import subprocess
import sys

from moelab.stop import GracefulStop


def test_sigterms_at_the_same_instant_are_one_request():
    """A killed multi-threaded parent sends its child's death signal once per exiting thread: the
    trainer must still finish its step and checkpoint, not exit at the second one."""
    said = []
    with GracefulStop(log=said.append, under_launcher=False) as graceful:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        assert graceful.requested and graceful.signal_name == "SIGTERM"
    assert len(said) == 1


LATER_SIGTERM = """
import signal, time
from moelab.stop import REPEAT_WINDOW_S, GracefulStop
GracefulStop(log=print, under_launcher=False).install()
signal.raise_signal(signal.SIGTERM)
time.sleep(REPEAT_WINDOW_S + 0.2)
signal.raise_signal(signal.SIGTERM)
print("still alive")
"""


def test_a_later_sigterm_exits_at_once():
    """Past the repeat window a second SIGTERM is a second request: the process ends at once."""
    proc = subprocess.run([sys.executable, "-c", LATER_SIGTERM], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr)
    assert "stopping after this step" in proc.stdout and "still alive" not in proc.stdout
