"""Checks on the names that become file paths: dataset ids and object keys.

An id or key from a config, a file list, a bucket listing or a manifest is input like any
other: ``../../x`` or ``/etc/x`` joined to a folder would read or write outside it. Every
such name passes one of these checks at the edge, before it names a file.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

# The Amazon Bin Image Dataset names its photos by number ("523" and "00523" differ).
_DATASET_ID = re.compile(r"[0-9]{1,32}")


class InvalidId(ValueError):
    """An id or key that cannot safely name a file; the message names it."""


def is_dataset_id(id_: object) -> bool:
    return isinstance(id_, str) and _DATASET_ID.fullmatch(id_) is not None


def check_id(id_: object, where: str = "") -> str:
    """``id_`` if it is a dataset id (ASCII digits), else InvalidId naming it and ``where`` it came from."""
    if not is_dataset_id(id_):
        origin = f" (from {where})" if where else ""
        raise InvalidId(f"invalid id {id_!r}{origin}: dataset ids are digits, like 00523")
    return id_


def is_file_stem(name: object) -> bool:
    """One visible path component: no separator, not '.', '..' or hidden, no NUL."""
    return (isinstance(name, str) and bool(name) and not name.startswith(".")
            and not any(c in name for c in "/\\\0"))


def safe_join(root: Path, relative: str, what: str = "key") -> Path:
    """``root / relative`` for a relative POSIX path that stays inside ``root``; InvalidId otherwise
    (absolute paths, '..', empty or '.' parts, backslashes, NUL)."""
    parts = PurePosixPath(relative).parts if relative else ()
    if (not parts or relative.startswith("/") or "\\" in relative or "\0" in relative
            or any(p in (".", "..") for p in relative.split("/")) or "" in relative.split("/")):
        raise InvalidId(f"invalid {what} {relative!r}: it would name a file outside {root}")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):  # a symlinked folder pointing elsewhere
        raise InvalidId(f"invalid {what} {relative!r}: it resolves outside {root}")
    return path
