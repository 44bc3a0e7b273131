"""After training: calibrate the kept model on validation photos it never trained on.

The validation split is halved by a hash of each photo's id: the temperature is fitted on one half
(its negative log-likelihood, through the same test-time views the model is served with), and the
count sets' threshold on the other half, with the temperature applied (split conformal needs
photos nothing else was fitted on). Both go into the model's spec, in ``model.pt`` and
``model_spec.json`` alike, so every path that answers probabilities gives calibrated ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from bincounter.config import TrainConfig
from bincounter.data.dataset import ShardDataset, make_loader, read_samples, shard_urls
from bincounter.fileio import atomic_write
from bincounter.model.calibration import conformal_threshold, fit_temperature, nll, probabilities
from bincounter.model.device import resolve_device
from bincounter.model.networks import BEST_WEIGHTS, ModelSpec
from bincounter.model.predictor import Predictor

SPEC_FILE = "model_spec.json"


def half_of(id_: str) -> int:
    """0 or 1, from a hash of the id: which half of the validation photos a photo is in."""
    return hashlib.sha256(f"calibration:{id_}".encode()).digest()[0] & 1


def view_logits(predictor: Predictor, samples: list, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """([photos, views, classes] logits, labels) of ``samples`` as the model is served."""
    dataset = ShardDataset(samples, predictor.transform)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=0, pin_memory=False)
    logits = [predictor.view_logits(x) for x, _ in loader]
    return (np.concatenate(logits) if logits else np.zeros((0, 1, 1))), dataset.labels.numpy()


def calibrate(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path) -> dict:
    """Fit and store the temperature and the count sets' threshold of ``out_dir``'s model; returns
    what was fitted and the validation NLL before and after (empty without validation photos)."""
    out_dir = Path(out_dir)
    predictor = Predictor.from_dir(out_dir, resolve_device(cfg.device))
    n_classes = predictor.spec.num_classes
    samples = [s for s in read_samples(shard_urls(data_dir, "val")) if s[2] < n_classes]
    halves = [[s for s in samples if half_of(s[0]) == h] for h in (0, 1)]
    if min(len(h) for h in halves) < 10:
        return {}  # too few held-out photos to fit anything honestly: the model stays as trained
    logits_t, y_t = view_logits(predictor, halves[0], cfg.batch_size * 2)
    temperature = fit_temperature(logits_t, y_t)
    logits_c, y_c = view_logits(predictor, halves[1], cfg.batch_size * 2)
    calibrated = probabilities(logits_c, temperature)
    threshold = conformal_threshold(calibrated, y_c, cfg.count_set_coverage)
    fitted = {"temperature": temperature, "count_set_threshold": threshold,
              "count_set_coverage": cfg.count_set_coverage}
    spec = ModelSpec.from_dict({**predictor.spec.to_dict(), **fitted})
    state = torch.load(out_dir / BEST_WEIGHTS, map_location="cpu", weights_only=True)
    state["spec"] = spec.to_dict()
    tmp = out_dir / f".{BEST_WEIGHTS}.calibrating"
    torch.save(state, tmp)
    tmp.replace(out_dir / BEST_WEIGHTS)
    atomic_write(out_dir / SPEC_FILE, json.dumps(spec.to_dict(), indent=2).encode())
    return {**fitted, "calibration_photos": len(y_t), "count_set_photos": len(y_c),
            "val_nll_before": nll(probabilities(logits_c, 1.0), y_c), "val_nll_after": nll(calibrated, y_c)}
