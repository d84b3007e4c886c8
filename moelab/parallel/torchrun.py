"""``python -m moelab.parallel.torchrun``: torchrun (the same arguments), quiet after a stop.

When torchrun itself receives SIGTERM or SIGINT it forwards the signal to its workers, which
finish their step, checkpoint and exit with status 75, and then it re-raises the signal as a
``SignalException``: a traceback and exit status 1, although nothing failed. This entry point
runs torchrun's own ``run`` and ends that case with one line and status 128 + the signal number
(as a shell reports a process stopped by that signal), so ``moelab train --nproc`` shows no
traceback after a graceful stop; it then reports 75 when the workers wrote their checkpoint.
Everything else (a failed worker, bad arguments) is torchrun's own behaviour and output.
"""

from __future__ import annotations

import logging
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    try:
        record(run)(args)
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"torchrun: {name}: the workers were asked to checkpoint and stop", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    # torchrun's agent logs each forwarded signal as a warning; the line above says it once
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    raise SystemExit(main())
