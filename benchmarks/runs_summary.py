"""The median over several runs of ``update_step.py``: one table of ratios to optax.

One process's ratios carry that process's luck (where its buffers landed,
what else the machine did in those minutes), which the rounds inside the run
cannot average out. Issue 5's target asks for the median of several runs, so
this script reads the ``--json`` files of several runs and prints, for every
tree x optimizer, the median over runs of each variant's ratio to optax, with
the lowest and highest run in brackets. ``optax again`` (a second copy of the
optax optimizer, when the runs timed it) is the noise floor.

Run::

    for i in 1 2 3; do python benchmarks/update_step.py --rounds 5 --no-torch --json run$i.json; done
    python benchmarks/runs_summary.py run1.json run2.json run3.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from _common import table

VARIANTS = ("optax-again", "optlab", "flat", "flat-resident")


def load(path: str) -> list[dict]:
    try:
        with open(path) as f:
            records = json.load(f)["records"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not the --json output of update_step.py ({e})") from e
    if not all(isinstance(r, dict) and {"tree", "optimizer", "optax"} <= r.keys() for r in records):
        raise SystemExit(f"{path}: not the --json output of update_step.py (records without tree/optimizer/optax)")
    return records


def summarize(runs: list[list[dict]]) -> dict:
    """``{(tree, optimizer): {variant: [ratio of each run that timed it]}}``, in first-seen order."""
    cells: dict = {}
    for records in runs:
        for r in records:
            cell = cells.setdefault((r["tree"], r["optimizer"]), {v: [] for v in VARIANTS})
            for v in VARIANTS:
                if v in r:
                    cell[v].append(r[v]["ratio_to_optax"][0])
    return cells


def fmt(ratios: list[float]) -> str:
    if not ratios:
        return "n/a"
    med = statistics.median(ratios)
    return f"{med:.2f}" if len(ratios) == 1 else f"{med:.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON files written by update_step.py --json")
    args = parser.parse_args(argv)
    cells = summarize([load(p) for p in args.runs])
    shown = [v for v in VARIANTS if any(c[v] for c in cells.values())]
    rows = [[tree, opt, *(fmt(c[v]) for v in shown)] for (tree, opt), c in cells.items()]
    print(table(["tree", "optimizer", *(f"{v} x optax" for v in shown)], rows, f"Median over {len(args.runs)} runs [lowest-highest run]"))
    medians = {v: [statistics.median(c[v]) for c in cells.values() if c[v]] for v in shown}
    print()
    for v, meds in medians.items():
        above = sum(m > 1.0 for m in meds)
        print(f"{v}: {len(meds) - above} of {len(meds)} medians at or below 1.00, range {min(meds):.2f}-{max(meds):.2f}")
    return {"cells": {f"{t} / {o}": c for (t, o), c in cells.items()}, "medians": medians}


if __name__ == "__main__":
    main(sys.argv[1:])
