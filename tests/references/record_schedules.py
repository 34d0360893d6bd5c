"""Record PyTorch learning-rate scheduler values for ``tests/test_schedules.py``.

Run from the repository root (torch is needed here only, never by the tests):

    /work/venv/bin/python tests/references/record_schedules.py

For every configuration in ``CASES`` a dummy optimizer (SGD with momentum 0.9,
or Adam where asked) gets the scheduler, and we record
``optimizer.param_groups[0]['lr']`` (and the momentum, or Adam's beta1, where
the scheduler cycles it) after 0, 1, 2, ... calls of ``scheduler.step()``.
That is optlab's step convention: ``schedule(t)`` is the value used by the
(t+1)-th update. ``steps_per_epoch`` records epoch-stepped use instead: the
value at iteration t, with ``scheduler.step()`` called once every
``steps_per_epoch`` iterations.

optlab stores schedule parameters as float32. A decay factor raised to the
power t multiplies its float32 representation error by t (float32(0.95)**200
is 2.5e-6 away from 0.95**200), so every ``gamma`` is rounded to float32
before torch sees it: the comparison then measures the formulas, not that
representation. Other parameters enter linearly and are passed as written
(rounding them would only move torch away from the intended value: float32(0.45)
* 200 is 89.9999976 in float64, while both 0.45 * 200 in float64 and
float32(0.45) * 200 in float32 give 90).

Output: ``tests/references/schedules.npz`` with one float64 array per recorded
series, named ``"<case id>/lr"`` and ``"<case id>/momentum"``, and the table
itself as a JSON string under ``"config"``.
"""

from __future__ import annotations

import json
import math
import pathlib
import warnings

import numpy as np
import torch
from torch.optim import lr_scheduler as sched

OUT = pathlib.Path(__file__).resolve().parent / "schedules.npz"
STEPS = 200

# LambdaLR needs a Python function; the test re-implements each of these in jnp
# under the same name (with constants exact in float32: a jnp ``0.98 ** t``
# would raise float32(0.98) to the power t, not 0.98).
LAMBDAS = {
    "exp31/32": lambda t: 0.96875**t,
    "rsqrt_warmup10": lambda t: min((t + 1) / 10, math.sqrt(10 / (t + 1))),
}


def spec(cls: str, **kwargs) -> dict:
    return {"cls": cls, "kwargs": kwargs}


