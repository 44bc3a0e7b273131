"""PNG plots of training and evaluation (logged to MLflow, shown in KFP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bincounter.reporting import plt, save_figure


def training_curves(history: list[dict], out_dir: Path) -> list[Path]:
    """Loss, accuracy and learning-rate curves per epoch."""
    if not history:
        return []
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [h["train_accuracy"] for h in history], marker="o", label="train accuracy")
    ax2b = ax2.twinx()
    if all("val_accuracy" in h for h in history):  # absent when there is no validation split
        ax2.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="val accuracy")
        ax2b.plot(epochs, [h["val_rmse"] for h in history], color="tab:red", linestyle="--", label="val RMSE")
    ax2b.set_ylabel("RMSE")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.legend(loc="upper left")
    if ax2b.lines:
        ax2b.legend(loc="upper right")
    curves = save_figure(fig, out_dir / "training_curves.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [h["lr"] for h in history], marker="o")
    ax.plot(epochs, [h["grad_norm_mean"] for h in history], marker="x", label="mean grad norm")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("learning rate (end of epoch) and gradient norm")
    ax.legend(["lr", "grad norm"])
    return [curves, save_figure(fig, out_dir / "lr_and_grad_norm.png")]


def confusion_matrix_plot(cm: np.ndarray, names: list[str], path: Path) -> Path:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(names), 1 + 0.7 * len(names)))
    rows = cm.sum(axis=1, keepdims=True).clip(min=1)
    ax.imshow(cm / rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] / rows[i, 0] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted count")
    ax.set_ylabel("true count")
    ax.set_title("Confusion matrix (colour: share of the row)")
    return save_figure(fig, path)


def per_class_plot(per_class: dict[str, dict], path: Path) -> Path:
    names = list(per_class)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(names), 3.5))
    for k, metric in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (k - 1) * 0.27, [per_class[n][metric] for n in names], width=0.27, label=metric)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_xlabel("count")
    ax.set_title("Per-class precision, recall, F1")
    ax.legend()
    return save_figure(fig, path)


def reliability_plot(rel: dict, path: Path) -> Path:
    edges = rel["edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    ok = ~np.isnan(rel["accuracy"])
    ax.bar(centers[ok], rel["accuracy"][ok], width=edges[1] - edges[0], alpha=0.7, edgecolor="black", label="accuracy")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {rel['ece']:.3f})")
    ax.legend()
    return save_figure(fig, path)


def reliability_before_after(before: dict, after: dict, temperature: float, path: Path) -> Path:
    """Reliability of the raw probabilities beside the calibrated ones (same photos)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, rel, title in ((axes[0], before, "before (temperature 1)"),
                           (axes[1], after, f"after (temperature {temperature:.2f})")):
        edges = rel["edges"]
        centers = (edges[:-1] + edges[1:]) / 2
        ok = ~np.isnan(rel["accuracy"])
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
        ax.bar(centers[ok], rel["accuracy"][ok], width=edges[1] - edges[0], alpha=0.7, edgecolor="black",
               label="accuracy")
        ax.set_xlabel("confidence")
        ax.set_title(f"{title}: ECE {rel['ece']:.3f}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    return save_figure(fig, path)


def verdict_figures_plot(rows: list[dict], path: Path) -> Path:
    """Flag precision, wrong bins passed and share settled against the inventory's error rate,
    for each rule (``evaluation.verdicts``' figures)."""
    metrics = (("flag_precision", "flag precision"), ("wrong_passed", "wrong records passed as match"),
               ("settled", "bins settled without a person"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, metrics):
        for rule in dict.fromkeys(r["rule"] for r in rows):
            mine = sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["error_rate"])
            xs = [r["error_rate"] for r in mine if r[key] is not None]
            ax.plot(xs, [r[key] for r in mine if r[key] is not None], marker="o", label=rule)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("inventory error rate")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)
