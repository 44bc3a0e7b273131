"""Reading input that may be hostile, within bounds: a file only when it is a regular file
inside its folder, JSON only when it is small and shallow enough to parse safely.

``json.loads`` recurses once per level of nesting, so 100,000 opening brackets raise
RecursionError, which no ``except ValueError`` catches: one such object in a bucket stopped a
whole ingest, and every rerun of preprocess. Depth is therefore counted first, by a scan that
does not recurse, and the size is checked before anything is read or scanned.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from itertools import accumulate
from pathlib import Path


class Refused(ValueError):
    """Input left unread or unparsed because it breaks a bound; the message says which."""


class TooLarge(Refused):
    """More bytes than the limit allows."""


class TooDeep(Refused):
    """JSON nested deeper than the limit allows."""


class OutsideFolder(Refused):
    """A path (through a symlink) to something outside the folder being read."""


class NotAFile(Refused):
    """A FIFO, device, socket or folder where a file should be: a FIFO would block for ever."""


# O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused right after, by fstat).
_OPEN = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_SYMLINK_ERRNOS = (errno.ELOOP, errno.EMLINK)  # what O_NOFOLLOW gives on Linux and macOS / BSD


@functools.lru_cache(maxsize=256)
def _real(folder: str) -> str:
    # Folders are resolved once: realpath costs a system call per path component, per file.
    return os.path.realpath(folder)


def _within(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _open_inside(path: str, root: str) -> int:
    """A descriptor for ``path`` if its real location is inside ``root``, else OutsideFolder.

    The common case costs one open: the folder is resolved once (cached), and O_NOFOLLOW
    refuses a symlink in the last component, which only then is resolved and checked.
    """
    real_root = _real(root)
    if not _within(_real(os.path.dirname(path) or "."), real_root):
        raise OutsideFolder(f"{path}: its folder lies outside {root}")
    try:
        return os.open(path, _OPEN | _NOFOLLOW)
    except OSError as exc:
        if exc.errno not in _SYMLINK_ERRNOS:
            raise
    real = os.path.realpath(path)
    if not _within(real, real_root):
        raise OutsideFolder(f"{path} links to {real}, outside {root}")
    return os.open(real, _OPEN)


def read_file(path: str | Path, *, root: str | Path | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at ``path``; FileNotFoundError when nothing is there.

    Refused, unread: with ``root``, a path whose real location is outside it (a symlink out of
    the folder); anything but a regular file; with ``max_bytes``, a larger file.
    """
    path = os.fspath(path)
    fd = _open_inside(path, os.fspath(root)) if root is not None else os.open(path, _OPEN)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(f"{path} is not a regular file (mode {stat.filemode(st.st_mode)})")
        if max_bytes is not None:
            _check_size(st.st_size, max_bytes, path)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)  # it may have grown since fstat
    if max_bytes is not None:
        _check_size(len(data), max_bytes, path)
    return data


def _check_size(size: int, max_bytes: int, what: str) -> None:
    if size > max_bytes:
        raise TooLarge(f"{what}: {size} bytes, over the limit of {max_bytes}")


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def nesting_depth(text: str) -> int:
    """How deeply JSON ``text`` nests arrays and objects, counted without recursion: brackets
    inside strings are dropped first. An unclosed string's brackets still count (an
    overestimate, and such text is not JSON anyway)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def loads(raw: bytes, *, max_bytes: int, max_depth: int, what: str = "JSON", **kwargs) -> object:
    """``json.loads(raw, **kwargs)`` once ``raw`` is known to be at most ``max_bytes`` long and
    ``max_depth`` deep; TooLarge or TooDeep before any parsing otherwise (ValueError for text
    that is not JSON, as json raises)."""
    _check_size(len(raw), max_bytes, what)
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")  # as json.loads decodes bytes
    depth = nesting_depth(text)
    if depth > max_depth:
        raise TooDeep(f"{what}: nested {depth} deep, over the limit of {max_depth}")
    return json.loads(text, **kwargs)


def capped_lines(chunks: Iterable[bytes], max_bytes: int) -> Iterator[bytes | None]:
    """The lines of a byte stream, newline kept; None in place of a line (newline included)
    over ``max_bytes``, whose bytes are dropped as they arrive: no longer line is ever held."""
    pending = bytearray()
    dropping = False
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if not dropping:
                pending += chunk[start:end + 1]
            yield None if dropping or len(pending) > max_bytes else bytes(pending)
            pending.clear()
            dropping = False
            start = end + 1
        if not dropping:
            pending += chunk[start:]
            if len(pending) > max_bytes:
                pending.clear()
                dropping = True
    if dropping or pending:
        yield None if dropping else bytes(pending)


def file_chunks(path: str | Path, size: int = 1 << 16) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def json_lines(path: str | Path, *, max_bytes: int, max_depth: int) -> Iterator[tuple[bytes | None, object]]:
    """(line, value) for each non-blank line of a JSON-lines file (the line None when over
    ``max_bytes``); the value is the ValueError (Refused or a JSON error) for a line that breaks
    the bounds or is not JSON."""
    for n, line in enumerate(capped_lines(file_chunks(path), max_bytes), start=1):
        if line is None:
            yield None, TooLarge(f"{path} line {n}: over the limit of {max_bytes} bytes")
        elif line.strip():
            try:
                yield line, loads(line, max_bytes=max_bytes, max_depth=max_depth, what=f"{path} line {n}")
            except ValueError as exc:
                yield line, exc


def csv_rows(path: str | Path, max_line_bytes: int, *,
             complete: bool = False) -> tuple[list[str], Iterator[tuple[int, list[str] | str]]]:
    """A CSV file's header (stripped, lower case) and its rows as ``(line number, cells)``, or
    ``(line number, reason)`` for a line that is no row: one over ``max_line_bytes`` (never held),
    one csv cannot parse, or (``complete``) one with fewer cells than the header. Blank rows are
    left out."""
    import csv

    dropped: set[int] = set()

    def decoded() -> Iterator[str]:
        for n, line in enumerate(capped_lines(file_chunks(str(path)), max_line_bytes), start=1):
            if line is None:  # never held: a blank line in its place, its number noted
                dropped.add(n)
                yield "\n"
            else:
                yield line.decode("utf-8-sig" if n == 1 else "utf-8", "replace")

    reader = csv.reader(decoded())
    header = [h.strip().lower() for h in next(reader, [])]

    def rows() -> Iterator[tuple[int, list[str] | str]]:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # a quote left open until the field outgrows csv's limit
                yield reader.line_num, str(exc)
                continue
            if reader.line_num in dropped:
                yield reader.line_num, f"longer than {max_line_bytes} bytes"
            elif complete and len(row) < len(header) and any(cell.strip() for cell in row):
                yield reader.line_num, f"{len(row)} fields, not {len(header)}"
            elif any(cell.strip() for cell in row):
                yield reader.line_num, row

    return header, rows()
