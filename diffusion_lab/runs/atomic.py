"""Write-then-rename, the one way every artefact reaches disk (checkpoints, pipeline folders, grids, caches,
summaries): a reader sees the previous version or the new one, never a torn one.

The temporary sits in the destination folder, so the rename never crosses a filesystem (Lightning's own
writer stages in `$TMPDIR` and *copies* over the target when the run folder is on scratch, NFS or tmpfs; a
kill during that copy left a 0-byte `last.ckpt`). Data are fsynced before the rename and the folder after it.
A writer killed with `kill -9` leaves its temporary behind; the next write into that folder removes the
temporaries of processes that no longer exist.
"""

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from diffusion_lab.errors import ConfigError

# .<name>.tmp-<host>-<pid>: hidden, tied to its writer (a pid means something on its own host only: caches
# are shared over NFS by jobs on several nodes), never mistaken for a `*.ckpt` or `*.png`.
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
_TEMPORARY = re.compile(r"^\..+\.tmp-(.+)-(\d+)$")
# .<name>.old.tmp-<host>-<pid>: a folder being replaced, set aside for the instant between two renames.
_SET_ASIDE = re.compile(r"^\.(.+)\.old\.tmp-.+-\d+$")
_swept: set[Path] = set()  # folders this process has cleaned already (a sample folder gets 10,000 writes)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class DiskFull(OSError):
    """No space left while writing an artefact; the previous version of it is untouched."""


def _temporary_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this pid is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries in `folder` whose writing process has died (putting back a folder that was set
    aside for replacement if its replacement never arrived); returns what was removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in Path(folder).iterdir():
            match = _TEMPORARY.match(entry.name)
            if not match or match.group(1) != _HOST:
                continue
            pid = int(match.group(2))
            if pid != os.getpid() and not process_alive(pid):
                set_aside = _SET_ASIDE.match(entry.name)
                if set_aside and not (entry.parent / set_aside.group(1)).exists():
                    os.replace(entry, entry.parent / set_aside.group(1))  # killed between the two renames
                    continue
                _remove(entry)
                removed.append(entry)
    return removed


def _share(path: Path) -> None:
    """Files 0666 and folders 0777 less the umask (0644 / 0755 usually): a lab-mate can read the model.
    (`mkdtemp` makes 0700 folders, and some writers make 0600 files.)"""
    umask = os.umask(0)
    os.umask(umask)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


def _fsync(path: Path) -> None:
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if entry.is_file() and not entry.is_symlink():
            with entry.open("rb") as handle:
                os.fsync(handle.fileno())
        elif entry.is_dir():
            _fsync_folder(entry)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _disk_full_error(error: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT behind `error`, also where a library wrapped it (torch.save raises a RuntimeError
    whose context is the OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return error
        error = error.__cause__ or error.__context__
    return None


def _disk_full(error: OSError, path: Path) -> DiskFull:
    free = shutil.disk_usage(path.parent).free
    return DiskFull(
        error.errno,
        f"no space left on the device writing {path} ({free / 2**20:.1f} MiB free there); "
        f"nothing was replaced: the previous {path.name}, if any, is intact",
    )


@contextlib.contextmanager
def staged(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (a fresh empty folder if `folder`); when the block ends without
    error, make it readable by others, fsync it and rename it to `path`. On any error (or a signal's
    exception) the temporary is removed and `path` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent not in _swept:
        remove_stale_temporaries(path.parent)
        _swept.add(path.parent)
    temporary = _temporary_for(path)
    _remove(temporary)
    if folder:
        temporary.mkdir()
    try:
        yield temporary
        _share(temporary)
        _fsync(temporary)
        if folder and path.exists():
            previous = path.with_name(f".{path.name}.old.tmp-{_HOST}-{os.getpid()}")
            os.replace(path, previous)
            os.replace(temporary, path)
            _remove(previous)
        else:
            os.replace(temporary, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        _remove(temporary)
        full = _disk_full_error(error)
        if full is not None and not isinstance(error, DiskFull):
            raise _disk_full(full, path) from error
        raise


def write_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(temporary_path)`, then rename it to `path`."""
    with staged(path) as temporary:
        write(temporary)
    return Path(path)


def write_folder(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(temporary_folder)` (e.g. a `save_pretrained`), then rename it to `path`, replacing any older one."""
    with staged(path, folder=True) as temporary:
        write(temporary)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_file(path, lambda temporary: temporary.write_text(text))


def require_writable(folder: str | Path) -> None:
    """One line naming the folder, before anything is written, where it cannot be written (a read-only mount,
    no permission): the first file written there would otherwise fail deep in a library."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write_check_"):
            pass
    except OSError as error:
        raise ConfigError(f"the run folder {folder} cannot be written ({error.strerror or error})") from None
