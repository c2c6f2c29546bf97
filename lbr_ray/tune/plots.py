"""PNG plots of a sweep (matplotlib, Agg; no Ray): metric vs R (or k), metric vs temperature, R x temperature heat
map, learning curves. Each row is one trial: {"R" | "k": .., "temperature": .., "status": .., metric: .., ...}."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

LABEL = {"dev_recall@10": "dev R@10", "dev_ndcg@10": "dev NDCG@10"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_vs(rows: list[dict], x: str, group: str | None, metric: str, path: Path) -> Path:
    """One line per value of `group` (e.g. one per temperature), the final dev metric against `x`.
    Hollow markers: trials that ASHA stopped early (their last reported value)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    lines = defaultdict(list)
    for r in rows:
        if r.get(x) is not None and r.get(metric) is not None:
            lines[r.get(group) if group else None].append(r)
    for g, members in sorted(lines.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        members.sort(key=lambda r: r[x])
        xs, ys = [r[x] for r in members], [r[metric] for r in members]
        line, = ax.plot(xs, ys, "-", label=f"{group}={g:g}" if group and g is not None else None)
        done = [r["status"] == "completed" for r in members]
        ax.scatter([a for a, d in zip(xs, done) if d], [b for b, d in zip(ys, done) if d], color=line.get_color())
        ax.scatter([a for a, d in zip(xs, done) if not d], [b for b, d in zip(ys, done) if not d],
                   facecolors="none", edgecolors=line.get_color())
    ticks = sorted({r[x] for rs in lines.values() for r in rs})
    if len(ticks) > 1 and x in ("R", "temperature", "lr"):
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.set_xlabel(x)
    ax.set_ylabel(LABEL.get(metric, metric))
    ax.set_title(f"{LABEL.get(metric, metric)} vs {x} (hollow: stopped early)", fontsize=10)
    if group and len(lines) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(rows: list[dict], x: str, y: str, metric: str, path: Path) -> Path:
    """Mean final metric per (x, y) cell, annotated; '*' marks cells with a trial stopped early."""
    plt = _plt()
    xs = sorted({r[x] for r in rows if r.get(x) is not None})
    ys = sorted({r[y] for r in rows if r.get(y) is not None})
    grid = np.full((len(ys), len(xs)), np.nan)
    stopped = np.zeros_like(grid, dtype=bool)
    cells = defaultdict(list)
    for r in rows:
        if r.get(x) is not None and r.get(y) is not None and r.get(metric) is not None:
            cells[(ys.index(r[y]), xs.index(r[x]))].append(r)
    for (i, j), members in cells.items():
        grid[i, j] = np.mean([r[metric] for r in members])
        stopped[i, j] = any(r["status"] != "completed" for r in members)
    fig, ax = plt.subplots(figsize=(1.6 * len(xs) + 2, 1.0 * len(ys) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not np.isnan(grid[i, j]):
                val = grid[i, j]
                text = f"{val:.3f}{'*' if stopped[i, j] else ''}"
                ax.text(j, i, text, ha="center", va="center",
                        color="white" if val < np.nanmean(grid) else "black", fontsize=9)
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{LABEL.get(metric, metric)} (* = stopped early by ASHA)", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves(rows: list[dict], curves: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> Path:
    """Dev metric against GR-CL step for every trial; dashed = stopped early."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        points = curves.get(r["trial"]) or []
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, "-" if r["status"] == "completed" else "--", marker=".", label=r["label"])
    ax.set_xlabel("GR-CL step")
    ax.set_ylabel(LABEL.get(metric, metric))
    ax.set_title(f"Learning curves ({LABEL.get(metric, metric)}; dashed: stopped early)", fontsize=10)
    ax.legend(fontsize=7, ncol=2 if len(rows) > 6 else 1, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(rows: list[dict], curves: dict, metric: str, out: Path) -> list[Path]:
    """The sweep's plots: every axis that the sweep searched (R or k, temperature), plus the learning curves."""
    size_key = "R" if any(r.get("R") is not None for r in rows) else "k"
    has = {key: len({r.get(key) for r in rows} - {None}) > 1 for key in (size_key, "temperature")}
    paths = [metric_vs(rows, size_key, "temperature", metric, out / f"metric_vs_{size_key}.png"),
             metric_vs(rows, "temperature", size_key, metric, out / "metric_vs_temperature.png")]
    if has[size_key] or has["temperature"]:
        paths.append(heatmap(rows, size_key, "temperature", metric, out / f"heatmap_{size_key}_temperature.png"))
    paths.append(learning_curves(rows, curves, metric, out / "learning_curves.png"))
    return paths


__all__ = ["write_plots", "metric_vs", "heatmap", "learning_curves"]
