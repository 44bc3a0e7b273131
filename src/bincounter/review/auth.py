"""Who is answering: a token per reviewer, or the identity header of an authenticating proxy.

The token file holds ``name:sha256(token)`` lines, never a token itself: ``add_reviewer`` makes
a random token, prints it once and stores its digest, so a leaked file signs nobody in. It is
read again whenever it changes, so a reviewer removed from it is refused at once.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from pathlib import Path

from bincounter.data import bounded
from bincounter.data.reviews import REVIEWER
from bincounter.fileio import atomic_write

MAX_TOKEN_FILE_BYTES = 2**20
_MAX_TOKEN_CHARS = 256


class NotSignedIn(Exception):
    """No reviewer could be named for a request; the message says why (never which token)."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _parse(text: str, path: str | Path) -> dict[str, str]:
    """digest -> name; a line that is not ``name:digest`` fails the whole file (a typo must not
    silently lock someone out or in)."""
    names: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, hexdigest = line.partition(":")
        if not REVIEWER.fullmatch(name) or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
            raise ValueError(f"{path} line {n} is not 'name:sha256-of-token'")
        names[hexdigest] = name
    return names


def read_tokens(path: str | Path) -> dict[str, str]:
    raw = bounded.read_file(path, max_bytes=MAX_TOKEN_FILE_BYTES)
    return _parse(raw.decode("utf-8", "replace"), path)


def add_reviewer(path: str | Path, name: str) -> str:
    """A new token for ``name`` (replacing any it had), stored as its digest; returns the token."""
    if not REVIEWER.fullmatch(name):
        raise ValueError(f"{name[:80]!r} is not a reviewer's name: letters, digits and . _ @ + - (up to 64)")
    path = Path(path)
    lines = []
    if path.exists():
        kept = {h: n for h, n in read_tokens(path).items() if n != name}
        lines = [f"{n}:{h}" for h, n in kept.items()]
    token = secrets.token_urlsafe(32)
    lines.append(f"{name}:{digest(token)}")
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    os.chmod(path, 0o600)
    return token


class Reviewers:
    """Names the reviewer of a request from its bearer token or the proxy's identity header."""

    def __init__(self, tokens: str | Path | None, identity_header: str | None):
        if tokens is None and identity_header is None:
            raise ValueError("the review page is not open to everyone: give --tokens FILE (bincounter review-token) "
                             "or --identity-header NAME (behind an authenticating proxy)")
        self.tokens_path = Path(tokens) if tokens else None
        self.identity_header = identity_header
        self._lock = threading.Lock()
        self._names: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        if self.tokens_path is not None:
            self._reload()  # a missing or malformed file fails the start, not the first request

    @property
    def mode(self) -> str:
        return "token" if self.tokens_path is not None else "proxy"

    def _reload(self) -> dict[str, str]:
        st = os.stat(self.tokens_path)
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._names = read_tokens(self.tokens_path)
                self._stamp = stamp
            return self._names

    def name(self, authorization: str | None, identity: str | None) -> str:
        """The reviewer's name, or NotSignedIn."""
        if authorization and self.tokens_path is not None:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN_CHARS:
                raise NotSignedIn("send 'Authorization: Bearer <your reviewer token>'")
            name = self._reload().get(digest(token))
            if name is None:
                raise NotSignedIn("that token is not a reviewer's (or no longer is)")
            return name
        if self.identity_header is not None:
            if identity and REVIEWER.fullmatch(identity.strip()):
                return identity.strip()
            if identity:
                raise NotSignedIn(f"the proxy's {self.identity_header} does not name a reviewer")
        raise NotSignedIn("sign in: send 'Authorization: Bearer <your reviewer token>'" if self.tokens_path
                          else f"no {self.identity_header} from the authenticating proxy")
