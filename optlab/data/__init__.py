"""Datasets for the optlab training lab, and their on-device input pipeline.

Loading (host memory, numpy, pixels untouched)::

    ds = load("mnist")             # or "digits", "fashion_mnist", "cifar10"
    ds.train_images                # uint8 (60000, 28, 28, 1), NHWC
    ds.train_labels                # int32 (60000,)
    ds.provenance                  # which checksums were verified

Files are found in ``data_dir``, else ``$OPTLAB_DATA``, else the cache
folder (``$OPTLAB_CACHE`` or ``~/.cache/optlab``), and downloaded into the
cache when missing and the network is reachable; see
:mod:`optlab.data._sources` for the exact search list and the checksum
table, and :mod:`optlab.data._cifar` for the accepted CIFAR-10 forms.

On the device (jax, jit-friendly): :func:`normalize`, :func:`channel_stats`,
:func:`shuffle_batches`, :func:`sequential_batches`, :func:`augment_cifar`,
:func:`epoch_batches`, :func:`time_input_pipeline`, :func:`to_device`;
see :mod:`optlab.data._pipeline` for the recipe.
"""

from __future__ import annotations

import os

from .._checks import check_choice
from . import _cifar, _digits, _mnist
from ._dataset import DataError, Dataset
from ._pipeline import (
    MODES,
    DeviceData,
    PipelineTiming,
    Stats,
    augment_cifar,
    channel_stats,
    epoch_batches,
    normalize,
    num_batches,
    sequential_batches,
    shuffle_batches,
    time_input_pipeline,
    to_device,
)
from ._sources import CHECKSUMS, cache_dir

NAMES = ("digits", "mnist", "fashion_mnist", "cifar10")

__all__ = [
    "CHECKSUMS",
    "MODES",
    "NAMES",
    "DataError",
    "Dataset",
    "DeviceData",
    "PipelineTiming",
    "Stats",
    "augment_cifar",
    "cache_dir",
    "channel_stats",
    "epoch_batches",
    "load",
    "normalize",
    "num_batches",
    "sequential_batches",
    "shuffle_batches",
    "time_input_pipeline",
    "to_device",
]


def load(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    """Load a classification dataset into host memory as uint8 NHWC arrays.

    Args:
      name: ``"digits"`` (scikit-learn's 8x8 digits, 1442 train / 355 test,
        pixels 0..16 scaled by ``(255 v + 8) // 16``), ``"mnist"`` and
        ``"fashion_mnist"`` (28x28x1, 60000 / 10000, from IDX files, gzipped
        or not), or ``"cifar10"`` (32x32x3, 50000 / 10000, from the canonical
        python pickles or an image-folder tree/tarball).
      data_dir: a folder to search instead of ``$OPTLAB_DATA`` (the cache
        folder is searched after it either way).
      download: fetch missing files from the canonical URL into the cache,
        with checksum verification (also disabled by ``OPTLAB_OFFLINE=1``).

    Raises:
      ValueError: unknown ``name``.
      FileNotFoundError: files missing and not downloadable; the message
        lists the files and the folders to put them in.
      DataError: a file is corrupt or truncated, fails its checksum, or has
        inconsistent contents (a ``ValueError``).

    Example:
      >>> ds = load("digits")
      >>> ds.train_images.shape, ds.test_images.shape, ds.num_classes
      ((1442, 8, 8, 1), (355, 8, 8, 1), 10)
    """
    check_choice("name", name, NAMES)
    if name == "digits":
        return _digits.load()
    if name in ("mnist", "fashion_mnist"):
        return _mnist.load(name, data_dir, download)
    return _cifar.load(data_dir, download)
