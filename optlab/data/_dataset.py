"""The container every loader returns, and the error every loader raises."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DataError(ValueError):
    """A data file exists but is not what it claims to be.

    Raised for a bad magic number, a size that disagrees with the header,
    a checksum mismatch, a truncated archive, image and label counts that
    disagree, labels out of range, or a malformed image-folder tree. The
    message names the file and the problem.
    """


class Dataset(NamedTuple):
    """A classification dataset held in host memory, ready to go to a device.

    Images are ``uint8`` NHWC (the stored pixel values, untouched; see
    :func:`optlab.data.normalize` to turn them into floats) and labels are
    ``int32`` in ``[0, num_classes)``.

    Attributes:
      train_images, test_images: ``uint8`` arrays ``(N, H, W, C)``.
      train_labels, test_labels: ``int32`` arrays ``(N,)``.
      num_classes: number of classes.
      class_names: ``class_names[k]`` names label ``k``.
      name: the dataset name given to :func:`optlab.data.load`.
      source: where the arrays came from (a path, or the Python package).
      provenance: one line per check that was made (checksums verified,
        structure-only checks, format caveats such as JPEG artefacts).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    source: str = ""
    provenance: tuple[str, ...] = ()


def check_arrays(
    what: str,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    image_shape: tuple[int, int, int],
) -> None:
    """Refuse arrays that would make a silently wrong dataset."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != image_shape:
        raise DataError(
            f"{what}: images must be uint8 of shape (N, {', '.join(map(str, image_shape))}),"
            f" got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(f"{what}: labels must be 1-d, got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{what}: {images.shape[0]} images but {labels.shape[0]} labels (counts must match)"
        )
    if images.shape[0] == 0:
        raise DataError(f"{what}: no examples")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"{what}: label {int(labels[bad[0]])} at index {int(bad[0])} is out of range"
            f" [0, {num_classes}) ({bad.size} bad labels in all)"
        )
