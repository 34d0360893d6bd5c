"""optlab's L-BFGS against ``torch.optim.LBFGS`` (recorded by ``tests/references/record_lbfgs.py``).

The references are float64 torch runs. Replaying them in float64 checks the
algorithm itself (every bracket of the line search, every skipped curvature
pair, the stopping tests): trajectories agree to round-off and the line search
makes exactly as many evaluations as torch's. The float32 replays then check
that nothing breaks at the precision people train in, with tolerances set by
how much each trajectory amplifies round-off (see `FLOAT32`).
"""

from __future__ import annotations

import contextlib
import doctest
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from optlab._base import apply_updates
from optlab._hparams import hyperparams, set_hyperparams
from optlab.optimizers import _lbfgs
from optlab.optimizers._lbfgs import lbfgs

with np.load(pathlib.Path(__file__).resolve().parent / "references" / "lbfgs.npz") as _npz:
    REF = dict(_npz)
CASES = json.loads(str(REF["config"]))
L2 = 0.01  # ridge penalty of the logistic problem, as in record_lbfgs.py


def enable_x64():
    # Recent jax spells it jax.enable_x64, older releases jax.experimental.enable_x64.
    ctx = getattr(jax, "enable_x64", None)
    if ctx is None:
        from jax.experimental import enable_x64 as ctx
    return ctx(True)


def rosenbrock(p):
    return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


def make_problem(name: str):
    """(loss function, starting parameters, minimiser or None), in the current default float dtype."""
    dtype = jnp.zeros(()).dtype
    arr = lambda v: jnp.asarray(v, dtype)  # noqa: E731
    if name == "rosenbrock":
        return rosenbrock, arr([-1.5, 2.0]), np.ones(2)
    if name == "quadratic":
        a, b = arr(REF["quadratic/A"]), arr(REF["quadratic/b"])
        return (lambda x: 0.5 * x @ (a @ x) - b @ x), arr(REF["quadratic/x0"]), np.linalg.solve(REF["quadratic/A"], REF["quadratic/b"])
    if name == "logistic":
        xs, ys = arr(REF["logistic/X"]), arr(REF["logistic/y"])

        def loss(p):
            margins = ys * (xs @ p["w"] + p["b"])
            return jnp.mean(jax.nn.softplus(-margins)) + 0.5 * L2 * (p["w"] @ p["w"])

        return loss, {"b": arr(0.0), "w": jnp.zeros(5, dtype)}, None
    raise ValueError(name)


def run(opt, loss_fn, params, steps: int, *, pass_value=True, pass_value_fn=True):
    """Flat parameters after 0..steps updates, line-search evaluations per update, final state."""
    value_fn = jax.value_and_grad(loss_fn)

    @jax.jit
    def step(params, state):
        loss, grads = value_fn(params)
        extra = {}
        if pass_value:
            extra["value"] = loss
        if pass_value_fn:
            extra["value_fn"] = value_fn
        updates, state = opt.update(grads, state, params, **extra)
        return apply_updates(params, updates), state

    state = opt.init(params)
    traj, evals = [ravel_pytree(params)[0]], [0]
    for _ in range(steps):
        params, state = step(params, state)
        traj.append(ravel_pytree(params)[0])
        evals.append(int(state.inner_state.line_search_evals))
    return np.stack(traj), np.diff(evals), state


def torch_run(cid: str) -> tuple[np.ndarray, int]:
    """torch's trajectory with its stopping tests applied: frozen after ``stop`` iterations."""
    traj = REF[f"{cid}/traj"].copy()
    stop = int(REF[f"{cid}/stop"])
    traj[stop:] = traj[stop]
    return traj, stop


def make_opt(case: dict, **kwargs):
    return lbfgs(
        case["lr"],
        memory_size=case["memory"],
        line_search=case["line_search"],
        max_line_search_evals=case.get("max_ls", 25),
        **kwargs,
    )


