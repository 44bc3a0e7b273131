"""Train: an explicit loop in the style of torchvision's classification reference.

One call, ``train(cfg, data_dir, out_dir)``, on one process or under ``torchrun`` (DDP).
Every epoch writes ``checkpoint.pt`` (model, EMA, optimizer, scheduler, epoch, history);
a rerun with the same ``out_dir`` (or any folder, given ``checkpoint_uri``) resumes from it; under
DDP every rank resumes from the checkpoint rank 0 finds. Each epoch reseeds every RNG from
(seed, epoch), the DataLoader workers' augmentations included (seeded per batch from the
epoch's seed and the batch's first sample), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bincounter import tracking
from bincounter.training.checkpoints import CheckpointMirror
from bincounter.config import TrainConfig
from bincounter.data.dataset import AUX_TARGETS, load_split, make_loader, materialize, seed_epoch
from bincounter.training.distill import (cached_teacher_probabilities, distill_loss, read_cached, teacher_probabilities,
                                write_cache)
from bincounter.evaluation.metrics import evaluate_predictions
from bincounter.model.device import resolve_device
from bincounter.model.networks import BEST_WEIGHTS, ModelSpec, build_model, normalization_for, served_state
from bincounter.data.preprocess import load_dataset_info
from bincounter.model.transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
SPEC = "model_spec.json"


@dataclass
class TrainResult:
    out_dir: Path
    spec: ModelSpec
    best_epoch: int
    best: dict
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    calibration: dict = field(default_factory=dict)  # training.calibrate's figures (empty: not calibrated)


# ---------------------------------------------------------------- engine set-up

def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it, else fp16; off on CPU (no gain without AMX/AVX512-BF16)."""
    if device.type != "cuda":
        return torch.bfloat16 if cfg.amp == "bf16" else None
    if cfg.amp == "off":
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def processes_per_node(cfg: TrainConfig) -> int:
    """Training processes for this machine: one per visible GPU when the device is left to
    choose ('auto'), else one (CPU, or a device named in the config)."""
    if cfg.device != "auto":
        return 1
    return max(1, torch.cuda.device_count())


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- loss

def emd_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared earth mover's distance between predicted and true count distributions.

    Cross-entropy treats "predicted 4 for a 5" like "predicted 0 for a 5"; comparing the
    cumulative distributions penalises by distance, which is what RMSE measures.
    """
    cdf_pred = torch.cumsum(F.softmax(logits.float(), dim=1), dim=1)
    cdf_true = torch.cumsum(F.one_hot(target, logits.shape[1]).float(), dim=1)
    return ((cdf_pred - cdf_true) ** 2).sum(dim=1).mean()


def class_weights(counts: list[int], kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    freq = torch.tensor(counts, dtype=torch.float64).clamp(min=1)
    w = (freq.sum() / freq) ** (0.5 if kind == "sqrt_inverse" else 1.0)
    return (w / (w * freq).sum() * freq.sum()).float()  # mean weight per sample is 1


def aux_loss(pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Huber loss on standardised auxiliary targets; a missing figure (NaN) adds nothing."""
    known = ~torch.isnan(target)
    if not known.any():
        return pred.sum() * 0.0  # keeps the graph whole (DDP expects every parameter to get a gradient)
    z = (target - mean) / std
    return F.smooth_l1_loss(pred.float()[known], z[known])


class CountLoss(nn.Module):
    """Cross-entropy over the count classes (a censored 'K+1 or more' photo is simply its own
    class: its likelihood is the probability of any count above K), optionally shared with
    teachers' soft targets, with an earth-mover term and auxiliary regression targets."""

    def __init__(self, cfg: TrainConfig, weights: torch.Tensor | None,
                 aux_stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.register_buffer("weights", weights if weights is not None else torch.tensor([]))
        self.smoothing = cfg.label_smoothing
        self.emd_weight = cfg.emd_weight if cfg.loss == "ce+emd" else 0.0
        self.aux_weight = cfg.aux_weight if aux_stats is not None else 0.0
        self.distill_weight = cfg.distill_weight if cfg.teachers else 0.0
        self.temperature = cfg.distill_temperature
        mean, std = aux_stats if aux_stats is not None else (torch.tensor([]), torch.tensor([]))
        self.register_buffer("aux_mean", mean)
        self.register_buffer("aux_std", std)

    def forward(self, output, target: torch.Tensor, aux_target: torch.Tensor | None = None,
                teacher: torch.Tensor | None = None) -> torch.Tensor:
        logits, aux = output if isinstance(output, tuple) else (output, None)
        weight = self.weights if self.weights.numel() else None
        loss = F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=self.smoothing)
        if self.distill_weight and teacher is not None:
            loss = (1 - self.distill_weight) * loss + self.distill_weight * distill_loss(logits, teacher,
                                                                                        self.temperature)
        if self.emd_weight:
            loss = loss + self.emd_weight * emd_loss(logits, target)
        if self.aux_weight and aux is not None and aux_target is not None:
            loss = loss + self.aux_weight * aux_loss(aux, aux_target, self.aux_mean, self.aux_std)
        return loss


