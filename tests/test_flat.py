"""The flat update path (`flatten`): same results as the per-leaf path, bit for bit.

The reference is the wrapped optimizer itself run leaf by leaf: for every
element-wise optimizer, ``flatten(opt)`` must produce trajectories whose
parameters are *identical* (``assert_array_equal``) to ``opt``'s over 20
steps, on a model-like tree of many small arrays of mixed shapes (scalars,
one-element arrays, biases, conv kernels), jitted and eagerly, with
bfloat16 leaves among float32 ones, on ``nnx.State`` parameters, and under
``vmap``. Whole-tree reductions (SWATS's projections, L-BFGS's dot products)
sum in another order, so those are compared to float32 round-off.

XLA:CPU fuses multiplies and adds into FMA instructions, decided by LLVM per
generated loop. The in-process tests run with the default flags (what users
get) and are bit-exact for every optimizer except AdaGrad, where one element
of small arrays is fused differently (explained at ``FMA_SENSITIVE``; bounded
by round-off here), and with jax 0.12 also AdaDelta and RMSprop with
``eps_in_sqrt``; under ``vmap`` they are compared to round-off. ``test_bitwise_on_random_trees_without_fma`` repeats the
comparison, AdaGrad included, on random trees in a subprocess where FMA is
unavailable (``--xla_cpu_max_isa=AVX``): there both programs are plain IEEE
arithmetic and must agree exactly for any layout.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optlab
from optlab import schedules
from optlab.models import CNN
from optlab.transforms._flat import FlatLayout, FlatState, flatten

STEPS = 20

# A model-like tree: conv kernels, biases, BatchNorm scales/offsets, a scalar
# temperature, one-element arrays, nested containers.
SHAPES = {
    "stem": {"kernel": (3, 3, 3, 8), "bias": (8,)},
    "block1": {
        "conv": {"kernel": (3, 3, 8, 8)},
        "bn": {"scale": (8,), "bias": (8,)},
        "gate": (1,),
    },
    "block2": [
        {"kernel": (1, 1, 8, 16), "bias": (16,)},
        {"scale": (16,), "bias": (16,), "extra": (1, 1)},
    ],
    "head": {"kernel": (16, 10), "bias": (10,)},
    "temperature": (),
    "odd": {"a": (7, 1, 3), "b": (2,), "c": (33,), "d": (5, 7)},
}


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def make_tree(seed, shapes=SHAPES, dtype_of=lambda path: jnp.float32):
    rng = np.random.default_rng(seed)
    paths_shapes = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]
    leaves = [jnp.asarray(rng.standard_normal(s), dtype_of(p)) for p, s in paths_shapes]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes, is_leaf=_is_shape), leaves)


PARAMS = make_tree(0)
GRADS = [make_tree(100 + k) for k in range(STEPS)]

OPTIMIZERS = {
    "sgd": lambda: optlab.sgd(0.1),
    "sgd-maximize-wd": lambda: optlab.sgd(0.1, weight_decay=0.05, maximize=True),
    "sgd-momentum": lambda: optlab.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "sgd-nesterov": lambda: optlab.sgd(0.1, momentum=0.9, nesterov=True),
    "sgd-one-cycle": lambda: optlab.sgd(
        schedules.one_cycle(0.4, STEPS).learning_rate, momentum=0.9, nesterov=True, weight_decay=5e-4
    ),
    "classical-momentum": lambda: optlab.classical_momentum(0.1, 0.9),
    "nesterov-momentum": lambda: optlab.nesterov_momentum(0.1, 0.9),
    "rmsprop": lambda: optlab.rmsprop(0.01),
    "rmsprop-centered-momentum-wd": lambda: optlab.rmsprop(0.01, momentum=0.9, centered=True, weight_decay=0.1),
    "rmsprop-eps-in-sqrt": lambda: optlab.rmsprop(0.01, eps_in_sqrt=True),
    "adam": lambda: optlab.adam(1e-2),
    "adam-l2": lambda: optlab.adam(1e-2, weight_decay=0.1),
    "adam-amsgrad": lambda: optlab.adam(1e-2, amsgrad=True),
    "adam-no-bias-correction": lambda: optlab.adam(1e-2, bias_correction=False),
    "adam-cosine": lambda: optlab.adam(schedules.cosine(1e-2, STEPS)),
    "adamw": lambda: optlab.adamw(1e-2, weight_decay=0.1),
    "adagrad-lr-decay": lambda: optlab.adagrad(0.1, lr_decay=0.01, weight_decay=0.1),
    "adadelta": lambda: optlab.adadelta(weight_decay=0.1),
    "rprop": lambda: optlab.rprop(),
    "adaptive-gains": lambda: optlab.adaptive_gains(0.1),
    "chain-clip-value": lambda: optlab.chain(optlab.clip(0.5), optlab.scale_by_adam(), optlab.scale_by_learning_rate(1e-2)),
}

# AdaGrad's first-step select ``where(count == 0, initial_value, s) + g * g`` (kept
# only for a non-zero initial accumulator value: from zero it is compiled out) makes
# LLVM unswitch the loop; in the fully unrolled loop of a small per-leaf array it
# then computes ``g * g`` of the first element once, before the branch, so that one
# element is not fused into an FMA while every other element (and every element of
# the flat buffer) is. The arithmetic is the same (see the FMA-free test below); the
# rounding of that element differs by one FMA.
FMA_SENSITIVE = {
    "adagrad": lambda: optlab.adagrad(0.1, weight_decay=0.1, initial_accumulator_value=0.1),
    "adagrad-lr-decay-initial-value": lambda: optlab.adagrad(0.1, lr_decay=0.01, initial_accumulator_value=0.1),
}
# With jax 0.12's XLA, ``sqrt(x + eps)`` loops fuse differently too (exact without FMA:
# both are in the subprocess test below).
FMA_SENSITIVE_FROM_JAX_0_12 = {"adadelta", "rmsprop-eps-in-sqrt"}
JAX_0_12 = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 12)


def trajectory(tx, params=PARAMS, grads=GRADS, jit=True):
    update = jax.jit(tx.update) if jit else tx.update
    apply = jax.jit(optlab.apply_updates) if jit else optlab.apply_updates
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = update(g, state, params)
        params = apply(params, updates)
        out.append(params)
    return out, state


def assert_trajectories_equal(a, b):
    for step, (pa, pb) in enumerate(zip(a, b)):
        la, ta = jax.tree_util.tree_flatten(pa)
        lb, tb = jax.tree_util.tree_flatten(pb)
        assert ta == tb
        for x, y in zip(la, lb):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=f"step {step + 1}")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_flat_trajectory_is_bitwise_the_per_leaf_trajectory(name):
    per_leaf, _ = trajectory(OPTIMIZERS[name]())
    flat, state = trajectory(flatten(OPTIMIZERS[name]()))
    assert isinstance(state, FlatState)
    if JAX_0_12 and name in FMA_SENSITIVE_FROM_JAX_0_12:
        for pa, pb in zip(per_leaf, flat):
            for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    else:
        assert_trajectories_equal(per_leaf, flat)


@pytest.mark.parametrize("name", sorted(FMA_SENSITIVE))
def test_adagrad_flat_trajectory_matches_up_to_fma_rounding(name):
    per_leaf, _ = trajectory(FMA_SENSITIVE[name]())
    flat, _ = trajectory(flatten(FMA_SENSITIVE[name]()))
    for pa, pb in zip(per_leaf, flat):
        for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sgd-momentum", "adam-l2", "adagrad", "rmsprop-centered-momentum-wd"])
def test_flat_trajectory_is_bitwise_without_jit(name):
    # Op by op, every operation is its own small program: no fusion, no unrolled
    # per-leaf loop, so AdaGrad is bit-exact here too.
    make = {**OPTIMIZERS, **FMA_SENSITIVE}[name]
    grads = GRADS[:5]
    per_leaf, _ = trajectory(make(), grads=grads, jit=False)
    flat, _ = trajectory(flatten(make()), grads=grads, jit=False)
    assert_trajectories_equal(per_leaf, flat)


def test_optax_transforms_work_inside_flatten():
    per_leaf, _ = trajectory(optax.adamw(1e-2, weight_decay=0.1))
    flat, _ = trajectory(flatten(optax.adamw(1e-2, weight_decay=0.1)))
    assert_trajectories_equal(per_leaf, flat)


# --- what the state looks like ---------------------------------------------------------------


def test_state_is_flat_and_hyperparameters_are_readable():
    opt = flatten(optlab.adam(1e-3, b1=0.8))
    state = opt.init(PARAMS)
    adam_state = state.inner_state.inner_state[1]
    layout = FlatLayout(PARAMS)
    n_big = sum(x.size for x in jax.tree_util.tree_leaves(PARAMS) if x.size > 1)
    assert set(adam_state.mu) == set(layout.buffers)
    assert adam_state.mu["float32"].shape == (n_big,)
    # The one-element leaves (gate, extra, temperature) keep their shapes, apart.
    assert sorted(x.shape for k, x in adam_state.mu.items() if k != "float32") == [(), (1,), (1, 1)]
    hp = optlab.hyperparams(state)
    assert float(hp["learning_rate"]) == pytest.approx(1e-3) and float(hp["b1"]) == pytest.approx(0.8)


def test_set_hyperparams_through_the_flat_state_matches_per_leaf():
    def run(opt):
        state = opt.init(PARAMS)
        params = PARAMS
        for k, g in enumerate(GRADS[:6]):
            if k == 3:
                state = optlab.set_hyperparams(state, learning_rate=0.05)
            updates, state = jax.jit(opt.update)(g, state, params)
            params = optlab.apply_updates(params, updates)
        return [params], state

    per_leaf, _ = run(optlab.sgd(0.1, momentum=0.9))
    flat, state = run(flatten(optlab.sgd(0.1, momentum=0.9)))
    assert float(optlab.hyperparams(state)["learning_rate"]) == pytest.approx(0.05)
    assert_trajectories_equal(per_leaf, flat)


@pytest.mark.parametrize(
    "shapes, keys",
    [
        ({"w": (3, 2)}, ["float32"]),  # one leaf: just raveled
        ({"w": (3, 2), "b": (2,)}, ["float32.0", "float32.1"]),  # a lone buffer is split in two
        ({"w": (3, 2), "b": (2,), "t": ()}, ["float32", "leaf00001"]),  # leaves in key order: b, t, w
        ({"s": (1,)}, ["leaf00000"]),
        ({"a": (4,), "b": (1, 1), "c": (5,)}, ["float32", "leaf00001"]),
    ],
)
def test_layout(shapes, keys):
    tree = make_tree(1, shapes)
    layout = FlatLayout(tree)
    flat = layout.pack(tree)
    assert sorted(flat) == keys
    assert sum(int(np.prod(x.shape)) for x in flat.values()) == sum(x.size for x in jax.tree_util.tree_leaves(tree))
    back = layout.unpack(flat)
    for x, y in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(x, y)


def test_large_leaves_stay_apart():
    tree = {"big": jnp.zeros((100, 50)), "a": jnp.zeros(30), "b": jnp.zeros((4, 5))}
    flat = FlatLayout(tree, max_packed_size=1000).pack(tree)
    # leaves in key order: a, b, big; "big" (5,000 elements) keeps its shape.
    assert {k: v.shape for k, v in flat.items()} == {"float32": (50,), "leaf00002": (100, 50)}
    assert {k: v.shape for k, v in FlatLayout(tree, max_packed_size=10**6).pack(tree).items()} == {
        "float32.0": (50,),
        "float32.1": (5000,),
    }


@pytest.mark.parametrize("name", ["sgd-momentum", "adam-l2", "rmsprop-centered-momentum-wd", "adamw"])
def test_bitwise_with_some_leaves_packed_and_some_apart(name):
    # With max_packed_size=64 the conv kernels (72 to 576 elements) stay apart.
    per_leaf, _ = trajectory(OPTIMIZERS[name]())
    flat, _ = trajectory(flatten(OPTIMIZERS[name](), max_packed_size=64))
    assert_trajectories_equal(per_leaf, flat)


def test_split_point_is_the_leaf_boundary_nearest_the_middle():
    tree = {"a": jnp.zeros(10), "b": jnp.zeros(30), "c": jnp.zeros(25), "d": jnp.zeros(5)}
    flat = FlatLayout(tree).pack(tree)
    assert {k: v.shape for k, v in flat.items()} == {"float32.0": (40,), "float32.1": (30,)}


# --- dtypes, nnx, vmap -----------------------------------------------------------------------


def _bf16_biases(path):
    return jnp.bfloat16 if jax.tree_util.keystr(path).endswith("['bias']") else jnp.float32


def test_mixed_dtypes_pack_by_dtype_and_match_per_leaf():
    params = make_tree(0, dtype_of=_bf16_biases)
    grads = [make_tree(100 + k, dtype_of=_bf16_biases) for k in range(STEPS)]
    opt = lambda: optlab.adam(1e-2, weight_decay=0.1)  # noqa: E731
    flat_state = flatten(opt()).init(params)
    mu = flat_state.inner_state.inner_state[1].mu
    assert mu["bfloat16"].dtype == jnp.bfloat16 and mu["float32"].dtype == jnp.float32
    per_leaf, _ = trajectory(opt(), params, grads)
    flat, _ = trajectory(flatten(opt()), params, grads)
    assert_trajectories_equal(per_leaf, flat)  # also checks every leaf kept its dtype


@pytest.mark.parametrize(
    "make",
    [
        lambda: optlab.adam(1e-2, mu_dtype=jnp.float32),
        lambda: optlab.sgd(1e-2, momentum=0.9, accumulator_dtype=jnp.float32),
        lambda: optlab.rmsprop(1e-2, centered=True, accumulator_dtype=jnp.float32),
    ],
    ids=["adam", "sgd-momentum", "rmsprop-centered"],
)
def test_float32_state_for_bfloat16_parameters(make):
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    grads = [jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), g) for g in GRADS]
    state = flatten(make()).init(params)
    slots = [x for x in jax.tree_util.tree_leaves(state.inner_state.inner_state) if x.ndim > 0]
    assert slots and {x.dtype for x in slots} == {jnp.dtype(jnp.float32)}
    assert_trajectories_equal(trajectory(make(), params, grads)[0], trajectory(flatten(make()), params, grads)[0])


def test_nnx_state_parameters():
    model = CNN(channels=(4, 8), batchnorm="before", rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    def random_like(k):
        rngs = [np.random.default_rng(k * 97 + i) for i in range(len(leaves))]
        new = [jnp.asarray(r.standard_normal(x.shape), x.dtype) for r, x in zip(rngs, leaves)]
        return jax.tree_util.tree_unflatten(treedef, new)

    grads = [random_like(k) for k in range(6)]
    per_leaf, _ = trajectory(optlab.adamw(1e-2), params, grads)
    flat, _ = trajectory(flatten(optlab.adamw(1e-2)), params, grads)
    assert isinstance(flat[-1], nnx.State)
    assert_trajectories_equal(per_leaf, flat)


@pytest.mark.parametrize(
    "make",
    [
        lambda lr: optlab.adam(lr),
        lambda lr: optlab.sgd(lr, momentum=0.9, weight_decay=0.1),
        lambda lr: optlab.adam(lr, weight_decay=0.1),
        lambda lr: optlab.sgd(lr, momentum=0.9, dampening=0.1, weight_decay=0.1),
    ],
    ids=["adam", "sgd-momentum-wd", "adam-wd", "sgd-momentum-dampening-wd"],
)
def test_vmap_over_learning_rates(make):
    # Under vmap LLVM contracts multiply-adds into FMAs differently in the flat and the
    # per-leaf loops (which cases differ depends on the jax version), so the results
    # may differ in the last bit (at most 2.4e-7 seen). Without FMA they are
    # bit-identical: test_bitwise_on_random_trees_without_fma runs two of these cases.
    lrs = jnp.array([1e-3, 1e-2, 1e-1])

    def run(wrap):
        # Parameters and gradients are arguments, as in training: closed over, XLA
        # would constant-fold the whole trajectory at compile time.
        def one(lr, params, grads):
            opt = wrap(make(lr))
            state = opt.init(params)
            for g in grads:
                updates, state = opt.update(g, state, params)
                params = optlab.apply_updates(params, updates)
            return params

        return jax.jit(jax.vmap(one, in_axes=(0, None, None)))(lrs, PARAMS, GRADS[:5])

    per_leaf, flat = run(lambda t: t), run(flatten)
    assert jax.tree_util.tree_leaves(flat)[0].shape[0] == 3
    for x, y in zip(jax.tree_util.tree_leaves(per_leaf), jax.tree_util.tree_leaves(flat)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=5e-7)


def test_vmap_over_a_batch_of_parameter_trees():
    batch = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[make_tree(s) for s in range(3)])
    gbatch = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[make_tree(50 + s) for s in range(3)])

    def run(opt):
        def step(p, g):
            updates, _ = opt.update(g, opt.init(p), p)
            return optlab.apply_updates(p, updates)

        return jax.jit(jax.vmap(step))(batch, gbatch)

    assert_trajectories_equal([run(optlab.rmsprop(0.01, momentum=0.9))], [run(flatten(optlab.rmsprop(0.01, momentum=0.9)))])


def test_donated_jit_step():
    opt = flatten(optlab.adam(1e-2))

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optlab.apply_updates(params, updates), state

    donated = jax.jit(step.__wrapped__ if hasattr(step, "__wrapped__") else step, donate_argnums=(0, 1))
    params = jax.tree_util.tree_map(jnp.copy, PARAMS)
    state = jax.tree_util.tree_map(jnp.copy, opt.init(params))
    expected_params, _ = step(PARAMS, opt.init(PARAMS), GRADS[0])
    params, state = donated(params, state, GRADS[0])
    assert_trajectories_equal([expected_params], [params])


# --- inside other wrappers, and reductions -----------------------------------------------------


def test_flatten_inside_partition_groups():
    def opt(wrap):
        return optlab.partition(
            {"decay": wrap(optlab.adamw(1e-2, weight_decay=0.1)), "no_decay": wrap(optlab.adam(1e-2))},
            optlab.weight_decay_labels,
        )

    assert_trajectories_equal(trajectory(opt(lambda t: t))[0], trajectory(opt(flatten))[0])


def test_whole_tree_reductions_agree_to_round_off():
    def opt():
        return optlab.chain(optlab.clip_by_global_norm(1.0), optlab.scale_by_learning_rate(0.1))

    for name, make in [("clip_by_global_norm", opt), ("swats", lambda: optlab.swats(1e-2))]:
        a, _ = trajectory(make())
        b, _ = trajectory(flatten(make()))
        for x, y in zip(jax.tree_util.tree_leaves(a[-1]), jax.tree_util.tree_leaves(b[-1])):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)


def test_lbfgs_value_fn_is_translated_to_the_flat_form():
    lbfgs_mod = pytest.importorskip("optlab.optimizers._lbfgs")
    target = make_tree(7, {"w": (4, 3), "b": (3,), "s": ()})
    scales = make_tree(8, {"w": (4, 3), "b": (3,), "s": ()})

    def loss(p):
        terms = jax.tree_util.tree_map(lambda x, t, s: jnp.sum((1.0 + s**2) * (x - t) ** 2), p, target, scales)
        return sum(jax.tree_util.tree_leaves(terms))

    value_fn = jax.value_and_grad(loss)
    params0 = jax.tree_util.tree_map(jnp.zeros_like, target)

    def run(opt):
        update = jax.jit(lambda g, s, p, v: opt.update(g, s, p, value_fn=value_fn, value=v))
        params, state = params0, opt.init(params0)
        for _ in range(20):
            value, grads = value_fn(params)
            updates, state = update(grads, state, params, value)
            params = optlab.apply_updates(params, updates)
        return params

    a, b = run(lbfgs_mod.lbfgs()), run(flatten(lbfgs_mod.lbfgs()))
    for x, y, t in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), jax.tree_util.tree_leaves(target)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(y, t, atol=1e-3)  # and it did converge


# --- bad input -------------------------------------------------------------------------------


def test_gradient_with_another_dtype_is_rejected():
    opt = flatten(optlab.sgd(0.1))
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    state = opt.init(params)
    with pytest.raises(TypeError, match=r"gradient leaf \['w'\] is bfloat16\[3\], but the parameter is float32\[3\]"):
        opt.update({"w": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2)}, state, params)


def test_gradient_tree_of_another_structure_is_rejected():
    opt = flatten(optlab.sgd(0.1))
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match="does not match the parameter tree"):
        opt.update({"w": jnp.ones(3)}, opt.init(params), params)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"flatten\(\) takes a gradient transformation, got `inner` \(=0.1\)"):
        flatten(0.1)
    opt = flatten(optlab.sgd(0.1))
    with pytest.raises(TypeError, match="expects the FlatState"):
        opt.update({"w": jnp.ones(3)}, optlab.sgd(0.1).init({"w": jnp.ones(3)}))
    layout = FlatLayout({"w": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match="expected a flat tree with keys"):
        layout.unpack({"float32": jnp.ones(5)})
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"`max_packed_size` \(="):
            flatten(optlab.sgd(0.1), max_packed_size=bad)


def _mixed_layout():
    # Leaves in key order: a, b (packed in "float32", 7 elements), h ("bfloat16", 2), t (apart: one element).
    tree = {"a": jnp.ones(3), "b": jnp.ones(4), "h": jnp.ones(2, jnp.bfloat16), "t": jnp.ones((1, 1))}
    layout = FlatLayout(tree)
    flat = layout.pack(tree)
    assert sorted(flat) == ["bfloat16", "float32", "leaf00003"]
    return layout, flat


@pytest.mark.parametrize(
    ("key", "bad", "error", "match"),
    [
        ("float32", jnp.ones(7, jnp.int32), TypeError, r"buffer 'float32' is int32\[7\].*expects float32\[7\]"),
        ("float32", jnp.ones(12), ValueError, r"buffer 'float32' is float32\[12\].*expects float32\[7\]"),
        ("float32", jnp.ones(5), ValueError, r"buffer 'float32' is float32\[5\].*expects float32\[7\]"),
        ("float32", jnp.ones((7, 1)), ValueError, r"buffer 'float32' is float32\[7, 1\].*expects float32\[7\]"),
        ("bfloat16", jnp.ones(2), TypeError, r"buffer 'bfloat16' is float32\[2\].*expects bfloat16\[2\]"),
        ("leaf00003", jnp.ones(1), ValueError, r"buffer 'leaf00003' is float32\[1\].*expects float32\[1, 1\]"),
        ("leaf00003", jnp.ones((1, 1), jnp.int32), TypeError, r"buffer 'leaf00003' is int32\[1, 1\]"),
    ],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_unpack_checks_each_buffer_dtype_and_size(key, bad, error, match, jit):
    layout, flat = _mixed_layout()
    unpack = jax.jit(layout.unpack) if jit else layout.unpack  # under jit: raised while tracing
    with pytest.raises(error, match=match):
        unpack({**flat, key: bad})


# --- IEEE exactness on random layouts, FMA contraction off -------------------------------------

_RANDOM_TREES_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optlab
    from optlab.transforms._flat import flatten
    opts = {
        "sgd-momentum": lambda: optlab.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2),
        "nesterov-momentum": lambda: optlab.nesterov_momentum(0.1),
        "adagrad-lr-decay": lambda: optlab.adagrad(0.1, lr_decay=0.01, weight_decay=0.1),
        "rmsprop-centered": lambda: optlab.rmsprop(0.01, momentum=0.9, centered=True),
        "adam-l2": lambda: optlab.adam(1e-2, weight_decay=0.1),
        "adamw-amsgrad": lambda: optlab.adamw(1e-2, amsgrad=True),
        "adadelta": lambda: optlab.adadelta(weight_decay=0.1),
        "rmsprop-eps-in-sqrt": lambda: optlab.rmsprop(0.01, eps_in_sqrt=True),
    }
    mismatches = []
    for seed in range(4):
        r = np.random.default_rng(seed)
        shapes = [tuple(int(d) for d in r.integers(1, 7, int(r.integers(0, 4)))) for _ in range(int(r.integers(2, 25)))]
        tree = lambda s: {f"p{i:02d}": jnp.asarray(np.random.default_rng(s * 1000 + i).standard_normal(x), jnp.float32)
                          for i, x in enumerate(shapes)}
        grads = [tree(seed * 50 + k + 1) for k in range(8)]
        for name, make in opts.items():
            finals = []
            for opt in (make(), flatten(make())):
                params, state, update = tree(seed * 50), opt.init(tree(seed * 50)), jax.jit(opt.update)
                for g in grads:
                    u, state = update(g, state, params)
                    params = optlab.apply_updates(params, u)
                finals.append(params)
            if any(not np.array_equal(finals[0][k], finals[1][k]) for k in finals[0]):
                mismatches.append((seed, name))
    # Under vmap over learning rates too (with FMA these differ in the last bit).
    lrs = jnp.array([1e-3, 1e-2, 1e-1])
    vmapped = {
        "vmap-adam-l2": lambda lr: optlab.adam(lr, weight_decay=0.1),
        "vmap-sgd-momentum": lambda lr: optlab.sgd(lr, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    }
    for name, make in vmapped.items():
        finals = []
        for wrap in (lambda t: t, flatten):
            def one(lr, params, gs):
                opt = wrap(make(lr))
                state = opt.init(params)
                for g in gs:
                    u, state = opt.update(g, state, params)
                    params = optlab.apply_updates(params, u)
                return params
            finals.append(jax.jit(jax.vmap(one, in_axes=(0, None, None)))(lrs, tree(0), grads[:5]))
        if any(not np.array_equal(finals[0][k], finals[1][k]) for k in finals[0]):
            mismatches.append(name)
    print("MISMATCHES", mismatches)
    """
)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="--xla_cpu_max_isa=AVX is an x86 flag")
def test_bitwise_on_random_trees_without_fma():
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_max_isa=AVX", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _RANDOM_TREES_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MISMATCHES []" in out.stdout, out.stdout[-3000:]
