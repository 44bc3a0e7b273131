"""Which device a model runs on: the one named, or for 'auto' this process's GPU, Apple's MPS or the CPU."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    """``name`` as a torch device; 'auto' picks this rank's GPU (``$LOCAL_RANK``), then MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
