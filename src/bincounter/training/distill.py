"""Distillation: trained counters (one, or an ensemble averaged) teach a student soft targets.

Each teacher's probabilities on every training photo are computed once, before training, on the
photo as evaluation sees it (the teacher's own transform and test-time views), and become a
second target beside the label. A teacher that saw many seeds or a bigger backbone passes on
what it learned while the student keeps the serving cost of one small model.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm import tqdm

from bincounter.data.dataset import ShardDataset, make_loader
from bincounter.fileio import atomic_write
from bincounter.model.networks import BEST_WEIGHTS, REMOTE_URIS
from bincounter.model.predictor import Predictor

log = logging.getLogger(__name__)

CACHE = "teacher_probs.npz"  # in the student's output folder: a resumed run does not recompute it


def teacher_folder(uri: str) -> Path:
    """The local folder holding a teacher's ``model.pt``: a training output folder as it is, or
    a downloaded copy of a remote one (an s3:// prefix, an MLflow run's or registered model's
    artifacts, which must hold exactly one ``model.pt``)."""
    if uri.startswith(REMOTE_URIS):
        import mlflow

        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        found = sorted(root.rglob(BEST_WEIGHTS)) if root.is_dir() else []
        if len(found) != 1:
            raise ValueError(f"teacher {uri} holds {len(found)} {BEST_WEIGHTS} files; name one trained model")
        return found[0].parent
    folder = Path(uri)
    if not (folder / BEST_WEIGHTS).is_file():
        raise ValueError(f"teacher {uri} is not a trained model folder (no {BEST_WEIGHTS} in it)")
    return folder


def teacher_probabilities(teachers: Sequence[str], dataset: ShardDataset, class_names: Sequence[str], *,
                          rows: Sequence[int] | None = None, batch_size: int = 64,
                          device: str | torch.device = "cpu", progress: bool = True) -> np.ndarray:
    """(N, classes) probabilities on ``dataset``'s photos (only those at ``rows``, in that order,
    when given), averaged over the teachers. Each teacher must answer over exactly
    ``class_names``, the classes the student trains on."""
    if not teachers:
        raise ValueError("no teachers given")
    rows = range(len(dataset)) if rows is None else rows
    total = np.zeros((len(rows), len(class_names)), dtype=np.float64)
    for uri in teachers:
        predictor = Predictor.from_dir(teacher_folder(uri), device)
        answers = tuple(predictor.spec.class_names)
        if answers != tuple(class_names):
            raise ValueError(f"teacher {uri} answers over classes {list(answers)}, but the student trains on "
                             f"{list(class_names)}: distil a teacher trained on data with the same classes")
        view = copy.copy(dataset)  # shares the decoded photos; the teacher's own transform, no extras
        view.transform, view.extras = predictor.transform, {}
        loader = make_loader(Subset(view, rows), batch_size=batch_size, shuffle=False, workers=0, pin_memory=False)
        batches = tqdm(loader, desc=f"teacher {Path(uri).name or uri}", unit="batch", disable=not progress,
                       leave=False)
        scored = [predictor.probabilities(x) for x, _ in batches]
        if scored:  # a rank's share is empty when there are fewer photos than ranks
            total += np.concatenate(scored)
    return (total / len(teachers)).astype(np.float32)


def read_cached(out_dir: Path, teachers: Sequence[str], dataset: ShardDataset) -> np.ndarray | None:
    """The probabilities kept in ``out_dir/teacher_probs.npz``, if they were made by the same
    teachers on the same photos."""
    path = out_dir / CACHE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as kept:
        if np.array_equal(kept["teachers"], np.array(list(teachers))) and np.array_equal(kept["ids"], np.array(dataset.ids)):
            return kept["probs"]
    log.info("%s was made for other teachers or photos: computing it again", path)
    return None


def write_cache(out_dir: Path, teachers: Sequence[str], dataset: ShardDataset, probs: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, teachers=np.array(list(teachers)), ids=np.array(dataset.ids), probs=probs)
    atomic_write(out_dir / CACHE, buf.getvalue())


def cached_teacher_probabilities(out_dir: Path, teachers: Sequence[str], dataset: ShardDataset,
                                 class_names: Sequence[str], **kwargs) -> np.ndarray:
    """``teacher_probabilities``, kept in ``out_dir/teacher_probs.npz`` for the same teachers and
    photos (a resumed run reads it back instead of running the teachers again)."""
    probs = read_cached(out_dir, teachers, dataset)
    if probs is None:
        probs = teacher_probabilities(teachers, dataset, class_names, **kwargs)
        write_cache(out_dir, teachers, dataset, probs)
    return probs


def distill_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student), both softened at ``temperature``; times T^2 so the gradients keep
    their scale whatever T is (Hinton et al., 2015)."""
    log_student = F.log_softmax(logits.float() / temperature, dim=1)
    soft = teacher_probs.float().clamp_min(1e-8).pow(1.0 / temperature)
    soft = soft / soft.sum(dim=1, keepdim=True)
    return F.kl_div(log_student, soft, reduction="batchmean") * temperature**2
