"""Record ``torch.optim`` trajectories for ``tests/test_torch_exact.py``.

Run from the repository root (torch is needed here only, never by the tests):

    /work/venv/bin/python tests/references/record_optimizers.py

Every case in ``CASES`` runs one ``torch.optim`` optimizer for ``STEPS`` steps
on a small parameter tree ``{"w": (5, 3), "b": (3,)}`` (float32) and records
the parameters after every step. The gradient comes from one of three
*problems*:

``random``
    a fixed, seeded stream of gradient arrays (stored in the npz, so the test
    feeds optlab exactly the same numbers), with about 5% exact zeros so that
    Rprop's "sign is zero" branch and AdaGrad's zero increments are exercised;
``quadratic``
    the gradient of the separable quadratic ``0.5 * sum(a * (x - c)**2)`` at
    the current parameters, ``a * (x - c)``, so the trajectory feeds back;
``rosenbrock``
    the gradient of the chained Rosenbrock function over the 18 parameters
    flattened (``w`` row-major, then ``b``), also at the current parameters.

Both feedback gradients are written elementwise in the order of operations
the test uses in ``jax.numpy`` (no autograd, no reductions), so the two
libraries compute bit-identical gradients from identical parameters.

A case may attach an ``lr_scheduler``; ``scheduler.step()`` follows every
``optimizer.step()`` (the usual per-iteration use), so the (t+1)-th update
uses the scheduler's value after t calls, which is ``schedule(t)`` in optlab.

Every float hyperparameter is rounded to float32 before torch sees it:
optlab stores hyperparameters as float32, and the comparison should measure
the update rules, not the two representations of, say, beta2 = 0.999.
torch runs its single-tensor code path (``foreach=False``), one thread.

Output: ``tests/references/optimizers.npz`` with

* ``init/<leaf>``: the initial parameters (float32);
* ``grads/<leaf>``: the random gradient stream, shape (STEPS, ...);
* ``quadratic/a/<leaf>``, ``quadratic/c/<leaf>``: the quadratic's curvatures and centre;
* ``<case id>/w``, ``<case id>/b``: the parameters after each step, (STEPS, ...);
* ``config``: JSON with the torch version, the case table and the default
  values of every recorded optimizer's constructor arguments
  (``inspect.signature``), for the defaults test.
"""

from __future__ import annotations

import inspect
import json
import pathlib
import warnings

import numpy as np
import torch
from torch.optim import lr_scheduler

OUT = pathlib.Path(__file__).resolve().parent / "optimizers.npz"
STEPS = 200
SHAPES = {"w": (5, 3), "b": (3,)}
SEED = 20240601


def case(case_id, cls, problem="random", scheduler=None, **kwargs):
    return {"id": case_id, "cls": cls, "kwargs": kwargs, "problem": problem, "scheduler": scheduler}


