"""What an evaluation shows: the progress bar (sentences/s, running cIoU), the score table, ``report.png``."""
from __future__ import annotations

import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from grounding.progress import progress_bar
from grounding.result import atomic_write_bytes


@contextmanager
def ProgressBar(total: int, completed: int, enabled: bool) -> Iterator[Callable[[float, float | None], None]]:
    """A progress bar on stderr showing sentences/s and the running cIoU (or nothing); yields ``advance(rate, ciou)``.

    (A function named like the class it replaced, so that eval/harness.py's ``with ProgressBar(...)`` stays.)"""
    with progress_bar(total, "eval", enabled=enabled, completed=completed,
                      fields={"rate": "{} sent/s", "ciou": "cIoU {}"}) as step:
        yield lambda rate, ciou: step(rate=f"{rate:.2f}", ciou="-" if ciou is None else f"{100 * ciou:.1f}")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def print_table(metrics: dict, console=None) -> None:
    """The scores as a rich table (percentages) on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metrics['dataset']} {metrics['split']}: task {metrics['task']}, mode {metrics['mode']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("cIoU", "gIoU", "acc@0.5"):
        table.add_row(key + (" %" if metrics.get(key) is not None else ""), _pct(metrics.get(key)))
    table.add_row("sentences", str(metrics["n_sentences"]))
    table.add_row("images", str(metrics["n_images"]))
    if metrics.get("res_mode"):
        table.add_row("RES mode", metrics["res_mode"] + (f" ({metrics['teacher_answer']})" if metrics.get("teacher_answer") else ""))
    if metrics.get("rec_mode"):
        table.add_row("REC mode", f"{metrics['rec_mode']} ({metrics['rec_question']})")
        table.add_row("REC box", "the predicted mask's box" if metrics.get("rec_box") == "mask" else "the answer's text box")
    table.add_row("model", str(metrics["model"]))
    rate = metrics.get("sentences_per_s")
    table.add_row("wall time", f"{metrics['wall_time_s']:.1f} s" + (f", {rate:.2f} sentences/s" if rate else ""))
    (console or Console()).print(table)


def write_report(path: str | os.PathLike, metrics: dict, lines: Iterable[dict]) -> Path:
    """``report.png``: score bars, and histograms of per-sentence mask IoU and box IoU."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = list(lines)
    mask_ious = [line["mask_iou"] for line in lines if line.get("mask_iou") is not None]
    box_ious = [line["box_iou"] for line in lines if line.get("box_iou") is not None
                and (line.get("rec_hit") is not None or line.get("box") is not None)]
    fig = Figure(figsize=(13, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_scores, ax_mask, ax_box = fig.subplots(1, 3)
    names = ["cIoU", "gIoU", "acc@0.5"]
    values = [metrics.get(k) for k in names]
    bars = ax_scores.bar(names, [0.0 if v is None else 100 * v for v in values], color=["#4c72b0", "#55a868", "#c44e52"])
    for bar, v in zip(bars, values):
        ax_scores.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, _pct(v), ha="center", va="bottom")
    ax_scores.set_ylim(0, 110)
    ax_scores.set_ylabel("%")
    ax_scores.set_title(f"{metrics['n_sentences']} sentences, {metrics['n_images']} images")
    for ax, values_, what in ((ax_mask, mask_ious, "mask IoU"), (ax_box, box_ious, "box IoU")):
        if values_:
            ax.hist(values_, bins=20, range=(0.0, 1.0), color="#8172b2")
            ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        else:
            ax.text(0.5, 0.5, "not scored", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"per-sentence {what}")
        ax.set_ylabel("sentences")
        ax.set_title(what)
    mode = metrics["mode"] + (f" (REC {metrics['rec_mode']})" if metrics.get("rec_mode") and metrics["mode"] != metrics["rec_mode"] else "")
    fig.suptitle(f"{metrics['model']}  |  {metrics['dataset']} {metrics['split']}  |  task {metrics['task']}, {mode}",
                 fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())
