"""The lectures' weight-initialisation table, reproduced as one optlab sweep.

Seven kernel initialisations (``optlab.models.INIT_NAMES``) of the MNIST
ConvNet of ``configs/mnist_convnet.py`` (SGD, learning rate 0.05, batch 128,
10 epochs, pixels scaled to [0, 1], seed 0 for every member, so that the
members differ only in their initial weights), trained together by
``optlab.sweep.run``. The lectures report test accuracies of 97.3-97.8% for all
of them after 10 epochs.

    python experiments/weight_init.py                       # the full table, about a minute on 2 cores
    python experiments/weight_init.py --epochs 1 --out runs/wi1
    python experiments/weight_init.py --quick               # smoke run: 2 members, 512 images, 1 epoch

MNIST is read from ``$OPTLAB_DATA/mnist`` (default: ``../shared/data`` beside
the project when it exists, else optlab's usual search and download). Writes ``<out>/weight_init.md`` (the table below, with the run's wall time,
strategy and machine) next to the sweep's own ``results.csv``/``results.md``,
``curves.npz`` and plots, and prints the table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mnist_convnet.py"
LECTURE_RANGE = (0.973, 0.978)  # test accuracy after 10 epochs, every initialisation


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the config's 10)")
    p.add_argument("--inits", default=None, help="comma-separated subset of the initialisations (default: all 7)")
    p.add_argument("--strategy", default="auto", help="sweep strategy: auto, vmap, map, chunked")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N images only")
    p.add_argument("--out", default=None, help="output folder (default: runs/weight_init)")
    p.add_argument("--no-plots", action="store_true", help="skip the sweep's plots")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 initialisations, 512 images, 1 epoch")
    return p.parse_args(argv)


def table_markdown(rows: list[dict], descriptions: dict[str, str], epochs: int) -> str:
    lines = [
        f"| init | kernel distribution | test accuracy after {epochs} epoch{'s' if epochs != 1 else ''} | test loss | train loss (last epoch) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        acc = r["final_test_accuracy"]
        lines.append(
            f"| `{r['model.init']}` | {descriptions[r['model.init']]} | {100 * acc:.2f}% | "
            f"{r['final_test_loss']:.4f} | {r['final_train_loss']:.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Run the sweep; returns ``{"rows", "seconds", "strategy", "markdown", "out_dir", "in_lecture_range"}``."""
    args = parse_args(argv)
    shared = ROOT.parent / "shared" / "data"  # the datasets beside the project, where present
    if shared.is_dir():
        os.environ.setdefault("OPTLAB_DATA", str(shared))
    from optlab.train import set_cpu_devices

    set_cpu_devices()  # one CPU device per core before JAX starts: members run on every core
    import jax

    import optlab.sweep as sweep
    from optlab.config import load_config_file
    from optlab._host import cpu_name
    from optlab.models import INIT_NAMES, describe_inits

    cfg = load_config_file(CONFIG)
    inits = list(INIT_NAMES) if args.inits is None else [s.strip() for s in args.inits.split(",") if s.strip()]
    if args.quick:
        inits, args.epochs, args.limit_train = inits[:2], 1, 512
        args.no_plots = True
    if args.epochs is not None:
        cfg["train"]["epochs"] = args.epochs
    if args.limit_train is not None:
        cfg["data"]["limit_train"] = args.limit_train
    epochs = cfg["train"]["epochs"]
    out = pathlib.Path(args.out) if args.out else ROOT / "runs" / "weight_init"

    t0 = time.perf_counter()
    result = sweep.run(cfg, sweep.grid(init=inits), strategy=args.strategy, out_dir=out,
                       plots=not args.no_plots, quiet=True)
    seconds = time.perf_counter() - t0

    rows = result.rows
    md_table = table_markdown(rows, describe_inits(), epochs)
    accs = [r["final_test_accuracy"] for r in rows]
    in_range = all(LECTURE_RANGE[0] <= a <= LECTURE_RANGE[1] for a in accs)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    strategies = sorted({g["strategy"] for g in result.info["groups"]})
    data_note = "" if args.limit_train is None else f", first {args.limit_train} training images only"
    md = "\n".join([
        f"# Weight initialisation: MNIST ConvNet, SGD lr {cfg['optimizer']['learning_rate']}, "
        f"batch {cfg['data']['batch_size']}, {epochs} epoch{'s' if epochs != 1 else ''}{data_note}",
        "",
        md_table,
        "",
        f"Test accuracy range: {100 * min(accs):.2f}% - {100 * max(accs):.2f}% "
        f"(the lectures: {100 * LECTURE_RANGE[0]:.1f}% - {100 * LECTURE_RANGE[1]:.1f}% after 10 epochs).",
        "",
        f"{len(rows)} members in one `optlab.sweep.run` (strategy {', '.join(strategies)}), "
        f"{seconds:.1f} s wall time including data loading, compilation and a test evaluation per epoch.",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.default_backend()}), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end.",
        f"Command: `python {' '.join(['experiments/weight_init.py'] + list(sys.argv[1:] if argv is None else argv))}`",
        "",
    ])
    (out / "weight_init.md").write_text(md)
    print(md)
    return {"rows": rows, "seconds": seconds, "strategy": strategies, "markdown": md, "out_dir": out,
            "in_lecture_range": in_range}


if __name__ == "__main__":
    main()
