"""The step-wise epoch (`make_train_epoch_stepwise`) against the scanned one, and ``train.loop``.

The reference for the step-wise epoch is the ``lax.scan`` epoch of
`make_train_epoch`, which the rest of the suite checks against PyTorch and
closed forms. They agree bitwise where XLA:CPU compiles the step the same way
in both: the MLP and the MNIST ConvNet (matmul layers). For a model with
``lax.conv_general_dilated`` they cannot: outside a loop XLA:CPU rewrites the
kernel-gradient convolution (``dim_labels=f01b_i01o->01bf``) into a canonical
one plus transposes and runs it on its Eigen kernel; inside the scan's while
body the convolution keeps its original form and is emitted as a plain loop
nest (the slow path of jax-ml/jax#12868), which sums in another order. The CNN
is therefore compared to float32 round-off (rtol 1e-6).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optlab
from optlab.config import ConfigError
from optlab.train import Experiment, choose_epoch_loop, fit, make_train_epoch, make_train_epoch_stepwise

EPOCHS = 2


def config(model: dict, *, data: dict | None = None, optimizer: dict | None = None, **train) -> dict:
    """256 digits in batches of 32: 8 steps per epoch."""
    return {
        "data": {"name": "digits", "normalization": "standardize", "batch_size": 32, "limit_train": 256, **(data or {})},
        "model": model,
        "optimizer": optimizer or {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9},
        "train": {"epochs": EPOCHS, "seed": 0, **train},
        "output": {"plots": False},
    }


MLP = {"name": "mlp", "hidden": [16]}
# BatchNorm (model state), dropout (per-step keys) and Adam: everything a step carries besides the weights.
# XLA's convolutions (layout "nhwc"): on the CPU the CNN defaults to matrix-product layers.
CNN = {"name": "cnn", "channels": [4, 8], "batchnorm": "before", "dropout": 0.1, "layout": "nhwc"}


def _arrays(tree) -> list[tuple[str, np.ndarray]]:
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append((jax.tree_util.keystr(path), np.asarray(x)))
    return out


def assert_trees_match(actual, expected, exact: bool):
    """Same structure, shapes and dtypes; values bitwise, or within float32 round-off of each leaf's scale."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for (path, a), (_, e) in zip(_arrays(actual), _arrays(expected), strict=True):
        assert (a.shape, a.dtype) == (e.shape, e.dtype), path
        if exact or not np.issubdtype(e.dtype, np.floating):
            np.testing.assert_array_equal(a, e, err_msg=f"leaf {path}")
        else:
            scale = float(np.max(np.abs(e))) if e.size else 0.0
            np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6 * scale, err_msg=f"leaf {path}")


def run_epochs(exp: Experiment, epoch_fn, epochs: int = EPOCHS):
    state, per_epoch = exp.init(), []
    for epoch in range(epochs):
        state, metrics = epoch_fn(state, exp.train_images, exp.train_labels, epoch)
        per_epoch.append(metrics)
    return state, per_epoch


@pytest.mark.parametrize(
    "cfg, exact",
    [
        pytest.param(config(MLP), True, id="mlp-sgd-momentum"),
        pytest.param(config(CNN, optimizer={"name": "adam", "learning_rate": 1e-3}), False, id="cnn-bn-dropout-adam"),
    ],
)
def test_stepwise_epoch_equals_scanned_epoch(cfg, exact):
    exp = Experiment(cfg)
    scan_state, scan_metrics = run_epochs(exp, jax.jit(exp.train_epoch, donate_argnums=(0,)))
    step_state, step_metrics = run_epochs(exp, make_train_epoch_stepwise(exp.train_step, 32))
    assert int(step_state.step) == EPOCHS * 8
    assert set(step_metrics[0]) == {"loss", "accuracy", "learning_rate", "grad_norm", "update_norm", "param_norm"}
    assert all(m["loss"].shape == (8,) for m in step_metrics)
    assert_trees_match(step_metrics, scan_metrics, exact)
    assert_trees_match(step_state, scan_state, exact)


def test_stepwise_epoch_compiles_once_and_donates_the_state():
    exp = Experiment(config(MLP))
    traces = []

    def counted_step(state, images, labels):
        traces.append(1)  # runs only while jax traces
        return exp.train_step(state, images, labels)

    epoch_fn = make_train_epoch_stepwise(counted_step, 32)
    state = exp.init()
    state, _ = epoch_fn(state, exp.train_images, exp.train_labels, 0)
    compiles = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    before = state
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        state, metrics = epoch_fn(state, exp.train_images, exp.train_labels, 1)
        jax.block_until_ready(metrics)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert len(traces) == 1
    assert compiles == []  # the second epoch compiles nothing: step, permutation and stacking are cached
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(before))


def test_stepwise_epoch_of_no_whole_batch_matches_the_scan():
    exp = Experiment(config(MLP))
    images, labels = exp.train_images[:20], exp.train_labels[:20]  # fewer than one batch of 32
    scan_state, scan_metrics = jax.jit(make_train_epoch(exp.train_step, 32))(exp.init(), images, labels, 0)
    step_state, step_metrics = make_train_epoch_stepwise(exp.train_step, 32)(exp.init(), images, labels, 0)
    assert step_metrics["loss"].shape == (0,)
    assert_trees_match(step_metrics, scan_metrics, exact=True)
    assert_trees_match(step_state, scan_state, exact=True)


# ---------------------------------------------------------------------------------------
# train.loop="auto": "step" exactly for lax convolutions on the CPU


