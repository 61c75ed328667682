"""A sweep's three plots (PNG, matplotlib's Agg backend): held-out score vs trainable parameters,
the training loss curves overlaid, and held-out score by rank per targets setting.

Each plot is drawn from the result rows (`report.row`) and each run's metrics.jsonl; every plot is
written even when it has nothing to show (it then says why), so a sweep's folder always has all
three. Filled markers are runs the verdict passed, hollow ones did not; the selected run is ringed.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_path

MARKERS = "osD^vP*Xh<>"
# file names of the three plots, in the order plot_all draws them
PLOTS = ("score_vs_params.png", "loss_curves.png", "score_by_rank.png")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def labels(rows: list[dict], skip: tuple = ()) -> dict[str, str]:
    """Short names per run: the settings that differ between runs (the id when nothing does).

    alpha is left out when it only follows r (the scale alpha/r is the same in every run).
    """
    keys = ("method", "r", "alpha", "targets", "lr", "dropout", "quantize", "num_virtual_tokens", "seed", "steps")
    varying = [k for k in keys if k not in skip and len({str(r[k]) for r in rows}) > 1]
    if "alpha" in varying and len({r["scale"] for r in rows}) == 1:
        varying.remove("alpha")
    text = lambda v: format(v, "g") if isinstance(v, float) else str(v)         # noqa: E731
    return {r["id"]: ", ".join(f"{k}={text(r[k])}" for k in varying if r[k] is not None) or
            ("" if skip else r["id"]) for r in rows}


def _count_axis(ax) -> None:
    """A log axis of parameter counts labelled 230K, 1.2M: matplotlib's 2x10^5 minor labels collide."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}K"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _group(r: dict) -> str:
    return f"{r['method']} {r['targets']}" if r["targets"] else f"{r['method']} ({r['num_virtual_tokens']} tokens)"


def _point(ax, x, r, style, chosen):
    passed = r["verdict"] == "PASS"
    ax.plot([x], [r["heldout_accuracy"]], linestyle="none", marker=style["marker"], markersize=8,
            color=style["color"], markerfacecolor=style["color"] if passed else "none")
    if r["id"] == chosen:
        ax.plot([x], [r["heldout_accuracy"]], linestyle="none", marker="o", markersize=17, markerfacecolor="none",
                markeredgecolor="black", markeredgewidth=1.5)


def _styles(rows: list[dict]) -> dict[str, dict]:
    groups = sorted({_group(r) for r in rows})
    colors = [f"C{i % 10}" for i in range(len(groups))]
    return {g: {"marker": MARKERS[i % len(MARKERS)], "color": colors[i]} for i, g in enumerate(groups)}


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()


def score_vs_params(rows: list[dict], chosen: str | None, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    scored = [r for r in rows if r["heldout_accuracy"] is not None and r["trainable_params"]]
    if not scored:
        _empty(ax, "no run finished training")
    else:
        styles, names = _styles(scored), labels(rows, skip=("method", "targets"))   # the legend has those
        for r in scored:
            style = styles[_group(r)]
            x, acc = r["trainable_params"], r["heldout_accuracy"]
            ax.errorbar([x], [acc], yerr=[[acc - r["heldout_low"]], [r["heldout_high"] - acc]], color=style["color"],
                        alpha=0.4, capsize=3, linestyle="none")
            _point(ax, x, r, style, chosen)
            ax.annotate(names[r["id"]], (x, acc), textcoords="offset points", xytext=(6, 4), fontsize=7)
        for g, style in styles.items():
            ax.plot([], [], linestyle="none", label=g, **style)
        ax.set_xscale("log")
        _count_axis(ax)
        ax.margins(x=0.12)
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("held-out accuracy (95% Wilson interval)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="filled: PASS, hollow: not; ringed: selected", title_fontsize=7)
    return _save(plt, fig, path)


def loss_curves(out: Path, rows: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    names, drawn = labels(rows), 0
    for r in rows:
        metrics = out / "runs" / r["id"] / "metrics.jsonl"
        if not metrics.is_file():
            continue
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if history:
            ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=names[r["id"]],
                    linestyle="-" if r["verdict"] == "PASS" else "--")
            drawn += 1
    if not drawn:
        _empty(ax, "no run has logged a step")
    else:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="dashed: verdict not PASS", title_fontsize=7)
    return _save(plt, fig, path)


def score_by_rank(rows: list[dict], chosen: str | None, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    scored = [r for r in rows if r["r"] is not None and r["heldout_accuracy"] is not None]
    if not scored:
        _empty(ax, "no LoRA or DoRA run finished training: rank does not apply")
    else:
        styles = _styles(scored)
        for g, style in styles.items():
            mine = [r for r in scored if _group(r) == g]
            ranks = sorted({r["r"] for r in mine})
            best = [max(r["heldout_accuracy"] for r in mine if r["r"] == k) for k in ranks]
            ax.plot(ranks, best, color=style["color"], alpha=0.6, label=g)
            for r in mine:
                _point(ax, r["r"], r, style, chosen)
        ranks = sorted({r["r"] for r in scored})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(k) for k in ranks])
        ax.set_xlabel("rank r")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="line: best run at each rank", title_fontsize=7)
    return _save(plt, fig, path)


def plot_all(out: Path, rows: list[dict], chosen: str | None) -> list[Path]:
    a, b, c = (out / name for name in PLOTS)
    return [score_vs_params(rows, chosen, a), loss_curves(out, rows, b), score_by_rank(rows, chosen, c)]
