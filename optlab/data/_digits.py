"""scikit-learn's bundled 8x8 handwritten digits (no file, no download).

1797 images whose pixels are counts 0..16 (each pixel counts the ``on`` cells
of a 4x4 block of the original 32x32 bitmap; UCI "optdigits").

- Pixels are scaled to ``uint8`` by integer rounding, half up:
  ``u = (255 * v + 8) // 16``, so 0 -> 0, 8 -> 128, 16 -> 255, exactly and on
  every platform.
- Split: within each class, every fifth image (in scikit-learn's order) is a
  test image: 1442 train / 355 test, stratified, with no random numbers, so it
  cannot drift between numpy versions. (Taking the last 360 images instead
  gives a test set from writers absent from training, about 4 points harder.)
"""

from __future__ import annotations

import numpy as np

from ._dataset import DataError, Dataset, check_arrays

TEST_EVERY = 5


def to_uint8(counts: np.ndarray) -> np.ndarray:
    """Map counts 0..16 to 0..255 by rounding half up (see the module docstring)."""
    v = np.asarray(counts)
    if not np.array_equal(v, np.round(v)) or v.min() < 0 or v.max() > 16:
        raise DataError("sklearn digits: pixel values are not integer counts in [0, 16]")
    return ((255 * v.astype(np.int64) + 8) // 16).astype(np.uint8)


def load() -> Dataset:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - sklearn is slow to import; only needed here

    bunch = load_digits()
    images = to_uint8(bunch.images)[..., None]
    labels = bunch.target.astype(np.int32)
    names = tuple(str(int(c)) for c in bunch.target_names)
    rank = np.zeros(len(labels), np.int64)  # position of each image within its class
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    is_test = rank % TEST_EVERY == TEST_EVERY - 1
    train = images[~is_test], labels[~is_test]
    test = images[is_test], labels[is_test]
    check_arrays("digits train", *train, len(names), (8, 8, 1))
    check_arrays("digits test", *test, len(names), (8, 8, 1))
    return Dataset(
        train_images=train[0], train_labels=train[1], test_images=test[0], test_labels=test[1],
        num_classes=len(names), class_names=names, name="digits",
        source="sklearn.datasets.load_digits",
        provenance=("bundled with scikit-learn; pixels 0..16 scaled by (255*v + 8) // 16;"
                    f" test = every {TEST_EVERY}th image of each class ({int(is_test.sum())}), train = the rest",),
    )