# --- exactness against torch -----------------------------------------------------------------

# Largest float64 difference allowed. Round-off is ~1e-16; the Rosenbrock valley with a
# line search amplifies a perturbation of the start about 1e5-fold over a long run
# (measured by perturbing x0 by 1e-10 in torch), hence the looser bounds there.
FLOAT64_ATOL = {
    "rosenbrock/strong_wolfe": 1e-8,
    "rosenbrock/fixed": 1e-11,
    "quadratic/strong_wolfe": 1e-12,
    "quadratic/fixed": 1e-12,
    "logistic/strong_wolfe": 1e-12,
    "logistic/fixed": 1e-12,
    "rosenbrock/strong_wolfe/tiny_lr": 1e-10,
    "rosenbrock/strong_wolfe/huge_lr": 1e-8,
    "quadratic/strong_wolfe/budget2": 1e-12,
    "rosenbrock/strong_wolfe/budget4": 1e-9,
    "rosenbrock/strong_wolfe/stuck": 1e-12,
}


@pytest.mark.parametrize("cid", sorted(CASES))
def test_matches_torch_in_float64(cid):
    case = CASES[cid]
    expected, stop = torch_run(cid)
    with enable_x64():
        loss_fn, params, _ = make_problem(case["problem"])
        traj, evals, state = run(make_opt(case), loss_fn, params, case["steps"])
    assert traj.dtype == np.float64
    np.testing.assert_allclose(traj, expected, rtol=0, atol=FLOAT64_ATOL[cid])
    # The same line-search path: torch's closure calls per step, before torch stops.
    np.testing.assert_array_equal(evals[:stop], REF[f"{cid}/ls_evals"][:stop])
    inner = state.inner_state
    assert int(inner.count) == stop
    assert bool(inner.done) == (stop < case["steps"])


# (steps float32 must follow torch for, atol over those steps, atol of the last point).
# Float32 round-off (6e-8) grows along a trajectory as fast as any perturbation: little on
# the quadratic and the logistic regression, ~1e5-fold through the Rosenbrock valley with a
# line search, so that case is followed for its first 20 steps only and then must end at
# the same point. At a minimum, a float32 loss only resolves the minimiser to about
# sqrt(eps * |f| / curvature): ~1e-3 for the logistic regression, whose float32 run stops
# there, its last two steps differing from those of torch's float64 run.
FLOAT32 = {
    "rosenbrock/strong_wolfe": (20, 2e-3, 1e-4),
    "rosenbrock/fixed": (40, 5e-4, 5e-4),
    "quadratic/strong_wolfe": (40, 5e-5, 5e-5),
    "quadratic/fixed": (40, 5e-5, 5e-5),
    "logistic/strong_wolfe": (7, 1e-5, 2e-3),
    "logistic/fixed": (30, 2e-5, 2e-5),
}


@pytest.mark.parametrize("cid", sorted(FLOAT32))
def test_matches_torch_in_float32(cid):
    case = CASES[cid]
    followed, atol, atol_end = FLOAT32[cid]
    expected, _ = torch_run(cid)
    loss_fn, params, _ = make_problem(case["problem"])
    traj, _, _ = run(make_opt(case), loss_fn, params, case["steps"])
    assert traj.dtype == np.float32
    np.testing.assert_allclose(traj[: followed + 1], expected[: followed + 1], rtol=0, atol=atol)
    np.testing.assert_allclose(traj[-1], expected[-1], rtol=0, atol=atol_end)


def test_loss_is_computed_with_value_fn_when_not_given():
    cid = "logistic/strong_wolfe"
    case = CASES[cid]
    expected, stop = torch_run(cid)
    with enable_x64():
        loss_fn, params, _ = make_problem(case["problem"])
        traj, evals, _ = run(make_opt(case), loss_fn, params, case["steps"], pass_value=False)
    np.testing.assert_allclose(traj, expected, rtol=0, atol=FLOAT64_ATOL[cid])
    np.testing.assert_array_equal(evals[:stop], REF[f"{cid}/ls_evals"][:stop])


