"""The lectures' weight-initialisation table, timed four ways side by side.

Seven kernel initialisations x the MNIST ConvNet (SGD lr 0.05, batch 128,
``--epochs`` epochs, a test evaluation after every epoch), trained by:

``sweep``
    one ``optlab.sweep.run`` over the seven members (``configs/mnist_convnet.py``);
``flax``
    seven runs one after another of a plain hand-written Flax NNX + optax loop,
    the kind a user writes today (``nnx.Conv``/``nnx.max_pool``, ``nnx.jit``
    train step, NumPy shuffling, one host-to-device batch per step);
``cli``
    seven ``optlab train configs/mnist_convnet.py --set model.init=...``
    processes one after another (plots off; checkpoints on, as by default);
``torch`` / ``torch1``
    seven runs one after another of the lectures' PyTorch code path
    (``torch.nn`` ConvNet, ``torch.optim.SGD``, eager, CPU) with PyTorch's
    default thread count / with one thread. Skipped when torch is absent.

Each round runs every contender once, in an order drawn anew for each round
(`_common.round_orders`), and reports its wall time and its time relative to the sweep *in the
same round* (so a change in the load of a shared machine hits all of them
alike), with the 1-minute load average before and after. Each contender's
per-epoch times are recorded, so runs of fewer epochs can be extrapolated to
``--target-epochs`` (default 10): ``measured + (target - epochs) x the median of
the epochs after the first``, clearly labelled as an estimate.

    python benchmarks/init_table.py --epochs 2                   # all contenders, ~10 minutes on 2 busy cores
    python benchmarks/init_table.py --epochs 10 --contenders sweep,torch1
    python benchmarks/init_table.py --quick                      # smoke run, a few seconds per contender

Data are loaded once per contender, inside its timed region (the ``cli`` runs
load them once per process); JAX's own import is outside it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONTENDERS = ("sweep", "flax", "cli", "torch", "torch1")
LR, BATCH, EVAL_BATCH = 0.05, 128, 1000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 initialisations, 256 images, 1 epoch")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--target-epochs", type=int, default=10, help="extrapolate the times to this many epochs")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of " + ", ".join(CONTENDERS))
    p.add_argument("--inits", default=None, help="comma-separated initialisations (default: all 7)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N images only")
    p.add_argument("--strategy", default="auto", help="the sweep's strategy")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="CPU devices for JAX, the sweep shards its members over them (default: one per core, "
                        "as `optlab sweep` does)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.limit_train, args.rounds = 1, 256, 1
        args.inits = args.inits or "default,he_normal"
    if args.epochs < 1 or args.rounds < 1:
        raise ValueError(f"`--epochs` (={args.epochs}) and `--rounds` (={args.rounds}) must be positive")
    return args


class _EpochClock(io.TextIOBase):
    """A stdout that notes the time of each of the sweep's "epoch k/E" lines (and prints nothing)."""

    def __init__(self):
        self.times = [time.perf_counter()]
        self._buf = ""

    def write(self, s):
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if re.search(r"epoch \d+/\d+", line):
                self.times.append(time.perf_counter())
        return len(s)


def _load_mnist(limit):
    from optlab import data

    ds = data.load("mnist")
    n = ds.train_images.shape[0] if limit is None else limit
    return ds.train_images[:n], ds.train_labels[:n], ds.test_images, ds.test_labels


# --- the contenders ----------------------------------------------------------------------------


def run_sweep(inits, epochs, limit, strategy):
    import optlab.sweep as sweep
    from optlab.config import load_config_file

    cfg = load_config_file(ROOT / "configs" / "mnist_convnet.py")
    cfg["train"]["epochs"] = epochs
    cfg["data"]["limit_train"] = limit
    cfg["output"] = {"plots": False}
    clock = _EpochClock()
    with contextlib.redirect_stdout(clock):
        res = sweep.run(cfg, sweep.grid(init=inits), strategy=strategy, quiet=False)
    epoch_s = list(map(float, __import__("numpy").diff(clock.times)))
    accs = {r["model.init"]: r["final_test_accuracy"] for r in res.rows}
    return accs, [epoch_s], f"strategy {res.info['groups'][0]['strategy']}, {res.info['devices']} device(s)"


