"""After a rollout, ask the new pods about photos whose answers are known.

The register step hands the deploy step a few test photos and how the version that will serve
answered them in its evaluation (``smoke/expected.json``, written by
``bincounter.evaluation.gate.write_smoke_set``). The new pods run the same engine on the same
bytes, so they must answer them the same: the same class, from the same version. A rollout whose
pods answer worse than that is undone by the deploy step.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "expected.json"
# The smoke requests go to the cluster's own Service: a proxy in the pod's env must not take them.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class SmokeResult:
    photos: int
    agreed: int
    version_seen: set[str]
    failures: list[str]

    @property
    def agreement(self) -> float:
        return self.agreed / self.photos if self.photos else 0.0


class SmokeFailed(RuntimeError):
    """The new pods answered the known photos worse than the version's evaluation did."""


def ask(url: str, smoke_dir: str | Path, *, timeout: float = 60.0) -> SmokeResult:
    """Post each smoke photo to ``url``'s ``/v1/count`` and compare its class and version."""
    smoke_dir = Path(smoke_dir)
    manifest = json.loads((smoke_dir / MANIFEST).read_text())
    agreed, versions, failures = 0, set(), []
    for photo in manifest["photos"]:
        request = urllib.request.Request(f"{url.rstrip('/')}/v1/count", data=(smoke_dir / photo["file"]).read_bytes(),
                                         headers={"Content-Type": "image/jpeg"}, method="POST")
        try:
            with _opener.open(request, timeout=timeout) as r:
                answer = json.loads(r.read())
        except (OSError, ValueError) as exc:  # refused, timed out, an error status, not JSON
            failures.append(f"{photo['id']}: {exc}")
            continue
        versions.add(str(answer.get("model_version")))
        if answer.get("label") == photo["label"] and str(answer.get("model_version")) == str(manifest["model_version"]):
            agreed += 1
        else:
            failures.append(f"{photo['id']}: answered {answer.get('label')!r} from v{answer.get('model_version')}, "
                            f"expected {photo['label']!r} from v{manifest['model_version']}")
    return SmokeResult(photos=len(manifest["photos"]), agreed=agreed, version_seen=versions, failures=failures)


def check(url: str, smoke_dir: str | Path, min_agreement: float, *, timeout: float = 60.0) -> SmokeResult:
    """``ask``, then raise :class:`SmokeFailed` when fewer than ``min_agreement`` of the photos
    got their known answer."""
    result = ask(url, smoke_dir, timeout=timeout)
    if result.agreement < min_agreement:
        raise SmokeFailed(f"the new pods at {url} answered {result.agreed} of {result.photos} known photos as their "
                          f"version's evaluation did (need {min_agreement:.0%}): " + "; ".join(result.failures[:5]))
    return result
