"""An ASGI app served by uvicorn on a free loopback port, in a thread, for one test."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def serving(app, port: int | None = None) -> Iterator[str]:
    """Serve ``app`` (on ``port``, default a free one); yields its base URL and stops the server on exit."""
    import uvicorn

    from bincounter_demo.s3server import free_port

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
