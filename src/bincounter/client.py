"""A small HTTP client for the model server (``bincounter.serve``)."""

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
