"""A warehouse floor for the review tests: bins in the bucket's layout, a queue of them, reviewers."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from bincounter.config import ReviewConfig, SourceConfig
from bincounter.review.auth import add_reviewer

EXPECTED = 4242  # the record's count in every bin: it must never reach the page or the API


@dataclass
class Floor:
    root: Path
    queue: Path
    tokens: Path
    token: dict[str, str]
    ids: list[str]

    def cfg(self, **kw) -> ReviewConfig:
        return ReviewConfig(**{"source": SourceConfig(uri=str(self.root), anonymous=False), "tokens": str(self.tokens),
                               **kw})

    def sha(self, id_: str) -> str:
        return hashlib.sha256((self.root / "bin-images" / f"{id_}.jpg").read_bytes()).hexdigest()

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token[name]}"}

    def photo(self, id_: str) -> bytes:
        return (self.root / "bin-images" / f"{id_}.jpg").read_bytes()

    def reviews(self, id_: str) -> list[dict]:
        """The bin's stored answers (none when nobody answered)."""
        path = self.root / "reviews" / f"{id_}.json"
        if not path.exists():
            return []
        doc = json.loads(path.read_text())
        assert doc["id"] == id_
        return doc["answers"]


def photo(seed: int) -> bytes:
    """A small bin photo, different for each seed: 1 to 5 boxes."""
    image = Image.new("RGB", (320, 240), (150 + 15 * (seed % 6), 120, 90))
    draw = ImageDraw.Draw(image)
    for k in range(seed % 5 + 1):
        draw.rectangle([20 + 55 * k, 60, 60 + 55 * k, 180], fill=(40 * k % 255, 90, 200 - 30 * k))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_floor(tmp_path: Path, n: int = 6, reviewers: tuple[str, ...] = ("ana", "bo", "cy"),
               model: str = "models:/bincounter/7", ids: list[str] | None = None) -> Floor:
    """Bins ``ids`` (default 00001..n) in the bucket's layout, each recorded as holding EXPECTED
    items; a queue of them in that order, asked by ``model``; a token per reviewer."""
    root = tmp_path / "floor"
    (root / "bin-images").mkdir(parents=True)
    (root / "metadata").mkdir()
    ids = ids or [f"{i:05d}" for i in range(1, n + 1)]
    for i, id_ in enumerate(ids):
        (root / "bin-images" / f"{id_}.jpg").write_bytes(photo(i + 1))
        (root / "metadata" / f"{id_}.json").write_text(json.dumps({"EXPECTED_QUANTITY": EXPECTED,
                                                                   "BIN_FCSKU_DATA": {}}))
    queue = tmp_path / "queue.csv"
    with queue.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["position", "id", "uncertainty", "model"])
        for pos, id_ in enumerate(ids, start=1):
            w.writerow([pos, id_, f"{0.9 - pos / 100:.4f}", model])
    tokens = tmp_path / "reviewers.tokens"
    token = {name: add_reviewer(tokens, name) for name in reviewers}  # none: the file is still made
    tokens.touch()
    return Floor(root, queue, tokens, token, ids)