def test_fixed_step_without_loss_follows_torch_one_iteration_steps():
    # With neither the loss nor value_fn the loss-change test cannot run, exactly as in
    # torch's max_iter=1 steps: the whole per-step trajectory is reproduced, including the
    # steps after the point where a longer torch step (and the loss-aware run) would stop.
    cid = "logistic/fixed"
    case = CASES[cid]
    with enable_x64():
        loss_fn, params, _ = make_problem(case["problem"])
        traj, _, _ = run(make_opt(case), loss_fn, params, case["steps"], pass_value=False, pass_value_fn=False)
    assert int(REF[f"{cid}/stop"]) < case["steps"]
    np.testing.assert_allclose(traj, REF[f"{cid}/traj"], rtol=0, atol=1e-12)


# --- convergence -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "problem, line_search, x64, steps, atol",
    [
        # The default tolerance_change (1e-9) stops at ~3e-5 from (1, 1), torch's too
        # (test_matches_torch_in_float64); a smaller one lets float32 get within 1e-5.
        ("rosenbrock", "strong_wolfe", False, 50, 1e-5),
        # On the quadratic a float32 loss pins the minimiser down to ~1e-4 only
        # (sqrt(eps |f| / lambda_min)), so this one runs in float64.
        ("quadratic", "strong_wolfe", True, 50, 1e-5),
        ("quadratic", None, True, 50, 1e-5),
    ],
)
def test_converges(problem, line_search, x64, steps, atol):
    with enable_x64() if x64 else contextlib.nullcontext():
        loss_fn, params, minimiser = make_problem(problem)
        opt = lbfgs(1.0, memory_size=20, line_search=line_search, tolerance_grad=1e-10, tolerance_change=1e-12)
        traj, _, _ = run(opt, loss_fn, params, steps)
    np.testing.assert_allclose(traj[-1], minimiser, rtol=0, atol=atol)
    # ... and not already at the start: the problem is not trivial for the optimizer.
    assert np.max(np.abs(traj[steps // 2] - minimiser)) > 10 * atol


def test_no_step_at_a_stationary_point():
    opt = lbfgs(line_search=None)
    params = jnp.ones(2)
    grads = jax.grad(rosenbrock)(params)
    np.testing.assert_array_equal(grads, np.zeros(2))
    updates, state = jax.jit(opt.update)(grads, opt.init(params), params)
    np.testing.assert_array_equal(updates, np.zeros(2))
    assert bool(state.inner_state.done) and int(state.inner_state.count) == 0


# --- jit, vmap, hyperparameters --------------------------------------------------------------


@pytest.mark.parametrize("line_search", ["strong_wolfe", None])
def test_jits_once(line_search):
    loss_fn, params, _ = make_problem("logistic")
    value_fn = jax.value_and_grad(loss_fn)
    opt = lbfgs(1.0, memory_size=3, line_search=line_search)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)  # runs only while tracing
        loss, grads = value_fn(params)
        updates, state = opt.update(grads, state, params, value_fn=value_fn, value=loss)
        return apply_updates(params, updates), state

    state = opt.init(params)
    for i in range(8):  # more steps than memory: the ring buffer wraps around
        if i == 4:
            state = set_hyperparams(state, learning_rate=0.5)
        params, state = step(params, state)
    assert len(traces) == 1
    assert int(state.inner_state.num_pairs) > 3 and not bool(state.inner_state.done)


def test_learning_rate_is_a_hyperparameter():
    # On the first iteration the step is learning_rate * min(1, 1/|g|_1) along -g.
    loss_fn, params, _ = make_problem("quadratic")
    grads = jax.grad(loss_fn)(params)
    opt = lbfgs(1.0, line_search=None)
    state = set_hyperparams(opt.init(params), learning_rate=0.5)
    assert float(hyperparams(state)["learning_rate"]) == 0.5
    update = jax.jit(opt.update)
    updates, state = update(grads, state, params)
    assert float(hyperparams(state)["learning_rate"]) == 0.5
    expected = -0.5 * grads * min(1.0, 1.0 / float(jnp.sum(jnp.abs(grads))))
    np.testing.assert_allclose(updates, expected, rtol=1e-6)
    built, _ = update(grads, lbfgs(0.5, line_search=None).init(params), params)
    np.testing.assert_array_equal(built, updates)


def test_vmap_over_starting_points_equals_separate_runs():
    with enable_x64():
        starts = jnp.array([[-1.5, 2.0], [1.2, -0.5]])
        value_fn = jax.value_and_grad(rosenbrock)
        opt = lbfgs(1.0, memory_size=5)

        def step(params, state):
            loss, grads = value_fn(params)
            updates, state = opt.update(grads, state, params, value_fn=value_fn, value=loss)
            return params + updates, state

        batched = jax.jit(jax.vmap(step))
        single = jax.jit(step)
        p_b, s_b = starts, jax.vmap(opt.init)(starts)
        singles = [(x, opt.init(x)) for x in starts]
        for _ in range(30):
            p_b, s_b = batched(p_b, s_b)
            singles = [single(*ps) for ps in singles]
        for i, (p, s) in enumerate(singles):
            np.testing.assert_allclose(p_b[i], p, rtol=0, atol=1e-10)
            assert int(s_b.inner_state.line_search_evals[i]) == int(s.inner_state.line_search_evals)
            assert int(s_b.inner_state.count[i]) == int(s.inner_state.count)
        # The two runs took different line-search paths, so the batched loops had to mask.
        assert int(s_b.inner_state.line_search_evals[0]) != int(s_b.inner_state.line_search_evals[1])


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"line_search": "backtracking"}, ValueError, r"`line_search` \(='backtracking'\) must be one of 'strong_wolfe', None"),
        ({"memory_size": 0}, ValueError, r"`memory_size` \(=0\) must be >= 1"),
        ({"memory_size": 2.5}, TypeError, r"`memory_size` \(=2.5\) must be an integer"),
        ({"learning_rate": -1.0}, ValueError, r"`learning_rate` \(=-1.0\) must be in \(0.0"),
        ({"learning_rate": 0.0}, ValueError, r"`learning_rate` \(=0.0\)"),
        ({"max_line_search_evals": 0}, ValueError, r"`max_line_search_evals` \(=0\) must be >= 1"),
        ({"tolerance_grad": -1e-7}, ValueError, r"`tolerance_grad`"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        lbfgs(**kwargs)


def test_line_search_needs_value_fn():
    opt = lbfgs()
    params = jnp.array([-1.5, 2.0])
    grads = jax.grad(rosenbrock)(params)
    with pytest.raises(TypeError, match=r"needs the keyword argument `value_fn`.*value_and_grad_fn"):
        opt.update(grads, opt.init(params), params, value_and_grad_fn=jax.value_and_grad(rosenbrock))
    with pytest.raises(ValueError, match="needs the parameters"):
        opt.update(grads, opt.init(params), None, value_fn=jax.value_and_grad(rosenbrock))
    # Without a line search the gradient is enough.
    fixed = lbfgs(line_search=None)
    updates, _ = fixed.update(grads, fixed.init(params), params)
    np.testing.assert_allclose(updates, -grads / jnp.sum(jnp.abs(grads)), rtol=1e-6)


def test_docstring_example_runs():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(_lbfgs.lbfgs, "lbfgs", globs={}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("params", [{}, {"w": jnp.zeros((0,))}], ids=["empty-tree", "zero-size-leaf"])
def test_an_empty_parameter_tree_is_a_clear_error(params):
    with pytest.raises(ValueError, match="lbfgs needs at least one parameter element"):
        lbfgs(line_search=None).init(params)
