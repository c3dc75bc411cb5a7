"""The comparison's charts (matplotlib, Agg backend, PNG): written next to report.md.

- ``eval_loss.png``: eval loss against step, every method in one chart;
- ``metric_vs_params.png``: the task metric (or the final eval loss) against trainable parameters, log x;
- ``memory.png`` and ``speed.png``: peak training memory and training tokens/s as horizontal bars.

Failed methods have no figures and are left out of every chart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window; before pyplot is imported

import matplotlib.pyplot as plt
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from deltatune.compare.report import METRIC_NAMES, memory_key

DPI = 120


def _colors(n: int) -> list[Any]:
    """Return ``n`` distinct colours (tab10, then tab20 for more methods)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=13)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, alpha=0.3)


def plot_eval_loss(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw eval loss against step for every method with a curve; return the file, or None without curves."""
    curves = [(r["method"], r["eval_curve"]) for r in records if r.get("eval_curve")]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for (name, curve), color in zip(curves, _colors(len(curves)), strict=True):
        steps, losses = zip(*curve, strict=True)
        ax.plot(steps, losses, marker="o", markersize=4, linewidth=2, label=name, color=color)
    _style(ax, "Eval loss during training", "optimizer step", "eval loss")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.legend(loc="upper right", fontsize=9, ncol=2 if len(curves) > 6 else 1)
    return _save(fig, path)


def plot_metric_vs_params(records: list[dict[str, Any]], metric: str | None, path: Path) -> Path | None:
    """Scatter the task metric (or the final eval loss when there is none) against trainable parameters on a
    log axis, each point labelled with its method; return the file, or None when no method has the figure."""
    key, label = ("metric_value", METRIC_NAMES[metric] + " (%)") if metric else ("eval_loss", "final eval loss")
    points = [(r["method"], r["trainable_params"], r[key]) for r in records
              if r.get(key) is not None and r.get("trainable_params")]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    scale = 100 if metric else 1
    for (name, params, value), color in zip(points, _colors(len(points)), strict=True):
        ax.scatter(params, value * scale, s=70, color=color, zorder=3)
        ax.annotate(name, (params, value * scale), textcoords="offset points", xytext=(6, 6), fontsize=10)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))  # 400, 4k, 2M
    counts = [p for _, p, _ in points]
    few_decades = max(counts) / min(counts) < 100  # label the minor ticks too, else they stay unlabelled
    ax.xaxis.set_minor_formatter(ticker.EngFormatter(sep="") if few_decades else ticker.NullFormatter())
    ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
    if metric:
        ax.set_ylim(-3, 103)
    better = "higher is better" if metric else "lower is better"
    _style(ax, f"{label.split(' (')[0].capitalize()} against trainable parameters ({better})",
           "trainable parameters (log scale)", label)
    return _save(fig, path)


def plot_bars(records: list[dict[str, Any]], key: str, title: str, xlabel: str, path: Path) -> Path | None:
    """Draw one horizontal bar per method for ``key`` with its value written beside the bar; return the file,
    or None when no method has the figure."""
    rows = [(r["method"], r[key]) for r in records if r.get(key) is not None]
    if not rows:
        return None
    names, values = zip(*rows, strict=True)
    fig, ax = plt.subplots(figsize=(9, max(2.6, 0.9 + 0.45 * len(rows))))
    bars = ax.barh(names, values, color=_colors(len(rows)))
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=4, fontsize=9)
    ax.invert_yaxis()  # the first method at the top, as in the table
    ax.set_xlim(0, max(values) * 1.18 or 1)
    _style(ax, title, xlabel, "")
    ax.grid(True, axis="x", alpha=0.3)
    ax.grid(False, axis="y")
    return _save(fig, path)


def write_plots(records: list[dict[str, Any]], metric: str | None, out: Path) -> list[Path]:
    """Write every chart the finished records allow into ``out``; return the files written."""
    finished = [r for r in records if r.get("status") == "finished"]
    mem, _ = memory_key(finished)
    made = [
        plot_eval_loss(finished, out / "eval_loss.png"),
        plot_metric_vs_params(finished, metric, out / "metric_vs_params.png"),
        plot_bars(finished, mem, "Peak training memory (lower is better)",
                  "MB, " + ("GPU memory allocated" if mem == "peak_cuda_mb" else "resident set size"),
                  out / "memory.png"),
        plot_bars(finished, "tokens_per_s", "Training speed (higher is better)", "tokens per second",
                  out / "speed.png"),
    ]
    return [p for p in made if p is not None]