def aux_statistics(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target mean and standard deviation over the training split (NaNs skipped)."""
    t = targets.double()
    known = ~torch.isnan(t)
    n = known.sum(0).clamp(min=1)
    mean = torch.where(known, t, 0.0).sum(0) / n
    var = torch.where(known, (t - mean) ** 2, 0.0).sum(0) / n
    return mean.float(), var.sqrt().clamp(min=1e-3).float()


# ---------------------------------------------------------------- optimiser

def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Head at ``lr``, backbone at ``lr * backbone_lr_scale``; no decay on norms and biases."""
    groups = []
    for part, scale in ((model.backbone, cfg.backbone_lr_scale), (model.head, 1.0)):
        decay = [p for p in part.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in part.parameters() if p.requires_grad and p.ndim <= 1]
        groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr * scale},
                   {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr * scale}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to zero, stepped every batch."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights (and BatchNorm statistics), or None.

    The decay ramps up as (1 + n) / (10 + n) over the first updates, so the average does not
    drag the random head's first steps along for hundreds of steps.
    """
    if not decay:
        return None

    def ema(avg: list[torch.Tensor], new: list[torch.Tensor], n: torch.Tensor) -> None:
        if not avg[0].is_floating_point():  # BatchNorm's batch counters: keep the latest
            torch._foreach_copy_(avg, new)
            return
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        torch._foreach_lerp_(avg, new, 1 - d)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema, use_buffers=True)


# ---------------------------------------------------------------- checkpoints

def save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------- distributed helpers

def state_digest(state: nn.Module | dict) -> str:
    """sha256 of a model's parameters and buffers (or of a state_dict), in key order: equal
    digests mean bit-identical weights, whatever the tensors' memory layout."""
    sha = hashlib.sha256()
    items = state.state_dict().items() if isinstance(state, nn.Module) else state.items()
    for key, t in items:
        t = t.detach().cpu().contiguous()
        sha.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts them
    at the start of each forward, so after the last step of an epoch every rank holds its own."""
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def from_rank0(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_replicas_agree(model: nn.Module, rank: int, world: int) -> str:
    """All ranks must finish with bit-identical weights; raises (on every rank) if they do not."""
    digest = state_digest(model)
    digests: list[str | None] = [None] * world
    dist.all_gather_object(digests, digest)
    log.info("rank %d/%d final model state sha256=%s", rank, world, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP replicas diverged: model digests per rank {digests}")
    return digest


# ---------------------------------------------------------------- loops

def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, device, epoch: int, cfg: TrainConfig,
                    amp_dtype, scaler, show: bool, step0: int, profiler=None, log_steps: bool = True,
                    ema: nn.Module | None = None) -> dict:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    grad_norms: list[float] = []
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not show, leave=False)
    for i, (images, target, *extra) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        extra = {k: v.to(device, non_blocking=True) for k, v in (extra[0] if extra else {}).items()}
        if cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type in ("cuda", "cpu")):
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
            loss = loss_fn(output, target, extra.get("aux"), extra.get("teacher"))
        logits = output[0] if isinstance(output, tuple) else output
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        grad_norms.append(float(norm))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        if profiler is not None:
            profiler.step()
        n = target.numel()
        total_loss += float(loss.detach()) * n
        correct += int((logits.argmax(1) == target).sum())
        seen += n
        if log_steps and i % 10 == 0:
            tracking.log_metrics({"step_loss": float(loss.detach()), "lr": optimizer.param_groups[-1]["lr"],
                                  "grad_norm": float(norm)}, step=step0 + i)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    _check_gradients(grad_norms, epoch)
    return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "grad_norm_mean": float(np.mean(grad_norms)) if grad_norms else 0.0,
            "lr": optimizer.param_groups[-1]["lr"], "steps": len(grad_norms), "images": seen}


def _check_gradients(norms: list[float], epoch: int) -> None:
    """Warn on vanishing or exploding gradients (what SageMaker Debugger's rules flagged)."""
    if not norms:
        return
    if not all(math.isfinite(n) for n in norms):
        log.warning("epoch %d: non-finite gradient norm (exploding gradients or a bad batch)", epoch + 1)
    elif max(norms) > 1e3:
        log.warning("epoch %d: gradient norm reached %.3g (exploding gradients?)", epoch + 1, max(norms))
    elif np.median(norms) < 1e-6:
        log.warning("epoch %d: median gradient norm %.3g (vanishing gradients?)", epoch + 1, np.median(norms))


@torch.no_grad()
def predict_probs(model: nn.Module, loader, device: torch.device, amp_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, class probabilities) of one view per photo (validation; evaluation adds the TTA views)."""
    model.eval()
    labels, probs = [], []
    for images, target, *_ in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            p = F.softmax(model(images).float(), dim=1)
        probs.append(p.cpu().numpy())
        labels.append(target.numpy())
    if not probs:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0))
    return np.concatenate(labels), np.concatenate(probs)


def answer_probs(y: np.ndarray, p: np.ndarray, answers: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities as the saved model answers: over the first ``answers`` classes,
    renormalised, keeping only photos whose label is one of them (see models.served_state)."""
    if p.shape[1] <= answers:
        return y, p
    keep = y < answers
    q = p[keep, :answers]
    return y[keep], q / q.sum(1, keepdims=True).clip(min=1e-12)


def _improved(metrics: dict, best: dict | None) -> bool:
    if best is None:
        return True
    key = (metrics["val_accuracy"], -metrics["val_rmse"])
    return key > (best["val_accuracy"], -best["val_rmse"])


# ---------------------------------------------------------------- entry point

def train(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path) -> TrainResult:
    """Train on ``data_dir`` (a preprocess output) into ``out_dir``; resumes if it can."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = init_distributed()
    is_main = rank == 0
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    amp_dtype = autocast_dtype(cfg, device)

    data_dir = materialize(data_dir)  # s3:// datasets are cached locally once
    info = load_dataset_info(data_dir)
    classes = info["classes"]
    mean, std = normalization_for(cfg.backbone)
    # The model trains on every class of the data; it answers over ``answers`` (without a
    # censored 'K+1 or more' class when overflow_answer='condition').
    censored = info.get("overflow") == "class" and cfg.overflow_answer == "condition"
    answers = classes[:-1] if censored else classes
    trained_spec = ModelSpec(backbone=cfg.backbone, num_classes=len(classes), head=cfg.head,
                             image_size=cfg.image_size, mean=mean, std=std, min_count=info["min_count"],
                             class_names=tuple(classes), tta=cfg.tta, rot90=cfg.rot90)
    spec = ModelSpec(**{**trained_spec.to_dict(), "num_classes": len(answers), "class_names": tuple(answers)})
    train_ds = load_split(data_dir, "train", TrainTransform(size=cfg.image_size, mean=mean, std=std, rot90=cfg.rot90),
                          with_targets=cfg.aux_weight > 0)
    val_ds = load_split(data_dir, "val", EvalTransform(size=cfg.image_size, mean=mean, std=std))
    if len(train_ds) == 0:
        raise ValueError(f"{data_dir} has no training samples")
    validated = len(val_ds) > 0
    if not validated and is_main:
        log.warning("%s has no validation split (val_fraction=0): keeping the last epoch's weights, "
                    "early stopping off, no val_* metrics", data_dir)

    seed_everything(cfg.seed)
    model = build_model(trained_spec, pretrained=cfg.pretrained, freeze_backbone=cfg.freeze_backbone,
                        freeze_early=cfg.freeze_early, aux_outputs=len(AUX_TARGETS) if cfg.aux_weight else 0).to(device)
    if cfg.channels_last != "off":
        model = model.to(memory_format=torch.channels_last)
    hist = [info["class_counts"]["train"][c] for c in classes]
    aux_stats = aux_statistics(train_ds.extras["aux"]) if "aux" in train_ds.extras else None
    if cfg.teachers:
        train_ds.add_extra("teacher", _teacher_targets(cfg, train_ds, classes, out_dir, device, rank, world))
    loss_fn = CountLoss(cfg, class_weights(hist, cfg.class_weighting), aux_stats).to(device)

    sampler = None
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, shuffle=True, seed=cfg.seed)
    workers = cfg.workers if device.type != "cpu" else min(cfg.workers, max(0, (os.cpu_count() or 1) - 2))
    train_loader = make_loader(train_ds, batch_size=cfg.batch_size, shuffle=True, workers=workers,
                               pin_memory=device.type == "cuda", sampler=sampler, seed=cfg.seed,
                               drop_last=len(sampler if sampler is not None else train_ds) > cfg.batch_size)
    val_loader = make_loader(val_ds, batch_size=cfg.batch_size * 2, shuffle=False, workers=workers,
                             pin_memory=device.type == "cuda")

    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    ema = make_ema(model, cfg.ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    start_epoch, history, best, best_epoch, stale = 0, [], None, -1, 0
    ckpt_path = out_dir / CHECKPOINT
    mirror = CheckpointMirror(cfg.checkpoint_uri)
    ckpt = None
    if is_main:  # its own folder's checkpoint, else the mirror's (a restart on a new machine)
        mirror.restore(out_dir)
        if ckpt_path.exists():
            # Tensors and plain containers only: a tampered checkpoint cannot run code.
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if world > 1:
        # Every rank resumes from rank 0's checkpoint, whatever its own folder holds (a worker's is
        # an emptyDir, or keeps an older epoch): else ranks would train different epochs and weights.
        ckpt = from_rank0(ckpt)
    if ckpt is not None:
        if ckpt["args"] != cfg.model_dump():
            raise ValueError(f"{ckpt_path} was written with other settings; use a new output folder "
                             "or delete the checkpoint to start over")
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
        best, best_epoch, stale = ckpt["best"], ckpt["best_epoch"], ckpt["stale"]
        log.info("rank %d/%d resumed at epoch %d, weights sha256=%s", rank, world, start_epoch + 1,
                 state_digest(model))
        del ckpt

    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
            stopped_early = True
            break
        # Reseeding from (seed, epoch) makes every epoch independent of how we got here; under DDP
        # each rank gets its own stream (else all ranks draw the same augmentations); world=1 is unchanged.
        epoch_seed = (cfg.seed * 1000 + epoch) * world + rank
        seed_everything(epoch_seed)
        seed_epoch(train_loader, epoch_seed)  # the shuffle and the augmentations, in workers too
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        profiler = _start_profiler(out_dir) if (cfg.profile and epoch == start_epoch and is_main) else None
        stats = train_one_epoch(net, train_loader, loss_fn, optimizer, scheduler, device, epoch, cfg, amp_dtype,
                                scaler, show=is_main and cfg.progress, log_steps=is_main, step0=epoch * len(train_loader),
                                profiler=profiler, ema=ema)
        if profiler is not None:
            profiler.stop()
        t_train = time.perf_counter()
        val = {}
        # The averaged weights are the ones validated, kept and served.
        served = ema.module if ema is not None else model
        if world > 1:  # every replica (and the checkpoint) then holds rank 0's weights
            sync_buffers(model)
            sync_buffers(served)
        if is_main:  # on the unwrapped model: DDP's forward would wait for the other ranks
            y, p = answer_probs(*predict_probs(served, val_loader, device, amp_dtype=amp_dtype), len(answers))
            val = evaluate_predictions(y, p, min_count=info["min_count"], class_names=answers) if len(y) else {}
        if world > 1:  # one verdict for all ranks, so best/stale/early stopping never diverge
            val = from_rank0(val)
        t_end = time.perf_counter()
        # Training throughput counts the training steps alone: validation time is its own metric.
        train_seconds = t_train - t0
        # Without a validation split there are no val_* metrics (zeros would read as a score).
        val_metrics = {f"val_{k}": val.get(k, 0.0) for k in ("accuracy", "rmse", "macro_f1", "within_1")}
        metrics = {"epoch": epoch + 1, **stats, **(val_metrics if validated else {}), "epoch_seconds": t_end - t0,
                   "images": stats["images"] * world, "train_seconds": train_seconds, "val_seconds": t_end - t_train,
                   "train_images_per_second": stats["images"] * world / train_seconds}
        history.append(metrics)
        # Nothing to compare without validation: the latest weights are kept and nothing is stale.
        if not validated or _improved(metrics, best):
            best, best_epoch, stale = metrics, epoch, 0
            if is_main:
                save_atomic({"model": served_state(served, len(answers)), "spec": spec.to_dict(), "epoch": epoch},
                            out_dir / BEST_WEIGHTS)
        else:
            stale += 1
        if is_main:
            tracking.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
            # Katib's StdOut collector reads "name=value" lines.
            scores = f"val_accuracy={metrics['val_accuracy']:.4f} val_rmse={metrics['val_rmse']:.4f} " if validated else ""
            print(f"epoch={epoch + 1} {scores}train_loss={metrics['train_loss']:.4f}", flush=True)
            save_atomic({"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                         "optimizer": optimizer.state_dict(),
                         "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch, "args": cfg.model_dump(), "history": history, "best": best,
                         "best_epoch": best_epoch, "stale": stale}, ckpt_path)
            mirror.push(out_dir)
    if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience and len(history) < cfg.epochs:
        stopped_early = True

    if is_main:
        (out_dir / SPEC).write_text(json.dumps(spec.to_dict(), indent=2))
        (out_dir / "history.json").write_text(json.dumps(history, indent=2))
        from bincounter.evaluation.plots import training_curves

        curves = training_curves(history, out_dir / "plots")
        tracking.log_artifacts(curves, "plots")
        if cfg.profile:
            tracking.log_artifacts([out_dir / "profile"], "profile")
    if world > 1:
        check_replicas_agree(served, rank, world)
        dist.barrier()
        dist.destroy_process_group()
    fitted: dict = {}
    if is_main and cfg.calibrate and validated:  # after the group is gone: no rank waits on this
        from bincounter.training.calibrate import calibrate

        fitted = calibrate(cfg, data_dir, out_dir)
        spec = ModelSpec.from_dict(json.loads((out_dir / SPEC).read_text()))
        tracking.log_metrics({f"calibration_{k}": v for k, v in fitted.items()})
    return TrainResult(out_dir=out_dir, spec=spec, best_epoch=best_epoch + 1, best=best or {}, history=history,
                       stopped_early=stopped_early, calibration=fitted)


def _teacher_targets(cfg: TrainConfig, train_ds, classes: list[str], out_dir: Path, device: torch.device,
                     rank: int, world: int) -> np.ndarray:
    """The teachers' probabilities on the training photos, the same on every rank. Under DDP
    each rank scores every world-th photo and the shares are gathered: the pass takes 1/world of
    the time, and no rank sits in a collective while another scores the whole split (which
    outlasts NCCL's timeout at full scale). Rank 0 keeps them for a resumed run."""
    kwargs = dict(batch_size=cfg.batch_size * 2, device=device, progress=cfg.progress and rank == 0)
    if world == 1:
        return cached_teacher_probabilities(out_dir, cfg.teachers, train_ds, classes, **kwargs)
    kept = from_rank0(read_cached(out_dir, cfg.teachers, train_ds) if rank == 0 else None)
    if kept is not None:
        return kept
    share = teacher_probabilities(cfg.teachers, train_ds, classes, rows=range(rank, len(train_ds), world), **kwargs)
    log.info("rank %d/%d scored %d of the %d training photos with the teachers", rank, world, len(share), len(train_ds))
    shares: list[np.ndarray | None] = [None] * world
    dist.all_gather_object(shares, share)
    probs = np.empty((len(train_ds), len(classes)), dtype=np.float32)
    for r, part in enumerate(shares):
        probs[r::world] = part
    if rank == 0:
        write_cache(out_dir, cfg.teachers, train_ds, probs)
    return probs


def _start_profiler(out_dir: Path):
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(str(out_dir / "profile")), record_shapes=True)
    prof.start()
    return prof

