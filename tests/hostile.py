"""Hostile inputs the data tests plant among good photos, and a guard for FIFOs."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

# 200 KB: under the metadata size limit, far over the depth limit (json.loads raises RecursionError).
NESTED = b"[" * 100_000 + b"]" * 100_000


@contextlib.contextmanager
def waited_on_fifos(fifos: list[Path], after: float = 20.0) -> Iterator[list[Path]]:
    """Yields the list of FIFOs that a reader was found waiting on ``after`` seconds in. Such
    readers are woken (the write end opened and closed: they read nothing), so a stage that
    would wait for ever fails its test instead of hanging it."""
    waited: list[Path] = []
    stop = threading.Event()

    def wake() -> None:
        if stop.wait(after):
            return
        while not stop.is_set():
            for fifo in fifos:
                try:  # succeeds only while a reader has the FIFO open, or waits in open()
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                    waited.append(fifo)
                except OSError:
                    pass
            stop.wait(0.2)

    thread = threading.Thread(target=wake, daemon=True)
    thread.start()
    try:
        yield waited
    finally:
        stop.set()
        thread.join()
