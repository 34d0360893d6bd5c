"""Tests for `optlab.schedules`.

1. Values against PyTorch's ``torch.optim.lr_scheduler``, recorded by
   ``tests/references/record_schedules.py`` into ``schedules.npz``.
2. Closed forms (numpy float64) for the schedules torch lacks.
3. jit: one trace for many steps and for new parameter values.
4. vmap over each schedule's main parameter equals one-by-one evaluation.
5. Bad arguments raise early, naming the argument.
6. Pytree round trip and repr.
"""

from __future__ import annotations

import doctest
import json
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optlab.schedules as S
from optlab.schedules import _schedules

REFERENCES = pathlib.Path(__file__).resolve().parent / "references"
with np.load(REFERENCES / "schedules.npz") as _npz:
    RECORDED = {name: _npz[name] for name in _npz.files}
TORCH_CASES = json.loads(str(RECORDED.pop("config")))["cases"]

# float32 round-off: about 12 ulps relative, and an absolute floor far below
# any recorded value that is not an exact zero of the curve. The worst case
# recorded (9e-7) is a three-phase one-cycle near its phase boundary
# 2 * pct_start * total_steps - 2, where float32(0.3) * 200 is off by 2.4e-6
# steps; everything else agrees to 4e-7.
RTOL = 1.5e-6
ATOL = 1e-12


def f32(x) -> float:
    """A hyperparameter as optlab stores it: float32."""
    return float(np.float32(x))


_jit_call = jax.jit(lambda schedule, step: schedule(step))


# --------------------------------------------------------------------------
# 1. PyTorch references

# The LambdaLR functions of the recorder, re-implemented in jnp.
LAMBDAS = {
    "exp31/32": lambda t: 0.96875**t,
    "rsqrt_warmup10": lambda t: jnp.minimum((t + 1) / 10, jnp.sqrt(10 / (t + 1))),
}


def _from_torch(spec: dict, lr: float) -> dict:
    """The optlab schedules for one torch scheduler spec: {"lr": ..., maybe "momentum": ...}."""
    cls, kw = spec["cls"], spec["kwargs"]
    if cls == "StepLR":
        return {"lr": S.step_decay(lr, kw["step_size"], kw.get("gamma", 0.1))}
    if cls == "MultiStepLR":
        return {"lr": S.multistep(lr, kw["milestones"], kw.get("gamma", 0.1))}
    if cls == "ExponentialLR":
        return {"lr": S.exponential(lr, kw["gamma"])}
    if cls == "CosineAnnealingLR":
        return {"lr": S.cosine(lr, kw["T_max"], kw.get("eta_min", 0.0))}
    if cls == "CosineAnnealingWarmRestarts":
        return {"lr": S.cosine_warm_restarts(lr, kw["T_0"], kw.get("T_mult", 1), kw.get("eta_min", 0.0))}
    if cls == "LinearLR":
        return {"lr": S.linear(lr * kw["start_factor"], lr * kw["end_factor"], kw["total_iters"])}
    if cls == "PolynomialLR":
        return {"lr": S.polynomial(lr, kw["total_iters"], kw["power"])}
    if cls == "LambdaLR":
        return {"lr": S.lambda_lr(lr, LAMBDAS[kw["lr_lambda"]])}
    if cls == "CyclicLR":
        cycle = {k: kw[k] for k in ("step_size_up", "step_size_down", "mode", "gamma") if k in kw}
        return {
            "lr": S.cyclic(kw["base_lr"], kw["max_lr"], **cycle),
            "momentum": S.cyclic_momentum(kw.get("base_momentum", 0.8), kw.get("max_momentum", 0.9), **cycle),
        }
    if cls == "OneCycleLR":
        lr_schedule, momentum = S.one_cycle(**kw)
        return {"lr": lr_schedule, "momentum": momentum}
    if cls == "SequentialLR":
        children = [_from_torch(child, lr)["lr"] for child in spec["children"]]
        return {"lr": S.join(children, kw["milestones"])}
    raise AssertionError(f"no optlab equivalent listed for {cls}")


def _torch_series():
    for case in TORCH_CASES:
        for series in case["series"]:
            yield pytest.param(case, series, id=f"{case['id']}/{series}")


