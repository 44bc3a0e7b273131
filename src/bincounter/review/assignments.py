"""Which bin each person counts next.

Bins come in the queue's order (the model's least sure first). Bins that others answered but
that are not settled (their counts disagree, or more agreeing answers are asked for) come before
fresh ones: one more answer settles them. A person never gets a bin they answered or skipped,
nor one that is settled or that too many people could not count; a bin handed to someone is
leased to them for a while, so two people counting side by side get different bins.

The answers themselves live in the store; this keeps a copy per bin, read again from the
store before a bin is handed out, so several servers over one store stay right.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from bincounter.audit.review_queue import QueuedBin
from bincounter.config import ReviewConfig
from bincounter.data.reviews import Answer, Settlement, settle

log = logging.getLogger(__name__)
_OUT = ("settled", "unreadable")


class Assignments:
    def __init__(self, bins: list[QueuedBin], load: Callable[[str], list[Answer]], cfg: ReviewConfig,
                 clock: Callable[[], float] = time.monotonic):
        self.bins = {b.id: b for b in bins}
        self.order = [b.id for b in bins]
        self._load = load
        self.cfg = cfg
        self._clock = clock
        self._lock = threading.Lock()
        self._answers: dict[str, list[Answer]] = {}
        self._photo: dict[str, str] = {}  # the sha256 of the photo last served, per bin
        self._leases: dict[str, tuple[str, float]] = {}
        self._skipped: dict[str, set[str]] = {}
        self.excluded: set[str] = set()  # bins whose reviews file cannot be read: never handed out

    def refresh(self, id_: str) -> list[Answer]:
        """The bin's answers from the store. A file that is not a reviews file (or over the limits)
        takes the bin out of the queue: it is never written over, and nobody counts it in vain."""
        try:
            answers = self._load(id_)
        except ValueError as exc:  # InvalidReview, bounded.Refused
            log.error("bin %s leaves the queue: its reviews cannot be read (%s)", id_, exc)
            with self._lock:
                self.excluded.add(id_)
            return self._answers.get(id_, [])
        with self._lock:
            self._answers[id_] = answers
        return answers

    def load_all(self) -> None:
        for id_ in self.order:
            self.refresh(id_)

    def settlement(self, id_: str) -> Settlement:
        return settle(self._answers.get(id_, []), photo_sha256=self._photo.get(id_), agreeing=self.cfg.agreeing,
                      cant_tell_limit=self.cfg.cant_tell_limit)

    def _open_to(self, id_: str, reviewer: str, now: float) -> int | None:
        """0: needs one more answer, 1: nobody answered it; None: not for this person now."""
        if id_ in self.excluded or id_ in self._skipped.get(reviewer, ()):
            return None
        holder = self._leases.get(id_)
        if holder is not None and holder[0] != reviewer and holder[1] > now:
            return None
        answers = self._answers.get(id_, [])
        if any(a.reviewer == reviewer for a in answers):
            return None
        status = self.settlement(id_).status
        if status in _OUT:
            return None
        return 0 if answers else 1

    def next_for(self, reviewer: str) -> QueuedBin | None:
        """The bin this person counts next (leased to them), or None when none is left for them."""
        tried: set[str] = set()
        while True:
            now = self._clock()
            with self._lock:
                ranked = sorted((rank, position, id_) for position, id_ in enumerate(self.order)
                                if id_ not in tried and (rank := self._open_to(id_, reviewer, now)) is not None)
            if not ranked:
                return None
            id_ = ranked[0][2]
            tried.add(id_)
            self.refresh(id_)  # another server may have written it since
            with self._lock:
                if self._open_to(id_, reviewer, self._clock()) is not None:
                    self._leases[id_] = (reviewer, self._clock() + self.cfg.lease_seconds)
                    return self.bins[id_]

    def skip(self, reviewer: str, id_: str) -> None:
        with self._lock:
            self._skipped.setdefault(reviewer, set()).add(id_)
            if self._leases.get(id_, ("",))[0] == reviewer:
                del self._leases[id_]

    def saw_photo(self, id_: str, sha256: str) -> None:
        with self._lock:
            self._photo[id_] = sha256

    def photo_of(self, id_: str) -> str | None:
        return self._photo.get(id_)

    def answered(self, reviewer: str, id_: str, answers: list[Answer]) -> Settlement:
        """Record the store's answers after ``reviewer``'s write; the bin's settlement now."""
        with self._lock:
            self._answers[id_] = answers
            if self._leases.get(id_, ("",))[0] == reviewer:
                del self._leases[id_]
            return self.settlement(id_)

    def remaining(self) -> int:
        """Bins of the queue not yet settled or given up on."""
        with self._lock:
            return sum(1 for id_ in self.order if id_ not in self.excluded and self.settlement(id_).status not in _OUT)

    def answered_by(self, reviewer: str) -> int:
        with self._lock:
            return sum(1 for answers in self._answers.values() if any(a.reviewer == reviewer for a in answers))