@pytest.mark.parametrize(
    "model, data, backend, expected",
    [
        (MLP, {}, None, "scan"),
        (CNN, {}, None, "step"),
        (CNN, {}, "gpu", "scan"),  # the slow path is XLA:CPU's alone
        ({**CNN, "layout": "auto"}, {}, None, "scan"),  # channel-major matrix products on the CPU
        ({"name": "convnet"}, {"name": "mnist"}, None, "scan"),  # matmul layers, no lax convolution
    ],
)
def test_auto_picks_the_step_loop_for_convolutions_on_the_cpu(model, data, backend, expected):
    exp = Experiment(config(model, data=data))
    if backend is None:
        assert jax.default_backend() == "cpu"
        assert exp.epoch_loop == expected
    chosen = choose_epoch_loop("auto", exp.train_step, exp.init(), exp.train_images, exp.train_labels, 32,
                               backend=backend)
    assert chosen == expected


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def _custom_conv(x, w):
    return _conv(x, w)


_custom_conv.defvjp(lambda x, w: (_conv(x, w), (x, w)), lambda res, g: (jnp.zeros_like(res[0]), jnp.zeros_like(res[1])))


@jax.custom_jvp
def _custom_jvp_conv(x, w):
    return _conv(x, w)


_custom_jvp_conv.defjvp(lambda primals, tangents: (_conv(*primals), _conv(*primals)))


# A convolution hidden at every kind of nesting the walk has to enter, and the same steps without one.
NESTINGS = {
    "top level": lambda x, w: _conv(x, w),
    "jit": lambda x, w: jax.jit(_conv)(x, w),
    "checkpoint": lambda x, w: jax.checkpoint(_conv)(x, w),
    "custom_vjp": lambda x, w: _custom_conv(x, w),
    "custom_jvp": lambda x, w: _custom_jvp_conv(x, w),
    "cond branch": lambda x, w: jax.lax.cond(jnp.sum(x) > 0, _conv, lambda x, w: jnp.zeros(x.shape[:3] + w.shape[3:]), x, w),
    "scan body": lambda x, w: jax.lax.scan(lambda c, _: (c, _conv(x, w)), 0.0, None, length=2)[1][0],
    "while body": lambda x, w: jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, _conv(x, w)), (0, _conv(x, w)))[1],
}


@pytest.mark.parametrize("has_conv", [True, False])
@pytest.mark.parametrize("nesting", list(NESTINGS))
def test_auto_finds_convolutions_in_nested_jaxprs(nesting, has_conv):
    wrap = NESTINGS[nesting]

    def step(w, images, labels):
        x = images.astype(jnp.float32)
        y = wrap(x, w) if has_conv else jnp.zeros(x.shape[:3] + w.shape[3:]) + jnp.sum(w)
        return w, {"loss": jnp.mean(y) + jnp.mean(labels)}

    w = jax.ShapeDtypeStruct((3, 3, 1, 2), jnp.float32)
    images, labels = jnp.zeros((64, 4, 4, 1), jnp.uint8), jnp.zeros((64,), jnp.int32)
    assert choose_epoch_loop("auto", step, w, images, labels, 8, backend="cpu") == ("step" if has_conv else "scan")


@pytest.mark.parametrize("loop", ["scan", "step"])
def test_explicit_loop_is_kept(loop):
    assert choose_epoch_loop(loop, None, None, None, None, 8) == loop  # nothing is traced


# ---------------------------------------------------------------------------------------
# The config key


@pytest.mark.parametrize("value, fragment", [("unroll", "'unroll'"), ("Step", "'Step'"), (1, "type int"), (None, "None")])
def test_bad_train_loop_raises_config_error_naming_key_and_value(value, fragment):
    with pytest.raises(ConfigError, match="train.loop") as info:
        optlab.config.resolve(config(MLP, loop=value))
    assert fragment in str(info.value)


def test_bad_loop_argument_raises_value_error():
    with pytest.raises(ValueError, match=r"`loop` \(='fast'\)"):
        choose_epoch_loop("fast", None, None, None, None, 8)


def test_train_loop_defaults_to_auto():
    assert optlab.config.resolve(config(MLP))["train"]["loop"] == "auto"


# ---------------------------------------------------------------------------------------
# fit with each loop


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    runs = {}
    for loop in ("scan", "step"):
        run_dir = tmp_path_factory.mktemp(loop) / "run"
        runs[loop] = fit(config(MLP, loop=loop), run_dir=run_dir, quiet=True)
    return runs


def test_fit_with_step_loop_equals_fit_with_scan_loop(fits):
    step, scan = fits["step"], fits["scan"]
    assert [h["epoch"] for h in step["history"]] == [1, 2]
    keys = ("step", "train_loss", "train_accuracy", "learning_rate", "grad_norm", "update_norm", "param_norm",
            "test_loss", "test_accuracy")
    assert [[h[k] for k in keys] for h in step["history"]] == [[h[k] for k in keys] for h in scan["history"]]
    assert_trees_match(step["state"], scan["state"], exact=True)


@pytest.mark.parametrize("loop", ["scan", "step"])
def test_fit_logs_the_loop_it_ran(fits, loop):
    events = [json.loads(line) for line in (fits[loop]["run_dir"] / "log.jsonl").read_text().splitlines()]
    start = [e for e in events if e["kind"] == "start"]
    assert len(start) == 1 and start[0]["loop"] == loop
