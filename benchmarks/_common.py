"""Shared helpers of the benchmarks: timing, the machine's description, tables.

Timing rules used everywhere:

* every timed function is jitted, warmed up (compiled and run) before timing,
  and ended with ``jax.block_until_ready`` so that asynchronous dispatch is
  not mistaken for speed;
* functions that update their arguments donate them (``donate_argnums``), and
  the state is threaded from one call to the next, as in a training loop;
* candidates measured against each other are *interleaved*: each round times
  a block of calls of every candidate in turn, so that a change in the load
  of a shared machine hits all of them alike; ratios are computed per round
  (paired) and summarised by their median;
* a result is the median over rounds with its interquartile range (the spread
  column, in percent of the median). Nothing here asserts on a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import numpy as np

from optlab._base import tree_copy
from optlab._host import cpu_name
from optlab.train import retain_host_memory

# Every candidate of a benchmark process runs under the same allocator settings, the ones
# optlab's fit and command line use: glibc keeps freed memory in the process, so XLA:CPU's
# per-call scratch buffers do not come back as fresh, page-faulting pages (optlab/_host.py).
HOST_MEMORY_RETAINED = retain_host_memory()


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, one or two rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per measurement")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


# --- the machine -----------------------------------------------------------------------------


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - an optional package that is missing or broken
        return "absent"
    return getattr(mod, "__version__", "?")


def environment() -> dict:
    """Versions, processor, core count and the load at the time of the run."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "optax": _version("optax"),
        "flax": _version("flax"),
        "numpy": np.__version__,
        "torch": _version("torch"),
        # The model too on an accelerator ("gpu x1 (NVIDIA H100 80GB HBM3)"): the bandwidth depends on it.
        "device": f"{jax.devices()[0].platform} x{jax.device_count()}"
        + ("" if jax.default_backend() == "cpu" else f" ({jax.devices()[0].device_kind})"),
        "cpu": cpu_name(),
        "nproc": os.cpu_count(),
        "load_average": tuple(round(x, 2) for x in load),
        "host_memory_retained": HOST_MEMORY_RETAINED,
        "commit": commit,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def describe_environment(env: dict) -> str:
    return (
        f"jax {env['jax']} (jaxlib {env['jaxlib']}), optax {env['optax']}, flax {env['flax']}, "
        f"numpy {env['numpy']}, torch {env['torch']}, python {env['python']}\n"
        f"{env['cpu']}, {env['nproc']} cores, device {env['device']}, "
        f"load average {env['load_average'][0]:.2f} {env['load_average'][1]:.2f} {env['load_average'][2]:.2f}, "
        f"commit {env['commit']}"
    )


# --- timing ----------------------------------------------------------------------------------


# A private copy of every leaf, so a donated call never frees an array someone else holds.
copy_tree = tree_copy


def torch_device() -> str | None:
    """Where PyTorch runs against JAX: ``"cuda"`` when JAX runs on a GPU and torch sees one,
    ``"cpu"`` when JAX runs on the CPU, None (no torch columns) otherwise or without torch."""
    try:
        import torch
    except ImportError:
        return None
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    return "cuda" if backend == "gpu" and torch.cuda.is_available() else None


def threaded_runner(step: Callable, carry, *args) -> Callable[[int], None]:
    """``run(n)``: call ``carry = step(*carry, *args)`` n times (donated carries), then block.

    ``step`` returns the new carry (a tuple of the donated arguments).
    """
    box = [tuple(carry)]

    def run(n: int) -> None:
        c = box[0]
        for _ in range(n):
            c = step(*c, *args)
        jax.block_until_ready(c)
        box[0] = c

    return run


def calibrate(run: Callable[[int], None], target_s: float, max_number: int = 10_000) -> int:
    """The number of calls per timing block that takes about ``target_s`` seconds."""
    t0 = time.perf_counter()
    run(1)
    once = max(time.perf_counter() - t0, 1e-7)
    return int(min(max_number, max(1, round(target_s / once))))


def round_orders(items: list, rounds: int, seed: int = 0) -> list[list]:
    """The order of each of ``rounds`` rounds: a random permutation of ``items`` per round.

    Seeded, so a run can be repeated. No item runs twice in a row across a
    round boundary, and an item's predecessor varies from round to round. The
    orders used before got one of the two right each: reversing the order
    every other round ran the first and the last item twice in a row, with
    their data still in the caches, and rotating it gave each item a fixed
    predecessor whose leftovers it always inherited. Two items can only
    alternate (A B A B ...): the rule leaves them one order.
    """
    rng = np.random.default_rng(seed)
    orders: list[list] = []
    for _ in range(rounds):
        order = [items[j] for j in rng.permutation(len(items))]
        if orders and len(items) > 1 and order[0] == orders[-1][-1]:
            order.append(order.pop(0))  # keep the last item of the round before from running again at once
        orders.append(order)
    return orders


def interleaved(
    runners: dict[str, Callable[[int], None]], rounds: int, number: dict[str, int] | int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each runner, one value per round, rounds interleaved across runners.

    Each round draws its order (`round_orders`), so no runner always comes
    first after a pause, follows the same neighbour, or runs back to back with
    itself.
    """
    if isinstance(number, int):
        number = {k: number for k in runners}
    for name, run in runners.items():
        run(warmup)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for order in round_orders(list(runners), rounds):
        for name in order:
            run = runners[name]
            t0 = time.perf_counter()
            run(number[name])
            times[name].append((time.perf_counter() - t0) / number[name])
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def spread_pct(xs) -> float:
    """Interquartile range in percent of the median (0 for fewer than two values)."""
    xs = np.asarray(xs, float)
    if xs.size < 2:
        return 0.0
    q1, q3 = np.percentile(xs, [25, 75])
    return float(100 * (q3 - q1) / np.median(xs))


def paired_ratio(a, b) -> tuple[float, float]:
    """Median and IQR (percent) of the per-round ratios a[i] / b[i]."""
    r = [x / y for x, y in zip(a, b)]
    return median(r), spread_pct(r)


# --- output ----------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "n/a"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_ratio(r: float, spread: float | None = None) -> str:
    if r != r:
        return "n/a"
    return f"{r:.2f}" if spread is None else f"{r:.2f} ±{spread / 2:.0f}%"


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def emit(result: dict, json_path: str | None) -> dict:
    """Print the tables of ``result`` and optionally save it as JSON."""
    print(describe_environment(result["environment"]))
    for t in result["tables"]:
        print()
        print(t)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result
