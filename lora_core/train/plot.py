"""Loss curve as an image (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    data = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(data) < 2:
        return data
    window = min(window, len(data))
    kernel = np.ones(window) / window
    head = np.cumsum(data[:window - 1]) / np.arange(1, window)  # shorter windows at the start
    return np.concatenate([head, np.convolve(data, kernel, mode="valid")])


def loss_curve_rgb(losses: Sequence[float], title: str = "training loss", width: int = 768,
                   height: int = 432, chunk_starts: Sequence[int] = (),
                   validation: Sequence[tuple] = ()) -> np.ndarray:
    """(H, W, 3) uint8 image of the per-step loss (light) and its moving average (dark), and the validation loss
    (`validation`: (step, loss) pairs; orange, with markers) on the same axes: a LoRA that starts to overfit shows
    as the validation curve turning up while the training loss still falls."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    dpi = 96
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    steps = np.arange(1, len(losses) + 1)
    if len(losses):
        ax.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="training loss")
        window = max(1, len(losses) // 20)
        ax.plot(steps, moving_average(losses, window), color="#08519c", linewidth=1.8,
                label=f"moving average ({window})")
        for start in chunk_starts:
            ax.axvline(start, color="#bbbbbb", linestyle="--", linewidth=0.8)
    if len(validation):
        vsteps, vloss = zip(*validation)
        ax.plot(vsteps, vloss, color="#e6550d", linewidth=1.6, marker="o", markersize=3.5, label="validation loss")
    if len(losses) or len(validation):
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no steps yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return rgba[..., :3].copy()
