"""Smoke runs of the sweep benchmarks and the weight-initialisation experiment (tiny sizes, no timing assertions).

Each script's ``main`` runs in its ``--quick`` mode on a few MNIST batches
and must print a Markdown table with a row per member / contender. MNIST
comes from ``OPTLAB_DATA`` (set by conftest.py when the shared data exist);
without it those tests are skipped.

The last tests check the ConvNet's channel-major layers (written for the
speed these benchmarks measure) against XLA's convolution and reduce-window
max pooling: values and derivatives, tied maxima included.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mnist_available() -> bool:
    root = os.environ.get("OPTLAB_DATA")
    return bool(root) and (pathlib.Path(root) / "mnist" / "train-images-idx3-ubyte.gz").is_file()


needs_mnist = pytest.mark.skipif(not _mnist_available(), reason="MNIST not found under OPTLAB_DATA")


def _load(relpath: str):
    name = "smoke_" + relpath.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    if str(ROOT) not in sys.path:  # the benchmarks import benchmarks._common
        sys.path.insert(0, str(ROOT))
    spec.loader.exec_module(module)
    return module


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text`` whose header starts with ``header_start``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"| {header_start}"):
            rows = []
            for body in lines[i + 2 :]:
                if not body.startswith("|"):
                    break
                rows.append([c.strip() for c in body.strip("|").split("|")])
            return rows
    raise AssertionError(f"no table with a header starting {header_start!r} in:\n{text}")


@pytest.mark.benchmark
@needs_mnist
def test_weight_init_experiment_quick(tmp_path, capsys):
    mod = _load("experiments/weight_init.py")
    res = mod.main(["--quick", "--out", str(tmp_path / "wi")])
    out = capsys.readouterr().out
    rows = _table_rows(out, "init")
    assert [r[0] for r in rows] == ["`default`", "`uniform`"]  # the first two of INIT_NAMES
    for r in rows:
        assert r[2].endswith("%") and 0 <= float(r[2][:-1]) <= 100
    assert (tmp_path / "wi" / "weight_init.md").read_text() == res["markdown"]
    assert (tmp_path / "wi" / "results.csv").is_file()
    assert res["strategy"] == ["map"]  # a ConvNet sweep on the CPU
    assert res["in_lecture_range"] is False  # 2 batches of training are far from the lectures' 97%


@pytest.mark.benchmark
@needs_mnist
@pytest.mark.parametrize("contenders", ["sweep,flax,torch1", "cli"])
def test_init_table_quick(contenders, capsys):
    if "torch" in contenders:
        pytest.importorskip("torch")
    mod = _load("benchmarks/init_table.py")
    inits = "default" if contenders == "cli" else "default,he_normal"  # one process per init: keep it short
    res = mod.main(["--quick", "--contenders", contenders, "--inits", inits])
    out = capsys.readouterr().out
    names = contenders.split(",")
    timing = _table_rows(out, "contender")
    assert [r[0] for r in timing] == names
    assert all(float(r[2]) > 0 for r in timing)
    accuracy = _table_rows(out, "init")
    assert [r[0] for r in accuracy] == inits.split(",")
    assert all(0 <= float(c[:-1]) <= 100 for r in accuracy for c in r[1:])
    assert set(res["records"]) == set(names)
    if "sweep" in names:  # every ratio is to the sweep of the same round, so its own is 1
        assert timing[0][5].startswith("1.00")


@pytest.mark.benchmark
@needs_mnist
def test_sweep_throughput_quick(capsys):
    mod = _load("benchmarks/sweep_throughput.py")
    res = mod.main(["--quick", "--models", "convnet", "--strategies", "vmap,map"])
    out = capsys.readouterr().out
    rows = _table_rows(out, "members")
    assert [(r[0], r[1]) for r in rows] == [("1", "vmap"), ("1", "map"), ("2", "vmap"), ("2", "map")]
    assert all(float(r[2].replace(",", "")) > 0 for r in rows)
    assert {(r["members"], r["strategy"]) for r in res["results"]} == {(1, "vmap"), (1, "map"), (2, "vmap"), (2, "map")}


@pytest.mark.benchmark
@needs_mnist
def test_sweep_throughput_formulations_quick(capsys):
    mod = _load("benchmarks/sweep_throughput.py")
    res = mod.main(["--quick", "--formulations"])
    rows = _table_rows(capsys.readouterr().out, "ConvNet formulation")
    assert len(rows) == 4 and rows[0][4].startswith("1.00")
    assert all(float(r[1]) > 0 for r in rows)
    assert len(res["formulations"]) == 4


# ---------------------------------------------------------------------------------------------
# The ConvNet's channel-major layers (introduced for these benchmarks) against XLA's own
# convolution and reduce-window max pooling, values and derivatives. Runs without MNIST.


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
