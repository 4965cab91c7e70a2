"""The plots of ``cliptune-compare``: Recall@K bars, training loss and validation mean_R curves.

Each function draws the given runs into one PNG and returns its path, or None when no run has
the data. Figures are built without pyplot, so nothing touches a global backend.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from cliptune.eval.compare_load import RunData

__all__ = ["plot_recall", "plot_train_loss", "plot_val_mean_r", "val_mean_r_curves"]


def _figure(w: float, h: float):
    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _colors(n: int) -> list:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_recall(runs: Sequence[RunData], path: Path) -> Path | None:
    """Grouped bars: R@k per run (after), t2i and i2t side by side, one row per set; a black
    tick marks the value before fine-tuning when present."""
    sets = list(dict.fromkeys(s for r in runs for s in r.after))
    panels = []
    for s in sets:
        for d in ("t2i", "i2t"):
            ks = sorted({int(m.split("@")[1]) for r in runs for m in r.after.get(s, {}) if m.startswith(f"{d}_R@")})
            if ks:
                panels.append((s, d, ks))
    if not panels:
        return None
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(5.2 * ncols, 3.4 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = _colors(len(runs))
    width = 0.8 / len(runs)
    any_before = False
    for ax, (s, d, ks) in zip(axes.flat, panels):
        x = np.arange(len(ks))
        for i, r in enumerate(runs):
            vals = [r.after.get(s, {}).get(f"{d}_R@{k}", np.nan) for k in ks]
            pos = x - 0.4 + width * (i + 0.5)
            bars = ax.bar(pos, vals, width * 0.92, color=colors[i], label=r.name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
            before = [r.before.get(s, {}).get(f"{d}_R@{k}", np.nan) for k in ks]
            if not all(np.isnan(before)):
                any_before = True
                ax.scatter(pos, before, marker="_", s=(width * 260) ** 2 / 4, color="black", linewidths=2, zorder=3)
        ax.set_xticks(x, [f"R@{k}" for k in ks])
        ax.set_ylim(0, 1.08)
        ax.set_title(f"{s}: {'text→image' if d == 't2i' else 'image→text'}")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if any_before:
        handles.append(Line2D([], [], color="black", marker="_", linestyle="none", markersize=14, markeredgewidth=2))
        labels.append("before fine-tuning")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8)
    fig.suptitle("Recall@K after fine-tuning")
    fig.savefig(path)
    return path


def _ema(y: np.ndarray, weight: float) -> np.ndarray:
    # TensorBoard-style debiased exponential moving average.
    out = np.empty_like(y, dtype=float)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(y):
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out


def _series(df: pd.DataFrame | None, col: str) -> tuple[np.ndarray, np.ndarray] | None:
    if df is None or col not in df.columns or "step" not in df.columns:
        return None
    d = df[["step", col]].dropna()
    if d.empty:
        return None
    d = d.groupby("step", as_index=False)[col].last()  # a step logged twice keeps its last value
    return d["step"].to_numpy(), d[col].to_numpy(dtype=float)


def _val_series(df: pd.DataFrame | None, col: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A validation curve with one point per evaluation of the same weights.

    Lightning logs a validation during fit at the index of the batch it follows (step 29 after the
    30th), and an evaluation after fit at the step count (30). cliptune-train now reuses fit's last
    validation when it ran at the last step, but runs written before logged both rows for the same
    weights: two final points at most one step apart with the same value are that one evaluation,
    drawn once, at the later step.
    """
    xy = _series(df, col)
    if xy is None:
        return None
    x, y = xy
    if len(x) >= 2 and x[-1] - x[-2] <= 1 and np.isclose(y[-1], y[-2], rtol=0, atol=1e-9):
        x, y = np.delete(x, -2), np.delete(y, -2)
    return x, y


def _loss_column(df: pd.DataFrame | None) -> str | None:
    if df is None:
        return None
    for c in ("train/loss", "train/loss_step"):
        if c in df.columns:
            return c
    return None


def plot_train_loss(runs: Sequence[RunData], path: Path, smooth: float = 0.9) -> Path | None:
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    drawn = False
    for r, c in zip(runs, _colors(len(runs))):
        col = _loss_column(r.curves)
        xy = _series(r.curves, col) if col else None
        if xy is None:
            continue
        x, y = xy
        ax.plot(x, y, color=c, alpha=0.25, linewidth=0.8)
        ax.plot(x, _ema(y, smooth) if len(y) > 1 else y, color=c, linewidth=1.8, label=r.name)
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss")
    ax.set_title(f"Training loss (faint: raw; solid: EMA {smooth})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def val_mean_r_curves(run: RunData) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{set: (steps, mean_R)}`` from the run's ``csv/metrics.csv``: one point per evaluation."""
    out = {}
    pat = re.compile(r"^val/(.+)/mean_R$")
    for col in (run.curves.columns if run.curves is not None else []):
        m = pat.match(col)
        xy = _val_series(run.curves, col) if m else None
        if m and xy is not None:
            out[m.group(1)] = xy
    return out


def plot_val_mean_r(runs: Sequence[RunData], path: Path) -> Path | None:
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    styles = ["-", "--", ":", "-."]
    drawn = False
    for r, c in zip(runs, _colors(len(runs))):
        curves = val_mean_r_curves(r)
        for j, (name, xy) in enumerate(curves.items()):
            label = r.name if len(curves) == 1 else f"{r.name} ({name})"
            ax.plot(*xy, color=c, linestyle=styles[j % len(styles)], marker="o", markersize=3, label=label)
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("mean Recall@K (both directions)")
    ax.set_title("Validation mean_R")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path
