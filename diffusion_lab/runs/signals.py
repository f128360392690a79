"""SIGINT (Ctrl-C) and SIGTERM (`kill`, schedulers) as a request to stop cleanly, not a crash.

The first signal is only noted; training stops at the end of the optimizer step in progress, with a
checkpoint (see `callbacks.RunCheckpoint`), and the process exits 130 / 143 like a shell would report the
signal. A second signal stops at once. SLURM's USR1 requeue is Lightning's and is left alone.
"""

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []


class RunInterrupted(SystemExit):
    """Raised at a step boundary after a stop signal; its exit code is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


def requested_stop() -> int | None:
    """The signal that asked this process to stop, if one did."""
    return _received[0] if _received else None


def stop_if_requested() -> None:
    """A safe point of long work (a batch of samples, of reference features, an export): stop here when a
    signal asked to (`RunInterrupted`, exit 128 + its number), instead of finishing work a scheduler's grace
    period would cut off anyway."""
    if _received:
        raise RunInterrupted(_received[0])


def _note(signum: int, frame) -> None:
    if _received:  # the second one: stop now
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
    _received.append(signum)
    log.warning(
        "received %s: stopping at the end of this step with a checkpoint (send it again to stop at once)",
        signal.Signals(signum).name,
    )


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """Within the block, SIGINT and SIGTERM set `requested_stop()` instead of killing the process. Yields the
    list of signals received, still readable after the block."""
    _received.clear()
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
        yield received
        return
    previous = {signum: signal.signal(signum, _note) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        received += _received
        _received.clear()  # the request was for this block (the next job of a multirun starts afresh)
