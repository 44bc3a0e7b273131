"""A local S3-compatible endpoint (moto's server mode) on loopback, for demos and tests,
and a proxy that makes it behave like S3 under load (latency, throttling, resets)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bincounter.data.sources import IMAGES, METADATA


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _s3_only_app():
    """moto's WSGI app, answering every request as S3.

    moto's server guesses the service of each request from its host, headers and path,
    scanning every service it knows: for an unsigned S3 GET that guess cost more CPU than
    serving the object. Here S3 is the only service (plus moto's own /moto-api).
    """
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    class S3Only(DomainDispatcherApplication):
        def get_application(self, environ):
            if environ.get("PATH_INFO", "").startswith("/moto-api"):
                return super().get_application(environ)
            app = self.app_instances.get("s3")
            if app is None:
                with self.lock:
                    app = self.app_instances.setdefault("s3", self.create_app("s3"))
            return app

    return S3Only(create_backend_app)


def _delayed(app, server: "LocalS3"):
    """A WSGI app that waits ``server.latency`` (read per request) before calling ``app``."""
    def delayed(environ, start_response):
        if server.latency:
            time.sleep(server.latency)  # releases the GIL: concurrent requests wait together, as on S3
        return app(environ, start_response)

    return delayed


class LocalS3:
    """``with LocalS3() as s3: s3.upload_folder(...)``; stopped on exit, also after errors.

    moto's state lives in the process: two servers in one process share their buckets.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0):
        self.host = host
        self.port = port or free_port(host)
        self.latency = latency  # seconds before each response starts (S3's first-byte latency); settable
        self.endpoint = f"http://{host}:{self.port}"
        self._server = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "LocalS3":
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
        app = _delayed(_s3_only_app(), self)
        self._server = make_server(self.host, self.port, app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def client(self):
        import boto3

        # moto accepts any credentials; these never leave the machine.
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def upload_folder(self, folder: str | Path, bucket: str, prefix: str = "", workers: int = 16) -> int:
        """Create ``bucket`` holding ``folder``'s ``bin-images/`` and ``metadata/`` as they are."""
        folder = Path(folder)
        client = self.client()
        client.create_bucket(Bucket=bucket, ACL="public-read")
        # Like the real aft-vbi-pds: anyone may list and read, without signing requests.
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
                           "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}],
        }))
        files = [p for sub in (IMAGES, METADATA) if (folder / sub).is_dir() for p in sorted((folder / sub).iterdir())]

        def put(path: Path) -> None:
            key = f"{prefix.strip('/') + '/' if prefix.strip('/') else ''}{path.parent.name}/{path.name}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), ACL="public-read")

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(put, files))
        return len(files)


@dataclass(frozen=True)
class ProxiedRequest:
    """One request as the proxy saw it (``status`` is None when a fault cut the connection)."""

    method: str
    path: str
    status: int | None
    fault: str | None
    signed: bool

    @property
    def key(self) -> str:
        """The object key of a GET on ``/bucket/key`` (path-style, as moto is addressed)."""
        return urllib.parse.unquote(self.path.split("?", 1)[0].lstrip("/").partition("/")[2])


# What real S3 answers when it sheds load or fails; botocore reads the code from the body.
_FAULT_RESPONSES = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "unavailable": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
FAULTS = (*_FAULT_RESPONSES, "reset", "truncate")


class S3Proxy:
    """A loopback HTTP proxy in front of an S3 endpoint: adds first-byte latency, injects
    faults and records every request, so throttling and flaky networks are reproducible.

    ``fault(method, path, n)`` is called for the n-th request (0-based) and returns None or
    one of ``FAULTS``: an S3 error response ("slowdown", "unavailable", "internal"), a
    connection reset before any response ("reset"), or a response whose body stops halfway
    ("truncate", a reset mid-transfer).
    """

    def __init__(self, upstream: str, *, latency: float = 0.0,
                 fault: Callable[[str, str, int], str | None] | None = None, host: str = "127.0.0.1"):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.latency = latency
        self.fault = fault
        self.requests: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _handler_for(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._server.handle_error = lambda request, address: None  # resets are the point here
        self.endpoint = f"http://{host}:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "S3Proxy":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self, method: str, path: str) -> tuple[int, str | None]:
        # Under the lock, so a fault function may keep state without locking its own.
        with self._lock:
            n = len(self.requests)
            self.requests.append(None)  # type: ignore[arg-type]  # reserve the slot; filled by record()
            return n, (self.fault(method, path, n) if self.fault else None)

    def record(self, n: int, request: ProxiedRequest) -> None:
        with self._lock:
            self.requests[n] = request

    def gets(self, prefix: str = "") -> list[ProxiedRequest]:
        """Object GETs (not listings) whose key starts with ``prefix``, faults included."""
        return [r for r in self.requests if r is not None and r.method == "GET" and "list-type" not in r.path
                and "?" not in r.path and r.key.startswith(prefix)]


def _handler_for(proxy: S3Proxy) -> type[BaseHTTPRequestHandler]:
    local = threading.local()  # one keep-alive connection upstream per handler thread

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

        def log_message(self, *args) -> None:  # one line per request otherwise
            pass

        def _forward(self) -> None:
            n, fault = proxy._next(self.command, self.path)
            signed = "Authorization" in self.headers or "X-Amz-Signature" in self.path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if proxy.latency:
                time.sleep(proxy.latency)
            # Each request is recorded before the client can see its outcome, so a caller that
            # inspects ``requests`` after its call returned never misses one.
            record = lambda status: proxy.record(n, ProxiedRequest(self.command, self.path, status, fault, signed))  # noqa: E731
            if fault == "reset":
                record(None)
                self._reset()
            elif fault in _FAULT_RESPONSES:
                status, code, message = _FAULT_RESPONSES[fault]
                xml = (f"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>{code}</Code>"
                       f"<Message>{message}</Message><RequestId>{n}</RequestId></Error>").encode()
                record(status)
                self._send(status, [("Content-Type", "application/xml")], xml)
            else:
                status, headers, payload = self._upstream(body)
                if fault == "truncate":
                    record(None)
                    self._send(status, headers, payload[: len(payload) // 2], length=len(payload))
                    self._reset()
                else:
                    record(status)
                    self._send(status, headers, payload)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        def _upstream(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            for attempt in (0, 1):  # the upstream may have closed an idle keep-alive connection
                conn = getattr(local, "conn", None) or http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                local.conn = conn
                try:
                    conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                    resp = conn.getresponse()
                    payload = resp.read()
                    return resp.status, resp.getheaders(), payload
                except (http.client.HTTPException, OSError):
                    conn.close()
                    local.conn = None
                    if attempt:
                        raise
            raise AssertionError("unreachable")

        def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes, length: int | None = None) -> None:
            self.send_response_only(status)
            for name, value in headers:
                if name.lower() not in ("connection", "transfer-encoding", "keep-alive", "content-length", "date",
                                        "server"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()

        def _reset(self) -> None:
            # SO_LINGER 0 makes close() send RST: the client sees "connection reset by peer".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

    return Handler
