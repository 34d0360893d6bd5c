"""On-device input pipeline: normalisation, shuffled batches, CIFAR augmentation.

The intended recipe keeps the whole dataset on the device as ``uint8`` (4x
smaller than float32; CIFAR-10's training set is 150 MB) and does everything
else inside the jitted training epoch::

    data = to_device(load("cifar10"))
    stats = channel_stats(load("cifar10").train_images)

    def epoch(state, key):
        xb, yb = epoch_batches(key, data.train_images, data.train_labels, 128, augment=augment_cifar)
        def step(state, batch):
            x, y = batch
            x = normalize(x, "standardize", stats)  # after augmenting, so padding is black
            ...
        return jax.lax.scan(step, state, (xb, yb))

Same key, same batches and same augmentation, on a given backend.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_choice, check_int, is_traced
from ._dataset import Dataset

MODES = ("unit", "centered", "standardize", "raw")


class Stats(NamedTuple):
    """Per-channel mean and standard deviation of pixel values scaled to [0, 1]."""

    mean: np.ndarray
    std: np.ndarray


def channel_stats(images: Any) -> Stats:
    """Per-channel mean and (population) standard deviation of ``uint8`` NHWC images.

    With ``x = images / 255``, channel ``c`` over all ``N*H*W`` pixels:
    ``mean_c = E[x_c]`` and ``std_c = sqrt(E[(x_c - mean_c)^2])`` (``ddof=0``, as
    the usual CIFAR constants are computed). Compute them on the *training*
    set only, and reuse them for the test set.

    The sums are exact: each channel's 256-bin histogram is counted in
    integers, then the moments are taken from it in float64.

    Example:
      >>> import numpy as np
      >>> s = channel_stats(np.array([0, 255], np.uint8).reshape(2, 1, 1, 1))
      >>> float(s.mean[0]), float(s.std[0])
      (0.5, 0.5)
    """
    images = np.asarray(images)
    _check_uint8_nhwc("images", images)
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        means.append(mean)
        stds.append(np.sqrt((counts * (values - mean) ** 2).sum() / n))
    return Stats(np.array(means, np.float32), np.array(stds, np.float32))


def normalize(images: Any, mode: str, stats: Stats | tuple | None = None):
    """``uint8`` images to float32, by an explicit rule.

    With ``x`` the stored pixel value in ``[0, 255]``:

    - ``"raw"``: ``x`` as float, in ``[0, 255]``;
    - ``"unit"``: ``x / 255``, in ``[0, 1]`` (torchvision's ``ToTensor``);
    - ``"centered"``: ``x / 255 - 0.5``, in ``[-0.5, 0.5]``;
    - ``"standardize"``: ``(x / 255 - mean_c) / std_c`` per channel ``c``
      (``ToTensor`` then ``Normalize(mean, std)``), with ``stats`` from
      :func:`channel_stats` on the training set.

    A numpy array gives a numpy array; a jax array (or tracer, inside ``jit``)
    gives a jax array. ``mode`` must be a Python string. The two can differ
    in the last bit or two for some pixels: XLA computes ``x / 255`` as
    ``x * (1 / 255)``, where numpy divides.

    Example:
      >>> import numpy as np
      >>> normalize(np.array([0, 51, 255], np.uint8), "centered").tolist()
      [-0.5, -0.30000001192092896, 0.5]
    """
    check_choice("mode", mode, MODES)
    xp = np if isinstance(images, np.ndarray) else jnp
    if xp is jnp:
        images = jnp.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(
            f"`images` must be uint8 pixel values, got dtype {images.dtype}: normalising twice is a bug;"
            " keep the uint8 arrays and normalise each batch once"
        )
    x = images.astype(xp.float32)
    if mode == "raw":
        return x
    x = x / xp.float32(255.0)
    if mode == "unit":
        return x
    if mode == "centered":
        return x - xp.float32(0.5)
    if stats is None:
        raise ValueError("`stats` (=None) is required by mode 'standardize'; use channel_stats(train_images)")
    mean, std = (xp.asarray(s, dtype=xp.float32) for s in stats)
    channels = images.shape[-1] if images.ndim else 0
    for name, s in (("stats.mean", mean), ("stats.std", std)):
        if s.shape not in ((), (1,), (channels,)):
            raise ValueError(f"`{name}` has shape {s.shape}; expected ({channels},) for {channels} channel(s)")
    if not is_traced(std) and bool(np.any(np.asarray(std) <= 0)):
        raise ValueError(f"`stats.std` (={np.asarray(std).tolist()}) must be > 0")
    return (x - mean) / std


def _check_uint8_nhwc(name: str, images: Any) -> None:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise TypeError(f"`{name}` must be uint8 NHWC (4-d), got {images.dtype} with shape {images.shape}")


# --------------------------------------------------------------------------
# Batching


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """``n // batch_size`` when dropping the remainder, else ``ceil(n / batch_size)``."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def _check_batching(n: Any, batch_size: Any, drop_remainder: bool) -> None:
    check_int("n", n, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    if drop_remainder and batch_size > n:
        raise ValueError(
            f"`batch_size` (={batch_size}) exceeds the number of examples (={n}), so dropping the"
            " remainder leaves no batch; use drop_remainder=False or a smaller batch"
        )


@partial(jax.jit, static_argnames=("n", "batch_size", "drop_remainder"))
def _shuffle(key, n: int, batch_size: int, drop_remainder: bool):
    perm = jax.random.permutation(key, n).astype(jnp.int32)
    nb = num_batches(n, batch_size, drop_remainder)
    # Without dropping, the last batch is topped up from the start of the same
    # permutation: every example appears, a few twice, and shapes stay static.
    return perm[jnp.arange(nb * batch_size) % n].reshape(nb, batch_size)


def shuffle_batches(key, n: int, batch_size: int, drop_remainder: bool = True):
    """Indices of one shuffled epoch, shaped ``(num_batches, batch_size)``, int32.

    A uniformly random permutation ``pi`` of ``0..n-1`` (``jax.random.permutation``)
    cut into consecutive batches: batch ``b`` is ``pi[b*B:(b+1)*B]``. With
    ``drop_remainder`` the last ``n mod B`` examples of ``pi`` are skipped this
    epoch (they differ each epoch); without it, ``ceil(n/B)`` batches and the
    last one is completed with ``pi[0], pi[1], ...``. Same key, same order.
    PyTorch's ``DataLoader(shuffle=True, drop_last=...)`` is the analogue.

    Example:
      >>> import jax
      >>> shuffle_batches(jax.random.key(0), 10, 4).shape
      (2, 4)
    """
    _check_batching(n, batch_size, drop_remainder)
    return _shuffle(key, int(n), int(batch_size), bool(drop_remainder))


def sequential_batches(n: int, batch_size: int):
    """Unshuffled indices ``(num_batches, batch_size)`` and a validity mask, for evaluation.

    Index ``i`` of the padded range is ``i mod n`` and ``mask[i] = i < n``,
    so every example is counted exactly once when the per-example results
    are weighted by ``mask``.

    Example:
      >>> idx, mask = sequential_batches(5, 2)
      >>> idx.tolist(), mask.tolist()
      ([[0, 1], [2, 3], [4, 0]], [[True, True], [True, True], [True, False]])
    """
    _check_batching(n, batch_size, False)
    nb = num_batches(n, batch_size, False)
    flat = jnp.arange(nb * batch_size, dtype=jnp.int32)
    return (flat % n).reshape(nb, batch_size), (flat < n).reshape(nb, batch_size)


# --------------------------------------------------------------------------
# Augmentation


@partial(jax.jit, static_argnames=("padding", "flip"))
def _augment(key, images, fill, padding: int, flip: bool):
    h, w, c = images.shape[-3:]
    x = images.reshape(-1, h, w, c)
    n = x.shape[0]
    k_y, k_x, k_flip = jax.random.split(key, 3)
    dy = jax.random.randint(k_y, (n,), -padding, padding + 1)
    dx = jax.random.randint(k_x, (n,), -padding, padding + 1)
    # Crop and flip as one gather: out[i, j] = x[i + dy, j' + dx] with
    # j' = w - 1 - j when mirrored (the flip applies to the cropped image).
    cols = jnp.broadcast_to(jnp.arange(w), (n, w))
    if flip:
        mirror = jax.random.bernoulli(k_flip, 0.5, (n,))
        cols = jnp.where(mirror[:, None], w - 1 - cols, cols)
    rows = jnp.arange(h)[None, :] + dy[:, None]
    cols = cols + dx[:, None]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    out = x[jnp.arange(n)[:, None, None], jnp.clip(rows, 0, h - 1)[:, :, None], jnp.clip(cols, 0, w - 1)[:, None, :]]
    out = jnp.where(inside[..., None], out, jnp.asarray(fill, x.dtype))
    return out.reshape(images.shape)


def augment_cifar(key, images, *, padding: int = 4, flip: bool = True, fill: Any = 0):
    """Random translation by padded crop, then random horizontal flip, per example.

    For each image independently: pad ``padding`` pixels on every side with
    ``fill`` (zero padding by default, as torchvision's
    ``RandomCrop(32, padding=4)`` and He et al., 2016, "Deep Residual Learning",
    sec. 4.2), take a random ``H x W`` window, i.e.
    ``out[i, j] = in[i + dy, j + dx]`` (``fill`` outside) with ``dy, dx``
    uniform in ``{-padding, ..., padding}``; then mirror left-right with
    probability 1/2 (``RandomHorizontalFlip``).

    ``images`` is ``(..., H, W, C)`` of any dtype (uint8 or float32), any
    number of leading batch axes; the result has the same shape and dtype.
    Apply it to uint8 or unit-scaled images *before* standardising to match
    torchvision exactly (padding is black); after standardising, pass
    ``fill=normalize(zero_pixel, ...)`` per channel to get the same. ``fill``
    must be representable in the images' dtype (e.g. an integer in
    ``[0, 255]`` for uint8): a ``ValueError`` otherwise. Jitted; same key,
    same result.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> augment_cifar(jax.random.key(0), jnp.zeros((8, 32, 32, 3))).shape
      (8, 32, 32, 3)
    """
    check_int("padding", padding, minimum=0)
    if not isinstance(flip, (bool, np.bool_)):
        raise TypeError(f"`flip` (={flip!r}) must be a bool")
    images = jnp.asarray(images)
    if images.ndim < 4:
        raise ValueError(f"`images` must be (..., H, W, C) with at least one batch axis, got shape {images.shape}")
    _check_fill(fill, images.dtype)
    return _augment(key, images, fill, int(padding), bool(flip))


def _check_fill(fill: Any, dtype) -> None:
    """Refuse a ``fill`` that casting to the images' dtype would change (-1 wraps to 255 in uint8)."""
    if is_traced(fill):
        return
    try:
        values = np.asarray(fill)
    except Exception:  # noqa: BLE001 - left to the cast in _augment, which names the problem itself
        return
    if values.dtype.kind not in "biuf":
        raise TypeError(f"`fill` (={fill!r}) must be a number or an array of numbers")
    values = values.astype(np.float64)
    dtype = np.dtype(dtype)
    if dtype.kind in "biu":
        lo, hi = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        ok = (values == np.round(values)) & (values >= lo) & (values <= hi)
        rule = f"an integer in [{lo}, {hi}]"
    elif dtype.kind == "f" or jnp.issubdtype(dtype, jnp.floating):
        hi = float(jnp.finfo(dtype).max)
        ok = ~np.isfinite(values) | (np.abs(values) <= hi)
        rule = f"in [{-hi}, {hi}]"
    else:
        return
    if not np.all(ok):
        raise ValueError(f"`fill` (={fill!r}) is not representable in the images' dtype {dtype}: it must be {rule}")


# --------------------------------------------------------------------------
# Whole epochs


@partial(jax.jit, static_argnames=("batch_size", "drop_remainder", "augment"))
def _epoch(key, images, labels, batch_size, drop_remainder, augment):
    k_perm, k_aug = jax.random.split(key)
    idx = _shuffle(k_perm, images.shape[0], batch_size, drop_remainder)
    xb, yb = images[idx], labels[idx]
    if augment is not None:
        xb = augment(k_aug, xb)
    return xb, yb


def epoch_batches(
    key,
    images,
    labels,
    batch_size: int,
    *,
    drop_remainder: bool = True,
    augment: Callable | None = None,
):
    """One shuffled (and optionally augmented) epoch, ready for ``jax.lax.scan``.

    Returns ``(images[idx], labels[idx])`` with ``idx = shuffle_batches(k1, n,
    batch_size, drop_remainder)``, shapes ``(num_batches, batch_size, H, W, C)``
    and ``(num_batches, batch_size)``, then ``images <- augment(k2, images)``
    when ``augment`` is given (e.g. :func:`augment_cifar`), where
    ``k1, k2 = jax.random.split(key)``. The gather and the augmentation run in
    one jitted call on the device holding the arrays.

    ``augment`` is a static argument: pass the same function object each
    epoch (a module-level function, or one ``functools.partial`` made once),
    or it is compiled again.

    This materialises the epoch (one more copy of the data). Where memory is
    tight, scan over ``shuffle_batches(...)`` instead and gather inside the step.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x, y = jnp.zeros((10, 8, 8, 1), jnp.uint8), jnp.arange(10)
      >>> xb, yb = epoch_batches(jax.random.key(0), x, y, 4)
      >>> xb.shape, yb.shape
      ((2, 4, 8, 8, 1), (2, 4))
    """
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    if images.ndim < 1 or labels.ndim < 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"`images` (shape {images.shape}) and `labels` (shape {labels.shape}) must have the same"
            " number of examples along axis 0"
        )
    _check_batching(images.shape[0], batch_size, drop_remainder)
    if augment is not None and not callable(augment):
        raise TypeError(f"`augment` (={augment!r}) must be callable(key, images) or None")
    return _epoch(key, images, labels, int(batch_size), bool(drop_remainder), augment)


class PipelineTiming(NamedTuple):
    """Wall-clock cost of the input pipeline (gather + augment) for one epoch."""

    seconds_per_epoch: float  # median over the timed repeats, compilation excluded
    first_call_seconds: float  # the first call, including compilation
    num_batches: int
    examples_per_second: float


def time_input_pipeline(
    key,
    images,
    labels,
    batch_size: int,
    *,
    augment: Callable | None = None,
    drop_remainder: bool = True,
    repeats: int = 3,
) -> PipelineTiming:
    """Time :func:`epoch_batches` alone, so training can report its input cost.

    Runs it once to compile, then ``repeats`` more times with keys
    ``fold_in(key, r)``, waiting for the results each time
    (``block_until_ready``); reports the median. Training fuses the pipeline
    into its epoch, where it may overlap with compute, so this is an upper
    bound on what it adds.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> t = time_input_pipeline(jax.random.key(0), jnp.zeros((64, 8, 8, 1)), jnp.zeros(64), 16, repeats=1)
      >>> t.num_batches
      4
    """
    check_int("repeats", repeats, minimum=1)
    start = time.perf_counter()
    xb, _ = jax.block_until_ready(epoch_batches(key, images, labels, batch_size,
                                                drop_remainder=drop_remainder, augment=augment))
    first = time.perf_counter() - start
    times = []
    for r in range(1, repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(epoch_batches(jax.random.fold_in(key, r), images, labels, batch_size,
                                            drop_remainder=drop_remainder, augment=augment))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    examples = xb.shape[0] * xb.shape[1]
    return PipelineTiming(median, first, int(xb.shape[0]), examples / median if median > 0 else float("inf"))


class DeviceData(NamedTuple):
    """A :class:`Dataset`'s arrays on a device: images stay uint8, labels int32."""

    train_images: jax.Array
    train_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array


def to_device(dataset: Dataset, device: Any = None) -> DeviceData:
    """Copy the four arrays of ``dataset`` to ``device`` (default: JAX's default device).

    Example:
      >>> from optlab.data import load
      >>> to_device(load("digits")).train_images.shape
      (1442, 8, 8, 1)
    """
    arrays = (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels)
    return DeviceData(*(jax.device_put(np.asarray(a), device) for a in arrays))
