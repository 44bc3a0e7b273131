"""What every report shares: figures saved as PNG (matplotlib without a display), a
self-contained HTML page KFP's UI can show, and markdown tables."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in containers
logging.getLogger("matplotlib.category").setLevel(logging.WARNING)  # chatty about string tick labels
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "save_figure", "html_page", "markdown_table"]


def save_figure(fig, path: Path) -> Path:
    """Save a figure as PNG and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def html_page(title: str, markdown_like: list[str], images: list[Path]) -> str:
    """A self-contained HTML page (images inlined) that KFP's UI can render as an artifact."""
    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>", f"<h1>{title}</h1>"]
    # Escaped: lines may quote input (a refused photo's decoder error, a file name).
    parts += [f"<pre>{html.escape(line)}</pre>" if line.startswith("|") else f"<p>{html.escape(line)}</p>"
              for line in markdown_like if line]
    for img in images:
        data = base64.b64encode(img.read_bytes()).decode()
        parts.append(f"<h3>{img.stem}</h3><img src='data:image/png;base64,{data}' style='max-width:100%'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def markdown_table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines
