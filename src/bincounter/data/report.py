"""The data report people look at after preprocessing: class histogram per split, image sizes,
quarantine reasons and sample photos per count (HTML and PNG)."""

from __future__ import annotations

import io
from collections import Counter
from concurrent.futures import Executor
from pathlib import Path

from PIL import Image

from bincounter.config import PreprocessConfig
from bincounter.reporting import html_page, markdown_table, plt, save_figure
from bincounter.data.split import SPLITS


def _class_histogram(per_split: dict[str, Counter], names: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0] * len(names)
    for split in SPLITS:
        heights = [per_split[split].get(i, 0) for i in range(len(names))]
        ax.bar(names, heights, bottom=bottom, label=split)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("items in bin (class)")
    ax.set_ylabel("photos")
    ax.set_title("Class histogram by split")
    ax.legend()
    return save_figure(fig, path)


def _image_sizes(sizes: Counter, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys, ns = zip(*[(w, h, n) for (w, h), n in sizes.items()]) if sizes else ((), (), ())
    ax.scatter(xs, ys, s=[10 + 90 * n / max(ns, default=1) for n in ns], alpha=0.6)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"Original image sizes ({len(sizes)} distinct)")
    return save_figure(fig, path)


def _quarantine_reasons(reasons: Counter, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.4 * len(reasons)))  # room for the title and axis
    if reasons:
        names, counts = zip(*reasons.most_common())
        ax.barh(names, counts, color="tab:red")
    ax.set_xlabel("photos")
    ax.set_title("Quarantine and warnings by reason")
    return save_figure(fig, path)


def _sample_grid(by_label: dict[int, list[bytes]], names: list[str], per_class: int, path: Path,
                 tile: int = 96) -> Path:
    """One row of example photos per class, drawn with PIL: a matplotlib grid of that many
    axes took longer than resizing a thousand photos."""
    from PIL import ImageDraw

    label_w, pad = 64, 4
    cols = max(per_class, 1)
    sheet = Image.new("RGB", (label_w + cols * (tile + pad), len(names) * (tile + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for row, label in enumerate(by_label):
        y = pad + row * (tile + pad)
        draw.text((6, y + tile // 2 - 6), f"count {names[label]}", fill="black")
        for col, jpg in enumerate(by_label[label]):
            with Image.open(io.BytesIO(jpg)) as img:
                img.draft("RGB", (tile, tile))
                sheet.paste(img.convert("RGB").resize((tile, tile)), (label_w + col * (tile + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def write_data_report(out_dir: Path, index: list[dict], quarantine: list[dict],
                      samples: dict[str, list], cfg: PreprocessConfig, executor: Executor | None = None) -> Path:
    """Write ``report/`` (PNGs, report.md, report.html) into a preprocessed folder.

    ``samples`` holds (sample, jpeg) example pairs per split. With an ``executor`` the plots
    are drawn in parallel (each is a second of matplotlib on a slow core, at the end of a job
    whose workers are otherwise idle by then).
    """
    report = out_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    names = cfg.class_names()
    per_split = {s: Counter(r["label"] for r in index if r["split"] == s) for s in SPLITS}
    reasons = Counter(q["reason"] + (" (kept)" if q.get("kept") else "") for q in quarantine)
    jobs: list[tuple] = [
        (_class_histogram, per_split, names, report / "class_histogram.png"),
        (_image_sizes, Counter((r["width"], r["height"]) for r in index), report / "image_sizes.png"),
        (_quarantine_reasons, reasons, report / "quarantine_reasons.png"),
    ]
    if cfg.samples_per_class_in_report:
        by_label: dict[int, list[bytes]] = {i: [] for i in range(len(names))}
        for split in SPLITS:
            for sample, jpg in samples[split]:
                if len(by_label[sample.label]) < cfg.samples_per_class_in_report:
                    by_label[sample.label].append(jpg)
        jobs.append((_sample_grid, by_label, names, cfg.samples_per_class_in_report, report / "samples_per_count.png"))
    if executor is None:
        pngs = [fn(*args) for fn, *args in jobs]
    else:
        pngs = [f.result() for f in [executor.submit(fn, *args) for fn, *args in jobs]]
    rows = [[n] + [per_split[s].get(i, 0) for s in SPLITS] for i, n in enumerate(names)]
    lines = [
        f"{len(index)} photos kept, {sum(1 for q in quarantine if not q.get('kept'))} quarantined; "
        f"images resized to {cfg.image_size}x{cfg.image_size}.",
        "",
        *markdown_table(["class", *SPLITS], rows),
        "",
        *markdown_table(["reason", "photos"], [[r, n] for r, n in reasons.most_common()]),
    ]
    md = ["# Data report", ""] + lines + [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    (report / "report.md").write_text("\n".join(md) + "\n")
    (report / "report.html").write_text(html_page("Data report", lines, pngs))
    return report
