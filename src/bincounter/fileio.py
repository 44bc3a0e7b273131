"""Atomic file writes: a path is either absent or complete, never half written."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import threading
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a hidden temporary beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process and thread (cheaper than mkstemp's random names); ingest deletes
    # any left behind by a killed run.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target`` (write beside, swap, then clean up).

    Readers of ``target`` see the old folder or the new one, never neither and never a mix:
    where the OS can, both are exchanged in one atomic rename and the old copy is deleted after.
    Elsewhere the old folder is renamed aside first; a kill in the moment between the two
    renames leaves it at ``.<name>.old``, which ``recover_dir`` puts back.
    """
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # it now holds the old folder
        return
    aside = _aside(target)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside)


def recover_dir(target: Path) -> None:
    """Undo what a kill inside ``replace_dir``'s fallback left: the old folder set aside."""
    aside = _aside(target)
    if aside.exists():
        if target.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, target)


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))
