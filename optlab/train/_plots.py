"""Plots of a run folder: loss, accuracy and learning rate against epochs and steps."""

from __future__ import annotations

import csv
import json
import pathlib


def _read_csv(path: pathlib.Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _read_steps(path: pathlib.Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "step":
                out.append(rec)
    return out


def plot_run(run_dir: str | pathlib.Path) -> pathlib.Path:
    """Write ``plots/training.png`` (loss, accuracy, learning rate) for a run folder; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "metrics.csv").is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.csv: is it an optlab run folder?")
    epochs = _read_csv(run_dir / "metrics.csv")
    steps = _read_steps(run_dir / "log.jsonl")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    e = [r["epoch"] for r in epochs]
    ax = axes[0]
    if steps:
        spe = max(1, max(r["step"] for r in steps) / max(e))
        ax.plot([r["step"] / spe for r in steps], [r["loss"] for r in steps], alpha=0.35, label="train (steps)")
    ax.plot(e, [r["train_loss"] for r in epochs], "o-", label="train (epoch mean)")
    ax.plot(e, [r["test_loss"] for r in epochs], "s-", label="test")
    ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    ax.legend()
    ax = axes[1]
    ax.plot(e, [r["train_accuracy"] for r in epochs], "o-", label="train")
    ax.plot(e, [r["test_accuracy"] for r in epochs], "s-", label="test")
    ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax.legend()
    ax = axes[2]
    if steps:
        ax.plot([r["step"] for r in steps], [r["learning_rate"] for r in steps])
        ax.set(xlabel="step")
    else:
        ax.plot(e, [r["learning_rate"] for r in epochs], "o-")
        ax.set(xlabel="epoch")
    ax.set(ylabel="learning rate", title="learning rate")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    path = out / "training.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
