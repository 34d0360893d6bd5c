"""Training steps per second: optlab.train against a hand-written Flax + optax loop and PyTorch eager.

Two of the lectures' models, with the optimizers of their configs:

* MNIST ConvNet (``configs/mnist_convnet.py``): 28x28x1, batch 128, SGD lr 0.05;
* CIFAR-10 CNN (``configs/cifar10_cnn.py``): 32x32x3, channels 32-64-128,
  BatchNorm before the ReLU, dropout 0.2, batch 128, Adam lr 1e-3.

Candidates, one process:

* ``optlab.train step``: ``make_steps`` + ``jax.jit(train_step, donate_argnums=0)``,
  what ``lr_find`` runs (its metrics, norms included, are computed every step);
* ``... + flatten``: the same with the optimizer wrapped in ``flatten``;
* ``optlab.train epoch``: ``make_train_epoch``, the ``lax.scan`` over shuffled
  batches that ``fit`` runs (per-step time = epoch time / batches);
* ``flax+optax``: a plain hand-written loop: ``nnx.split``/``nnx.merge``,
  ``jax.value_and_grad``, ``optax`` update, jitted with donated buffers;
* ``torch eager``: the same architecture in PyTorch (NCHW), ``torch.optim``
  with its defaults, ``zero_grad/forward/backward/step``; timed in a phase of
  its own (its OpenMP threads and XLA's thread pool compete when interleaved),
  with 1 intra-op thread and with one per core (the faster one is the
  reference of the "vs torch" column); when JAX runs on a GPU and torch sees
  CUDA, once, on the GPU.

The batch is synthetic (fixed random uint8 images and labels already on the
device; scaled by 1/255 inside the step), without augmentation, so the data
pipeline is not measured. Every JAX candidate first runs one step under
``jax.transfer_guard("disallow")``: no host round trip inside the step. JAX candidates are interleaved round by round and
their ratios to ``flax+optax`` are paired (median of per-round ratios); the
ratio to torch is median over median. Higher steps/s is better.

Run: ``python benchmarks/train_step.py`` (``--quick`` for a smoke run).
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
from optlab.models import CNN, ConvNet
from optlab.train import (
    choose_epoch_loop,
    init_state,
    make_steps,
    make_train_epoch,
    make_train_epoch_stepwise,
)
from optlab.transforms._flat import flatten

from _common import (
    base_parser,
    calibrate,
    copy_tree,
    emit,
    environment,
    fmt_ratio,
    interleaved,
    median,
    paired_ratio,
    spread_pct,
    table,
    threaded_runner,
    torch_device,
)


def preprocess(x):
    return x.astype(jnp.float32) / 255.0


def cross_entropy(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


# --- the models, in Flax (optlab.models) and in PyTorch --------------------------------------


def workloads(quick: bool) -> dict:
    batch = 8 if quick else 128
    channels = (4, 8) if quick else (32, 64, 128)
    return {
        "MNIST ConvNet": {
            "model": lambda: ConvNet(rngs=nnx.Rngs(0)),
            "shape": (batch, 28, 28, 1),
            "optlab": lambda: optlab.sgd(0.05),
            "optax": lambda: optax.sgd(0.05),
            "torch": ("convnet", "SGD", {"lr": 0.05}),
        },
        "CIFAR-10 CNN": {
            "model": lambda: CNN(channels=channels, batchnorm="before", dropout=0.2, rngs=nnx.Rngs(0)),
            "shape": (batch, 32, 32, 3),
            "optlab": lambda: optlab.adam(1e-3),
            "optax": lambda: optax.adam(1e-3),
            "torch": ("cnn", "Adam", {"lr": 1e-3}, channels),
        },
    }


def torch_model(kind: str, channels=None):
    import torch.nn as nn

    if kind == "convnet":
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(7 * 7 * 8, 10),
        )  # fmt: skip
    layers, c_in = [], 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c, momentum=0.1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(c_in, 10))


# --- runners ---------------------------------------------------------------------------------


def optlab_step_runner(work, images, labels, wrap=lambda t: t):
    tx = wrap(work["optlab"]())
    graphdef, state = init_state(work["model"](), tx, 0)
    train_step, _ = make_steps(graphdef, tx, preprocess=preprocess)
    step = jax.jit(train_step, donate_argnums=0)
    box = [state]

    def run(n: int) -> None:
        # The metrics (loss, accuracy, three global norms) stay outputs, as in fit and lr_find.
        s = box[0]
        for _ in range(n):
            s, metrics = step(s, images, labels)
        jax.block_until_ready((s, metrics))
        box[0] = s

    return run


def optlab_epoch_runner(work, images, labels, batches: int):
    """``run(n)``: n whole epochs of ``batches`` steps each, as `fit` runs them.

    The loop is what ``train.loop="auto"`` picks (`choose_epoch_loop`): one
    ``lax.scan`` per epoch, or a Python loop over one jitted step for models
    with XLA convolutions on the CPU. Returns ``(run, loop)``.
    """
    tx = work["optlab"]()
    graphdef, state = init_state(work["model"](), tx, 0)
    train_step, _ = make_steps(graphdef, tx, preprocess=preprocess)
    data_x = jnp.concatenate([images] * batches)
    data_y = jnp.concatenate([labels] * batches)
    batch = images.shape[0]
    loop = choose_epoch_loop("auto", train_step, state, data_x, data_y, batch)
    if loop == "scan":
        epoch = jax.jit(make_train_epoch(train_step, batch), donate_argnums=0)
    else:
        epoch = make_train_epoch_stepwise(train_step, batch)
    # The epoch number stays on the device (a host scalar per epoch would trip the transfer guard).
    box, next_epoch = [state, jnp.zeros((), jnp.int32)], jax.jit(lambda e: e + 1)

    def run(n: int) -> None:
        s, e = box
        for _ in range(n):
            s, metrics = epoch(s, data_x, data_y, e)
            e = next_epoch(e)
        jax.block_until_ready((s, metrics))
        box[:] = [s, e]

    return run, loop


def flax_optax_runner(work, images, labels):
    """The plain loop a Flax user writes."""
    graphdef, params, rest = nnx.split(work["model"](), nnx.Param, ...)
    tx = work["optax"]()
    opt_state = tx.init(params)

    def step(params, rest, opt_state, x, y):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            loss = cross_entropy(model(preprocess(x), train=True), y)
            return loss, nnx.split(model, nnx.Param, ...)[2]

        (_, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    return threaded_runner(step, copy_tree((params, rest, opt_state)), images, labels)


def torch_runner(work, images, labels, device: str = "cpu"):
    try:
        import torch
    except ImportError:
        return None
    kind, cls, kwargs, *rest = work["torch"]
    torch.manual_seed(0)
    model = torch_model(kind, *rest).to(device)
    model.train()
    opt = getattr(torch.optim, cls)(model.parameters(), **kwargs)
    x_u8 = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(np.array(labels)).long().to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    # CUDA kernels run asynchronously: a block of steps is timed to its end, as JAX's is.
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_u8.float() / 255.0), y)
            loss.backward()
            opt.step()
        sync()

    return run


def time_torch(work, images, labels, rounds, target_s) -> dict:
    """PyTorch with one intra-op thread and with one per core, each in its own phase (on the GPU
    when JAX runs on one: `torch_device`).

    On a machine shared with other jobs, OpenMP's barriers can make the multi-threaded
    run far slower than the single-threaded one; both are reported and the faster is
    the reference of the "vs torch" column.
    """
    device = torch_device()
    if device is None:
        return {}
    if device == "cuda":
        return {"torch eager (cuda)": timed({"t": torch_runner(work, images, labels, device)}, rounds, target_s)["t"]}
    import torch

    before, out = torch.get_num_threads(), {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        run = torch_runner(work, images, labels)
        out[f"torch eager ({threads} thread{'s' if threads > 1 else ''})"] = timed({"t": run}, rounds, target_s)["t"]
    torch.set_num_threads(before)
    return out


def timed(runners: dict, rounds: int, target_s: float) -> dict:
    for run in runners.values():
        run(2)
    number = {k: calibrate(r, target_s, max_number=200) for k, r in runners.items()}
    return interleaved(runners, rounds, number, warmup=1)


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--workloads", default=None, help="comma-separated subset of: MNIST ConvNet, CIFAR-10 CNN")
    args = parser.parse_args(argv)
    all_work = workloads(args.quick)
    selected = args.workloads.split(",") if args.workloads else list(all_work)
    unknown = sorted(set(selected) - set(all_work))
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(all_work)}")
    rounds = args.rounds or (2 if args.quick else 7)
    target_s = 0.01 if args.quick else 0.5
    batches = 2 if args.quick else 20
    rows, records = [], []
    for name in selected:
        work = all_work[name]
        rng = np.random.default_rng(0)
        images = jnp.asarray(rng.integers(0, 256, work["shape"], dtype=np.uint8))
        labels = jnp.asarray(rng.integers(0, 10, work["shape"][0]), jnp.int32)
        runners = {
            "flax+optax": flax_optax_runner(work, images, labels),
            "optlab.train step": optlab_step_runner(work, images, labels),
            "optlab.train step + flatten": optlab_step_runner(work, images, labels, flatten),
        }
        epoch_run, loop = optlab_epoch_runner(work, images, labels, batches)
        epoch_key = f"optlab.train epoch ({loop})"
        runners[epoch_key] = epoch_run
        for run in runners.values():
            run(1)  # compile outside the guard
            # A step that moved data between host and device implicitly would raise here.
            with jax.transfer_guard("disallow"):
                run(1)
        times = timed(runners, rounds, target_s)
        times[epoch_key] = [t / batches for t in times[epoch_key]]  # per step
        torch_times = {} if args.no_torch else time_torch(work, images, labels, rounds, target_s)
        times.update(torch_times)
        base = times["flax+optax"]
        torch_t = min(torch_times.values(), key=median) if torch_times else None
        rec = {"workload": name, "batch": work["shape"][0]}
        for k, ts in times.items():
            sps = [1.0 / t for t in ts]
            rec[k] = {"steps_per_s": median(sps), "spread": spread_pct(sps), "times": ts}
            vs_flax = paired_ratio(base, ts) if k in runners else (median(base) / median(ts), None)
            vs_torch = median(torch_t) / median(ts) if torch_t else float("nan")
            rec[k]["speed_vs_flax_optax"], rec[k]["speed_vs_torch"] = vs_flax, vs_torch
            rows.append(
                [name, k, f"{median(sps):.1f}", f"{spread_pct(sps):.0f}%", fmt_ratio(*vs_flax), fmt_ratio(vs_torch)]
            )
        records.append(rec)
    title = (
        f"Training steps per second on the {jax.default_backend().upper()} (synthetic fixed batch, no augmentation), "
        f"median of {rounds} rounds; "
        "speed ratios > 1 mean faster than the reference; every JAX step ran once under "
        'jax.transfer_guard("disallow")'
    )
    headers = ["workload", "implementation", "steps/s", "spread (IQR)", "speed vs flax+optax", "speed vs torch eager"]
    return emit({"environment": environment(), "records": records, "tables": [table(headers, rows, title)]}, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
