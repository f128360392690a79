"""No child process outlives a run that failed.

DataLoader workers ignore SIGTERM (`data.loaders.ignore_stop_signals`), which is also how multiprocessing
ends daemonic children at exit: after a fatal error the main process then waited on its workers forever (a
truncated JPEG past `data.max_bad_fraction` hung a run until its walltime). A failing run kills its children
outright, and each worker asks the kernel to kill it when its parent dies, whatever killed the parent.
"""

import contextlib
import ctypes
import multiprocessing
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process: SIGKILL when the parent dies (Linux `prctl`; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def kill_children() -> int:
    """SIGKILL every multiprocessing child of this process (loader workers); returns how many."""
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)
    return len(children)