def _flax_initializer(name):
    import jax
    from flax import nnx

    if name == "uniform":
        return lambda key, shape, dtype=jax.numpy.float32: jax.random.uniform(key, shape, dtype, -0.1, 0.1)
    return {
        "default": nnx.initializers.lecun_normal(),
        "normal": nnx.initializers.normal(0.1),
        "xavier_uniform": nnx.initializers.xavier_uniform(),
        "xavier_normal": nnx.initializers.xavier_normal(),
        "he_uniform": nnx.initializers.he_uniform(),
        "he_normal": nnx.initializers.he_normal(),
    }[name]


def run_flax(inits, epochs, limit):
    """A hand-written Flax NNX + optax loop, one run per initialisation."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, kernel_init, rngs):
            self.conv1 = nnx.Conv(1, 4, (3, 3), padding="SAME", kernel_init=kernel_init, rngs=rngs)
            self.conv2 = nnx.Conv(4, 8, (3, 3), padding="SAME", kernel_init=kernel_init, rngs=rngs)
            self.linear = nnx.Linear(392, 10, kernel_init=kernel_init, rngs=rngs)

        def __call__(self, x):
            x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
            x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
            return self.linear(x.reshape(x.shape[0], -1))

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        try:
            optimizer.update(model, grads)  # flax >= 0.11
        except TypeError:
            optimizer.update(grads)
        return loss

    @nnx.jit
    def correct(model, x, y):
        return jnp.sum(jnp.argmax(model(x), -1) == y)

    x, y, xt, yt = _load_mnist(limit)
    x, xt = x.astype(np.float32) / 255, xt.astype(np.float32) / 255
    accs, epoch_times = {}, []
    for name in inits:
        model = Net(_flax_initializer(name), nnx.Rngs(0))
        try:
            optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
        except TypeError:  # flax < 0.11
            optimizer = nnx.Optimizer(model, optax.sgd(LR))
        rng = np.random.default_rng(0)
        times = []
        for _ in range(epochs):
            t0 = time.perf_counter()
            perm = rng.permutation(len(x))
            for i in range(len(x) // BATCH):
                idx = perm[i * BATCH : (i + 1) * BATCH]
                loss = train_step(model, optimizer, x[idx], y[idx])
            jax.block_until_ready(loss)
            hits = sum(int(correct(model, xt[i : i + EVAL_BATCH], yt[i : i + EVAL_BATCH]))
                       for i in range(0, len(xt), EVAL_BATCH))
            times.append(time.perf_counter() - t0)
        accs[name] = hits / len(xt)
        epoch_times.append(times)
    return accs, epoch_times, "nnx.jit step, optax.sgd"


def run_cli(inits, epochs, limit):
    """``optlab train`` once per initialisation, each in its own process."""
    exe = shutil.which("optlab")
    cmd0 = [exe] if exe else [sys.executable, "-m", "optlab.cli"]
    accs, epoch_times = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in inits:
            sets = [f"model.init={name}", f"train.epochs={epochs}", f"output.dir={tmp}", f"output.name={name}",
                    "output.plots=False"]
            if limit is not None:
                sets.append(f"data.limit_train={limit}")
            cmd = cmd0 + ["train", str(ROOT / "configs" / "mnist_convnet.py")] + [a for s in sets for a in ("--set", s)]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "CI": "1"})
            total = time.perf_counter() - t0
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
            accs[name] = float(re.search(r"final test accuracy ([0-9.]+)", out.stdout).group(1))
            # Per-epoch seconds from the run's log; the process start-up, data loading and compilation
            # are charged to the first epoch.
            import csv

            with open(pathlib.Path(tmp) / name / "metrics.csv") as f:
                secs = [float(r["seconds"]) for r in csv.DictReader(f)]
            epoch_times.append([total - sum(secs[1:])] + secs[1:])
    return accs, epoch_times, "one process per run, checkpoints on, plots off"


_TORCH_INITS = {
    "uniform": lambda nn, w: nn.init.uniform_(w, -0.1, 0.1),
    "normal": lambda nn, w: nn.init.normal_(w, 0.0, 0.1),
    "xavier_uniform": lambda nn, w: nn.init.xavier_uniform_(w),
    "xavier_normal": lambda nn, w: nn.init.xavier_normal_(w),
    "he_uniform": lambda nn, w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "he_normal": lambda nn, w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
}


def run_torch(inits, epochs, limit, threads=None):
    """The lectures' PyTorch loop, eager on the CPU, one run per initialisation."""
    import numpy as np
    import torch
    from torch import nn

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        x, y, xt, yt = _load_mnist(limit)
        to_nchw = lambda a: torch.tensor(a.transpose(0, 3, 1, 2), dtype=torch.float32) / 255  # noqa: E731
        x, xt = to_nchw(x), to_nchw(xt)
        y, yt = torch.tensor(y, dtype=torch.int64), torch.tensor(yt, dtype=torch.int64)
        accs, epoch_times = {}, []
        for name in inits:
            torch.manual_seed(0)
            net = nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(392, 10),
            )
            if name != "default":  # "default": PyTorch's own initialisation, biases included
                for layer in net:
                    if isinstance(layer, (nn.Conv2d, nn.Linear)):
                        _TORCH_INITS[name](nn, layer.weight)
                        nn.init.zeros_(layer.bias)
            opt = torch.optim.SGD(net.parameters(), lr=LR)
            times = []
            for _ in range(epochs):
                t0 = time.perf_counter()
                net.train()
                perm = torch.randperm(len(x))
                for i in range(len(x) // BATCH):
                    idx = perm[i * BATCH : (i + 1) * BATCH]
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                    loss.backward()
                    opt.step()
                net.eval()
                with torch.no_grad():
                    hits = sum(int((net(xt[i : i + EVAL_BATCH]).argmax(1) == yt[i : i + EVAL_BATCH]).sum())
                               for i in range(0, len(xt), EVAL_BATCH))
                times.append(time.perf_counter() - t0)
            accs[name] = hits / len(xt)
            epoch_times.append(times)
        return accs, epoch_times, f"{torch.get_num_threads()} thread(s)"
    finally:
        torch.set_num_threads(before)


# --- the table ---------------------------------------------------------------------------------


def extrapolate(epoch_times: list[list[float]], epochs: int, target: int) -> float:
    """Total seconds at ``target`` epochs: measured + (target - epochs) x median later epoch (per run).

    NaN after a single epoch: its time includes the start-up and compilation, so it would
    overstate every later epoch.
    """
    import statistics

    if epochs < 2 and target != epochs:
        return float("nan")
    total = 0.0
    for times in epoch_times:
        steady = statistics.median(times[1:]) if len(times) > 1 else 0.0
        total += sum(times) + (target - epochs) * steady
    return total


def main(argv=None) -> dict:
    args = parse_args(argv)
    shared = ROOT.parent / "shared" / "data"  # the datasets beside the project, where present
    if shared.is_dir():
        os.environ.setdefault("OPTLAB_DATA", str(shared))
    from optlab.train import set_cpu_devices

    set_cpu_devices(args.cpu_devices)  # before JAX starts
    import jax  # noqa: F401 - imported before any timing

    from benchmarks import _common as C
    from optlab.models import INIT_NAMES

    inits = list(INIT_NAMES) if args.inits is None else [s.strip() for s in args.inits.split(",") if s.strip()]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in contenders:
        if c not in CONTENDERS:
            raise ValueError(f"`--contenders` entry {c!r} must be one of {', '.join(CONTENDERS)}")
    skipped = {}
    try:
        import torch  # noqa: F401
    except ImportError:
        for c in ("torch", "torch1"):
            if c in contenders:
                contenders.remove(c)
                skipped[c] = "torch is not installed (pip install torch --index-url https://download.pytorch.org/whl/cpu)"

    runners = {
        "sweep": lambda: run_sweep(inits, args.epochs, args.limit_train, args.strategy),
        "flax": lambda: run_flax(inits, args.epochs, args.limit_train),
        "cli": lambda: run_cli(inits, args.epochs, args.limit_train),
        "torch": lambda: run_torch(inits, args.epochs, args.limit_train),
        "torch1": lambda: run_torch(inits, args.epochs, args.limit_train, threads=1),
    }
    env = C.environment()
    records = {c: [] for c in contenders}
    for r, order in enumerate(C.round_orders(contenders, args.rounds)):
        for c in order:
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            accs, epoch_times, note = runners[c]()
            seconds = time.perf_counter() - t0
            records[c].append({"seconds": seconds, "accuracies": accs, "epoch_times": epoch_times, "note": note,
                               "load": [load0, os.getloadavg()[0]],
                               "extrapolated": extrapolate(epoch_times, args.epochs, args.target_epochs)})
            print(f"round {r + 1} {c}: {seconds:.1f} s ({note}), load {load0:.1f} -> {os.getloadavg()[0]:.1f}; "
                  "test accuracy " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accs.items()), flush=True)
            if args.json:  # partial results survive an interrupted long run
                with open(args.json + ".partial", "w") as f:
                    json.dump({"environment": env, "args": vars(args), "records": records}, f, indent=1, default=str)

    def ratio(c, key):
        if "sweep" not in records:
            return float("nan"), 0.0
        return C.paired_ratio([x[key] for x in records[c]], [x[key] for x in records["sweep"]])

    rows = []
    for c in contenders:
        secs = [x["seconds"] for x in records[c]]
        est = [x["extrapolated"] for x in records[c]]
        per_member = C.median(secs) / len(inits)
        loads = [f"{x['load'][0]:.1f}-{x['load'][1]:.1f}" for x in records[c]]
        row = [c, records[c][0]["note"], f"{C.median(secs):.1f}", f"{C.spread_pct(secs):.0f}%", f"{per_member:.1f}",
               C.fmt_ratio(*ratio(c, "seconds"))]
        if args.target_epochs != args.epochs:
            row += [f"{C.median(est):.0f}" if est[0] == est[0] else "n/a (needs >= 2 epochs)",
                    C.fmt_ratio(*ratio(c, "extrapolated"))]
        rows.append(row + [", ".join(loads)])
    headers = ["contender", "how", f"seconds ({args.epochs} ep., median)", "spread", "s per member", "time / sweep"]
    if args.target_epochs != args.epochs:
        headers += [f"EXTRAPOLATED s at {args.target_epochs} ep.", f"extrap. time / sweep"]
    headers.append("load 1-min before-after, per round")
    data_note = "all 60,000" if args.limit_train is None else f"the first {args.limit_train}"
    tables = [C.table(headers, rows, title=(
        f"{len(inits)} initialisations x MNIST ConvNet x {args.epochs} epoch(s) ({data_note} training images), "
        f"{args.rounds} round(s)"))]
    acc_rows = [[name] + [f"{100 * C.median([x['accuracies'][name] for x in records[c]]):.2f}%" for c in contenders]
                for name in inits]
    tables.append(C.table(["init"] + contenders, acc_rows,
                          title=f"test accuracy after {args.epochs} epoch(s) (median over rounds)"))
    if skipped:
        tables.append("\n".join(f"skipped {c}: {why}" for c, why in skipped.items()))
    result = {"environment": env, "args": vars(args), "records": records, "skipped": skipped, "tables": tables}
    return C.emit(result, args.json)


if __name__ == "__main__":
    main()