CASES = [
    # --- SGD -------------------------------------------------------------------------------
    case("sgd/plain", "SGD", lr=0.05),
    case("sgd/momentum", "SGD", lr=0.05, momentum=0.9),
    case("sgd/momentum-dampening", "SGD", lr=0.05, momentum=0.9, dampening=0.3),
    case("sgd/nesterov", "SGD", lr=0.05, momentum=0.9, nesterov=True),
    case("sgd/weight_decay", "SGD", lr=0.05, weight_decay=0.1),
    case("sgd/momentum-weight_decay", "SGD", lr=0.03, momentum=0.8, weight_decay=0.05),
    case("sgd/maximize", "SGD", lr=0.05, momentum=0.5, maximize=True),
    case("sgd/maximize-nesterov-wd", "SGD", lr=0.02, momentum=0.7, nesterov=True, weight_decay=0.01, maximize=True),
    # --- Adagrad ---------------------------------------------------------------------------
    case("adagrad/defaults", "Adagrad"),
    case("adagrad/lr_decay", "Adagrad", lr=0.1, lr_decay=0.01),
    case("adagrad/weight_decay", "Adagrad", lr=0.1, weight_decay=0.1),
    case("adagrad/initial_accumulator", "Adagrad", lr=0.1, initial_accumulator_value=0.5, eps=1e-6),
    case("adagrad/maximize-wd", "Adagrad", lr=0.1, weight_decay=0.1, maximize=True),
    # --- RMSprop ---------------------------------------------------------------------------
    case("rmsprop/defaults", "RMSprop"),
    case("rmsprop/centered", "RMSprop", lr=0.01, centered=True),
    case("rmsprop/momentum", "RMSprop", lr=0.01, momentum=0.9),
    case("rmsprop/weight_decay", "RMSprop", lr=0.01, weight_decay=0.1),
    case("rmsprop/centered-momentum", "RMSprop", lr=0.005, alpha=0.9, eps=1e-6, centered=True, momentum=0.8),
    case("rmsprop/maximize-centered-momentum-wd", "RMSprop", lr=0.005, centered=True, momentum=0.5, weight_decay=0.1,
         maximize=True),
    # --- Adam / AdamW ----------------------------------------------------------------------
    case("adam/defaults", "Adam"),
    case("adam/betas-eps", "Adam", lr=0.01, betas=(0.8, 0.99), eps=1e-6),
    case("adam/amsgrad", "Adam", lr=0.01, amsgrad=True),
    case("adam/weight_decay", "Adam", lr=0.01, weight_decay=0.1),
    case("adam/amsgrad-weight_decay", "Adam", lr=0.01, weight_decay=0.05, amsgrad=True),
    case("adamw/defaults", "AdamW"),
    case("adamw/weight_decay", "AdamW", lr=0.01, weight_decay=0.1),
    case("adamw/amsgrad", "AdamW", lr=0.01, weight_decay=0.05, amsgrad=True),
    case("adam/maximize-amsgrad-wd", "Adam", lr=0.01, weight_decay=0.05, amsgrad=True, maximize=True),
    case("adamw/maximize", "AdamW", lr=0.01, weight_decay=0.1, maximize=True),
    # --- Adadelta --------------------------------------------------------------------------
    case("adadelta/defaults", "Adadelta"),
    case("adadelta/weight_decay", "Adadelta", lr=0.5, rho=0.95, eps=1e-5, weight_decay=0.1),
    case("adadelta/maximize-wd", "Adadelta", lr=0.5, weight_decay=0.1, maximize=True),
    # --- Rprop -----------------------------------------------------------------------------
    case("rprop/defaults", "Rprop"),
    case("rprop/etas-step_sizes", "Rprop", lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-3, 0.2)),
    case("rprop/maximize", "Rprop", lr=0.05, maximize=True),
    # --- gradients that depend on the parameters -------------------------------------------
    case("quadratic/sgd-nesterov", "SGD", "quadratic", lr=0.1, momentum=0.9, nesterov=True),
    case("quadratic/sgd-dampening-wd", "SGD", "quadratic", lr=0.2, momentum=0.5, dampening=0.5, weight_decay=0.01),
    case("quadratic/adagrad", "Adagrad", "quadratic", lr=0.3, lr_decay=0.001),
    case("quadratic/rmsprop-centered-momentum", "RMSprop", "quadratic", lr=0.01, centered=True, momentum=0.5),
    case("quadratic/adam", "Adam", "quadratic", lr=0.05),
    case("quadratic/adamw-amsgrad", "AdamW", "quadratic", lr=0.05, weight_decay=0.1, amsgrad=True),
    case("quadratic/adadelta", "Adadelta", "quadratic", lr=1.0),
    case("quadratic/rprop", "Rprop", "quadratic"),
    case("rosenbrock/sgd-momentum", "SGD", "rosenbrock", lr=1e-4, momentum=0.9),
    case("rosenbrock/adam", "Adam", "rosenbrock", lr=0.01),
    case("rosenbrock/rmsprop", "RMSprop", "rosenbrock", lr=1e-3),
    case("rosenbrock/rprop", "Rprop", "rosenbrock", lr=1e-3),
    # --- with a learning-rate scheduler attached -------------------------------------------
    case("scheduled/sgd-momentum-steplr", "SGD",
         scheduler={"cls": "StepLR", "kwargs": {"step_size": 30, "gamma": 0.5}}, lr=0.1, momentum=0.9),
    case("scheduled/adam-cosine", "Adam",
         scheduler={"cls": "CosineAnnealingLR", "kwargs": {"T_max": STEPS, "eta_min": 1e-4}}, lr=0.01),
    # OneCycleLR cycles SGD's momentum between base_momentum and max_momentum too.
    case("scheduled/sgd-onecycle", "SGD",
         scheduler={"cls": "OneCycleLR", "kwargs": {"max_lr": 0.1, "total_steps": STEPS}}, lr=0.1, momentum=0.9),
    # ... and Adam's beta1.
    case("scheduled/adam-onecycle-beta1", "Adam",
         scheduler={"cls": "OneCycleLR", "kwargs": {"max_lr": 0.01, "total_steps": STEPS, "pct_start": 0.2}}, lr=0.01),
    case("scheduled/rosenbrock-sgd-onecycle", "SGD", "rosenbrock",
         scheduler={"cls": "OneCycleLR", "kwargs": {"max_lr": 2e-4, "total_steps": STEPS, "anneal_strategy": "linear"}},
         lr=2e-4, momentum=0.9),
]

