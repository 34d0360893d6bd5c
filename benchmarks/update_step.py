"""One optimizer step, ``update`` + ``apply_updates``, jitted with donated buffers: optlab against optax and PyTorch.

For each optimizer (sgd, sgd+momentum, nesterov, adagrad, rmsprop, adam,
adamw) and each parameter tree:

* ``1 x 10M``: one array of 10,000,000 float32 (pure bandwidth);
* ``100 x 100k``: 100 arrays of 100,000 (10M in all);
* ``1000 small``: 1,000 arrays of 16 to ~4,000 elements, 1,000,000 in all
  (per-array overhead, as in CNNs with BatchNorm);
* ``ResNet-9``: the parameters of the CIFAR-10 ResNet-9 (``optlab.models.ResNet9``,
  width 64: 25 arrays, 6,573,120 parameters), as an ``nnx.State``;

it times, interleaved in one process (see ``_common.py``):

* ``optax``: the optax optimizer with the same hyperparameters;
* ``optax again``: a second, separately built and compiled copy of it, timed
  like the others: its ratio to ``optax`` is the noise floor of the run (two
  identical programs differ by this much), the yardstick for the other ratios;
* ``optlab``: the optlab optimizer, leaf by leaf;
* ``flat``: ``flatten(optlab optimizer)``: inside the step, gradients and
  parameters of the leaves of at most 4,096 elements are packed into one
  buffer per dtype (larger leaves stay apart), updates unpacked at the end;
* ``flat-resident``: the optlab optimizer on parameters that are *kept* packed
  between steps (``FlatLayout.pack`` once, every leaf; a model would unpack
  them where it reads them), so the step itself touches only the buffers;
* ``torch foreach`` / ``torch fused``: ``torch.optim``, same shapes,
  ``foreach=True`` and, where the class has it, ``fused=True`` (skipped when
  torch is not installed), timed in a phase of their own. On the CPU with 1
  and with one-per-core intra-op threads, the faster kept (``1t``/``2t`` in the
  cell); when JAX runs on a GPU and torch sees CUDA, on the GPU (``cuda`` in
  the cell), each block of steps ended by ``torch.cuda.synchronize()``.

Reported: time per step, the ratio to optax (median of per-round ratios; below
1 is faster), and the effective bandwidth: bytes that must move per parameter
(sgd 12: read w, g, write w; momentum-like 20; adam 28) times the number of
parameters, divided by the time, also as a percentage of this machine's
bandwidth for an in-place ``a += s * b`` (``bandwidth.py``, measured at the
start of the run; an update step reads and writes its arrays in place the
same way). Small trees fit in the caches and can exceed 100%.

Run: ``python benchmarks/update_step.py`` (``--quick`` for a smoke run,
``--trees``/``--optimizers`` to select).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optlab
from optlab.models import ResNet9
from optlab.transforms._flat import FlatLayout, flatten

import bandwidth
from _common import (
    base_parser,
    calibrate,
    copy_tree,
    emit,
    environment,
    fmt_ratio,
    fmt_time,
    interleaved,
    median,
    paired_ratio,
    spread_pct,
    table,
    threaded_runner,
    torch_device,
)

LR = 1e-3

# name: (optlab factory, (optax function, its keyword arguments), bytes per float32 parameter,
#        torch class and kwargs)
OPTIMIZERS = {
    "sgd": (lambda: optlab.sgd(LR), (optax.sgd, {"learning_rate": LR}), 12, ("SGD", {"lr": LR})),
    "sgd+momentum": (
        lambda: optlab.sgd(LR, momentum=0.9),
        (optax.sgd, {"learning_rate": LR, "momentum": 0.9}),
        20,
        ("SGD", {"lr": LR, "momentum": 0.9}),
    ),
    "nesterov": (
        lambda: optlab.sgd(LR, momentum=0.9, nesterov=True),
        (optax.sgd, {"learning_rate": LR, "momentum": 0.9, "nesterov": True}),
        20,
        ("SGD", {"lr": LR, "momentum": 0.9, "nesterov": True}),
    ),
    "adagrad": (
        lambda: optlab.adagrad(LR),
        (optax.adagrad, {"learning_rate": LR, "initial_accumulator_value": 0.0, "eps": 1e-10}),
        20,
        ("Adagrad", {"lr": LR}),
    ),
    "rmsprop": (
        lambda: optlab.rmsprop(LR),
        (optax.rmsprop, {"learning_rate": LR, "decay": 0.99, "eps": 1e-8, "eps_in_sqrt": False}),
        20,
        ("RMSprop", {"lr": LR}),
    ),
    "adam": (lambda: optlab.adam(LR), (optax.adam, {"learning_rate": LR}), 28, ("Adam", {"lr": LR})),
    "adamw": (
        lambda: optlab.adamw(LR, weight_decay=1e-2),
        (optax.adamw, {"learning_rate": LR, "weight_decay": 1e-2}),
        28,
        ("AdamW", {"lr": LR, "weight_decay": 1e-2}),
    ),
}


def optax_optimizer(name: str, inject: bool = False):
    """The optax counterpart of ``OPTIMIZERS[name]``; with ``inject``, its numeric
    hyperparameters in the state (``optax.inject_hyperparams``), as optlab keeps them."""
    fn, kwargs = OPTIMIZERS[name][1]
    if not inject:
        return fn(**kwargs)
    static = tuple(k for k, v in kwargs.items() if isinstance(v, bool))
    return optax.inject_hyperparams(fn, static_args=static)(**kwargs)


VARIANTS = ("optax", "optax-again", "optlab", "flat", "flat-resident")


def small_sizes(n: int, total: int, seed: int = 0) -> list[int]:
    """``n`` sizes, log-uniform between 16 and ~4,000 before rescaling, summing to ``total``."""
    rng = np.random.default_rng(seed)
    raw = np.exp(rng.uniform(np.log(16), np.log(4096), n))
    sizes = np.maximum(1, np.floor(raw * total / raw.sum())).astype(int)
    sizes[: total - sizes.sum()] += 1  # distribute the rounding remainder
    return [int(s) for s in sizes]


def array_tree(sizes: list[int], seed: int) -> dict:
    key = jax.random.key(seed)
    return {f"a{i:04d}": jax.random.normal(jax.random.fold_in(key, i), (s,), jnp.float32) for i, s in enumerate(sizes)}


def model_params(width: int):
    _, params, _ = nnx.split(ResNet9(width=width, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return params


def trees(quick: bool) -> dict:
    """name -> parameter tree (built lazily: the full-size trees take memory)."""
    if quick:
        return {
            "1 x 64k": lambda: array_tree([1 << 16], 0),
            "10 x 6.5k": lambda: array_tree([6554] * 10, 0),
            "50 small (20k)": lambda: array_tree(small_sizes(50, 20_000), 0),
            "ResNet-9 (width 4)": lambda: model_params(4),
        }
    return {
        "1 x 10M": lambda: array_tree([10_000_000], 0),
        "100 x 100k": lambda: array_tree([100_000] * 100, 0),
        "1000 small (1M)": lambda: array_tree(small_sizes(1000, 1_000_000), 0),
        "ResNet-9 (CIFAR-10)": lambda: model_params(64),
    }


def jax_runner(tx, params, grads):
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    step = jax.jit(step, donate_argnums=(0, 1))
    p = copy_tree(params)
    s = copy_tree(tx.init(p))
    return threaded_runner(lambda p, s, g: step(p, s, g), (p, s), grads)


def torch_runner(cls_name: str, kwargs: dict, params, grads, mode: str, threads: int, device: str = "cpu"):
    """``run(n)`` of ``torch.optim.<cls>(..., foreach=True | fused=True)`` on ``device``.

    None where torch lacks the class or the mode.
    """
    try:
        import torch
    except ImportError:
        return None
    if device == "cpu":
        torch.set_num_threads(threads)
    cls = getattr(torch.optim, cls_name)
    ts = []
    for p, g in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(grads)):
        t = torch.tensor(np.asarray(p), device=device, requires_grad=True)
        t.grad = torch.tensor(np.asarray(g), device=device)
        ts.append(t)
    try:
        opt = cls(ts, **kwargs, **{mode: True})
        opt.step()
    except (RuntimeError, TypeError, ValueError):
        return None
    # CUDA kernels run asynchronously: a block of steps is timed to its end, as JAX's is.
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(n: int) -> None:
        with torch.no_grad():
            for _ in range(n):
                opt.step()
        sync()

    return run


def timed(runners: dict, rounds: int, target_s: float) -> dict:
    """Warm up (compile), calibrate the block size, then time the runners interleaved."""
    for run in runners.values():
        run(2)
    number = {k: calibrate(r, target_s) for k, r in runners.items()}
    return interleaved(runners, rounds, number, warmup=1)


def measure_tree(tree_name, params, optimizers, rounds, target_s, roof_gbps, torch_on=None, variants=VARIANTS):
    """One table for one tree; ``torch_on`` is the device of the PyTorch columns (None: no PyTorch)."""
    grads = jax.tree_util.tree_map(lambda x: 1e-2 * jnp.sin(x + 1.0), params)
    # Resident parameters are packed once, so there is no reason to leave large leaves out.
    layout = FlatLayout(params, max_packed_size=2**31 - 1)
    flat_params, flat_grads = layout.pack(params), layout.pack(grads)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    n_leaves = len(jax.tree_util.tree_leaves(params))
    rows, records = [], []
    for name in optimizers:
        make_optlab, _, nbytes, (torch_cls, torch_kwargs) = OPTIMIZERS[name]
        builders = {
            "optax": lambda: jax_runner(optax_optimizer(name), params, grads),
            "optax-again": lambda: jax_runner(optax_optimizer(name), params, grads),
            "optlab": lambda: jax_runner(make_optlab(), params, grads),
            "flat": lambda: jax_runner(flatten(make_optlab()), params, grads),
            "flat-resident": lambda: jax_runner(make_optlab(), flat_params, flat_grads),
        }
        times = timed({k: build() for k, build in builders.items() if k in variants}, rounds, target_s)
        rec = {"tree": tree_name, "optimizer": name, "n_params": n_params, "n_leaves": n_leaves, "bytes": nbytes * n_params}
        for k, ts in times.items():
            rec[k] = {"median": median(ts), "spread": spread_pct(ts), "times": ts}
            if k != "optax":
                rec[k]["ratio_to_optax"] = paired_ratio(ts, times["optax"])
        if torch_on is not None:
            # PyTorch is timed in a phase of its own: its OpenMP threads and XLA's thread
            # pool both spin after their work, and on a few cores interleaving them slows
            # both. Its ratio to optax is therefore unpaired (median over median).
            # On the CPU, both 1 and one-per-core intra-op threads are timed and the faster kept:
            # on a shared machine OpenMP's barriers can make the multi-threaded run much slower.
            thread_counts = sorted({1, os.cpu_count() or 1}) if torch_on == "cpu" else [0]
            for mode in ("foreach", "fused"):
                best = None
                for threads in thread_counts:
                    run = torch_runner(torch_cls, torch_kwargs, params, grads, mode, threads, torch_on)
                    if run is None:
                        continue
                    ts = timed({"t": run}, rounds, target_s)["t"]
                    if best is None or median(ts) < median(best[1]):
                        best = (threads, ts)
                if best is not None:
                    threads, ts = best
                    k = f"torch {mode}"
                    rec[k] = {"median": median(ts), "spread": spread_pct(ts), "times": ts, "device": torch_on}
                    if torch_on == "cpu":
                        rec[k]["threads"] = threads
                    rec[k]["ratio_to_optax"] = (rec[k]["median"] / rec["optax"]["median"], None)
        records.append(rec)
        ours = [k for k in ("optlab", "flat", "flat-resident") if k in rec]
        best = min(ours, key=lambda k: rec[k]["median"])
        gbps = {k: rec["bytes"] / rec[k]["median"] / 1e9 for k in ours}

        def cell(k):
            if k not in rec:
                return "n/a"
            r, s = rec[k]["ratio_to_optax"]
            if "threads" in rec[k]:
                threads = f", {rec[k]['threads']}t"
            else:
                threads = f", {rec[k]['device']}" if "device" in rec[k] else ""
            return f"{fmt_time(rec[k]['median'])} ({fmt_ratio(r, s)}{threads})"

        rows.append(
            [
                name,
                f"{fmt_time(rec['optax']['median'])} ±{rec['optax']['spread'] / 2:.0f}%",
                cell("optax-again"),
                cell("optlab"),
                cell("flat"),
                cell("flat-resident"),
                " / ".join(f"{gbps[k]:.1f}" if k in gbps else "n/a" for k in ("optlab", "flat")),
                f"{100 * gbps[best] / roof_gbps:.0f}% ({best})",
                cell("torch foreach"),
                cell("torch fused"),
            ]
        )
    headers = [
        "optimizer",
        "optax",
        "optax again (x optax)",
        "optlab (x optax)",
        "flat (x optax)",
        "flat-resident (x optax)",
        "GB/s optlab / flat",
        "best % of roofline",
        "torch foreach (x optax)",
        "torch fused (x optax)",
    ]
    title = f"{tree_name}: {n_leaves} arrays, {n_params:,} float32 parameters, median of {rounds} interleaved rounds"
    return table(headers, rows, title), records


def adam_summary(records: list[dict], roof_gbps: float) -> str:
    """Adam on each tree against the issue's GPU targets: share of the measured roofline, and
    the ratio to ``torch.optim.Adam(fused=True)`` (below 1: optlab is faster)."""
    lines = ["Adam per tree (targets on a GPU: >= 80% of the roofline on 10M+ parameters, ahead of torch fused):"]
    for rec in records:
        if rec["optimizer"] != "adam" or "optlab" not in rec:
            continue
        t = rec["optlab"]["median"]
        pct = 100 * rec["bytes"] / t / 1e9 / roof_gbps
        fused = rec.get("torch fused")
        vs = f"{t / fused['median']:.2f}x torch fused ({fused['device']})" if fused else "torch fused not timed"
        lines.append(f"- {rec['tree']}: optlab {fmt_time(t)}, {pct:.0f}% of the roofline, {vs}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--trees", default=None, help="comma-separated subset of the tree names")
    parser.add_argument("--optimizers", default=None, help=f"comma-separated subset of {','.join(OPTIMIZERS)}")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of the JAX columns (optax is always timed)"
    )
    args = parser.parse_args(argv)
    variants = {"optax", *args.variants.split(",")}
    if not variants <= set(VARIANTS):
        parser.error(f"unknown variant(s) {sorted(variants - set(VARIANTS))}; choose from {list(VARIANTS)}")
    if not variants & {"optlab", "flat", "flat-resident"}:
        parser.error("--variants must include at least one of optlab, flat, flat-resident")
    rounds = args.rounds or (2 if args.quick else 7)
    target_s = 0.002 if args.quick else 0.1
    optimizers = args.optimizers.split(",") if args.optimizers else list(OPTIMIZERS)
    unknown = sorted(set(optimizers) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {list(OPTIMIZERS)}")
    all_trees = trees(args.quick)
    names = args.trees.split(",") if args.trees else list(all_trees)
    unknown = sorted(set(names) - set(all_trees))
    if unknown:
        parser.error(f"unknown tree(s) {unknown}; choose from {list(all_trees)}")

    bw = bandwidth.measure(1 << 16 if args.quick else 1 << 25, rounds=2 if args.quick else 5, target_s=target_s)
    roof = bw["axpy (in place)"]["gbps"]
    tables = [
        f"Bandwidth measured in this process: in-place axpy {roof:.1f} GB/s (the roofline below), "
        f"triad {bw['triad']['gbps']:.1f} GB/s, copy {bw['copy']['gbps']:.1f} GB/s."
    ]
    torch_on = None if args.no_torch else torch_device()
    if not args.no_torch and torch_on is None:
        tables.append(f"No PyTorch columns: torch is not installed, or cannot run on JAX's {jax.default_backend()}.")
    records = []
    for name in names:
        t, recs = measure_tree(name, all_trees[name](), optimizers, rounds, target_s, roof, torch_on, variants)
        tables.append(t)
        records += recs
    tables.append(adam_summary(records, roof))
    return emit({"environment": environment(), "bandwidth": bw, "records": records, "tables": tables}, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