# (id, lr given to the optimizer, scheduler spec, extra options)
CASES = [
    ("step/30x0.1", 0.1, spec("StepLR", step_size=30, gamma=0.1), {}),
    ("step/7x0.5", 1.0, spec("StepLR", step_size=7, gamma=0.5), {}),
    ("step/1x0.97", 0.05, spec("StepLR", step_size=1, gamma=0.97), {}),
    ("multistep/30-80-150", 0.1, spec("MultiStepLR", milestones=[30, 80, 150], gamma=0.1), {}),
    ("multistep/1-2-50", 0.3, spec("MultiStepLR", milestones=[1, 2, 50], gamma=0.5), {}),
    ("multistep/0-100", 0.2, spec("MultiStepLR", milestones=[0, 100], gamma=0.25), {}),
    ("exponential/0.95", 0.1, spec("ExponentialLR", gamma=0.95), {}),
    ("exponential/0.99", 1.0, spec("ExponentialLR", gamma=0.99), {}),
    ("exponential/0.9", 0.5, spec("ExponentialLR", gamma=0.9), {}),
    # Torch's recursive CosineAnnealingLR keeps oscillating past T_max: record several periods.
    ("cosine/T50", 0.1, spec("CosineAnnealingLR", T_max=50), {}),
    ("cosine/T66-min0.01", 1.0, spec("CosineAnnealingLR", T_max=66, eta_min=0.01), {}),
    ("cosine/T200-min1e-3", 0.1, spec("CosineAnnealingLR", T_max=200, eta_min=1e-3), {}),
    ("cosine/T7", 0.3, spec("CosineAnnealingLR", T_max=7), {}),
    ("sgdr/T10", 0.1, spec("CosineAnnealingWarmRestarts", T_0=10), {}),
    ("sgdr/T5x2-min1e-3", 0.1, spec("CosineAnnealingWarmRestarts", T_0=5, T_mult=2, eta_min=1e-3), {}),
    ("sgdr/T3x3", 1.0, spec("CosineAnnealingWarmRestarts", T_0=3, T_mult=3), {}),
    ("sgdr/T1x2", 0.05, spec("CosineAnnealingWarmRestarts", T_0=1, T_mult=2), {}),
    ("sgdr/T1x1", 0.05, spec("CosineAnnealingWarmRestarts", T_0=1, T_mult=1), {}),
    ("linear/warmup5", 0.1, spec("LinearLR", start_factor=1 / 3, end_factor=1.0, total_iters=5), {}),
    ("linear/decay100", 0.2, spec("LinearLR", start_factor=1.0, end_factor=0.0, total_iters=100), {}),
    ("linear/0.5to0.1", 0.1, spec("LinearLR", start_factor=0.5, end_factor=0.1, total_iters=37), {}),
    ("poly/100", 0.1, spec("PolynomialLR", total_iters=100, power=1.0), {}),
    ("poly/150p2", 0.1, spec("PolynomialLR", total_iters=150, power=2.0), {}),
    ("poly/60p0.5", 1.0, spec("PolynomialLR", total_iters=60, power=0.5), {}),
    ("cyclic/triangular-lr-only", 0.001,
     spec("CyclicLR", base_lr=0.001, max_lr=0.1, step_size_up=20, cycle_momentum=False), {}),
    ("cyclic/triangular", 0.001, spec("CyclicLR", base_lr=0.001, max_lr=0.1, step_size_up=20), {}),
    ("cyclic/triangular2", 0.01,
     spec("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=10, step_size_down=30, mode="triangular2"), {}),
    ("cyclic/exp_range", 0.001,
     spec("CyclicLR", base_lr=0.001, max_lr=0.01, step_size_up=15, mode="exp_range", gamma=0.99), {}),
    ("cyclic/exp_range-asym", 0.01,
     spec("CyclicLR", base_lr=0.01, max_lr=0.05, step_size_up=7, step_size_down=3, mode="exp_range",
          gamma=0.995, base_momentum=0.85, max_momentum=0.95), {}),
    ("onecycle/default", 0.1, spec("OneCycleLR", max_lr=0.1, total_steps=200), {}),
    ("onecycle/three-phase", 0.5, spec("OneCycleLR", max_lr=0.5, total_steps=200, three_phase=True), {}),
    ("onecycle/linear", 0.1,
     spec("OneCycleLR", max_lr=0.1, total_steps=150, pct_start=0.25, anneal_strategy="linear",
          div_factor=10.0, final_div_factor=100.0), {"steps": 150}),
    ("onecycle/three-phase-linear", 1.0,
     spec("OneCycleLR", max_lr=1.0, total_steps=200, pct_start=0.45, anneal_strategy="linear",
          three_phase=True, base_momentum=0.8, max_momentum=0.9), {}),
    ("onecycle/adam-beta1", 0.003,
     spec("OneCycleLR", max_lr=0.003, total_steps=120, pct_start=0.1), {"optimizer": "Adam", "steps": 120}),
    ("lambda/exp31/32", 0.1, spec("LambdaLR", lr_lambda="exp31/32"), {}),
    ("lambda/rsqrt_warmup10", 0.5, spec("LambdaLR", lr_lambda="rsqrt_warmup10"), {}),
    ("sequential/linear10+cosine190", 0.1,
     {"cls": "SequentialLR", "kwargs": {"milestones": [10]},
      "children": [spec("LinearLR", start_factor=0.1, end_factor=1.0, total_iters=10),
                   spec("CosineAnnealingLR", T_max=190, eta_min=1e-4)]}, {}),
    ("sequential/linear20+exp", 0.5,
     {"cls": "SequentialLR", "kwargs": {"milestones": [20]},
      "children": [spec("LinearLR", start_factor=0.01, end_factor=1.0, total_iters=20),
                   spec("ExponentialLR", gamma=0.98)]}, {}),
    ("sequential/truncated-warmup+step+cosine", 0.2,
     {"cls": "SequentialLR", "kwargs": {"milestones": [5, 60]},
      "children": [spec("LinearLR", start_factor=0.2, end_factor=1.0, total_iters=10),
                   spec("StepLR", step_size=20, gamma=0.5),
                   spec("CosineAnnealingLR", T_max=140)]}, {}),
    ("per-epoch/step3x0.5-spe7", 0.1, spec("StepLR", step_size=3, gamma=0.5), {"steps_per_epoch": 7}),
    ("per-epoch/cosine20-spe10", 0.1, spec("CosineAnnealingLR", T_max=20, eta_min=1e-3), {"steps_per_epoch": 10}),
]


def round_gammas(x):
    """Round every ``gamma`` of a (nested) scheduler spec to float32."""
    if isinstance(x, list):
        return [round_gammas(v) for v in x]
    if isinstance(x, dict):
        return {k: float(np.float32(v)) if k == "gamma" else round_gammas(v) for k, v in x.items()}
    return x


def build(optimizer, s: dict):
    kwargs = dict(s["kwargs"])
    if s["cls"] == "SequentialLR":
        children = [build(optimizer, c) for c in s["children"]]
        return sched.SequentialLR(optimizer, children, **kwargs)
    if s["cls"] == "LambdaLR":
        kwargs["lr_lambda"] = LAMBDAS[kwargs["lr_lambda"]]
    return getattr(sched, s["cls"])(optimizer, **kwargs)


def momentum_of(group) -> float:
    return group["betas"][0] if "betas" in group else group["momentum"]


def record(lr: float, s: dict, opts: dict) -> dict[str, np.ndarray]:
    param = torch.nn.Parameter(torch.zeros(1))
    if opts.get("optimizer") == "Adam":
        optimizer = torch.optim.Adam([param], lr=lr)
    else:
        optimizer = torch.optim.SGD([param], lr=lr, momentum=0.9)
    scheduler = build(optimizer, s)
    steps = opts.get("steps", STEPS)
    per_epoch = opts.get("steps_per_epoch", 1)
    cycles_momentum = getattr(scheduler, "cycle_momentum", False)
    lrs, moms = [], []
    for t in range(steps):
        group = optimizer.param_groups[0]
        lrs.append(float(group["lr"]))
        moms.append(float(momentum_of(group)))
        optimizer.step()  # torch warns when the scheduler steps before the optimizer
        if (t + 1) % per_epoch == 0 and t + 1 < steps:
            scheduler.step()
    out = {"lr": np.asarray(lrs, dtype=np.float64)}
    if cycles_momentum:
        out["momentum"] = np.asarray(moms, dtype=np.float64)
    return out


def main() -> None:
    warnings.simplefilter("error")  # a torch warning means the recording is wrong
    arrays, table = {}, []
    for case_id, lr, s, opts in CASES:
        s = round_gammas(s)
        series = record(lr, s, opts)
        for name, values in series.items():
            arrays[f"{case_id}/{name}"] = values
        table.append({"id": case_id, "lr": lr, "scheduler": s, "options": opts, "series": sorted(series)})
    arrays["config"] = np.asarray(json.dumps({"torch": torch.__version__, "cases": table}))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {len(table)} cases ({len(arrays) - 1} series) to {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
