"""Record ``torch.optim.LBFGS`` trajectories for ``tests/test_lbfgs.py``.

Run from the repository root (torch is needed here only, never by the tests):

    /work/venv/bin/python tests/references/record_lbfgs.py

Precision: everything runs in float64. The tests replay the same runs with
optlab in float64 too and compare to round-off (1e-12, up to 1e-8 where a
trajectory amplifies it), which checks the algorithm
branch by branch (line-search brackets, skipped curvature pairs, the first
step's scaling); a float32 replay is compared with a tolerance fitted to
float32 round-off. A float32 torch reference would not help that second
comparison: torch and XLA sum dot products in different orders, so two
float32 runs differ by round-off of the same size as float32-vs-float64.

Each case is replayed with ``max_iter=1``, ``step(closure)`` called once per
recorded step (optlab's ``update`` is one iteration): the parameters after
every step form ``"<case>/traj"`` (``steps + 1`` rows, the start first), and
``"<case>/ls_evals"`` the number of closure calls each step's line search made
(torch's ``func_evals`` increment minus the closure call every step begins
with). ``max_eval = 1 + max_ls`` gives each step's line search a budget of
``max_ls`` evaluations after its first trial step (the default ``max_eval`` of
a one-iteration step would leave it none).

torch applies its stopping tests (tiny step, tiny loss change, gradient below
tolerance) only *between* the iterations of one ``step``; optlab's ``lbfgs``
applies them between updates and then freezes (its ``done`` flag).
``"<case>/stop"`` is the number of iterations after which torch would stop,
i.e. ``state["n_iter"]`` after one ``step`` with ``max_iter=steps``. It is read
off the per-step replay by `first_stop`, and wherever the line-search budget
is the default, such a one-call replay is run as well and must agree: same
iteration count, same final parameters.

Output: ``tests/references/lbfgs.npz``: the arrays above, the problem data
(``quadratic/A``, ``quadratic/b``, ``quadratic/x0``, ``logistic/X``,
``logistic/y``) and the table of cases as a JSON string under ``"config"``.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parent / "lbfgs.npz"
MAX_LS = 25
L2 = 0.01  # logistic regression: ridge penalty 0.5 * L2 * |w|^2 keeps the minimum finite


def make_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240611)
    # A convex quadratic 0.5 x'Ax - b'x in 20-D with eigenvalues from 1 to 100.
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    a = (q * np.logspace(0.0, 2.0, 20)) @ q.T
    a = 0.5 * (a + a.T)
    # Logistic regression on 64 points in 5-D with 10% of the labels flipped.
    x = rng.standard_normal((64, 5))
    w_true = rng.standard_normal(5)
    y = np.sign(x @ w_true + 0.3)
    y[rng.random(64) < 0.1] *= -1
    return {
        "quadratic/A": a,
        "quadratic/b": rng.standard_normal(20),
        "quadratic/x0": rng.standard_normal(20),
        "logistic/X": x,
        "logistic/y": y,
    }


def problem(name: str, data: dict):
    """(list of start tensors, loss function of those tensors) for one problem.

    The tensors are listed in the order in which ``jax.flatten_util.ravel_pytree``
    flattens the optlab parameters, so that both sides see the same flat vector.
    """
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    if name == "rosenbrock":
        def loss(p):
            x, y = p[0][0], p[0][1]
            return (1 - x) ** 2 + 100 * (y - x**2) ** 2

        return [t([-1.5, 2.0])], loss
    if name == "quadratic":
        a, b = t(data["quadratic/A"]), t(data["quadratic/b"])

        def loss(p):
            x = p[0]
            return 0.5 * x @ (a @ x) - b @ x

        return [t(data["quadratic/x0"])], loss
    if name == "logistic":
        xs, ys = t(data["logistic/X"]), t(data["logistic/y"])

        def loss(p):
            bias, w = p  # optlab's params are {"b": (), "w": (5,)}: "b" flattens first
            margins = ys * (xs @ w + bias)
            return torch.nn.functional.softplus(-margins).mean() + 0.5 * L2 * (w @ w)

        return [t(0.0), t(np.zeros(5))], loss
    raise ValueError(name)


# id -> problem, line search, learning rate (exact in float32), memory size, steps, and
# (optionally) the line search's evaluation budget after its first trial step.
CASES = {
    "rosenbrock/strong_wolfe": dict(problem="rosenbrock", line_search="strong_wolfe", lr=1.0, memory=10, steps=50),
    "rosenbrock/fixed": dict(problem="rosenbrock", line_search=None, lr=0.25, memory=10, steps=40),
    "quadratic/strong_wolfe": dict(problem="quadratic", line_search="strong_wolfe", lr=1.0, memory=5, steps=40),
    "quadratic/fixed": dict(problem="quadratic", line_search=None, lr=1.0, memory=5, steps=40),
    "logistic/strong_wolfe": dict(problem="logistic", line_search="strong_wolfe", lr=1.0, memory=3, steps=30),
    "logistic/fixed": dict(problem="logistic", line_search=None, lr=0.5, memory=3, steps=30),
    # Line-search stress cases: tiny initial steps make the bracketing phase extrapolate
    # several times; huge ones make the zoom phase work (and hit its safeguards); a small
    # budget ends line searches with their evaluations exhausted, in the bracketing phase
    # (budget2) or the zoom (budget4); "stuck" finds no decrease at all: t = 0, no step.
    "rosenbrock/strong_wolfe/tiny_lr": dict(problem="rosenbrock", line_search="strong_wolfe", lr=2.0**-10, memory=10, steps=20),
    "rosenbrock/strong_wolfe/huge_lr": dict(problem="rosenbrock", line_search="strong_wolfe", lr=2.0**8, memory=10, steps=20),
    "quadratic/strong_wolfe/budget2": dict(problem="quadratic", line_search="strong_wolfe", lr=2.0**-8, memory=5, steps=12, max_ls=2),
    "rosenbrock/strong_wolfe/budget4": dict(problem="rosenbrock", line_search="strong_wolfe", lr=16.0, memory=10, steps=20, max_ls=4),
    "rosenbrock/strong_wolfe/stuck": dict(problem="rosenbrock", line_search="strong_wolfe", lr=2.0**8, memory=10, steps=4, max_ls=2),
}
TOLERANCE_GRAD, TOLERANCE_CHANGE = 1e-7, 1e-9


def flat(params) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy().copy()


def run(case: dict, data: dict, max_iter: int, calls: int) -> dict:
    """``calls`` calls of ``step(closure)`` with ``max_iter`` iterations each."""
    max_ls = case.get("max_ls", MAX_LS)
    params, loss_fn = problem(case["problem"], data)
    params = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.LBFGS(
        params,
        lr=case["lr"],
        max_iter=max_iter,
        max_eval=max_iter * (1 + max_ls),
        history_size=case["memory"],
        line_search_fn=case["line_search"],
        tolerance_grad=TOLERANCE_GRAD,
        tolerance_change=TOLERANCE_CHANGE,
    )
    state = opt.state[params[0]]

    def closure():
        opt.zero_grad()
        value = loss_fn(params)
        value.backward()
        return value

    rec = {"traj": [flat(params)], "ls_evals": [], "loss": [], "n_iter": [], "max_step": []}
    for _ in range(calls):
        before = state.get("func_evals", 0)
        rec["loss"].append(float(opt.step(closure).detach()))
        rec["ls_evals"].append(state["func_evals"] - before - 1)
        rec["traj"].append(flat(params))
        rec["n_iter"].append(state["n_iter"])
        rec["max_step"].append(float((state["d"] * state["t"]).abs().max()))
    rec["loss"].append(float(closure().detach()))
    return {k: np.array(v) for k, v in rec.items()}


def first_stop(rec: dict) -> int:
    """After how many iterations would torch's tests between iterations (max_iter > 1) stop?

    Read off a per-step replay: a call that did not iterate (gradient below
    tolerance at its start: the previous iteration would have stopped), a call
    that did not move (no descent direction, or a line search that found no
    decrease), a step ``max|t d|`` or a loss change below ``tolerance_change``.
    Checked against a one-call replay wherever that one can say (see `main`).
    """
    calls = len(rec["n_iter"])
    n_iter = np.concatenate([[0], rec["n_iter"]])
    for k in range(1, calls + 1):
        if n_iter[k] == n_iter[k - 1]:
            return k - 1
        if np.array_equal(rec["traj"][k], rec["traj"][k - 1]):
            return k
        if rec["max_step"][k - 1] <= TOLERANCE_CHANGE or abs(rec["loss"][k] - rec["loss"][k - 1]) < TOLERANCE_CHANGE:
            return k
    return calls


def main() -> None:
    torch.set_default_dtype(torch.float64)
    data = make_data()
    out = dict(data)
    for cid, case in CASES.items():
        rec = run(case, data, max_iter=1, calls=case["steps"])
        traj = rec["traj"]
        assert np.all(np.isfinite(traj)), cid
        stop = first_stop(rec)
        if case.get("max_ls", MAX_LS) == MAX_LS:
            # A one-call replay stops by itself. Its line searches get the rest of the
            # call's evaluation budget rather than max_ls each, which only matters where
            # one would run out, so it is run where the budget is the default only. The
            # two replays must agree (this also checks `first_stop`).
            one_call = run(case, data, max_iter=case["steps"], calls=1)
            assert int(one_call["n_iter"][-1]) == stop, (cid, one_call["n_iter"], stop)
            np.testing.assert_array_equal(one_call["traj"][-1], traj[stop], err_msg=cid)
        out[f"{cid}/traj"] = traj
        out[f"{cid}/ls_evals"] = rec["ls_evals"].astype(np.int32)
        out[f"{cid}/stop"] = np.int32(stop)
        print(f"{cid:34s} stop={stop:3d} ls evals={rec['ls_evals'].tolist()}")
    out["config"] = np.array(json.dumps(CASES))
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
