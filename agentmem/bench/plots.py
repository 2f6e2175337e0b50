"""PNG plots of benchmark reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

# (key in a summary row, axis label, log-scale y)
PANELS = [
    ("kl", "KL(full || compacted), nats/token", True),
    ("cont_dnll", "continuation dNLL, nats/token", False),
    ("copy_dnll", "recall: copy dNLL, nats/token", False),
    ("retrieval", "key -> value exact match", False),
]


def _style(method: str) -> dict:
    if method == "am":
        return {"color": "black", "linewidth": 2.6, "marker": "o", "zorder": 5}
    if method.startswith("am"):
        return {"linewidth": 1.8, "marker": "o", "linestyle": "-"}
    return {"linewidth": 1.3, "marker": "s", "linestyle": "--", "markersize": 4}


def quality_plot(summary: dict[str, dict[float, dict]], path: Path, title: str, panels=PANELS) -> Path:
    """One panel per metric, quality vs kept ratio (log x, largest first), one line per method.

    ``summary[method][ratio]`` is a dict with the panel keys (missing or None values are skipped).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in panels if any(r.get(p[0]) is not None for m in summary.values() for r in m.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, label, logy) in zip(axes[0], panels):
        for method, by_ratio in summary.items():
            pts = sorted((r, row[key]) for r, row in by_ratio.items() if row.get(key) is not None)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, [max(y, 1e-4) if logy else y for y in ys], label=method, **_style(method))
        ax.set_xscale("log")
        ax.invert_xaxis()
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("kept ratio of the KV cache")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
