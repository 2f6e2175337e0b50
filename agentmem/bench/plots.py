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
    if method.startswith("kvpress"):
        return {"linewidth": 1.0, "marker": "x", "linestyle": ":", "markersize": 4}
    if method == "am":
        return {"color": "black", "linewidth": 2.6, "marker": "o", "zorder": 5}
    if method.startswith("am"):
        return {"linewidth": 1.8, "marker": "o", "linestyle": "-"}
    return {"linewidth": 1.3, "marker": "s", "linestyle": "--", "markersize": 4}


def quality_plot(
    summary: dict[str, dict[float, dict]], path: Path, title: str, panels=PANELS, labels: dict | None = None
) -> Path:
    """One panel per metric (2 per row), quality vs kept ratio (log x, largest first), one line per
    method. ``summary[method][ratio]`` is a dict with the panel keys (missing / None skipped);
    ``labels`` overrides panel titles by key.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = [p for p in panels if any(r.get(p[0]) is not None for m in summary.values() for r in m.values())]
    ratios = sorted({r for by in summary.values() for r in by})
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (key, label, logy) in zip(axes.flat, panels):
        label = (labels or {}).get(key, label)
        for method, by_ratio in summary.items():
            pts = sorted((r, row[key]) for r, row in by_ratio.items() if row.get(key) is not None)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, [max(y, 1e-4) if logy else y for y in ys], label=method, **_style(method))
        ax.set_xscale("log")
        ax.set_xticks(ratios)
        ax.set_xticklabels([f"{r:g}" for r in ratios])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_xaxis()
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("kept ratio of the KV cache")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