RECORDED_CLASSES = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adadelta", "Rprop"]


def f32(x):
    """Round every float of a (nested) hyperparameter to float32; ints, bools and strings stay."""
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, float):
        return float(np.float32(x))
    if isinstance(x, (list, tuple)):
        return [f32(v) for v in x]
    if isinstance(x, dict):
        return {k: f32(v) for k, v in x.items()}
    raise TypeError(f"unexpected hyperparameter {x!r}")


def make_data(rng: np.random.Generator) -> dict[str, np.ndarray]:
    data = {}
    for name, shape in SHAPES.items():
        data[f"init/{name}"] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    for name, shape in SHAPES.items():
        g = rng.standard_normal((STEPS, *shape)) + 0.2  # a small drift so momentum has a direction
        g[rng.random(g.shape) < 0.05] = 0.0
        data[f"grads/{name}"] = g.astype(np.float32)
    for name, shape in SHAPES.items():
        data[f"quadratic/a/{name}"] = rng.uniform(0.5, 3.0, shape).astype(np.float32)
        data[f"quadratic/c/{name}"] = rng.standard_normal(shape).astype(np.float32)
    return data


def quadratic_grad(params, data):
    return {k: torch.from_numpy(data[f"quadratic/a/{k}"]) * (p - torch.from_numpy(data[f"quadratic/c/{k}"]))
            for k, p in params.items()}


def rosenbrock_grad(params):
    """Gradient of sum_i 100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2, elementwise (test mirrors it)."""
    x = torch.cat([params["w"].reshape(-1), params["b"]])
    head = x[:-1]
    d = x[1:] - head * head
    g_head = -400.0 * head * d - 2.0 * (1.0 - head)
    zero = torch.zeros(1, dtype=x.dtype)
    g = torch.cat([g_head, zero]) + torch.cat([zero, 200.0 * d])
    n = params["w"].numel()
    return {"w": g[:n].reshape(params["w"].shape), "b": g[n:]}


def run(c: dict, data: dict) -> dict[str, np.ndarray]:
    params = {k: torch.nn.Parameter(torch.from_numpy(data[f"init/{k}"].copy())) for k in SHAPES}
    kwargs = dict(c["kwargs"])
    for k in ("betas", "etas", "step_sizes"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    optimizer = getattr(torch.optim, c["cls"])(list(params.values()), foreach=False, **kwargs)
    scheduler = None
    if c["scheduler"] is not None:
        scheduler = getattr(lr_scheduler, c["scheduler"]["cls"])(optimizer, **c["scheduler"]["kwargs"])
    trajectory = {k: [] for k in SHAPES}
    for t in range(STEPS):
        with torch.no_grad():
            current = {k: p.detach().clone() for k, p in params.items()}
            if c["problem"] == "random":
                grads = {k: torch.from_numpy(data[f"grads/{k}"][t].copy()) for k in SHAPES}
            elif c["problem"] == "quadratic":
                grads = quadratic_grad(current, data)
            elif c["problem"] == "rosenbrock":
                grads = rosenbrock_grad(current)
            else:
                raise ValueError(c["problem"])
        for k, p in params.items():
            p.grad = grads[k].to(torch.float32)
        optimizer.step()
        if scheduler is not None and t + 1 < STEPS:
            scheduler.step()
        for k, p in params.items():
            trajectory[k].append(p.detach().numpy().copy())
    out = {k: np.stack(v).astype(np.float32) for k, v in trajectory.items()}
    for k, v in out.items():
        if not np.all(np.isfinite(v)):
            raise RuntimeError(f"case {c['id']}: non-finite parameters in {k}")
    return out


def torch_defaults() -> dict:
    """Constructor defaults of each recorded class, as JSON-able values (None when required)."""
    out = {}
    for name in RECORDED_CLASSES:
        sig = inspect.signature(getattr(torch.optim, name).__init__)
        d = {}
        for p in sig.parameters.values():
            if p.name in ("self", "params"):
                continue
            v = p.default
            if v is inspect.Parameter.empty:
                v = None
            elif isinstance(v, tuple):
                v = list(v)
            d[p.name] = v
        out[name] = d
    return out


def main() -> None:
    warnings.simplefilter("error")  # a torch warning means the recording is wrong
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    data = make_data(rng)
    arrays = dict(data)
    table = []
    for c in CASES:
        c = f32(c)
        for name, values in run(c, data).items():
            arrays[f"{c['id']}/{name}"] = values
        table.append(c)
    config = {
        "torch": torch.__version__, "steps": STEPS, "shapes": SHAPES, "cases": table, "defaults": torch_defaults(),
    }
    arrays["config"] = np.asarray(json.dumps(config))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {len(table)} cases to {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
