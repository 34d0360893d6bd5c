"""MNIST and Fashion-MNIST from IDX files.

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian
header ``0x00 0x00 <type> <ndim>`` followed by ``ndim`` big-endian uint32
sizes, then the values in row-major order. Type ``0x08`` is unsigned byte.
Images are ``(N, 28, 28)`` (magic ``0x00000803``), labels ``(N,)`` (magic
``0x00000801``). Each file may be gzip-compressed or not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import _sources
from ._dataset import DataError, Dataset, check_arrays

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    # https://github.com/zalandoresearch/fashion-mnist#labels
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
}

_UBYTE = 0x08


def parse_idx(content: bytes, path: Path, ndim: int) -> np.ndarray:
    """The uint8 array stored in IDX bytes ``content`` (read from ``path``)."""
    if len(content) < 4:
        raise DataError(f"{path}: {len(content)} bytes is too short for an IDX header")
    magic = int.from_bytes(content[:4], "big")
    expected = (_UBYTE << 8) | ndim
    if magic != expected:
        raise DataError(
            f"{path}: bad magic number 0x{magic:08x}, expected 0x{expected:08x}"
            f" (IDX unsigned-byte array with {ndim} dimension{'s' * (ndim > 1)})"
        )
    header = 4 + 4 * ndim
    if len(content) < header:
        raise DataError(f"{path}: truncated header ({len(content)} bytes, the header needs {header})")
    dims = tuple(int.from_bytes(content[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected_size = header + int(np.prod(dims, dtype=np.int64))
    if len(content) != expected_size:
        problem = "truncated" if len(content) < expected_size else "trailing bytes"
        raise DataError(
            f"{path}: wrong size for the header's dimensions {' x '.join(map(str, dims))}:"
            f" expected {expected_size} bytes, file has {len(content)} ({problem})"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(dims)


def _find(name: str, data_dir) -> tuple[dict[str, Path] | None, list[str]]:
    """The first folder holding all four files (``.gz`` or not), and notes on partial ones."""
    partial = []
    for folder in _sources.candidate_folders(name, data_dir):
        found = {}
        for field, base in FILES.items():
            for candidate in (folder / f"{base}.gz", folder / base):
                if candidate.is_file():
                    found[field] = candidate
                    break
        if len(found) == len(FILES):
            return found, partial
        if found:
            missing = sorted(FILES[f] for f in FILES if f not in found)
            partial.append(f"{folder} has only {len(found)} of the 4 files; missing {', '.join(missing)}")
    return None, partial


def load(name: str, data_dir=None, download: bool = True) -> Dataset:
    paths, partial = _find(name, data_dir)
    if paths is None:
        _sources.fetch_or_explain(name, data_dir, [f"{b}.gz" for b in FILES.values()], download, partial)
        paths, partial = _find(name, data_dir)
        if paths is None:  # pragma: no cover - fetch wrote them into the cache
            raise _sources.missing_error(name, data_dir, [f"{b}.gz" for b in FILES.values()],
                                         "downloaded files not found", partial)

    arrays, provenance = {}, []
    for field, path in paths.items():
        stored, content = _sources.read_maybe_gzip(path)
        arrays[field] = parse_idx(content, path, ndim=3 if field.endswith("images") else 1)
        # Structure first, then checksum: a truncated file reports as truncated.
        provenance.append(_sources.verify(name, FILES[field], path, stored=stored, content=content))

    num_classes = len(CLASS_NAMES[name])
    splits = {}
    for split in ("train", "test"):
        images = arrays[f"{split}_images"]
        labels = arrays[f"{split}_labels"].astype(np.int32)
        what = f"{name} {split} ({paths[f'{split}_images']}, {paths[f'{split}_labels']})"
        if images.shape[1:] != (28, 28):
            raise DataError(f"{paths[f'{split}_images']}: images are {images.shape[1:]}, expected 28 x 28")
        images = images[..., None]  # NHWC with one channel; a view, no copy
        check_arrays(what, images, labels, num_classes, (28, 28, 1))
        splits[split] = (images, labels)

    return Dataset(
        train_images=splits["train"][0], train_labels=splits["train"][1],
        test_images=splits["test"][0], test_labels=splits["test"][1],
        num_classes=num_classes, class_names=CLASS_NAMES[name], name=name,
        source=str(paths["train_images"].parent), provenance=tuple(provenance),
    )
