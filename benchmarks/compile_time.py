"""Time to first step: build, initialise, trace, compile and run one jitted optimizer step, optlab against optax.

For each optimizer of ``update_step.py`` on the parameters of the CIFAR-10
ResNet-9 (25 arrays, 6.6M parameters; ``--trees`` adds the 1,000-array tree),
every round builds a *fresh* optimizer and a fresh ``jax.jit`` of
``update + apply_updates`` (donated parameters and state), so nothing comes
from JAX's caches, and times

* ``init``: ``tx.init(params)`` (eager, as a training script runs it);
* ``trace``: tracing and lowering to StableHLO (``jit(...).lower``);
* ``compile``: XLA compilation (``.compile()``);
* ``run``: the first call, until its results are ready;

for optax, optlab and ``flatten(optlab)``, interleaved round by round, and
for a second copy of the optax optimizer (``optax again``: its ratio to
``optax`` is the noise floor of the run, two identical programs), and for
``optax.inject_hyperparams`` around the same optax optimizer: optax's way
of holding hyperparameters in the state, which every optlab optimizer does
(plain optax bakes them into the program as constants, so changing one means
recompiling). ``total`` is their sum, the wait before the first step. Times
are medians over rounds; a ratio is the median of the per-round ratios of
totals (the variants of one round run back to back, so they share the
machine's state), with its interquartile range in percent.

Run: ``python benchmarks/compile_time.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import optax

from optlab.transforms._flat import flatten

from _common import (
    base_parser,
    copy_tree,
    emit,
    environment,
    fmt_ratio,
    fmt_time,
    median,
    paired_ratio,
    round_orders,
    table,
)
from update_step import OPTIMIZERS, array_tree, model_params, optax_optimizer, small_sizes

PHASES = ("init", "trace", "compile", "run")


def first_step(make_tx, params, grads) -> dict:
    """Seconds spent in each phase before the first step's results are ready."""
    t0 = time.perf_counter()
    tx = make_tx()
    state = jax.block_until_ready(tx.init(params))
    t1 = time.perf_counter()

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads)
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    jax.block_until_ready(compiled(copy_tree(params), copy_tree(state), grads))
    t4 = time.perf_counter()
    return {"init": t1 - t0, "trace": t2 - t1, "compile": t3 - t2, "run": t4 - t3, "total": t4 - t0}


def variants(name):
    make_optlab = OPTIMIZERS[name][0]
    return {
        "optax": lambda: optax_optimizer(name),
        "optax-again": lambda: optax_optimizer(name),
        "optlab": make_optlab,
        "flat": lambda: flatten(make_optlab()),
        "optax-inject": lambda: optax_optimizer(name, inject=True),
    }


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default=None, help=f"comma-separated subset of {','.join(OPTIMIZERS)}")
    parser.add_argument("--trees", default="resnet9", help="comma-separated: resnet9, small1000")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    optimizers = args.optimizers.split(",") if args.optimizers else list(OPTIMIZERS)
    all_trees = {
        "resnet9": ("ResNet-9 (width 4)", lambda: model_params(4))
        if args.quick
        else ("ResNet-9 (CIFAR-10)", lambda: model_params(64)),
        "small1000": ("50 small arrays", lambda: array_tree(small_sizes(50, 20_000), 0))
        if args.quick
        else ("1000 small arrays (1M)", lambda: array_tree(small_sizes(1000, 1_000_000), 0)),
    }
    tree_keys = args.trees.split(",")
    unknown = sorted(set(tree_keys) - set(all_trees)) + sorted(set(optimizers) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"unknown tree(s)/optimizer(s) {unknown}")

    # One unrelated compilation first, so JAX's one-time start-up is not charged to the first optimizer.
    jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(4)))
    tables, records = [], []
    for key in tree_keys:
        label, build = all_trees[key]
        params = build()
        grads = jax.tree_util.tree_map(lambda x: 1e-2 * jnp.cos(x), params)
        n_leaves = len(jax.tree_util.tree_leaves(params))
        rows = []
        for name in optimizers:
            results = {v: [] for v in variants(name)}
            # One untimed round first: the first build of each variant also fills Python's
            # and JAX's one-time caches for its code, which would favour whoever comes later.
            makers = variants(name)
            for make in makers.values():
                first_step(make, params, grads)
            for order in round_orders(list(makers), rounds):  # no variant always first or after the same one
                for v in order:
                    results[v].append(first_step(makers[v], params, grads))
            med = {v: {ph: median([r[ph] for r in rs]) for ph in (*PHASES, "total")} for v, rs in results.items()}
            records.append({"tree": label, "optimizer": name, "median": med, "rounds": results})
            row = [name]
            for v in ("optax", "optlab", "flat"):
                m = med[v]
                row.append(f"{fmt_time(m['total'])}")
                row.append(f"{fmt_time(m['trace'])} / {fmt_time(m['compile'])}")
            row.append(fmt_time(med["optax-inject"]["total"]))
            totals = {v: [r["total"] for r in rs] for v, rs in results.items()}
            for a, b in (("optax-again", "optax"), ("optlab", "optax"), ("flat", "optax"), ("optlab", "optax-inject")):
                row.append(fmt_ratio(*paired_ratio(totals[a], totals[b])))
            rows.append(row)
        headers = [
            "optimizer",
            "optax total",
            "optax trace / compile",
            "optlab total",
            "optlab trace / compile",
            "flat total",
            "flat trace / compile",
            "optax inject total",
            "optax again x optax",
            "optlab x optax",
            "flat x optax",
            "optlab x optax inject",
        ]
        title = (
            f"Time to first step, {label} ({n_leaves} arrays): median of {rounds} rounds "
            "(total = init + trace + compile + first run)"
        )
        tables.append(table(headers, rows, title))
    return emit({"environment": environment(), "records": records, "tables": tables}, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
