"""Small shared helpers: atomic file writes, and reading the text files a user hands in."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gmpq.errors import GmpqError, StorageError
from gmpq.faults import fault_point

#: errno values of a full device or an exhausted quota.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path`` atomically.

    A crash or a kill during ``write`` leaves any previous file at ``path`` intact. A full device (or exhausted quota)
    raises :class:`~gmpq.errors.StorageError` "no space left on device while writing ``path``", whichever library
    did the writing, and leaves nothing half-written.
    """
    target = Path(path)
    ensure_directory(target.parent)
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        fault_point("write", target.name)
        # mkstemp creates 0600 and some writers (safetensors) re-create the file: give it open()'s permissions
        tmp.chmod(0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if _is_out_of_space(e):
            raise _no_space(target) from None
        raise
    return target


def ensure_directory(path: str | os.PathLike) -> Path:
    """Create the directory ``path`` with its parents; a file where a directory must be (``path`` itself or one of
    its parents) raises :class:`~gmpq.errors.StorageError` naming that file."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), p)
        raise StorageError(f"cannot create the directory {str(p)!r}: {str(blocker)!r} is a file; choose another "
                           "output path or move the file away") from None
    return p


@contextmanager
def replaced_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build the new version of the directory ``path`` in a staging copy beside it (its current files copied in),
    then swap it in: a kill at any moment leaves the previous directory or the new one, each complete.

    The swap is two renames: ``path`` -> ``.NAME.old-PID``, staging -> ``path``. A kill between them leaves only the
    old copy, which the next call (or :func:`restore_replaced_directory`) renames back. A failure inside the block
    removes the staging copy and leaves ``path`` untouched; staging copies of killed processes are removed.
    """
    target = Path(os.path.abspath(path))  # "." or "out/" name a directory too
    ensure_directory(target.parent)
    restore_replaced_directory(target)
    for stale in target.parent.glob(f".{target.name}.new-*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    staging = target.parent / f".{target.name}.new-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if target.is_dir():
            shutil.copytree(target, staging, symlinks=True)
        else:
            staging.mkdir()
        yield staging
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, StorageError) and str(staging) in str(e):  # name the file where the user looks for it
            raise StorageError(str(e).replace(str(staging), str(target))) from None
        if _is_out_of_space(e):
            raise _no_space(target) from None
        raise


def restore_replaced_directory(path: str | os.PathLike) -> bool:
    """Put back the previous version of ``path`` that a swap of :func:`replaced_directory` killed between its two
    renames left as ``.NAME.old-PID``; True when it did."""
    target = Path(path)
    if target.exists():
        return False
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return False
    os.rename(olds[-1], target)
    return True


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, as UTF-8."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_user_text(path: str | os.PathLike, what: str, error: type[GmpqError]) -> str:
    """The UTF-8 text of a file the user handed in (a policy, a recipe, a config).

    A missing or unreadable file, or one that is not UTF-8 text (a binary file, another encoding), raises ``error``
    with one line naming ``what`` and the path.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {str(p)!r} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); is it the "
                    "right file?") from None


def _no_space(target: Path) -> StorageError:
    return StorageError(f"no space left on device while writing {target}; free some space on its device (or write "
                        "somewhere else) and run it again")


def _is_out_of_space(error: BaseException) -> bool:
    """Whether ``error`` reports a full device: an ``OSError`` with ENOSPC/EDQUOT, or a library's wrapped I/O error
    (safetensors raises ``SafetensorError("Error while serializing: I/O error: No space left on device (os error
    28)")``)."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return True
    text = str(error)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
