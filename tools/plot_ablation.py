"""Plot an ablation study (``results.json`` of tools/ablate.py): each metric against λ.

``python tools/plot_ablation.py OUT/results.json [PNG]`` (default ``OUT/results.png``). One panel per metric:
the joint arms as mean ± std over seeds against λ (log axis); the single-task baseline of the metric's task
and the learned-weights arm as horizontal reference lines with their ±std band.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

TITLES = {"BERTScore-F1": "BERTScore F1", "AP": "box AP", "AP50": "box AP50"}
SCALE = 100.0  # as in RESULTS.md
STYLE = {
    "joint": {"color": "tab:blue", "label": "joint, fixed λ"},
    "caption_only": {"color": "tab:gray", "label": "caption only", "linestyle": "-"},
    "detection_only": {"color": "tab:green", "label": "detection only", "linestyle": "-"},
    "uncertainty": {"color": "tab:orange", "label": "learned weights", "linestyle": "--"},
}


def _stat(arm: dict[str, Any], metric: str) -> tuple[float, float]:
    s = arm["summary"].get(metric)
    if not s or s["n"] == 0:
        return math.nan, math.nan
    std = s["std"] if math.isfinite(s["std"]) else 0.0
    return s["mean"] * SCALE, std * SCALE


def draw_panel(ax: Axes, arms: list[dict[str, Any]], metric: str, baseline: str) -> None:
    """One metric: the λ sweep as error bars, ``baseline`` and learned weights as lines with a ±std band."""
    joint = [a for a in arms if a["kind"] == "joint" and math.isfinite(_stat(a, metric)[0])]
    if joint:
        lams = [a["lambda"] for a in joint]
        means, stds = zip(*(_stat(a, metric) for a in joint), strict=True)
        ax.errorbar(lams, means, yerr=stds, marker="o", capsize=3, **STYLE["joint"])
    for arm in arms:
        if arm["kind"] not in (baseline, "uncertainty"):
            continue
        mean, std = _stat(arm, metric)
        if not math.isfinite(mean):
            continue
        style = STYLE[arm["kind"]]
        ax.axhline(mean, color=style["color"], linestyle=style["linestyle"], label=style["label"])
        ax.axhspan(mean - std, mean + std, color=style["color"], alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    if joint:
        ax.set_xticks(lams, [f"{lam:g}" for lam in lams])
        ax.minorticks_off()
    ax.set_xlabel("λ (caption loss weight)")
    ax.set_title(TITLES.get(metric, metric) + " ×100")
    ax.grid(alpha=0.3)


def draw_figure(results: dict[str, Any]) -> Figure:
    """Caption metrics first, then box metrics, four panels a row, and the legend."""
    panels = [(m, "caption_only") for m in results["caption_metrics"]]
    panels += [(m, "detection_only") for m in results["detection_metrics"]]
    rows = math.ceil((len(panels) + 1) / 4)  # + 1: a panel for the legend
    fig = Figure(figsize=(16, 3.75 * rows), layout="constrained")
    axes = fig.subplots(rows, 4, squeeze=False)
    for ax, (metric, baseline) in zip(axes.flat, panels, strict=False):
        draw_panel(ax, results["arms"], metric, baseline)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    legend_ax = axes.flat[len(panels)]
    handles = {}
    for ax in axes.flat[: len(panels)]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    order = [STYLE[k]["label"] for k in STYLE if STYLE[k]["label"] in handles]
    if order:
        legend_ax.legend([handles[k] for k in order], order, loc="center", frameon=False, fontsize="large")
    fig.suptitle(
        f"Ablation on {Path(results['data']).name} ({results['max_steps']} steps, seeds {results['seeds']}; "
        "mean ± std over seeds)"
    )
    return fig


def save_plot(results: dict[str, Any], path: str | Path) -> None:
    draw_figure(results).savefig(path, dpi=100)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(argv[0])
    dst = Path(argv[1]) if len(argv) == 2 else src.with_suffix(".png")
    save_plot(json.loads(src.read_text()), dst)
    print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
