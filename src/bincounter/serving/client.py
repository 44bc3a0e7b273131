"""A small HTTP client for the model server (``bincounter.serving``)."""

from __future__ import annotations

import ipaddress
import json
import mimetypes
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

# A proxy from the environment cannot reach this machine's loopback; skip it there.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_default = urllib.request.build_opener()


def count_images(url: str, paths: list[Path], timeout: float = 30) -> list[dict[str, Any]]:
    """Count the items in each image by POSTing it to ``{url}/v1/count``.

    Returns one dict per path, in order: the server's answer (``count``, ``confidence``,
    ``expected_count``, ``probabilities``, ``model_uri``) plus ``path``.

    Raises:
        FileNotFoundError: a path does not exist (checked before any request).
        ConnectionError: the server cannot be reached (the message names the URL).
        RuntimeError: the server refused an image (the message has its status and reason).
    """
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file(s): {', '.join(missing)}")
    endpoint = url.rstrip("/") + "/v1/count"
    opener = _direct if _is_loopback(endpoint) else _default
    results = []
    for path in paths:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        request = urllib.request.Request(
            endpoint, data=path.read_bytes(), method="POST", headers={"Content-Type": content_type}
        )
        try:
            with opener.open(request, timeout=timeout) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{path}: {endpoint} answered {exc.code}: {_detail(exc)}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ConnectionRefusedError):
                raise ConnectionError(
                    f"cannot reach the bincounter server at {url}: connection refused (is it running?)"
                ) from None
            raise ConnectionError(f"cannot reach the bincounter server at {url}: {reason}") from None
        except TimeoutError:
            raise ConnectionError(f"the bincounter server at {url} did not answer within {timeout} s") from None
        results.append({**answer, "path": str(path)})
    return results


class ImageRefused(RuntimeError):
    """The server refused an image (4xx): the image is bad, the server is fine."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def count_batch(url: str, images: list[tuple[str, bytes]], timeout: float = 120, retries: int = 8,
                sleep=None) -> list[dict[str, Any]]:
    """Count several images with one multipart POST to ``{url}/v1/count:batch``.

    ``images`` are (file name, bytes) pairs; the answers come back in the same order. A 503
    (model loading, queue full) is retried after its ``Retry-After`` (at most ``retries``
    times); a 4xx raises :class:`ImageRefused`; an unreachable server ConnectionError.
    """
    import random
    import time
    import uuid

    sleep = sleep or time.sleep
    endpoint = url.rstrip("/") + "/v1/count:batch"
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in images:
        safe = name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{safe}"\r\n'
                     f"Content-Type: {mimetypes.guess_type(safe)[0] or 'application/octet-stream'}\r\n\r\n".encode())
        parts += [data, b"\r\n"]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    opener = _direct if _is_loopback(endpoint) else _default
    for attempt in range(retries + 1):
        request = urllib.request.Request(endpoint, data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with opener.open(request, timeout=timeout) as resp:
                answers = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (429, 502, 503, 504) and attempt < retries:
                wait = _retry_after(exc.headers.get("Retry-After"), attempt)
                sleep(wait * (0.5 + random.random() / 2))
                continue
            if 400 <= exc.code < 500:
                raise ImageRefused(exc.code, _detail(exc)) from None
            raise ConnectionError(f"{endpoint} answered {exc.code}: {_detail(exc)}") from None
        except urllib.error.URLError as exc:
            raise ConnectionError(f"cannot reach the bincounter server at {url}: {exc.reason}") from None
        except TimeoutError:
            raise ConnectionError(f"the bincounter server at {url} did not answer within {timeout} s") from None
        if not isinstance(answers, list) or len(answers) != len(images):
            raise ConnectionError(f"{endpoint} answered {type(answers).__name__} for {len(images)} images")
        return answers
    raise AssertionError("unreachable")


def _retry_after(header: str | None, attempt: int) -> float:
    try:
        return min(60.0, max(0.1, float(header)))
    except (TypeError, ValueError):
        return min(30.0, 0.5 * 2**attempt)


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read()
        return str(json.loads(body).get("detail", body.decode(errors="replace")))
    except Exception:  # noqa: BLE001 - the status alone still says something
        return exc.reason or "no detail"


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
