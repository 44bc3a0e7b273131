"""The "local" deployment target: the model server as a detached process on this machine.

``deploy`` starts ``python -m bincounter.serving`` in its own session (so it outlives the
caller and a Ctrl-C in the caller's terminal does not reach it), waits until ``/readyz``
answers 200, then stops the server it replaces, and records the process in
``<deployments_dir>/<name>.json``. ``stop`` and ``status`` find it again through that file.
POSIX only (process groups).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bincounter
from bincounter import paths
from bincounter.config import DeployConfig
from bincounter.fileio import atomic_write

DEFAULT_NAME = "bincounter"
DEFAULT_READY_TIMEOUT = 180.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LOG_TAIL_LINES = 40
# Popen objects of the servers this process started: stopping one must reap it too,
# or it lingers as a zombie that still "exists" for os.kill(pid, 0).
_children: dict[int, subprocess.Popen] = {}
# Health checks go to our own loopback server; an $HTTP_PROXY must not intercept them.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LocalDeployError(RuntimeError):
    """The server did not become ready; it has been killed. ``pid`` and ``log_path`` say which;
    ``rolled_back_to`` is the model the deployment serves again (None when it served nothing)."""

    def __init__(self, message: str, *, pid: int, log_path: Path, rolled_back_to: str | None = None):
        super().__init__(message)
        self.pid = pid
        self.log_path = log_path
        self.rolled_back_to = rolled_back_to


def deploy(
    cfg: DeployConfig,
    *,
    name: str = DEFAULT_NAME,
    timeout: float = DEFAULT_READY_TIMEOUT,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start the model server in the background, wait until it is ready, then retire the one it
    replaces (blue/green): a new server that never gets ready leaves the old one serving.

    ``cfg.port`` 0 picks a free port on ``cfg.host``, so both run side by side for a moment. On a
    fixed port the old server must make room first; a new one that fails is replaced by the old
    model again, started from its recorded spec. ``labels`` (the pinned model's version, run and
    digest) are recorded with the deployment.

    Returns ``{"target": "local", "url", "pid", "name", "model_uri", "log", ...labels}``.
    Raises :class:`LocalDeployError` (a RuntimeError) with the server log's tail when the
    server exits or is not ready within ``timeout`` seconds; the process is killed then.
    """
    _check_name(name)
    previous = _running(name)
    port = cfg.port or _free_port(cfg.host)
    made_room = previous is not None and int(previous["port"]) == port and previous["host"] == cfg.host
    if made_room:
        stop(name)
    try:
        record = _start(name, cfg.model_uri, cfg.host, port, timeout, labels or {})
    except LocalDeployError as exc:
        if made_room:
            _start(name, previous["model_uri"], previous["host"], int(previous["port"]), timeout,
                   previous.get("labels", {}))
        if previous is not None:
            exc.rolled_back_to = previous["model_uri"]
            exc.args = (f"{exc.args[0]}\nthe deployment serves {previous['model_uri']} again",)
        raise
    if previous is not None and not made_room:
        _terminate(int(previous["pid"]))
    return {"target": "local", **{k: record[k] for k in ("url", "pid", "name", "model_uri", "log")},
            **record["labels"]}


def _running(name: str) -> dict[str, Any] | None:
    """The named deployment's record, when its server still runs."""
    record = _read_state(_state_path(name))
    if record is None or not (int(record.get("pid", 0)) > 0 and _is_our_server(int(record["pid"]))):
        return None
    return record