def test_reference_table_covers_every_torch_scheduler():
    classes = set()

    def collect(spec):
        classes.add(spec["cls"])
        for child in spec.get("children", []):
            collect(child)

    for case in TORCH_CASES:
        collect(case["scheduler"])
    assert classes == {
        "StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts",
        "LinearLR", "PolynomialLR", "CyclicLR", "OneCycleLR", "LambdaLR", "SequentialLR",
    }
    assert any("steps_per_epoch" in case["options"] for case in TORCH_CASES)
    assert sum(len(case["series"]) for case in TORCH_CASES) == len(RECORDED)


@pytest.mark.parametrize("case, series", list(_torch_series()))
def test_matches_torch(case, series):
    expected = RECORDED[f"{case['id']}/{series}"]
    schedule = _from_torch(case["scheduler"], case["lr"])[series]
    if "steps_per_epoch" in case["options"]:
        schedule = S.per_epoch(schedule, case["options"]["steps_per_epoch"])
    steps = np.arange(len(expected))
    got = np.asarray(schedule(steps), dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    # Scalar calls (the jitted optimizer path) agree with the vectorized one.
    for t in (0, len(expected) // 2, len(expected) - 1):
        np.testing.assert_allclose(float(schedule(t)), expected[t], rtol=RTOL, atol=ATOL)


def test_one_cycle_holds_final_value_after_total_steps():
    # Torch raises past total_steps; optlab keeps the last value.
    lr, momentum = S.one_cycle(0.1, total_steps=50)
    final = 0.1 / 25.0 / 1e4
    np.testing.assert_allclose(np.asarray(lr(np.arange(49, 80))), final, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(momentum(np.arange(49, 80))), 0.95, rtol=RTOL)


# --------------------------------------------------------------------------
# 2. Closed forms for schedules torch does not have

t64 = np.arange(300, dtype=np.float64)

CLOSED_FORMS = [
    ("constant", lambda: S.constant(0.3), lambda t: np.full_like(t, f32(0.3))),
    ("constant-negative", lambda: S.constant(-2.0), lambda t: np.full_like(t, -2.0)),
    ("exp_decay", lambda: S.exp_decay(0.1, 0.02), lambda t: f32(0.1) * np.exp(-f32(0.02) * t)),
    ("exp_decay-k0", lambda: S.exp_decay(0.5, 0.0), lambda t: np.full_like(t, 0.5)),
    ("staircase_exponential-smooth", lambda: S.staircase_exponential(0.1, 0.5, 30),
     lambda t: f32(0.1) * 0.5 ** (t / 30)),
    ("staircase_exponential-staircase", lambda: S.staircase_exponential(0.1, 0.7, 25, staircase=True),
     lambda t: f32(0.1) * f32(0.7) ** np.floor(t / 25)),
    ("halving", lambda: S.halving(1.0, 40), lambda t: 2.0 ** -np.floor(t / 40)),
    ("halving-every1", lambda: S.halving(0.1, 1), lambda t: f32(0.1) * 2.0**-t),
    ("inverse_time", lambda: S.inverse_time(0.1, 0.05), lambda t: f32(0.1) / (1 + f32(0.05) * t)),
    ("linear-decay", lambda: S.linear(0.1, 0.001, 150),
     lambda t: f32(0.1) + (f32(0.001) - f32(0.1)) * np.minimum(t, 150) / 150),
    ("linear-increase", lambda: S.linear(0.0, 0.3, 77), lambda t: f32(0.3) * np.minimum(t, 77) / 77),
    ("linear-zero-steps", lambda: S.linear(1.0, 0.25, 0), lambda t: np.full_like(t, 0.25)),
    ("linear_warmup", lambda: S.linear_warmup(0.01, 1.0, 100),
     lambda t: f32(0.01) + (1 - f32(0.01)) * np.minimum(t, 100) / 100),
    ("polynomial-end-value", lambda: S.polynomial(0.1, 120, power=3.0, end_value=0.01),
     lambda t: f32(0.01) + (f32(0.1) - f32(0.01)) * (1 - np.minimum(t, 120) / 120) ** 3),
    ("piecewise_constant", lambda: S.piecewise_constant([10, 100, 250], [1.0, 0.3, 0.1, 0.02]),
     lambda t: np.select([t < 10, t < 100, t < 250], [1.0, f32(0.3), f32(0.1)], f32(0.02))),
    ("piecewise_constant-no-boundaries", lambda: S.piecewise_constant([], [0.7]),
     lambda t: np.full_like(t, f32(0.7))),
    ("multistep-no-milestones", lambda: S.multistep(0.2, [], 0.1), lambda t: np.full_like(t, f32(0.2))),
    ("per_epoch-cosine", lambda: S.per_epoch(S.cosine(1.0, 10), 25),
     lambda t: 0.5 * (1 + np.cos(np.pi * np.floor(t / 25) / 10))),
    ("join-warmup-into-exp_decay", lambda: S.join([S.linear_warmup(0.0, 0.5, 20), S.exp_decay(0.5, 0.01)], [20]),
     lambda t: np.where(t < 20, 0.5 * t / 20, 0.5 * np.exp(-f32(0.01) * (t - 20)))),
    ("join-three", lambda: S.join([S.constant(1.0), S.halving(0.5, 10), S.constant(0.01)], [5, 50]),
     lambda t: np.select([t < 5, t < 50], [1.0, 0.5 * 2.0 ** -np.floor((t - 5) / 10)], f32(0.01))),
    ("join-nested", lambda: S.join([S.join([S.constant(0.1), S.constant(0.2)], [3]), S.exponential(0.4, 0.5)], [7]),
     lambda t: np.select([t < 3, t < 7], [f32(0.1), f32(0.2)], f32(0.4) * 0.5 ** (t - 7))),
]


@pytest.mark.parametrize("build, reference", [pytest.param(b, r, id=i) for i, b, r in CLOSED_FORMS])
def test_closed_form(build, reference):
    got = np.asarray(build()(t64.astype(np.int32)), dtype=np.float64)
    np.testing.assert_allclose(got, reference(t64), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("T_0, T_mult", [(1, 2), (3, 8), (1, 7), (7, 2), (2, 5), (4, 3)])
def test_cosine_warm_restarts_at_every_restart(T_0, T_mult):
    # Far beyond the recorded 200 steps, on both sides of every restart
    # S(n) = T_0 (m^n - 1) / (m - 1) with cycles shorter than 2**24 steps: the
    # log-based cycle index is off by one at some of them before correction
    # (e.g. log1p(2**13 - 2) / log(2) < 13 in float32).
    restarts = [T_0 * (T_mult**n - 1) // (T_mult - 1) for n in range(64) if T_0 * T_mult**n < 2**24]
    steps = sorted({s + d for s in restarts for d in (-1, 0, 1) if s + d >= 0})
    steps = np.array(steps + [steps[-1]] * (80 - len(steps)))  # one shape: one compilation
    got = np.asarray(_jit_call(S.cosine_warm_restarts(1.0, T_0, T_mult), steps), dtype=np.float64)
    n = np.searchsorted(restarts, steps, side="right") - 1
    t_cur = steps - np.asarray(restarts)[n]
    t_i = T_0 * float(T_mult) ** n
    np.testing.assert_allclose(got, 0.5 * (1 + np.cos(np.pi * t_cur / t_i)), rtol=RTOL, atol=1e-10)


def test_doc_examples_run():
    result = doctest.testmod(_schedules, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 20
    assert result.failed == 0


# --------------------------------------------------------------------------
# Every schedule, built from one main parameter (used by 3, 4 and 6)


def _sqrt_decay(t):
    return jax.lax.rsqrt(1.0 + t)


BY_MAIN_PARAM = {
    "constant": lambda v: S.constant(v),
    "step_decay": lambda v: S.step_decay(v, 30, 0.5),
    "multistep": lambda v: S.multistep(v, [10, 50, 90], 0.3),
    "exponential": lambda v: S.exponential(v, 0.97),
    "exp_decay": lambda v: S.exp_decay(v, 0.01),
    "staircase_exponential": lambda v: S.staircase_exponential(v, 0.5, 40, staircase=True),
    "halving": lambda v: S.halving(v, 25),
    "inverse_time": lambda v: S.inverse_time(v, 0.1),
    "cosine": lambda v: S.cosine(v, 100),
    "cosine_warm_restarts": lambda v: S.cosine_warm_restarts(v, 10, 2, 1e-3),
    "linear": lambda v: S.linear(v, 0.0, 80),
    "linear_warmup": lambda v: S.linear_warmup(0.0, v, 40),
    "polynomial": lambda v: S.polynomial(v, 120, 2.0),
    "piecewise_constant": lambda v: S.piecewise_constant([20, 60], jnp.stack([v, v / 10, v / 100])),
    "cyclic": lambda v: S.cyclic(v / 10, v, 15, 25, "triangular2"),
    "cyclic_momentum": lambda v: S.cyclic_momentum(0.8, v, 15, mode="exp_range", gamma=0.99),
    "one_cycle": lambda v: S.one_cycle(v, 150, three_phase=True),
    "one_cycle_momentum": lambda v: S.one_cycle(0.1, 150, base_momentum=v).momentum,
    "join": lambda v: S.join([S.linear_warmup(0.0, v, 20), S.cosine(v, 80), S.constant(v / 100)], [20, 100]),
    "lambda_lr": lambda v: S.lambda_lr(v, _sqrt_decay),
    "per_epoch": lambda v: S.per_epoch(S.step_decay(v, 2, 0.5), 13),
}
MAIN_VALUES = (0.05, 0.1, 0.9)
STEPS = jnp.arange(0, 260, 3)


def test_public_names():
    contract = {
        "Schedule", "OneCycle", "constant", "step_decay", "multistep", "exponential", "exp_decay",
        "staircase_exponential", "halving", "inverse_time", "cosine", "cosine_warm_restarts", "linear",
        "polynomial", "piecewise_constant", "cyclic", "cyclic_momentum", "one_cycle", "linear_warmup", "join",
        "lambda_lr", "per_epoch",
    }
    assert set(S.__all__) == contract
    assert all(callable(getattr(S, name)) for name in S.__all__)
    # Every factory is swept by the jit, vmap and pytree tests below.
    assert contract - {"Schedule", "OneCycle"} <= set(BY_MAIN_PARAM)


def _call(built, t):
    """Values of a schedule, or of both curves of a OneCycle, stacked."""
    if isinstance(built, S.OneCycle):
        return jnp.stack([built.learning_rate(t), built.momentum(t)])
    return built(t)


# --------------------------------------------------------------------------
# 3. jit: no retracing


@pytest.mark.parametrize("name", sorted(BY_MAIN_PARAM))
def test_jit_traces_once_over_steps_and_param_values(name):
    build = BY_MAIN_PARAM[name]
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def value(schedule, step):
        return _call(schedule, step)

    for v in MAIN_VALUES:
        schedule = build(v)
        for t in (0, 1, 17, 99, 250):
            got = value(schedule, jnp.int32(t))
            np.testing.assert_allclose(np.asarray(got), np.asarray(_call(schedule, t)), rtol=RTOL)


def test_jit_does_not_retrace_for_new_counts_and_boundaries():
    traces = []

    @jax.jit
    def value(schedule, step):
        traces.append(None)
        return schedule(step)

    # Step counts, milestones and boundaries are data too.
    for k in range(3):
        value(S.multistep(0.1, [10 + k, 20 + k, 30 + k], 0.5), 25)
        value(S.cosine_warm_restarts(0.1, 5 + k, 1 + k), 25)
        value(S.join([S.linear_warmup(0.0, 0.1, 5 + k), S.cosine(0.1, 50 + k)], [5 + k]), 25)
        value(S.one_cycle(0.1, 100 + k, pct_start=0.2 + 0.1 * k).learning_rate, 25)
    assert len(traces) == 4
    # A different structure (number of milestones, mode) does compile again.
    value(S.multistep(0.1, [10, 20], 0.5), 25)
    value(S.cyclic(0.1, 1.0, 10, mode="triangular2"), 25)
    value(S.cyclic(0.1, 1.0, 10, mode="exp_range"), 25)
    assert len(traces) == 7


def test_schedule_in_a_scanned_optimizer_state():
    # A schedule stored in a carried state, read at the state's own counter.
    def body(state, _):
        lr = state["schedule"](state["count"])
        return {"schedule": state["schedule"], "count": state["count"] + 1}, lr

    state = {"schedule": S.cosine(0.1, 20), "count": jnp.int32(0)}
    _, lrs = jax.lax.scan(body, state, None, length=30)
    np.testing.assert_allclose(np.asarray(lrs), np.asarray(S.cosine(0.1, 20)(np.arange(30))), rtol=RTOL)


# --------------------------------------------------------------------------
# 4. vmap


@pytest.mark.parametrize("name", sorted(BY_MAIN_PARAM))
def test_vmap_over_main_param_matches_one_by_one(name):
    build = BY_MAIN_PARAM[name]
    swept = jax.vmap(lambda v: _call(build(v), STEPS))(jnp.asarray(MAIN_VALUES, dtype=jnp.float32))
    one_by_one = jnp.stack([_call(build(v), STEPS) for v in MAIN_VALUES])
    assert swept.shape == one_by_one.shape
    np.testing.assert_allclose(np.asarray(swept), np.asarray(one_by_one), rtol=RTOL, atol=ATOL)
    # The sweep really varies with the parameter.
    assert not np.allclose(np.asarray(swept[0]), np.asarray(swept[-1]))


def test_vmap_over_schedules_as_data():
    # Stack the leaves of schedules of equal structure, then vmap the call.
    schedules = [S.cosine_warm_restarts(lr, 10, 2) for lr in MAIN_VALUES]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *schedules)
    swept = jax.vmap(lambda s: s(STEPS))(stacked)
    np.testing.assert_allclose(np.asarray(swept), np.stack([np.asarray(s(STEPS)) for s in schedules]), rtol=RTOL)


# --------------------------------------------------------------------------
# 5. Bad arguments

_cos = S.cosine(0.1, 10)

BAD_ARGS = [
    (S.constant, {"value": "fast"}, TypeError, "`value` (='fast')"),
    (S.step_decay, {"init_value": -0.1, "step_size": 10}, ValueError, "`init_value` (=-0.1)"),
    (S.step_decay, {"init_value": 0.1, "step_size": 0}, ValueError, "`step_size` (=0)"),
    (S.step_decay, {"init_value": 0.1, "step_size": 10, "gamma": "x"}, TypeError, "`gamma`"),
    (S.step_decay, {"init_value": True, "step_size": 10}, TypeError, "`init_value` (=True)"),
    (S.multistep, {"init_value": 0.1, "milestones": [30, 20]}, ValueError, "strictly increasing"),
    (S.multistep, {"init_value": 0.1, "milestones": [10, 10]}, ValueError, "`milestones` (=[10, 10])"),
    (S.multistep, {"init_value": 0.1, "milestones": [-5, 10]}, ValueError, "`milestones`"),
    (S.multistep, {"init_value": 0.1, "milestones": [[1, 2]]}, ValueError, "1-D"),
    (S.multistep, {"init_value": 0.1, "milestones": "30,60"}, TypeError, "`milestones`"),
    (S.multistep, {"init_value": 0.1, "gamma": -0.1}, ValueError, "`gamma` (=-0.1)"),
    (S.exponential, {"init_value": 0.1, "gamma": -0.5}, ValueError, "`gamma` (=-0.5)"),
    (S.exp_decay, {"init_value": 0.1, "k": -1.0}, ValueError, "`k` (=-1.0)"),
    (S.staircase_exponential, {"init_value": 0.1, "decay_rate": 0.5, "decay_steps": 0}, ValueError, "`decay_steps`"),
    (S.staircase_exponential, {"init_value": 0.1, "decay_rate": 0.5, "decay_steps": 10, "staircase": "yes"},
     TypeError, "`staircase` (='yes')"),
    (S.halving, {"init_value": 0.1, "every": 0}, ValueError, "`every` (=0)"),
    (S.inverse_time, {"init_value": 0.1, "k": -0.1}, ValueError, "`k` (=-0.1)"),
    (S.cosine, {"init_value": 0.1, "T_max": 0}, ValueError, "`T_max` (=0)"),
    (S.cosine, {"init_value": 0.1, "T_max": 10, "eta_min": -1.0}, ValueError, "`eta_min` (=-1.0)"),
    (S.cosine_warm_restarts, {"init_value": 0.1, "T_0": 0}, ValueError, "`T_0` (=0) must be >= 1"),
    (S.cosine_warm_restarts, {"init_value": 0.1, "T_0": 2.5}, ValueError, "`T_0` (=2.5) must be a whole number"),
    (S.cosine_warm_restarts, {"init_value": 0.1, "T_0": 10, "T_mult": 0}, ValueError, "`T_mult` (=0) must be >= 1"),
    (S.cosine_warm_restarts, {"init_value": 0.1, "T_0": 10, "T_mult": 1.5}, ValueError, "`T_mult` (=1.5)"),
    (S.cosine_warm_restarts, {"init_value": 0.1, "T_0": [10, 20]}, TypeError, "`T_0`"),
    (S.linear, {"init_value": 0.1, "end_value": 0.0, "transition_steps": -1}, ValueError, "`transition_steps` (=-1)"),
    (S.linear, {"init_value": 0.1, "end_value": -0.1, "transition_steps": 10}, ValueError, "`end_value` (=-0.1)"),
    (S.linear_warmup, {"init_value": 0.0, "peak_value": -1.0, "warmup_steps": 10}, ValueError, "`peak_value`"),
    (S.linear_warmup, {"init_value": 0.0, "peak_value": 1.0, "warmup_steps": -10}, ValueError, "`warmup_steps`"),
    (S.polynomial, {"init_value": 0.1, "total_steps": 0}, ValueError, "`total_steps` (=0)"),
    (S.polynomial, {"init_value": 0.1, "total_steps": 100, "power": -1.0}, ValueError, "`power` (=-1.0)"),
    (S.piecewise_constant, {"boundaries": [10, 5], "values": [1, 2, 3]}, ValueError, "`boundaries` (=[10, 5])"),
    (S.piecewise_constant, {"boundaries": [10, 20], "values": [1.0, 2.0]}, ValueError, "len(boundaries) + 1 = 3"),
    (S.piecewise_constant, {"boundaries": [10], "values": [1.0, -2.0]}, ValueError, "`values`"),
    (S.cyclic, {"base_lr": 0.1, "max_lr": 1.0, "mode": "cosine"}, ValueError, "`mode` (='cosine')"),
    (S.cyclic, {"base_lr": 0.1, "max_lr": 1.0, "step_size_up": 0}, ValueError, "`step_size_up` (=0)"),
    (S.cyclic, {"base_lr": 0.1, "max_lr": 1.0, "step_size_down": -3}, ValueError, "`step_size_down` (=-3)"),
    (S.cyclic, {"base_lr": 0.1, "max_lr": 1.0, "mode": "exp_range", "gamma": 0.0}, ValueError, "`gamma` (=0.0)"),
    (S.cyclic, {"base_lr": -0.1, "max_lr": 1.0}, ValueError, "`base_lr` (=-0.1)"),
    (S.cyclic_momentum, {"base_momentum": 1.5}, ValueError, "`base_momentum` (=1.5)"),
    (S.one_cycle, {"max_lr": 0.1, "total_steps": 0}, ValueError, "`total_steps` (=0) must be >= 1"),
    (S.one_cycle, {"max_lr": 0.1, "total_steps": 100.5}, ValueError, "`total_steps` (=100.5)"),
    (S.one_cycle, {"max_lr": 0.1, "total_steps": 100, "pct_start": 1.5}, ValueError, "`pct_start` (=1.5)"),
    (S.one_cycle, {"max_lr": 0.1, "total_steps": 100, "anneal_strategy": "exp"}, ValueError, "`anneal_strategy`"),
    (S.one_cycle, {"max_lr": 0.1, "total_steps": 100, "three_phase": 1}, TypeError, "`three_phase` (=1)"),
    (S.one_cycle, {"max_lr": 0.1, "total_steps": 100, "div_factor": 0.0}, ValueError, "`div_factor` (=0.0)"),
    (S.one_cycle, {"max_lr": 0.1, "total_steps": 100, "max_momentum": -0.1}, ValueError, "`max_momentum`"),
    (S.join, {"schedules": [_cos], "boundaries": [5]}, ValueError, "len(schedules) - 1 = 0"),
    (S.join, {"schedules": [_cos, _cos], "boundaries": []}, ValueError, "len(schedules) - 1 = 1"),
    (S.join, {"schedules": [_cos, "cosine"], "boundaries": [5]}, TypeError, "`schedules[1]` (='cosine')"),
    (S.join, {"schedules": [], "boundaries": []}, ValueError, "`schedules`"),
    (S.join, {"schedules": _cos, "boundaries": []}, TypeError, "must be a list of Schedules"),
    (S.join, {"schedules": [_cos, _cos, _cos], "boundaries": [20, 10]}, ValueError, "strictly increasing"),
    (S.lambda_lr, {"init_value": 0.1, "fn": 3}, TypeError, "`fn` (=3)"),
    (S.lambda_lr, {"init_value": -0.1, "fn": _sqrt_decay}, ValueError, "`init_value`"),
    (S.per_epoch, {"schedule": _sqrt_decay, "steps_per_epoch": 10}, TypeError, "`schedule`"),
    (S.per_epoch, {"schedule": _cos, "steps_per_epoch": 0}, ValueError, "`steps_per_epoch` (=0) must be >= 1"),
    (S.per_epoch, {"schedule": _cos, "steps_per_epoch": 2.5}, ValueError, "`steps_per_epoch` (=2.5)"),
]


@pytest.mark.parametrize(
    "factory, kwargs, error, fragment",
    [pytest.param(*row, id=f"{row[0].__name__}-{'-'.join(map(str, row[1]))}-{i}") for i, row in enumerate(BAD_ARGS)],
)
def test_bad_arguments(factory, kwargs, error, fragment):
    with pytest.raises(error) as info:
        factory(**kwargs)
    assert fragment in str(info.value)


def test_checks_skip_traced_values():
    # Inside vmap the values are unknown: building must not inspect them.
    out = jax.vmap(lambda T: S.cosine_warm_restarts(0.1, T, 2)(7))(jnp.array([3.0, 5.0]))
    np.testing.assert_allclose(
        np.asarray(out), [0.05 * (1 + math.cos(math.pi * 4 / 6)), 0.05 * (1 + math.cos(math.pi * 2 / 10))],
        rtol=RTOL,
    )


# --------------------------------------------------------------------------
# 6. Pytree round trip and repr


@pytest.mark.parametrize("name", sorted(BY_MAIN_PARAM))
def test_pytree_round_trip(name):
    built = BY_MAIN_PARAM[name](0.1)
    copy = jax.tree_util.tree_map(lambda x: x, built)
    leaves, treedef = jax.tree_util.tree_flatten(built)
    copy_leaves, copy_treedef = jax.tree_util.tree_flatten(copy)
    assert copy_treedef == treedef
    assert leaves, "numeric parameters must be leaves"
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    for a, b in zip(leaves, copy_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(_call(copy, STEPS)), np.asarray(_call(built, STEPS)))
    assert repr(copy) == repr(built)


def test_leaves_are_the_numeric_parameters():
    schedule = S.join([S.linear_warmup(0.0, 0.1, 10), S.cosine(0.1, 90, 1e-4)], [10])
    leaves = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(schedule)]
    assert leaves == [0.0, f32(0.1), 10.0, f32(0.1), 90.0, f32(1e-4), [10.0]]
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, S.cosine(0.1, 100))
    np.testing.assert_allclose(float(doubled(0)), 0.2, rtol=RTOL)  # init_value doubled
    np.testing.assert_allclose(float(doubled(100)), 0.1, rtol=RTOL)  # T_max doubled: half way at 100


@pytest.mark.parametrize(
    "schedule, text",
    [
        (S.cosine(0.1, 100), "cosine(init_value=0.1, T_max=100, eta_min=0)"),
        (S.multistep(0.5, [30, 60], 0.1), "multistep(init_value=0.5, milestones=[30, 60], gamma=0.1)"),
        (S.staircase_exponential(1.0, 0.5, 10, staircase=True),
         "staircase_exponential(init_value=1, decay_rate=0.5, decay_steps=10, staircase=True)"),
        (S.join([S.linear_warmup(0.0, 0.1, 10), S.constant(0.1)], [10]),
         "join(schedules=[linear_warmup(init_value=0, peak_value=0.1, warmup_steps=10), constant(value=0.1)], "
         "boundaries=[10])"),
        (S.lambda_lr(0.1, _sqrt_decay), "lambda_lr(init_value=0.1, fn=_sqrt_decay)"),
        (S.cyclic(0.001, 0.1, 20, mode="exp_range", gamma=0.99),
         "cyclic(base_lr=0.001, max_lr=0.1, step_size_up=20, step_size_down=20, gamma=0.99, mode='exp_range')"),
    ],
)
def test_repr(schedule, text):
    assert repr(schedule) == text
