"""Long phases show progress: in a pipe, a line once a stage has run `delay` seconds and then at
least every `every` seconds while it runs, even inside one long step; nothing for quick stages or
with --quiet."""

import io
import time

from rich.console import Console

from moelab.progress import Progress


def _pipe() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def test_a_pipe_gets_a_line_per_long_stage_and_a_heartbeat():
    lines = []
    with Progress("inspect", every=0.1, delay=0.1, log=lines.append, console=_pipe()) as p:
        p.stage("quick", 5)(5)                # over before the delay: no line
        advance = p.stage("routing", 100)
        advance(40)
        time.sleep(0.6)                       # one long step: the heartbeat still speaks
        with p.phase("plots"):
            time.sleep(0.4)
    assert not any("quick" in line for line in lines)
    routing = [line for line in lines if line.startswith("inspect: routing 40/100 (40%)")]
    assert len(routing) >= 2                  # after the delay, then every `every` seconds
    assert any(line.startswith("inspect: plots, ") for line in lines)


def test_an_early_error_prints_no_progress_line():
    lines = []
    try:
        with Progress("inspect", log=lines.append, console=_pipe()) as p:
            p.stage("reading the run", None)
            raise ValueError("bad run")
    except ValueError:
        pass
    assert lines == []


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