def _start(name: str, model_uri: str, host: str, port: int, timeout: float, labels: dict[str, str]) -> dict[str, Any]:
    """Start a server of ``model_uri``, wait until it is ready and record it as ``name``'s."""
    url = f"http://{_url_host(host)}:{port}"
    folder = paths.deployments_dir()
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"{name}-{port}.log"
    cmd = [
        sys.executable, "-m", "bincounter.serving",
        "--model-uri", model_uri,
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    try:
        _wait_ready(proc, url, timeout)
    except BaseException as exc:
        _terminate(proc.pid)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise LocalDeployError(
            f"local deployment {name!r} of {model_uri} failed: {exc}{_reason(log_path)}\n"
            f"--- last lines of {log_path} ---\n{_tail(log_path)}",
            pid=proc.pid,
            log_path=log_path,
        ) from None
    record = {
        "name": name,
        "target": "local",
        "pid": proc.pid,
        "url": url,
        "model_uri": model_uri,
        "labels": labels,
        "host": host,
        "port": port,
        "log": str(log_path),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(_state_path(name), (json.dumps(record, indent=2) + "\n").encode())
    return record


def check(cfg: DeployConfig, *, name: str = DEFAULT_NAME, **_: Any) -> dict[str, Any]:
    """A local server needs a valid name and a folder to keep its state in."""
    _check_name(name)
    paths.deployments_dir().mkdir(parents=True, exist_ok=True)
    return {"target": "local", "name": name}


def stop(name: str = DEFAULT_NAME, *, timeout: float = 15.0) -> bool:
    """Stop the named local deployment and remove its state file.

    Sends SIGTERM to the server's process group, waits up to ``timeout`` seconds, then
    SIGKILL. Returns True if a running server was stopped, False if there was none (no
    state file, or a stale pid whose process is gone or is no longer our server).
    """
    _check_name(name)
    state_file = _state_path(name)
    record = _read_state(state_file)
    if record is None:
        return False
    pid = int(record.get("pid", 0))
    stopped = False
    if pid > 0 and _is_our_server(pid):
        _terminate(pid, timeout=timeout)
        stopped = True
    state_file.unlink(missing_ok=True)
    return stopped


def status(name: str = DEFAULT_NAME) -> dict[str, Any]:
    """What is known about the named deployment.

    The state file's fields plus ``running`` (the process exists) and ``ready`` (its
    ``/readyz`` answers 200); ``{"name": name, "running": False, "ready": False}`` if
    nothing was deployed under that name.
    """
    _check_name(name)
    record = _read_state(_state_path(name))
    if record is None:
        return {"name": name, "running": False, "ready": False}
    record.setdefault("name", name)
    pid = int(record.get("pid", 0))
    running = pid > 0 and _is_our_server(pid)
    ready = running and "url" in record and _readyz(record["url"], timeout=2.0) == pid
    return {**record, "running": running, "ready": ready}


# -- process handling ---------------------------------------------------------------


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(f"the server exited with code {code} before it was ready")
        # The pid check guards against another server already answering on a fixed port.
        if _readyz(url, timeout=2.0) == proc.pid:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the server at {url} was not ready after {timeout:.0f} s")
        time.sleep(0.25)


def _readyz(url: str, timeout: float) -> int | None:
    """The pid reported by a ready server at ``url``, else None."""
    try:
        with _opener.open(f"{url}/readyz", timeout=timeout) as resp:
            if resp.status != 200:
                return None
            return int(json.loads(resp.read()).get("pid", -1))
    except (OSError, ValueError):  # connection refused, 503 (HTTPError), bad JSON...
        return None


def _terminate(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL it if it lingers."""
    for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        _signal_group(pid, sig)
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _alive(pid):
            break
    _children.pop(pid, None)


def _signal_group(pid: int, sig: int) -> None:
    try:
        # start_new_session made the server its group's leader; signal the group so any
        # helper processes it forked go too, but never a group that is not its own.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    proc = _children.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        # Reap it if it is our child (started by an earlier deploy() in this process).
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_server(pid: int) -> bool:
    """The pid is alive and still runs bincounter.serving (pids get reused after a reboot)."""
    if not _alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        if cmdline.exists():
            return b"bincounter.serving" in cmdline.read_bytes()
        out = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, timeout=5)
        return b"bincounter.serving" in out.stdout
    except (OSError, subprocess.SubprocessError):
        return True  # cannot tell; trust the state file


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Run the same bincounter as the caller, even from a source checkout that is not installed.
    package_root = str(Path(bincounter.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # Pin the caller's view of local state, so models:/ URIs resolve in the same registry
    # whatever the child's working directory.
    env.setdefault("BINCOUNTER_HOME", str(paths.home()))
    if not env.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = paths.default_tracking_uri()
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- small helpers -------------------------------------------------------------------


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _url_host(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid deployment name {name!r}: use letters, digits, '.', '_' or '-'")


def _state_path(name: str) -> Path:
    return paths.deployments_dir() / f"{name}.json"


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treat as stale so stop() can clean it up


def _reason(log_path: Path) -> str:
    """The server's own one-line account of a failed model load, if it logged one."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if "could not be loaded: " in line:
            return "\n" + line.split("could not be loaded: ", 1)[1].strip()
    return ""


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(log is empty)"
