"""Figures of the paper that the benchmarks redraw from measured numbers."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from quantlrm.errors import QuantLRMError


def trend_line(steps: Sequence[float], accuracy: Sequence[float]) -> tuple[float, float]:
    """Least-squares line accuracy ~ slope * step + intercept (numpy.polyfit, degree 1)."""
    if len(steps) != len(accuracy):
        raise QuantLRMError(
            f"{len(steps)} steps but {len(accuracy)} accuracies.",
            "pass one accuracy per snapshot step.",
        )
    if len(set(steps)) < 2:
        raise QuantLRMError(
            "a trend line needs at least two distinct snapshot steps.", "measure more snapshots."
        )
    slope, intercept = np.polyfit(np.asarray(steps, float), np.asarray(accuracy, float), 1)
    return float(slope), float(intercept)


def plot_snapshot_curve(
    steps: Sequence[float],
    accuracy: Sequence[float],
    baselines: Mapping[str, float],
    out: str | os.PathLike,
    title: str = "W3 QuantLRM with pseudo-fine-tuning signals",
    ylabel: str = "Average accuracy (%)",
) -> dict:
    """Figure 3 of the paper: QuantLRM accuracy against the snapshot step it took its
    signals from, baselines that need no fine-tuning (e.g. {"AWQ": 41.2, "GPTQ": 38.0}, or
    RTN where GPTQ is absent) as horizontal lines, and the least-squares trend line.

    Writes a PNG (matplotlib Agg, no display needed); returns the trend's slope/intercept.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slope, intercept = trend_line(steps, accuracy)
    xs = np.asarray(steps, float)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    try:
        ax.plot(xs, accuracy, "o-", color="tab:blue", label="QuantLRM (pseudo-fine-tuning)")
        grid = np.linspace(xs.min(), xs.max(), 50)
        ax.plot(
            grid,
            slope * grid + intercept,
            "--",
            color="tab:blue",
            alpha=0.6,
            label="least-squares trend",
        )
        styles = ["tab:red", "tab:green", "tab:orange", "tab:purple", "tab:gray"]
        for (name, value), color in zip(baselines.items(), styles * 4, strict=False):
            ax.axhline(value, color=color, linestyle=":", label=name)
        ax.set_xlabel("fine-tuning step of the signals")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return {"slope": slope, "intercept": intercept, "path": str(out)}
