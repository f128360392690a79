"""One writer per run folder: a lock file taken at start and released at exit.

Two jobs on one folder (a SLURM array with a fixed `hydra.run.dir`, a relaunch while the first attempt still
runs) would interleave `metrics.csv`, overwrite each other's config and mix checkpoints. `flock` is unreliable
on NFS and Lustre, so the lock is a file created with `O_CREAT | O_EXCL` (atomic on those too) holding the
holder's host, pid and start time, and a heartbeat the holder refreshes. A lock whose holder is gone (a dead
pid on this host, or a heartbeat older than `STALE_AFTER_S` from another host: kill -9, a lost node) is taken
over, with a line saying so.
"""

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from diffusion_lab.errors import ConfigError
from diffusion_lab.runs.atomic import process_alive, write_text

log = logging.getLogger(__name__)
LOCK_NAME = ".diffusion_lab.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0  # six missed heartbeats


class RunLock:
    """`with RunLock(folder):` holds the folder's lock for the block (see the module docstring)."""

    def __init__(
        self, folder: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S
    ) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the lock file ----------------------------------------------------------------------------------
    def _write(self, flags: int) -> None:
        record = json.dumps({**self.holder, "heartbeat": time.time()}).encode()
        descriptor = os.open(self.path, flags, 0o644)
        try:
            os.write(descriptor, record)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # torn by a kill between create and write: as good as stale
            return {}

    def _stale(self, holder: dict) -> bool:
        if not holder:
            return True
        if holder.get("host") == self.holder["host"]:
            return not process_alive(int(holder.get("pid", -1)))
        return time.time() - float(holder.get("heartbeat", 0)) > self.stale_after_s

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                self._write(os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                holder = self.read()
                if holder is None:  # released in between
                    continue
                if not self._stale(holder):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
                    raise ConfigError(
                        f"{self.path.parent} is in use by another run (host {holder['host']}, pid {holder['pid']}, "
                        f"since {since}): give this run its own hydra.run.dir, or stop that one first"
                    ) from None
                log.warning(
                    "taking over the lock of %s from a run that is gone (host %s, pid %s)",
                    self.path.parent, holder.get("host", "?"), holder.get("pid", "?"),
                )  # fmt: skip
                self.path.unlink(missing_ok=True)
        else:
            raise ConfigError(f"could not take the lock {self.path}: it keeps changing hands")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self.read() or {}
            if current.get("pid") != self.holder["pid"] or current.get("host") != self.holder["host"]:
                return  # taken over: no longer ours to refresh
            write_text(self.path, json.dumps({**self.holder, "heartbeat": time.time()}))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self.read() or {}
        if current.get("pid") == self.holder["pid"] and current.get("host") == self.holder["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
