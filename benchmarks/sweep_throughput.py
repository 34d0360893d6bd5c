"""Sweep throughput: member-steps per second as the number of members grows, per strategy.

For the MNIST MLP (784-128-10) and the lectures' ConvNet, SGD lr 0.05, batch
128, this times the compiled epoch of ``optlab.sweep.run`` (the program that
``run`` builds for a group of members: ``vmap``, ``map`` or ``chunked`` over the
stacked member states, sharded over ``--devices`` local devices) on
``--steps`` batches per member, for 1, 2, 4, ... 64 members. Compilation,
evaluation and host bookkeeping are excluded (``benchmarks/init_table.py``
times whole sweeps). The strategies of one member count are interleaved
round by round, so the load of a shared machine hits them alike; the table
gives the median over rounds, the spread (interquartile range, % of the
median), and each strategy's speed relative to ``map`` in the same rounds.

    python benchmarks/sweep_throughput.py                      # both models, 1..64 members
    python benchmarks/sweep_throughput.py --models convnet --members 1,7 --rounds 5
    python benchmarks/sweep_throughput.py --host-devices 2 --devices 1,2 --strategies map  # both cores as 2 devices
    python benchmarks/sweep_throughput.py --quick              # smoke run, a few seconds
    python benchmarks/sweep_throughput.py --formulations --steps 100 --rounds 5   # ConvNet layers, old vs new

``--formulations`` instead times one member's ConvNet training (the
``optlab.train`` epoch: a ``lax.scan`` over batches) with the model's
channel-major matrix-product layers against the previous formulation
(``nnx.Conv`` + ``nnx.max_pool``, XLA's convolution and select-and-scatter),
and both again as one ``jit``-ed step per batch called from Python.

``--host-devices N`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
before JAX starts (it has no effect when JAX is already imported).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {
    "mlp": {"name": "mlp", "hidden": [128]},
    "convnet": {"name": "convnet"},
}
STRATEGIES = ("vmap", "map", "chunked")
MEMBER_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one round")
    p.add_argument("--models", default="mlp,convnet", help="comma-separated: mlp, convnet")
    p.add_argument("--members", default=",".join(map(str, MEMBER_COUNTS)), help="comma-separated member counts")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated: vmap, map, chunked")
    p.add_argument("--chunk-size", type=int, default=4, help="members per vmapped chunk for `chunked`")
    p.add_argument("--steps", type=int, default=20, help="training steps (batches of 128) per member per call")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--devices", default="1", help="local devices to shard members over; a list (1,2) compares them")
    p.add_argument("--host-devices", type=int, default=None, help="CPU: expose N XLA host devices")
    p.add_argument("--formulations", action="store_true", help="time the ConvNet's layer formulations instead")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.members, args.steps, args.rounds = "mlp,convnet", "1,2", 2, 1
    return args


def _member_counts(text: str) -> list[int]:
    counts = [int(s) for s in text.split(",") if s.strip()]
    if not counts or min(counts) < 1:
        raise ValueError(f"`--members` (={text!r}) must list positive integers")
    return counts


def build(model: str, members: int, strategy: str, steps: int, devices: list, chunk_size: int):
    """The compiled epoch of a sweep group and its stacked member states (seeds 0..members-1)."""
    import jax

    import optlab.sweep as sweep
    from optlab.sweep import _run

    cfg = {
        "data": {"name": "mnist", "normalization": "unit", "batch_size": 128, "limit_train": 128 * steps},
        "model": dict(MODELS[model]),
        "optimizer": {"name": "sgd", "learning_rate": 0.05},
        "train": {"epochs": 1, "seed": 0},
        "output": {"plots": False},
    }
    expanded = _run.make_members(cfg, sweep.grid(seed=list(range(members))))
    exp = _run.Experiment(expanded[0].config)
    states = [_run._member_state(m, exp)[1] for m in expanded]
    nd = len(devices)
    padded = states + [states[-1]] * ((-len(states)) % nd)  # as run() pads a piece: to whole devices
    program = _run._GroupProgram(exp, strategy, chunk_size, devices)
    stacked = program.place(_run._stack(padded))
    t0 = time.perf_counter()
    jax.block_until_ready(program.epoch(stacked, exp.train_images, exp.train_labels, 0))
    compile_s = time.perf_counter() - t0

    def run_once():
        jax.block_until_ready(program.epoch(stacked, exp.train_images, exp.train_labels, 1))

    return run_once, compile_s, exp.steps_per_epoch


def _convnet_xla_conv(self, x, *, train=None):
    """The ConvNet as it was first written: XLA convolutions, reduce-window max pooling, NHWC."""
    import jax
    from flax import nnx

    x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    return self.linear(x.reshape(x.shape[0], -1))


def formulations(args, C) -> dict:
    """One member's ConvNet training, current layers vs ``nnx.Conv`` + ``nnx.max_pool``, scan vs per-step jit."""
    import jax

    from optlab.models import ConvNet
    from optlab.sweep import _run

    cfg = {
        "data": {"name": "mnist", "normalization": "unit", "batch_size": 128, "limit_train": 128 * args.steps},
        "model": {"name": "convnet"},
        "optimizer": {"name": "sgd", "learning_rate": 0.05},
        "train": {"epochs": 1, "seed": 0},
    }
    current = ConvNet.__call__
    runners = {}
    for name, call in (("channel-major matmul layers (now)", current), ("nnx.Conv + nnx.max_pool (before)", _convnet_xla_conv)):
        ConvNet.__call__ = call
        try:
            exp = _run.Experiment(cfg)
            state = exp.init()
            epoch = jax.jit(exp.train_epoch)
            step = jax.jit(exp.train_step)
            batches = [(exp.train_images[i * 128:(i + 1) * 128], exp.train_labels[i * 128:(i + 1) * 128])
                       for i in range(exp.steps_per_epoch)]
            jax.block_until_ready(epoch(state, exp.train_images, exp.train_labels, 0))
            jax.block_until_ready(step(state, *batches[0]))
        finally:
            ConvNet.__call__ = current

        def scan_run(epoch=epoch, state=state, exp=exp):
            jax.block_until_ready(epoch(state, exp.train_images, exp.train_labels, 1))

        def step_run(step=step, state=state, batches=batches):
            s = state
            for x, y in batches:
                s, _ = step(s, x, y)
            jax.block_until_ready(s)

        runners[f"{name}, lax.scan epoch"] = scan_run
        runners[f"{name}, jit step per batch"] = step_run
    times = {k: [] for k in runners}
    loads = []
    for order in C.round_orders(list(runners), args.rounds):
        loads.append(os.getloadavg()[0])
        for k in order:
            t0 = time.perf_counter()
            runners[k]()
            times[k].append(time.perf_counter() - t0)
    ref = next(iter(runners))
    rows = []
    for k, v in times.items():
        rel = C.paired_ratio(v, times[ref])
        rows.append([k, f"{1e3 * C.median(v) / args.steps:.2f}", f"{C.spread_pct(v):.0f}%",
                     f"{C.median(v) * 468 / args.steps:.2f}", C.fmt_ratio(*rel)])
    table = C.table(["ConvNet formulation, loop", "ms per step", "spread", "s per 468-step epoch",
                     "time / first row"], rows,
                    title=f"one member, {args.steps} steps of batch 128, {args.rounds} interleaved rounds, "
                          f"load {min(loads):.1f}-{max(loads):.1f}")
    return {"environment": C.environment(), "args": vars(args), "formulations": times, "tables": [table]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.host_devices and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.host_devices}".strip()
    shared = ROOT.parent / "shared" / "data"  # the datasets beside the project, where present
    if shared.is_dir():
        os.environ.setdefault("OPTLAB_DATA", str(shared))
    import jax

    from benchmarks import _common as C

    if args.formulations:
        return C.emit(formulations(args, C), args.json)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise ValueError(f"`--models` entry {m!r} must be one of {', '.join(MODELS)}")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"`--strategies` entry {s!r} must be one of {', '.join(STRATEGIES)}")
    counts = _member_counts(args.members)
    device_counts = [int(d) for d in str(args.devices).split(",") if d.strip()]
    if not device_counts or min(device_counts) < 1 or max(device_counts) > len(jax.local_devices()):
        raise ValueError(f"`--devices` (={args.devices}) must be counts from 1 to the {len(jax.local_devices())} "
                         "local devices (on a CPU, pass --host-devices)")
    # One contender per (strategy, device count); named by the strategy alone when one count is given.
    variants = [(s, d) for d in device_counts for s in strategies]
    label = {v: v[0] if len(device_counts) == 1 else f"{v[0]} on {v[1]} dev" for v in variants}
    baseline = ("map", device_counts[0]) if "map" in strategies else None

    env = C.environment()
    results, tables = [], []
    for model in models:
        rows = []
        for m in counts:
            runners, compiled = {}, {}
            for v in variants:
                devices = jax.local_devices()[: v[1]]
                runners[v], compiled[v], steps = build(model, m, v[0], args.steps, devices, args.chunk_size)
            load_before = os.getloadavg()[0]
            times = {v: [] for v in variants}
            for order in C.round_orders(variants, args.rounds):
                for v in order:
                    t0 = time.perf_counter()
                    runners[v]()
                    times[v].append(time.perf_counter() - t0)
            load_after = os.getloadavg()[0]
            for v in variants:
                med = C.median(times[v])
                rate = m * steps / med
                rel = C.paired_ratio(times[baseline], times[v]) if baseline else (float("nan"), 0.0)
                results.append({"model": model, "members": m, "strategy": v[0], "devices": v[1], "steps": steps,
                                "seconds": times[v], "member_steps_per_s": rate, "vs_map": rel[0],
                                "compile_s": compiled[v], "load": [load_before, load_after]})
                rows.append([m, label[v], f"{rate:,.0f}", f"{C.spread_pct([m * steps / t for t in times[v]]):.0f}%",
                             C.fmt_ratio(*rel), f"{1e3 * med / (m * steps):.2f}", f"{compiled[v]:.1f}",
                             f"{load_before:.1f}/{load_after:.1f}"])
            print(f"{model} {m} members done: " + ", ".join(
                f"{label[v]} {m * steps / C.median(times[v]):,.0f} member-steps/s" for v in variants), flush=True)
        base = "map" if len(device_counts) == 1 else f"map on {device_counts[0]} dev"
        tables.append(C.table(
            ["members", "strategy", "member-steps/s", "spread", f"speed vs {base}", "ms per member-step",
             "compile + 1st call (s)", "load 1-min before/after"],
            rows,
            title=f"{model}: {args.steps} steps of batch 128 per member, device count(s) {args.devices}, "
                  f"{args.rounds} round(s), chunk {args.chunk_size}",
        ))
    result = {"environment": env, "args": vars(args), "results": results, "tables": tables}
    return C.emit(result, args.json)


if __name__ == "__main__":
    main()
