"""Tests for optlab.models.

References are independent of the implementation: parameter counts are
written out from the layer definitions, initialiser statistics come from the
closed-form distributions (torch.nn.init's formulas), and the CNN forward
pass (BatchNorm in train and eval mode) is recomputed in float64 numpy.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optlab.models import (
    ACTIVATIONS,
    CNN,
    INIT_NAMES,
    MLP,
    MODELS,
    ConvNet,
    ResNet9,
    count_params,
    get_initializer,
    get_model,
    merge_model,
    split_model,
)

# ---------------------------------------------------------------------------
# Model table: (id, constructor kwargs for get_model, input shape). Tiny
# widths keep every test fast on two CPU cores.

IMAGES = (3, 16, 16, 3)  # the CIFAR-like input shape most tests share (compiles are cached per shape)

MODEL_CASES = [
    ("mlp", dict(in_features=28 * 28, hidden=(32, 16), num_classes=10), (3, 28, 28, 1)),
    ("mlp-linear", dict(in_features=12, hidden=(), num_classes=5, activation="tanh"), (3, 12)),
    ("convnet", dict(num_classes=10), (3, 28, 28, 1)),
    ("cnn", dict(channels=(4, 8), num_classes=10), IMAGES),
    ("cnn-bn-before", dict(channels=(4, 8), batchnorm="before", dropout=0.25), IMAGES),
    ("cnn-bn-after-flatten", dict(channels=(4, 8), batchnorm="after", head="flatten", input_size=16), IMAGES),
    ("resnet9", dict(width=4, num_classes=7), IMAGES),
]


def _registry_name(case_id: str) -> str:
    return case_id.split("-")[0]


def _rngs(seed: int, impl: str = "rbg") -> nnx.Rngs:
    """Parameter RNGs from an RBG key by default.

    XLA compiles a threefry sampler for each new shape, ~1 s of CPU each on
    this machine, which would dominate the suite; RBG samplers compile ~6x
    faster and are as good for everything tested here. Only the vmap test
    with dropout needs threefry: RBG draws under vmap differ from unbatched
    ones, so per-member dropout masks would not match.
    """
    return nnx.Rngs(jax.random.key(seed, impl=impl))


def _build(case_id: str, kwargs: dict, seed: int = 0, impl: str = "rbg", **extra) -> nnx.Module:
    return get_model(_registry_name(case_id), rngs=_rngs(seed, impl), **kwargs, **extra)


def _input(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


@functools.partial(nnx.jit, static_argnames="train")
def _apply(model, x, train=None):
    """``model(x, train=train)``, jitted: one compile per model configuration
    instead of one per primitive, which keeps the suite fast. BatchNorm and
    RNG updates flow back into ``model`` as with an eager call."""
    return model(x, train=train)


def _layers(model):
    """(path, module) of every dense/conv layer."""
    return [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, (nnx.Linear, nnx.Conv))]


def _batchnorms(model):
    return [n for _, n in nnx.iter_graph(model) if isinstance(n, nnx.BatchNorm)]


def _arr(variable) -> np.ndarray:
    return np.asarray(variable[...], dtype=np.float64)


# ---------------------------------------------------------------------------
# Shapes and parameter counts


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case_id, kwargs, shape", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_output_shape_and_finite(case_id, kwargs, shape, train):
    model = _build(case_id, kwargs)
    if not train:
        model.eval()
    out = _apply(model, _input(shape))
    num_classes = kwargs.get("num_classes", 10)
    assert out.shape == (shape[0], num_classes)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def _conv(c_in, c_out, bias=True):
    return 9 * c_in * c_out + (c_out if bias else 0)


def _linear(d_in, d_out, bias=True):
    return d_in * d_out + (d_out if bias else 0)


def _bn(c):
    return 2 * c  # scale and bias; running stats are not parameters


def _resnet9_count(w, k, c_in=3):
    conv_bn = lambda a, b: _conv(a, b, bias=False) + _bn(b)  # noqa: E731
    return (
        conv_bn(c_in, w)
        + conv_bn(w, 2 * w) + 2 * conv_bn(2 * w, 2 * w)
        + conv_bn(2 * w, 4 * w)
        + conv_bn(4 * w, 8 * w) + 2 * conv_bn(8 * w, 8 * w)
        + _linear(8 * w, k, bias=False)
    )


PARAM_COUNTS = [
    ("convnet", dict(), 4266),  # 40 + 296 + 3930, the lecture's count
    ("convnet", dict(num_classes=3), _conv(1, 4) + _conv(4, 8) + _linear(392, 3)),
    (
        "mlp",
        dict(in_features=784, hidden=(32, 16), num_classes=10),
        _linear(784, 32) + _linear(32, 16) + _linear(16, 10),
    ),
    ("mlp", dict(in_features=784, hidden=(), num_classes=10), _linear(784, 10)),
    ("cnn", dict(channels=(32, 64, 128)), _conv(3, 32) + _conv(32, 64) + _conv(64, 128) + _linear(128, 10)),
    (
        "cnn",
        dict(channels=(4, 8), batchnorm="before"),  # conv bias dropped in front of BN
        _conv(3, 4, False) + _bn(4) + _conv(4, 8, False) + _bn(8) + _linear(8, 10),
    ),
    (
        "cnn",
        dict(channels=(4, 8), batchnorm="after", in_channels=1, num_classes=2),
        _conv(1, 4) + _bn(4) + _conv(4, 8) + _bn(8) + _linear(8, 2),
    ),
    (
        "cnn",
        dict(channels=(4, 8, 16), head="flatten", input_size=32),  # 32 -> 16 -> 8 -> 4
        _conv(3, 4) + _conv(4, 8) + _conv(8, 16) + _linear(16 * 4 * 4, 10),
    ),
    ("resnet9", dict(width=4), _resnet9_count(4, 10)),
    ("resnet9", dict(width=64), 6_573_120),  # Page's ResNet-9 as published
]


@pytest.mark.parametrize("name, kwargs, expected", PARAM_COUNTS)
def test_parameter_count(name, kwargs, expected):
    # eval_shape: no arrays are allocated, so the full-width ResNet-9 is free.
    model = nnx.eval_shape(lambda: get_model(name, rngs=nnx.Rngs(0), **kwargs))
    assert count_params(model) == expected


def test_resnet9_formula_matches_published_count():
    assert _resnet9_count(64, 10) == 6_573_120


# ---------------------------------------------------------------------------
# Initialisers: closed-form distributions (torch.nn.init conventions)


def _fans(shape):
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _theory(name, shape):
    """(std, uniform bound or None, kind) of the named distribution."""
    fan_in, fan_out = _fans(shape)
    return {
        "default": (1 / math.sqrt(fan_in), None, "truncated"),
        "uniform": (0.1 / math.sqrt(3), 0.1, "uniform"),
        "normal": (0.1, None, "normal"),
        "xavier_uniform": (math.sqrt(2 / (fan_in + fan_out)), math.sqrt(6 / (fan_in + fan_out)), "uniform"),
        "xavier_normal": (math.sqrt(2 / (fan_in + fan_out)), None, "normal"),
        "he_uniform": (math.sqrt(2 / fan_in), math.sqrt(6 / fan_in), "uniform"),
        "he_normal": (math.sqrt(2 / fan_in), None, "normal"),
    }[name]


def test_init_table_is_complete():
    assert set(INIT_NAMES) == {
        "default", "uniform", "normal", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal"
    }


@pytest.mark.parametrize("shape", [(1000, 500), (3, 3, 64, 128)], ids=["dense", "conv"])
@pytest.mark.parametrize("name", INIT_NAMES)
def test_initializer_statistics(name, shape):
    key = jax.random.key(0, impl="rbg")
    w = np.asarray(get_initializer(name)(key, shape, jnp.float32), dtype=np.float64).ravel()
    std, bound, kind = _theory(name, shape)
    assert abs(w.mean()) < 4 * std / math.sqrt(w.size)
    assert w.std() == pytest.approx(std, rel=0.02)
    a = np.abs(w) / std
    if kind == "uniform":
        assert np.abs(w).max() <= bound * (1 + 1e-6)  # float32 rounding of the bound
        assert np.abs(w).max() > 0.99 * bound
    elif kind == "normal":
        # untruncated: P(|z| > 2) = 4.55%, and values beyond 3 sigma occur
        assert np.mean(a > 2) == pytest.approx(0.0455, abs=0.005)
        assert a.max() > 3.5
    else:
        # Flax's lecun_normal: N truncated to +-2 sigma_u, sigma_u = std / 0.8796
        assert a.max() <= 2 / 0.87962566 + 1e-4
        assert a.max() > 2.2


@pytest.mark.parametrize("scale", [0.5, 2.0])
@pytest.mark.parametrize("name", ["uniform", "normal", "he_uniform", "xavier_normal"])
def test_init_scale_multiplies_the_distribution(name, scale):
    key = jax.random.key(1, impl="rbg")
    shape = (800, 600)
    base = np.asarray(get_initializer(name)(key, shape))
    scaled = np.asarray(get_initializer(name, scale)(key, shape))
    np.testing.assert_allclose(scaled, scale * base, rtol=1e-6)
    std, bound, _ = _theory(name, shape)
    assert scaled.std() == pytest.approx(scale * std, rel=0.02)
    if bound is not None:
        assert np.abs(scaled).max() <= scale * bound * (1 + 1e-6)


def test_default_init_is_flax_default():
    for make in (
        lambda **kw: nnx.Linear(64, 32, rngs=_rngs(3), **kw),
        lambda **kw: nnx.Conv(8, 16, kernel_size=(3, 3), rngs=_rngs(3), **kw),
    ):
        np.testing.assert_array_equal(
            np.asarray(make().kernel[...]), np.asarray(make(kernel_init=get_initializer("default")).kernel[...])
        )


def _std_tolerance(n):
    # relative standard error of a sample std is ~1/sqrt(2n) (a bit more for
    # uniform or truncated laws); 5 of those plus 1% keeps false alarms ~0.
    return 0.01 + 5 / math.sqrt(2 * n)


# Every model with a fan-dependent uniform (its exact bound checks each
# layer's fans) and with Flax's default; every init on a dense and a conv net.
# Compiles are per (distribution, shape), so the full product would be slow.
INIT_CASES = [(case, init) for case in MODEL_CASES for init in ("default", "he_uniform")] + [
    (case, init)
    for case in MODEL_CASES
    if case[0] in ("mlp", "convnet")
    for init in INIT_NAMES
    if init not in ("default", "he_uniform")
]


@pytest.mark.parametrize("case, init", INIT_CASES, ids=[f"{c[0]}-{i}" for c, i in INIT_CASES])
def test_model_initialisation(case, init):
    case_id, kwargs, _ = case
    model = _build(case_id, kwargs, init=init)
    layers = _layers(model)
    assert layers
    for path, layer in layers:
        kernel = _arr(layer.kernel)
        if layer.bias is not None:
            assert np.all(_arr(layer.bias) == 0), path
        std, bound, _ = _theory(init, kernel.shape)
        if bound is not None:
            assert np.abs(kernel).max() <= bound * (1 + 1e-6), path
        if kernel.size >= 200:
            assert kernel.std() == pytest.approx(std, rel=_std_tolerance(kernel.size)), path
    for bn in _batchnorms(model):
        assert np.all(_arr(bn.scale) == 1) and np.all(_arr(bn.bias) == 0)
        assert np.all(_arr(bn.mean) == 0) and np.all(_arr(bn.var) == 1)


def test_model_init_scale_reaches_every_layer():
    model = CNN(channels=(4, 8), init="uniform", init_scale=0.25, rngs=_rngs(0))
    for path, layer in _layers(model):
        assert np.abs(_arr(layer.kernel)).max() <= 0.025, path


def test_different_seeds_give_different_parameters():
    a = nnx.state(ConvNet(rngs=_rngs(0)), nnx.Param)
    b = nnx.state(ConvNet(rngs=_rngs(1)), nnx.Param)
    c = nnx.state(ConvNet(rngs=_rngs(0)), nnx.Param)
    assert not np.allclose(a["conv1"]["kernel"][...], b["conv1"]["kernel"][...])
    np.testing.assert_array_equal(a["linear"]["kernel"][...], c["linear"]["kernel"][...])


# ---------------------------------------------------------------------------
# MLP: a numpy reference forward, one per activation


NP_ACT = {
    "relu": lambda x: np.maximum(x, 0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "softplus": lambda x: np.log1p(np.exp(x)),
    "identity": lambda x: x,
}


def test_activation_table_matches_reference_list():
    assert set(ACTIVATIONS) == set(NP_ACT)


@pytest.mark.parametrize("activation", sorted(NP_ACT))
def test_mlp_matches_numpy(activation):
    model = MLP(2 * 3 * 2, (7, 5), 4, activation=activation, rngs=_rngs(0))
    x = _input((6, 2, 3, 2))
    h = np.asarray(x, np.float64).reshape(6, -1)
    layers = list(model.layers)
    for i, layer in enumerate(layers):
        h = h @ _arr(layer.kernel) + _arr(layer.bias)
        if i < len(layers) - 1:
            h = NP_ACT[activation](h)
    np.testing.assert_allclose(np.asarray(_apply(model, x)), h, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# CNN with BatchNorm: numpy reference in train and eval mode

EPS = 1e-5


def _np_conv3x3(x, k, b):
    # cross-correlation with SAME zero padding, as lax.conv_general_dilated
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, k.shape[-1]))
    for di in range(3):
        for dj in range(3):
            out += np.einsum("nhwc,co->nhwo", xp[:, di : di + h, dj : dj + w, :], k[di, dj])
    return out + (0 if b is None else b)


def _np_pool(x):
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _np_bn(x, bn, train, momentum, new_stats):
    if train:
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        new_stats.append(
            (momentum * _arr(bn.mean) + (1 - momentum) * mean, momentum * _arr(bn.var) + (1 - momentum) * var)
        )
    else:
        mean, var = _arr(bn.mean), _arr(bn.var)
    return (x - mean) / np.sqrt(var + EPS) * _arr(bn.scale) + _arr(bn.bias)


def _np_cnn(model, x, *, batchnorm, head, train, momentum):
    """Logits and the running statistics a train-mode call should leave behind."""
    h = np.asarray(x, np.float64)
    new_stats = []
    for block in model.blocks:
        bias = None if block.conv.bias is None else _arr(block.conv.bias)
        h = _np_conv3x3(h, _arr(block.conv.kernel), bias)
        if batchnorm == "before":
            h = _np_bn(h, block.bn, train, momentum, new_stats)
        h = np.maximum(h, 0)
        if batchnorm == "after":
            h = _np_bn(h, block.bn, train, momentum, new_stats)
        h = _np_pool(h)
    h = h.mean(axis=(1, 2)) if head == "avg" else h.reshape(h.shape[0], -1)
    return h @ _arr(model.linear.kernel) + _arr(model.linear.bias), new_stats


def _randomise_batchnorm(model, seed):
    """Non-trivial BN scale/bias/running stats, so that using the wrong ones shows."""
    rng = np.random.default_rng(seed)
    for bn in _batchnorms(model):
        c = bn.scale[...].shape
        bn.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
        bn.bias[...] = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)
        bn.mean[...] = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)
        bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)


CNN_REFERENCE_CASES = [
    (None, "avg", 0.0),
    ("before", "avg", 0.0),
    ("after", "avg", 0.0),
    ("before", "flatten", 0.5),  # dropout must be off in eval mode
    ("after", "flatten", 0.0),
]


@pytest.mark.parametrize("batchnorm, head, dropout", CNN_REFERENCE_CASES)
def test_cnn_matches_numpy_in_eval_mode(batchnorm, head, dropout):
    model = CNN(
        channels=(4, 8), batchnorm=batchnorm, dropout=dropout, head=head, input_size=16, rngs=_rngs(0),
    )  # fmt: skip
    _randomise_batchnorm(model, 1)
    model.eval()
    x = _input(IMAGES)
    before = jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.BatchStat))
    expected, _ = _np_cnn(model, x, batchnorm=batchnorm, head=head, train=False, momentum=None)
    np.testing.assert_allclose(np.asarray(_apply(model, x)), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(_apply(model, x)), expected, rtol=1e-4, atol=1e-5)  # dropout off: repeatable
    after = nnx.state(model, nnx.BatchStat)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)  # eval never updates the stats


@pytest.mark.parametrize("momentum", [0.9, 0.5])
@pytest.mark.parametrize("batchnorm, head", [(None, "avg"), ("before", "avg"), ("after", "avg"), ("before", "flatten")])
def test_cnn_matches_numpy_in_train_mode(batchnorm, head, momentum):
    model = CNN(
        channels=(4, 8), batchnorm=batchnorm, head=head, input_size=16, bn_momentum=momentum, rngs=_rngs(0),
    )  # fmt: skip
    _randomise_batchnorm(model, 2)
    x = 2.0 + 3.0 * _input(IMAGES)  # off-centre input: batch stats far from the running ones
    expected, new_stats = _np_cnn(model, x, batchnorm=batchnorm, head=head, train=True, momentum=momentum)
    np.testing.assert_allclose(np.asarray(_apply(model, x)), expected, rtol=1e-4, atol=1e-4)
    bns = _batchnorms(model)
    assert len(bns) == len(new_stats) == (0 if batchnorm is None else 2)
    for bn, (mean, var) in zip(bns, new_stats):
        np.testing.assert_allclose(_arr(bn.mean), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_arr(bn.var), var, rtol=1e-4, atol=1e-5)


def test_batchnorm_before_normalises_the_pre_activation():
    model = CNN(channels=(4, 8), batchnorm="before", layout="nhwc", rngs=_rngs(0))
    block = model.blocks[0]
    x = 5.0 + _input(IMAGES)
    block(x)  # a train-mode call: running mean <- 0.9 * 0 + 0.1 * batch mean of conv(x)
    pre = np.asarray(block.conv(x), np.float64)
    np.testing.assert_allclose(_arr(block.bn.mean), 0.1 * pre.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    normalised = np.asarray(block.bn(block.conv(x)), np.float64)
    np.testing.assert_allclose(normalised.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(normalised.std(axis=(0, 1, 2)), 1, atol=1e-3)


@pytest.mark.parametrize(
    "case_id, kwargs, shape",
    [c for c in MODEL_CASES if "bn" in c[0] or c[0] == "resnet9"],
    ids=[c[0] for c in MODEL_CASES if "bn" in c[0] or c[0] == "resnet9"],
)
def test_train_updates_stats_and_eval_does_not(case_id, kwargs, shape):
    model = _build(case_id, kwargs)
    x = 1.0 + _input(shape)
    stats0 = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.BatchStat)))
    _apply(model, x)
    stats1 = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.BatchStat)))
    assert len(stats0) == 2 * len(_batchnorms(model)) > 0
    assert all(not np.allclose(a, b) for a, b in zip(stats0, stats1))
    for override in (dict(train=False), {}):
        if not override:
            model.eval()
        _apply(model, x, **override)
        stats2 = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.BatchStat)))
        for a, b in zip(stats1, stats2):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "case_id, kwargs, shape",
    [c for c in MODEL_CASES if "bn" in c[0] or c[0] == "resnet9"],
    ids=[c[0] for c in MODEL_CASES if "bn" in c[0] or c[0] == "resnet9"],
)
def test_eval_output_of_one_example_ignores_the_batch(case_id, kwargs, shape):
    model = _build(case_id, kwargs)
    x = _input(shape)
    _apply(model, x)  # move the running stats away from their initial values
    train_full, train_one = _apply(model, x, train=True)[:1], _apply(model, x[:1] * 1.0, train=True)
    model.eval()
    full, one = _apply(model, x)[:1], _apply(model, x[:1])
    np.testing.assert_allclose(np.asarray(full), np.asarray(one), rtol=1e-5, atol=1e-6)
    # in train mode the batch statistics couple the examples
    assert not np.allclose(np.asarray(train_full), np.asarray(train_one), atol=1e-3)


def test_train_flag_overrides_mode_both_ways():
    x = _input(IMAGES)
    model = CNN(channels=(4, 8), batchnorm="after", dropout=0.5, rngs=_rngs(0))
    _apply(model, x)
    model.eval()
    eval_out = np.asarray(_apply(model, x))
    model.train()
    np.testing.assert_allclose(np.asarray(_apply(model, x, train=False)), eval_out, rtol=1e-6, atol=1e-7)
    model.eval()
    assert not np.allclose(np.asarray(_apply(model, x, train=True)), eval_out, atol=1e-3)


def test_dropout_only_in_train_mode():
    x = _input(IMAGES)
    kwargs = dict(channels=(4, 8), num_classes=10)
    with_dropout = CNN(dropout=0.5, **kwargs, rngs=_rngs(0))
    without = CNN(dropout=0.0, **kwargs, rngs=_rngs(0))
    # dropout draws no parameters, so both models have the same weights
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, nnx.state(with_dropout, nnx.Param), nnx.state(without, nnx.Param)
    )
    reference = np.asarray(_apply(without, x))
    a, b = np.asarray(_apply(with_dropout, x)), np.asarray(_apply(with_dropout, x))
    assert not np.allclose(a, reference, atol=1e-4) and not np.allclose(a, b, atol=1e-4)
    with_dropout.eval()
    np.testing.assert_allclose(np.asarray(_apply(with_dropout, x)), reference, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(_apply(with_dropout, x)), reference, rtol=1e-6)


def test_dropout_mask_zeroes_features_and_rescales():
    # With the classifier replaced by the identity, the output is the dropped-out feature vector.
    model = CNN(num_classes=8, channels=(4, 8), dropout=0.5, rngs=_rngs(0))
    model.linear.kernel[...] = jnp.eye(8)
    x = 1.0 + jnp.abs(_input((64, 4, 4, 3)))
    clean = np.asarray(_apply(model, x, train=False))
    dropped = np.asarray(_apply(model, x, train=True))
    kept = dropped != 0
    assert 0.4 < kept[clean != 0].mean() < 0.6
    np.testing.assert_allclose(dropped[kept], 2 * clean[kept], rtol=1e-5)


# ---------------------------------------------------------------------------
# Functional use: split, stack two members, vmap a jitted train step


def _loss_and_state(graphdef, params, rest, x, y):
    # merge_model = nnx.merge(..., copy=True): fresh Variables, so BatchNorm and
    # Dropout may update their state inside jax.grad (google/flax#5050).
    model = merge_model(graphdef, params, rest)
    logits = model(x, train=True)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return loss, (logits, new_rest)


VMAP_CASES = [c for c in MODEL_CASES if c[0] in ("mlp", "convnet", "cnn-bn-before", "cnn-bn-after-flatten", "resnet9")]


@pytest.mark.parametrize("case_id, kwargs, shape", VMAP_CASES, ids=[c[0] for c in VMAP_CASES])
def test_vmap_over_members_matches_each_model_alone(case_id, kwargs, shape):
    impl = "threefry2x32" if kwargs.get("dropout") else "rbg"  # see _rngs
    members = [_build(case_id, kwargs, seed=s, impl=impl) for s in (0, 1)]
    splits = [nnx.split(m, nnx.Param, ...) for m in members]
    graphdef = splits[0][0]
    assert all(g == graphdef for g, _, _ in splits)
    x = _input(shape)
    y = jnp.arange(shape[0]) % kwargs.get("num_classes", 10)

    step = jax.value_and_grad(lambda p, r: _loss_and_state(graphdef, p, r, x, y), has_aux=True)
    stacked_params = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *(p for _, p, _ in splits))
    stacked_rest = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *(r for _, _, r in splits))
    (loss, (logits, new_rest)), grads = jax.jit(jax.vmap(step))(stacked_params, stacked_rest)

    assert logits.shape == (2, shape[0], kwargs.get("num_classes", 10))
    assert not np.allclose(np.asarray(logits[0]), np.asarray(logits[1]))
    for i, (_, params, rest) in enumerate(splits):
        (loss_i, (logits_i, rest_i)), grads_i = jax.jit(step)(params, rest)
        np.testing.assert_allclose(loss[i], loss_i, rtol=1e-4)
        np.testing.assert_allclose(logits[i], logits_i, rtol=1e-4, atol=1e-5)
        member = lambda tree: jax.tree_util.tree_map(lambda a: a[i], tree)  # noqa: E731
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), member(grads), grads_i
        )
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
            else np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
            member(new_rest),
            rest_i,
        )
        # ... and to running the stateful model itself (updates its own stats)
        np.testing.assert_allclose(logits[i], _apply(members[i], x), rtol=1e-4, atol=1e-5)


def test_vmapped_forward_with_plain_merge():
    # Forward only (no jax.grad): the literal nnx.split / nnx.merge pattern,
    # with eval-mode members, whose BatchNorm reads the running stats.
    members = []
    for seed in (0, 1):
        model = ResNet9(width=4, num_classes=7, rngs=_rngs(seed))
        _apply(model, _input(IMAGES, seed=seed + 5))  # distinct running stats per member
        model.eval()
        members.append(model)
    splits = [nnx.split(m, nnx.Param, ...) for m in members]
    graphdef = splits[0][0]
    stack = lambda trees: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    x = _input(IMAGES)

    @jax.jit
    @jax.vmap
    def forward(params, rest):
        return nnx.merge(graphdef, params, rest)(x)

    out = forward(stack([p for _, p, _ in splits]), stack([r for _, _, r in splits]))
    for i, member in enumerate(members):
        np.testing.assert_allclose(out[i], _apply(member, x), rtol=1e-4, atol=1e-5)


def test_split_model_is_params_and_rest():
    model = CNN(channels=(4, 8), batchnorm="after", dropout=0.1, rngs=_rngs(0))
    graphdef, params, rest = split_model(model)
    leaves = lambda s: jax.tree_util.tree_leaves(s)  # noqa: E731
    assert len(leaves(params)) == 2 * (2 + 2) + 2  # per block conv kernel/bias, BN scale/bias; linear
    assert sum(x.size for x in leaves(params)) == count_params(model)
    assert len(leaves(nnx.state(model, nnx.BatchStat))) == 2 * 2
    assert len(leaves(rest)) == 2 * 2 + 2  # BN mean/var per block, dropout RNG key/count
    restored = merge_model(graphdef, params, rest)
    x = _input(IMAGES)
    np.testing.assert_array_equal(
        np.asarray(_apply(restored, x, train=False)), np.asarray(_apply(model, x, train=False))
    )


@pytest.mark.parametrize("case_id, kwargs, shape", [MODEL_CASES[2], MODEL_CASES[4]], ids=["convnet", "cnn-bn-before"])
def test_eager_call_matches_jitted_call(case_id, kwargs, shape):
    x = _input(shape)
    eager, jitted = _build(case_id, kwargs), _build(case_id, kwargs)
    for train in (False, True):  # eval first: dropout masks then come from the same RNG count
        np.testing.assert_allclose(
            np.asarray(eager(x, train=train)), np.asarray(_apply(jitted, x, train=train)), rtol=1e-5, atol=1e-6
        )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        nnx.state(eager, nnx.BatchStat),
        nnx.state(jitted, nnx.BatchStat),
    )


# ---------------------------------------------------------------------------
# Registry and bad input


def test_registry_builds_the_same_model_as_the_class():
    for name, cls, kwargs in [
        ("ConvNet", ConvNet, dict(num_classes=5)),
        ("resnet9", ResNet9, dict(width=4)),
        ("mlp", MLP, dict(in_features=6, hidden=[4], num_classes=3, activation="elu")),
    ]:
        via_registry = get_model(name, rngs=_rngs(7), **kwargs)
        direct = cls(**kwargs, rngs=_rngs(7))
        assert type(via_registry) is cls and MODELS[name.lower()] is cls
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, nnx.state(via_registry, nnx.Param), nnx.state(direct, nnx.Param)
        )


def test_registry_accepts_a_seed_instead_of_rngs():
    kwargs = dict(in_features=6, hidden=[4], num_classes=3)
    from_key = get_model("mlp", rngs=jax.random.key(7, impl="rbg"), **kwargs)
    direct = MLP(**kwargs, rngs=_rngs(7))
    jax.tree_util.tree_map(np.testing.assert_array_equal, nnx.state(from_key, nnx.Param), nnx.state(direct, nnx.Param))


_MLP = dict(in_features=4, hidden=(3,), num_classes=2)

# (id, constructor, arguments, error, message pattern)
BAD_INPUT = [
    ("init", MLP, dict(_MLP, init="glorot"), ValueError, r"`init` \(='glorot'\).*'he_normal'"),
    ("init-type", ConvNet, dict(init=3), TypeError, r"`init` \(=3\)"),
    ("init-scale", ConvNet, dict(init_scale=-1.0), ValueError, r"`init_scale` \(=-1.0\)"),
    # An infinite scale would make every initial weight inf or nan: the scale must be finite.
    ("init-scale-inf", MLP, dict(_MLP, init_scale=float("inf")), ValueError, r"`init_scale` \(=inf\) must be in \(0"),
    ("init-scale-inf-cnn", CNN, dict(init_scale=np.float32("inf")), ValueError, r"`init_scale` \(=inf\)"),
    ("init-scale-nan", ResNet9, dict(init_scale=float("nan")), ValueError, r"`init_scale` \(=nan\)"),
    ("activation", MLP, dict(_MLP, activation="swish2"), ValueError, r"`activation` \(='swish2'\).*'relu'"),
    ("batchnorm", CNN, dict(batchnorm="middle"), ValueError, r"`batchnorm` \(='middle'\).*'before'"),
    ("dropout", CNN, dict(dropout=1.0), ValueError, r"`dropout` \(=1.0\)"),
    ("bn-momentum", ResNet9, dict(bn_momentum=1.5), ValueError, r"`bn_momentum` \(=1.5\)"),
    ("head", CNN, dict(head="max"), ValueError, r"`head` \(='max'\)"),
    ("channels-empty", CNN, dict(channels=()), ValueError, r"`channels`"),
    ("hidden-zero", MLP, dict(_MLP, hidden=(3, 0)), ValueError, r"`hidden\[1\]` \(=0\)"),
    ("hidden-type", MLP, dict(_MLP, hidden=3), TypeError, r"`hidden` \(=3\)"),
    ("num-classes", ConvNet, dict(num_classes=0), ValueError, r"`num_classes` \(=0\)"),
    ("width", ResNet9, dict(width=2.5), TypeError, r"`width` \(=2.5\)"),
    ("flatten-too-small", CNN, dict(head="flatten", input_size=4), ValueError, r"`input_size` \(=4\)"),
    ("model-name", get_model, dict(name="vgg16"), ValueError, r"`name` \(='vgg16'\).*'resnet9'"),
    ("unknown-kwarg", get_model, dict(name="cnn", chanels=(4,)), TypeError, r"'chanels'.*'channels'"),
    ("missing-kwarg", get_model, dict(name="mlp", in_features=4), TypeError, r"'hidden', 'num_classes'"),
]


@pytest.mark.parametrize("make, kwargs, error, match", [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_arguments_are_rejected(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        make(**kwargs, rngs=_rngs(0))


BAD_SHAPES = [
    ("convnet-size", lambda: ConvNet(rngs=_rngs(0)), (2, 32, 32, 1), r"28x28"),
    ("convnet-channels", lambda: ConvNet(rngs=_rngs(0)), (2, 28, 28, 3), r"NHWC"),
    ("mlp-features", lambda: MLP(10, (4,), 2, rngs=_rngs(0)), (2, 11), r"in_features=10"),
    ("cnn-flatten", lambda: CNN(channels=(4, 8), head="flatten", input_size=8, rngs=_rngs(0)), (2, 16, 16, 3), r"8x8"),
    ("cnn-rank", lambda: CNN(channels=(4, 8), rngs=_rngs(0)), (2, 16, 16), r"NHWC"),
    ("cnn-too-small", lambda: CNN(channels=(4, 8), rngs=_rngs(0)), (2, 2, 2, 3), r"at least 4x4"),
    ("resnet-too-small", lambda: ResNet9(width=4, rngs=_rngs(0)), (2, 4, 4, 3), r"at least 8x8"),
]


@pytest.mark.parametrize("make, shape, match", [b[1:] for b in BAD_SHAPES], ids=[b[0] for b in BAD_SHAPES])
def test_bad_input_shapes_are_rejected(make, shape, match):
    model = make()
    with pytest.raises(ValueError, match=match):
        model(jnp.zeros(shape))


# ---------------------------------------------------------------------------------------------
# The ConvNet's channel-major layers (written for speed on the CPU) against XLA's own
# convolution and reduce-window max pooling: values and derivatives, tied maxima included.


def _lax_conv(x_nhwc, kernel, bias):
    return jax.lax.conv_general_dilated(x_nhwc, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


@pytest.mark.parametrize(("channels", "out", "size"), [(1, 4, (28, 28)), (4, 8, (14, 14)), (3, 2, (5, 7))])
def test_conv3x3_channel_major_equals_lax_convolution(channels, out, size):
    from optlab.models._layers import conv3x3_channel_major

    kx, kw, kb = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (6, *size, channels))
    w = jax.random.normal(kw, (3, 3, channels, out))
    b = jax.random.normal(kb, (out,))
    to_cm, to_nhwc = (lambda a: a.transpose(3, 1, 2, 0)), (lambda a: a.transpose(3, 1, 2, 0))
    got = jax.jit(lambda x, w, b: to_nhwc(conv3x3_channel_major(to_cm(x), w, b)))(x, w, b)
    np.testing.assert_allclose(got, _lax_conv(x, w, b), rtol=1e-5, atol=1e-5)
    probe = jax.random.normal(jax.random.key(1), got.shape)  # a random cotangent
    mine = jax.jit(jax.grad(lambda x, w, b: jnp.sum(probe * to_nhwc(conv3x3_channel_major(to_cm(x), w, b))),
                            (0, 1, 2)))(x, w, b)
    ref = jax.jit(jax.grad(lambda x, w, b: jnp.sum(probe * _lax_conv(x, w, b)), (0, 1, 2)))(x, w, b)
    for a, r in zip(mine, ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 8, 8, 2), (2, 7, 9, 3)])  # even, and odd sizes (last row/column dropped)
def test_max_pool2x2_equals_reduce_window_pooling_ties_included(shape):
    from flax import nnx

    from optlab.models._layers import max_pool2x2

    # Small integers: most windows hold tied maxima, where the derivative rule matters.
    x = jax.random.randint(jax.random.key(2), shape, 0, 3).astype(jnp.float32)
    ref_pool = lambda a: nnx.max_pool(a, (2, 2), strides=(2, 2))  # noqa: E731 - select_and_scatter derivative
    np.testing.assert_array_equal(jax.jit(max_pool2x2)(x), ref_pool(x))
    probe = jax.random.normal(jax.random.key(3), ref_pool(x).shape)
    got = jax.jit(jax.grad(lambda a: jnp.sum(probe * max_pool2x2(a))))(x)
    want = jax.jit(jax.grad(lambda a: jnp.sum(probe * ref_pool(a))))(x)
    np.testing.assert_array_equal(got, want)
    # Forward mode agrees with reverse mode (a custom_jvp rule, not a custom_vjp).
    tangent = jax.random.normal(jax.random.key(4), shape)
    _, jvp_out = jax.jit(lambda a, t: jax.jvp(max_pool2x2, (a,), (t,)))(x, tangent)
    np.testing.assert_allclose(jnp.sum(probe * jvp_out), jnp.sum(got * tangent), rtol=1e-5)
    # Channel-major layout: the same pooling over axes (1, 2) of (C, H, W, B).
    cm = x.transpose(3, 1, 2, 0)
    np.testing.assert_array_equal(max_pool2x2(cm, axis=1).transpose(3, 1, 2, 0), ref_pool(x))


def test_convnet_equals_its_xla_convolution_formulation():
    from flax import nnx

    from optlab.models import ConvNet, merge_model, split_model

    model = ConvNet(init="he_normal", rngs=nnx.Rngs(0))
    graphdef, params, rest = split_model(model)
    x = jax.random.uniform(jax.random.key(5), (16, 28, 28, 1))
    y = jnp.arange(16) % 10

    def xla(m, a):  # the ConvNet as first written, NHWC with XLA's convolution
        a = nnx.max_pool(jax.nn.relu(m.conv1(a)), (2, 2), strides=(2, 2))
        a = nnx.max_pool(jax.nn.relu(m.conv2(a)), (2, 2), strides=(2, 2))
        return m.linear(a.reshape(a.shape[0], -1))

    def loss(p, call):
        logits = call(merge_model(graphdef, p, rest), x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)), logits

    (l1, z1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, lambda m, a: m(a)), has_aux=True))(params)
    (l2, z2), g2 = jax.jit(jax.value_and_grad(lambda p: loss(p, xla), has_aux=True))(params)
    np.testing.assert_allclose(z1, z2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_max_pool2x2_window_of_nans_gives_the_derivative_to_its_last_entry():
    from optlab.models._layers import max_pool2x2

    x = jnp.full((1, 2, 2, 1), jnp.nan).at[0, 0, 0, 0].set(1.0)  # no entry equals the NaN maximum
    g = jax.grad(lambda a: jnp.sum(max_pool2x2(a)))(x)
    np.testing.assert_array_equal(g[0, :, :, 0], [[0.0, 0.0], [0.0, 1.0]])


# The CNN's two layouts: channel-major matrix products (the CPU default) and XLA's convolutions.


def _train_call(model, x):
    """Loss, gradients and updated BatchNorm statistics of one train-mode call."""
    graphdef, params, rest = split_model(model)

    def loss(p):
        m = merge_model(graphdef, p, rest)
        return jnp.sum(m(x, train=True) ** 2), split_model(m)[2]

    (value, new_rest), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, grads, new_rest


_LAYOUT_CASES = [  # (id, model of a layout, input shape, rtol of the loss, rtol of the gradients)
    *[(f"cnn-bn={bn}-{head}", functools.partial(CNN, channels=(8, 16), batchnorm=bn, head=head), (6, 32, 32, 3),
       1e-6, 1e-4) for bn in (None, "before", "after") for head in ("avg", "flatten")],
    # Nine layers deep: the two layouts' round-off compounds more.
    *[(f"resnet9-{size}", functools.partial(ResNet9, width=4), (4, size, size, 3), 1e-5, 1e-3) for size in (32, 12)],
]


@pytest.mark.parametrize("build, shape, rtol_loss, rtol_grad", [c[1:] for c in _LAYOUT_CASES],
                         ids=[c[0] for c in _LAYOUT_CASES])
def test_layouts_compute_the_same_function(build, shape, rtol_loss, rtol_grad):
    x = jax.random.normal(jax.random.key(1), shape)
    results = []
    for layout in ("nhwc", "channel_major"):
        model = build(layout=layout, rngs=_rngs(0))
        assert model.layout == layout
        results.append(_train_call(model, x))
    (v1, g1, r1), (v2, g2, r2) = results
    np.testing.assert_allclose(v1, v2, rtol=rtol_loss)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol_grad, atol=0.1 * rtol_grad * float(jnp.max(jnp.abs(a))))
    for a, b in zip(jax.tree_util.tree_leaves(r1), jax.tree_util.tree_leaves(r2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # BatchNorm statistics, as NHWC computes them


@pytest.mark.parametrize("build", [functools.partial(CNN, channels=(4,)), functools.partial(ResNet9, width=4)])
def test_layout_auto_is_channel_major_on_the_cpu_and_checked(build):
    assert jax.default_backend() == "cpu"
    assert build(rngs=_rngs(0)).layout == "channel_major"
    with pytest.raises(ValueError, match="layout"):
        build(layout="NCHW", rngs=_rngs(0))
