"""CIFAR-10 (Krizhevsky, 2009) from the canonical pickles or from an image-folder tree.

Accepted forms, looked for in each folder ``F`` of
``_sources.candidate_folders("cifar10")`` (``R/cifar10`` then ``R`` for each
search root ``R``), in this order:

1. ``F/cifar-10-batches-py/`` — the canonical python version: pickled
   ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``;
2. ``F/cifar-10-python.tar.gz`` — the same, still archived;
3. an image-folder tarball ``F/cifar10-jpeg.tar.gz``, ``F/cifar10-images.tar.gz``
   or ``F/cifar10-images.tar``;
4. an image-folder tree ``F/cifar10-jpeg/``, ``F/cifar10-images/``, or
   ``R/cifar10/`` itself when it has ``train/`` and ``test/`` in it.

An image-folder tree is ``<split>/<class>/<name>.png|.jpg|.jpeg`` with split
``train`` and ``test`` and the ten canonical class folder names, optionally
under one top-level folder. Images must be 32x32 (any PIL mode, converted
to RGB). Examples are read in the order split, class (canonical order), file
name, then put in a fixed pseudo-random order (seed 0) per split, so that the
first N training examples (``data.limit_train``) hold every class, as they do
in the pickles.

Decoding 60,000 images takes seconds, so archives and trees are decoded
once and the arrays cached as an ``.npz`` under ``<cache>/decoded/``, keyed
by the md5 of the archive (or, for a tree, by the names, sizes and
modification times of its files): a changed source gets a new key and is
decoded again. Cache files are written atomically (temporary file, then
rename), and a damaged cache file is ignored and rewritten.

Pickles are read with an unpickler that admits only the numpy array
reconstruction functions, so a hostile batch file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from . import _sources
from ._dataset import DataError, Dataset, check_arrays

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
PICKLED_DIR = "cifar-10-batches-py"
PICKLED_TAR = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
META = "batches.meta"
IMAGE_TARBALLS = ("cifar10-jpeg.tar.gz", "cifar10-images.tar.gz", "cifar10-images.tar")
IMAGE_DIRS = ("cifar10-jpeg", "cifar10-images")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
# Bump when the cached arrays' layout changes, so old cache files are not reused.
CACHE_VERSION = "1"


# --------------------------------------------------------------------------
# Finding the source


def _candidates(data_dir) -> Iterator[tuple[str, Path]]:
    for folder in _sources.candidate_folders("cifar10", data_dir):
        yield "pickled-dir", folder / PICKLED_DIR
        yield "pickled-tar", folder / PICKLED_TAR
        for name in IMAGE_TARBALLS:
            yield "image-tar", folder / name
        for name in IMAGE_DIRS:
            yield "image-dir", folder / name
        if folder.name == "cifar10":
            yield "image-dir", folder


def _find(data_dir) -> tuple[str, Path] | None:
    for kind, path in _candidates(data_dir):
        if kind.endswith("-dir"):
            if kind == "pickled-dir" and path.is_dir():
                return kind, path
            if kind == "image-dir" and path.is_dir() and _tree_root(path) is not None:
                return kind, path
        elif path.is_file():
            return kind, path
    return None


def _tree_root(path: Path) -> Path | None:
    """``path`` or its single subfolder, whichever holds ``train/`` and ``test/``."""
    if all((path / s).is_dir() for s in SPLITS):
        return path
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and all((subdirs[0] / s).is_dir() for s in SPLITS):
        return subdirs[0]
    return None


# --------------------------------------------------------------------------
# Canonical pickled batches


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled numpy array needs."""

    _core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _core.multiarray._reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _core.numeric._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _core.numeric._frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _unpickle(data: bytes, where: str) -> dict:
    try:
        # latin1 decodes the Python 2 str keys of the canonical files to str
        # and keeps numpy's byte buffers intact (numpy's documented advice).
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as err:  # noqa: BLE001 - any failure means the same thing: not a valid batch
        raise DataError(f"{where}: not a valid CIFAR-10 python batch ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(data, where)
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{where}: batch lacks 'data' or 'labels' (keys: {sorted(map(str, batch))})")
    pixels, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
        shape = getattr(pixels, "shape", None)
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        raise DataError(f"{where}: 'data' must be uint8 of shape (N, 3072), got {dtype} {shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{where}: 'labels' must be a list of integers, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != pixels.shape[0]:
        raise DataError(f"{where}: {pixels.shape[0]} images but {labels.shape[0]} labels (counts must match)")
    # Rows are three 32x32 planes (R, G, B); NHWC puts the channel last.
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _check_meta(data: bytes, where: str) -> None:
    meta = _unpickle(data, where)
    names = tuple(meta.get("label_names", ()))
    if names != CLASS_NAMES:
        raise DataError(f"{where}: label_names {names} are not CIFAR-10's {CLASS_NAMES}")


def _from_pickles(read: Callable[[str], bytes], where: Callable[[str], str]) -> dict[str, np.ndarray]:
    _check_meta(read(META), where(META))
    arrays = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", TEST_BATCHES)):
        parts = [_parse_batch(read(name), where(name)) for name in names]
        arrays[f"{split}_images"] = np.concatenate([p[0] for p in parts])
        arrays[f"{split}_labels"] = np.concatenate([p[1] for p in parts])
    return arrays


def _load_pickled_dir(folder: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    names = (*TRAIN_BATCHES, *TEST_BATCHES, META)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: incomplete CIFAR-10 python folder, missing {', '.join(missing)}")
    provenance = []

    def read(name: str) -> bytes:
        data = (folder / name).read_bytes()
        provenance.append(_sources.verify("cifar10", name, folder / name, stored=data))
        return data

    return _from_pickles(read, lambda name: str(folder / name)), provenance


def _read_pickled_tar(path: Path) -> dict[str, np.ndarray]:
    members = {}
    with _open_tar(path) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 2 and parts[0] == PICKLED_DIR:
                members[parts[1]] = _read_member(tar, member, path)
    missing = [n for n in (*TRAIN_BATCHES, *TEST_BATCHES, META) if n not in members]
    if missing:
        raise DataError(f"{path}: archive lacks {PICKLED_DIR}/{', '.join(missing)}")
    return _from_pickles(members.__getitem__, lambda name: f"{path}:{PICKLED_DIR}/{name}")


# --------------------------------------------------------------------------
# Image-folder trees and tarballs


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable tar archive ({err})") from err


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    try:
        return tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: truncated or corrupt archive at {member.name} ({err})") from err


def _iter_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    """(relative name, bytes) of each regular file; stream errors become DataError."""
    tar = _open_tar(path)
    try:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                raise DataError(f"{path}: truncated or corrupt archive ({err})") from err
            if member is None:
                return
            if member.isfile():
                yield member.name, _read_member(tar, member, path)
    finally:
        tar.close()


def _iter_dir(root: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            yield full.relative_to(root).as_posix(), full.read_bytes


def _ignored(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _group(entries: list[tuple[str, object]], source: Path) -> dict[tuple[str, str], list[tuple[str, object]]]:
    """Sort ``split/class/file`` entries into ``{(split, class): [(file, payload)]}``, checking the structure."""
    entries = [(tuple(Path(n).parts), p) for n, p in entries]
    entries = [(parts, p) for parts, p in entries if not _ignored(parts)]
    tops = {parts[0] for parts, _ in entries if len(parts) > 1}
    if len(tops) == 1 and not tops & set(SPLITS):  # everything under one top-level folder
        entries = [(parts[1:], p) for parts, p in entries if len(parts) > 1]
    groups: dict[tuple[str, str], list] = {}
    for parts, payload in entries:
        if len(parts) == 1:  # a README or licence beside the splits
            continue
        shown = "/".join(parts)
        if len(parts) != 3 or parts[0] not in SPLITS:
            raise DataError(f"{source}: unexpected entry {shown!r}; expected <train|test>/<class>/<image>")
        split, cls, filename = parts
        if cls not in CLASS_NAMES:
            raise DataError(f"{source}: unknown class folder {split}/{cls!r}; CIFAR-10's are {', '.join(CLASS_NAMES)}")
        if Path(filename).suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{source}: {shown!r} is not a .png/.jpg/.jpeg image")
        groups.setdefault((split, cls), []).append((filename, payload))
    for split in SPLITS:
        missing = [c for c in CLASS_NAMES if (split, c) not in groups]
        if missing:
            found = sorted(c for s, c in groups if s == split)
            raise DataError(
                f"{source}: {split}/ must hold the 10 CIFAR-10 class folders; missing {', '.join(missing)}"
                f" (found {len(found)}: {', '.join(found) or 'none'})"
            )
    return groups


def _decode_images(groups: dict, source: Path) -> dict[str, np.ndarray]:
    """Decode every image of ``groups`` (the slow part; its result is cached)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - only needed on a cache miss

    arrays = {}
    for split in SPLITS:
        keys = [(split, c) for c in CLASS_NAMES]
        n = sum(len(groups[k]) for k in keys)
        images = np.empty((n, *IMAGE_SHAPE), np.uint8)
        labels = np.empty((n,), np.int32)
        i = 0
        for label, key in enumerate(keys):
            for filename, payload in sorted(groups[key], key=lambda e: e[0]):
                data = payload if isinstance(payload, bytes) else payload()
                where = f"{source}:{split}/{key[1]}/{filename}"
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        if im.size != IMAGE_SHAPE[1::-1]:
                            raise DataError(f"{where}: image is {im.size[0]}x{im.size[1]}, expected 32x32")
                        images[i] = np.asarray(im.convert("RGB"))
                except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
                    if isinstance(err, DataError):
                        raise
                    raise DataError(f"{where}: cannot decode image ({err})") from err
                labels[i] = label
                i += 1
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


def _mix_classes(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A fixed permutation of each split: image folders come sorted by class, the pickles do not."""
    mixed = {}
    for split in SPLITS:
        order = np.random.default_rng(0).permutation(arrays[f"{split}_labels"].shape[0])
        mixed[f"{split}_images"] = arrays[f"{split}_images"][order]
        mixed[f"{split}_labels"] = arrays[f"{split}_labels"][order]
    return mixed


def _read_image_tar(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    groups = _group(list(_iter_tar(path)), path)
    return _decode_images(groups, path), _image_notes(groups)


def _read_image_dir(folder: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    root = _tree_root(folder)
    groups = _group(list(_iter_dir(root)), root)
    return _decode_images(groups, root), _image_notes(groups)


def _image_notes(groups: dict) -> list[str]:
    suffixes = {Path(f).suffix.lower() for entries in groups.values() for f, _ in entries}
    if suffixes & {".jpg", ".jpeg"}:
        return ["images decoded from JPEG: pixels carry compression artefacts;"
                " report results as 'CIFAR-10 (JPEG copy)'"]
    return []


def _tree_fingerprint(folder: Path) -> str:
    """md5 over every file's relative name, size and mtime: changes when any file does."""
    digest = hashlib.md5(usedforsecurity=False)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            st = (Path(dirpath) / name).stat()
            rel = (Path(dirpath) / name).relative_to(folder).as_posix()
            digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------
# Decoded-array cache

_FIELDS = ("train_images", "train_labels", "test_images", "test_labels")


def cache_path(source: Path, content_key: str) -> Path:
    """Where the decoded arrays of ``source`` (in the state ``content_key``) are cached."""
    source_key = hashlib.md5(str(source.resolve()).encode(), usedforsecurity=False).hexdigest()[:12]
    return _sources.cache_dir() / "decoded" / f"cifar10-{source_key}-{content_key[:20]}-v{CACHE_VERSION}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        # Opened here, not by np.load, so that a damaged file is closed too.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            arrays = {f: npz[f] for f in _FIELDS}
            notes = [str(s) for s in npz["notes"]]
        for split in SPLITS:
            check_arrays(str(path), arrays[f"{split}_images"], arrays[f"{split}_labels"], 10, IMAGE_SHAPE)
        return {**arrays, "notes": notes}
    except (OSError, KeyError, ValueError, zlib.error, EOFError, zipfile.BadZipFile):
        return None  # missing or damaged: decode again and overwrite


def _write_cache(path: Path, arrays: dict[str, np.ndarray], notes: list[str]) -> None:
    payload = {f: arrays[f] for f in _FIELDS}
    payload["notes"] = np.array(notes, dtype=str)
    try:
        _sources.atomic_write(path, lambda f: np.savez(f, **payload))
    except OSError:
        return  # an unwritable cache only costs time on the next load
    # Drop earlier versions of the same source, so edits do not pile up files.
    prefix = path.name.split("-")[:2]
    for old in path.parent.glob(f"{'-'.join(prefix)}-*.npz"):
        if old != path:
            old.unlink(missing_ok=True)


def _cached(source: Path, content_key: str, build) -> tuple[dict[str, np.ndarray], list[str]]:
    path = cache_path(source, content_key)
    hit = _read_cache(path)
    if hit is not None:
        notes = hit.pop("notes")
        return hit, [*notes, f"decoded arrays read from cache {path}"]
    arrays, notes = build()
    _write_cache(path, arrays, notes)
    return arrays, [*notes, f"decoded once and cached as {path}"]


# --------------------------------------------------------------------------


def load(data_dir=None, download: bool = True) -> Dataset:
    found = _find(data_dir)
    needed = [f"{PICKLED_DIR}/ (the canonical python version) or {PICKLED_TAR}",
              f"or an image-folder tarball {IMAGE_TARBALLS[0]} (train/<class>/*.jpg, test/<class>/*.jpg)"]
    if found is None:
        _sources.fetch_or_explain("cifar10", data_dir, needed, download, [])
        found = _find(data_dir)
        if found is None:  # pragma: no cover - fetch() stored the canonical tarball in the cache
            raise _sources.missing_error("cifar10", data_dir, needed, "downloaded file not found", [])
    kind, path = found

    provenance: list[str] = []
    if kind == "pickled-dir":
        arrays, provenance = _load_pickled_dir(path)
    elif kind == "image-dir":
        arrays, notes = _cached(path, _tree_fingerprint(path), lambda: _read_image_dir(path))
        provenance = [f"{path}: image-folder tree, no published checksum; structure checked", *notes]
    else:
        digest = _sources.md5_file(path)
        provenance.append(_sources.verify("cifar10", path.name, path, digest=digest))
        if kind == "pickled-tar":
            arrays, notes = _cached(path, digest, lambda: (_read_pickled_tar(path), []))
        else:
            arrays, notes = _cached(path, digest, lambda: _read_image_tar(path))
        provenance += notes

    for split in SPLITS:
        check_arrays(f"cifar10 {split} ({path})", arrays[f"{split}_images"], arrays[f"{split}_labels"],
                     len(CLASS_NAMES), IMAGE_SHAPE)
    if kind.startswith("image"):
        arrays = _mix_classes(arrays)
        provenance.append("examples of the image folders put in a fixed pseudo-random order (seed 0), "
                          "so that a prefix (data.limit_train) holds every class")
    return Dataset(
        train_images=arrays["train_images"], train_labels=arrays["train_labels"],
        test_images=arrays["test_images"], test_labels=arrays["test_labels"],
        num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES, name="cifar10",
        source=str(path), provenance=tuple(provenance),
    )
