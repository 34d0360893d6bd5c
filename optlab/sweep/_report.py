"""Sweep results as CSV, Markdown and plots."""

from __future__ import annotations

import csv
import json
import math
import pathlib

import numpy as np


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table, columns in the first row's key order, floats to 4 significant digits.

    Example:
      >>> import optlab.sweep as sweep
      >>> print(sweep.markdown_table([{"lr": 0.1, "acc": 0.912345}, {"lr": 0.01, "acc": None}]))
      | lr | acc |
      |---|---|
      | 0.1 | 0.9123 |
      | 0.01 |  |
    """
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def swept_keys(rows: list[dict]) -> list[str]:
    fixed = {"member", "group", "final_test_accuracy", "best_test_accuracy", "final_test_loss",
             "final_train_loss", "diverged_at_step"}
    return [k for k in rows[0] if k not in fixed]


def write_report(result, out_dir, plots: bool = True) -> pathlib.Path:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = ["# Sweep results", "", markdown_table(rows), ""]
    if result.best:
        md += ["Best member: " + ", ".join(f"`{k}`={_fmt(v)}" for k, v in result.best.items()), ""]
    md += ["Run info: `" + json.dumps(result.info, default=str) + "`", ""]
    (out / "results.md").write_text("\n".join(md))
    (out / "best.json").write_text(json.dumps(result.best, indent=2, default=str))
    np.savez(out / "curves.npz", **result.curves)
    if plots:
        plot_sweep(result, out / "plots")
    return out


def plot_sweep(result, folder) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = result.rows
    paths = []
    for key in swept_keys(rows):
        vals = [r[key] for r in rows]
        numeric = all(isinstance(v, (int, float)) for v in vals)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        ax = axes[0]
        acc = [r["final_test_accuracy"] for r in rows]
        if numeric:
            ax.scatter(vals, acc)
            if min(vals) > 0 and max(vals) / max(min(vals), 1e-300) > 20:
                ax.set_xscale("log")
        else:
            labels = sorted(set(map(str, vals)))
            ax.scatter([labels.index(str(v)) for v in vals], acc)
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set(xlabel=key, ylabel="final test accuracy", title=f"test accuracy vs {key}")
        ax = axes[1]
        cmap = plt.get_cmap("viridis")
        order = sorted(set(map(str, vals)), key=lambda s: float(s) if numeric else s)
        for r, curve in zip(rows, result.curves["test_accuracy"]):
            c = cmap(order.index(str(r[key])) / max(1, len(order) - 1))
            ax.plot(np.arange(1, len(curve) + 1), curve, color=c, alpha=0.8)
        for s in order:
            ax.plot([], [], color=cmap(order.index(s) / max(1, len(order) - 1)), label=f"{key}={s}")
        ax.legend(fontsize=7)
        ax.set(xlabel="epoch", ylabel="test accuracy", title=f"curves coloured by {key}")
        fig.tight_layout()
        p = folder / f"{key.replace('.', '_')}.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths.append(p)
    return paths
