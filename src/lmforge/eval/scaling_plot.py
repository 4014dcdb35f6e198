"""The scaling fit's figure: loss against compute with the fitted frontier, the IsoFLOP curves, and
loss against tokens per model size with the fitted law."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.fileio import atomic_path
from .scaling import compute_optimal, law_loss


def plot_fit(fit: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, runs = fit["approach3"], fit["runs"]
    sizes = sorted({r["params"] for r in runs})
    budgets = sorted({r["planned_flops"] or r["flops"] for r in runs})
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(sizes), len(budgets))))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8))

    for color, n in zip(colors, sizes):
        group = [r for r in runs if r["params"] == n]
        ax1.scatter([r["flops"] for r in group], [r["val_loss"] for r in group], color=color, s=18,
                    label=f"N={n / 1e6:.2g}M")
        ax3.scatter([r["tokens"] for r in group], [r["val_loss"] for r in group], color=color, s=18)
        d = np.geomspace(min(r["tokens"] for r in group) / 2, max(r["tokens"] for r in group) * 2, 50)
        ax3.plot(d, law_loss(p, n, d), color=color, lw=1)
    c = np.geomspace(min(r["flops"] for r in runs) / 2, max(r["flops"] for r in runs) * 4, 60)
    n_opt, d_opt = compute_optimal(p, c)
    ax1.plot(c, law_loss(p, n_opt, d_opt), "k--", lw=1, label="fitted frontier")
    ax1.set(xscale="log", xlabel="training FLOPs C", ylabel="validation loss", title="loss vs compute")
    ax1.legend(fontsize=7)

    minima = {m["flops"]: m for m in fit["approach2"]["minima"]}
    for color, budget in zip(colors, budgets):
        group = sorted((r for r in runs if (r["planned_flops"] or r["flops"]) == budget), key=lambda r: r["params"])
        ax2.plot([r["params"] for r in group], [r["val_loss"] for r in group], "o", color=color, ms=4,
                 label=f"C={budget:.2g}")
        m = minima.get(budget)
        if m:
            x = np.linspace(np.log(group[0]["params"]), np.log(group[-1]["params"]), 50)
            ax2.plot(np.exp(x), np.polyval(m["coef"], x), color=color, lw=1)
            if m.get("n_opt"):
                ax2.axvline(m["n_opt"], color=color, lw=0.6, ls=":")
    ax2.set(xscale="log", xlabel="parameters N", ylabel="validation loss", title="IsoFLOP curves (approach 2)")
    ax2.legend(fontsize=7)
    ax3.set(xscale="log", xlabel="training tokens D", ylabel="validation loss",
            title=f"L = {p['E']:.2f} + {p['A']:.3g}/N^{p['alpha']:.2f} + {p['B']:.3g}/D^{p['beta']:.2f}")
    ax3.title.set_fontsize(9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
