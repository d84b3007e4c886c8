"""Long phases show progress: in a pipe, a line when a stage starts and then at least every
`every` seconds while it runs, even inside one long step; nothing with --quiet."""

import io
import time

from rich.console import Console

from moelab.progress import Progress


def _pipe() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def test_a_pipe_gets_a_line_per_stage_and_a_heartbeat():
    lines = []
    with Progress("inspect", every=0.05, log=lines.append, console=_pipe()) as p:
        advance = p.stage("routing", 100)
        advance(40)
        time.sleep(0.3)                       # one long step: the heartbeat still speaks
        with p.phase("plots"):
            time.sleep(0.2)
    assert lines[0] == "inspect: routing (100)"
    assert any(line.startswith("inspect: routing 40/100 (40%)") for line in lines)
    assert "inspect: plots" in lines and any(line.startswith("inspect: plots, ") for line in lines)


def test_quiet_prints_nothing():
    lines = []
    with Progress("compare", enabled=False, every=0.01, log=lines.append, console=_pipe()) as p:
        p.stage("scoring", 3)(3)
        time.sleep(0.05)
    assert lines == []


def test_a_terminal_gets_a_transient_bar():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with Progress("compare", console=console) as p:
        advance = p.stage("timing inference", 4)
        advance(4)
        time.sleep(0.2)
    assert "timing inference" in out.getvalue()
