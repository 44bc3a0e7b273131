"""Judges for tests that need a registered model but do not test the promotion gate itself
(the gate's own tests are tests/evaluation/test_gate.py and tests/registry/)."""

from __future__ import annotations

from bincounter.registry.register import Judge, Verdict


def always(promote: bool = True) -> Judge:
    """Promote (or keep) whatever the champion: the test sets up a registry, it does not judge."""
    return lambda champion: Verdict(promote, "test: decided by hand", {"gate.champion_version": champion or "none"})


def by_recorded_score(client, name: str, score: float) -> Judge:
    """Compare ``score`` with the champion's recorded ``metric.accuracy`` tag: enough to test the
    registry's lock and aliases, which must keep every decision true when made."""

    def judge(champion: str | None) -> Verdict:
        if champion is None:
            return Verdict(True, "first model")
        theirs = float(client.get_model_version(name, champion).tags["metric.accuracy"])
        return Verdict(score > theirs, f"{score} against {theirs}")

    return judge
