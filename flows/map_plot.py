"""A picture of a MAP front: 2-task panels of the real samples, the surrogate front, and picked points."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np


def panels(tasks: list[str], limit: int = 6) -> list[tuple[str, str]]:
    """Every pair for up to four tasks; beyond, consecutive pairs (then wrapping), at most `limit` panels."""
    if len(tasks) <= 4:
        return list(combinations(tasks, 2))[:limit]
    pairs = [(tasks[i], tasks[(i + 1) % len(tasks)]) for i in range(0, len(tasks), 2)]
    return pairs[:limit]


def plot_front(path: Path, tasks: list[str], samples: list[dict[str, float]], points: list[dict],
               picked: list[dict] = (), title: str = "") -> Path:
    """samples: {task: accuracy} measured; points: front points with `predicted`; picked: {predicted, measured}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = panels(tasks)
    cols = min(3, len(pairs))
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (a, b) in zip(axes.flat, pairs):
        ax.scatter([100 * s[a] for s in samples], [100 * s[b] for s in samples], s=12, c="0.7",
                   label="evaluated samples")
        pa = np.array([100 * p["predicted"][a] for p in points])
        pb = np.array([100 * p["predicted"][b] for p in points])
        order = np.argsort(pa)
        ax.plot(pa[order], pb[order], ".", c="tab:blue", ms=5, label="surrogate front")
        for p in picked:
            ax.plot(100 * p["predicted"][a], 100 * p["predicted"][b], "o", mfc="none", mec="tab:red", ms=9,
                    label="picked (predicted)")
            ax.plot(100 * p["measured"][a], 100 * p["measured"][b], "*", c="tab:red", ms=11, label="picked (measured)")
        ax.set_xlabel(f"{a} accuracy (%)")
        ax.set_ylabel(f"{b} accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
