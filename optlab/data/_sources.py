"""Where data files come from, what they must hash to, and how they arrive.

Search order (first folder holding a complete copy wins):

1. ``data_dir`` when given to :func:`optlab.data.load`, otherwise ``$OPTLAB_DATA``
   when set;
2. the cache folder, ``$OPTLAB_CACHE`` or ``~/.cache/optlab`` (downloads land here).

Inside each of those roots ``R`` a dataset is looked for in the subfolders of
:data:`SUBFOLDERS`, in order:

- mnist: ``R/mnist``, ``R/MNIST/raw`` (torchvision's layout), ``R`` itself;
- fashion_mnist: ``R/fashion_mnist``, ``R/fashion-mnist``, ``R/FashionMNIST/raw``
  (never ``R`` itself: its files have the same names as MNIST's);
- cifar10: ``R``, ``R/cifar10``; see :mod:`optlab.data._cifar` for the file
  and folder names tried there.

Checksums: every known md5 is in the one table :data:`CHECKSUMS`. An entry
says what is hashed and whether a mismatch is fatal:

- MNIST: md5 of the *uncompressed* IDX bytes, so the canonical ``.gz``, a
  re-gzipped copy (such as ``shared/data/mnist``) and an uncompressed copy
  all verify. A mismatch is an error.
- Fashion-MNIST: only the md5s of the distributed ``.gz`` files are
  published. A ``.gz`` that matches is verified; any other copy (uncompressed,
  or re-compressed, whose gzip bytes differ) gets the structural checks only,
  and its :attr:`Dataset.provenance` says so. Downloads are always verified.
- CIFAR-10: the canonical ``cifar-10-python.tar.gz`` and each pickled batch
  file (md5s as published with the dataset and used by torchvision), and the
  JPEG image-folder tarball ``cifar10-jpeg.tar.gz`` from ``shared/data``. A
  file bearing one of these names must match; an image-folder tree or
  tarball under any other name gets the structural checks only.

Downloads use a short timeout; when they fail (no network), the loaders
raise :class:`FileNotFoundError` saying which files to put in which folder.
Set ``OPTLAB_OFFLINE=1`` (or pass ``download=False``) to never try.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

from ._dataset import DataError

DOWNLOAD_TIMEOUT_S = 10.0


class Checksum(NamedTuple):
    md5: str
    # "content": md5 of the uncompressed bytes; "file": md5 of the file as
    # stored; "gzip-file": md5 of the file when it is gzip-compressed (an
    # uncompressed copy cannot be checked against it).
    of: str
    # A mismatch raises (True) or falls back to structural checks (False).
    strict: bool


# The single table of known checksums, keyed by (dataset, file name).
CHECKSUMS: dict[tuple[str, str], Checksum] = {
    # MNIST (values from shared/README.md; identical to the canonical files').
    ("mnist", "train-images-idx3-ubyte"): Checksum("6bbc9ace898e44ae57da46a324031adb", "content", True),
    ("mnist", "train-labels-idx1-ubyte"): Checksum("a25bea736e30d166cdddb491f175f624", "content", True),
    ("mnist", "t10k-images-idx3-ubyte"): Checksum("2646ac647ad5339dbf082846283269ea", "content", True),
    ("mnist", "t10k-labels-idx1-ubyte"): Checksum("27ae3e4e09519cfbb04c329615203637", "content", True),
    # Fashion-MNIST: md5 of the distributed .gz files (zalandoresearch/fashion-mnist).
    ("fashion_mnist", "train-images-idx3-ubyte"): Checksum("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "gzip-file", False),
    ("fashion_mnist", "train-labels-idx1-ubyte"): Checksum("25c81989df183df01b3e8a0aad5dffbe", "gzip-file", False),
    ("fashion_mnist", "t10k-images-idx3-ubyte"): Checksum("bef4ecab320f06d8554ea6380940ec79", "gzip-file", False),
    ("fashion_mnist", "t10k-labels-idx1-ubyte"): Checksum("bb300cfdad3c16e7a12a480ee83cd310", "gzip-file", False),
    # CIFAR-10, canonical python version (https://www.cs.toronto.edu/~kriz/cifar.html).
    ("cifar10", "cifar-10-python.tar.gz"): Checksum("c58f30108f718f92721af3b95e74349a", "file", True),
    ("cifar10", "data_batch_1"): Checksum("c99cafc152244af753f735de768cd75f", "file", True),
    ("cifar10", "data_batch_2"): Checksum("d4bba439e000b95fd0a9bffe97cbabec", "file", True),
    ("cifar10", "data_batch_3"): Checksum("54ebc095f3ab1f0389bbae665268c751", "file", True),
    ("cifar10", "data_batch_4"): Checksum("634d18415352ddfa80567beed471001a", "file", True),
    ("cifar10", "data_batch_5"): Checksum("482c414d41f54cd18b22e5b47cb7c3cb", "file", True),
    ("cifar10", "test_batch"): Checksum("40351d587109b95175f43aff81a1287e", "file", True),
    ("cifar10", "batches.meta"): Checksum("5ff9c542aee3614f3951f8cda6e48888", "file", True),
    # CIFAR-10 as a JPEG image-folder tarball (shared/data/cifar10-jpeg.tar.gz).
    ("cifar10", "cifar10-jpeg.tar.gz"): Checksum("aed45d70bcf5c81787fb02f1f6773090", "file", True),
}

# Where a missing dataset is downloaded from: (base URL, file names).
DOWNLOADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    ),
    "fashion_mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    ),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", ("cifar-10-python.tar.gz",)),
}

# Subfolders of each search root that may hold a dataset; the first one is
# where downloads go (under the cache folder).
SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw", "."),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
    "cifar10": ("cifar10", "."),
}


def cache_dir() -> Path:
    """``$OPTLAB_CACHE``, or ``~/.cache/optlab``; read at each call."""
    env = os.environ.get("OPTLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "optlab"


def search_roots(data_dir: str | os.PathLike | None) -> list[Path]:
    """The roots searched, in order (see the module docstring)."""
    roots: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"`data_dir` (={str(data_dir)!r}) is not a directory")
        roots.append(root)
    elif os.environ.get("OPTLAB_DATA"):
        roots.append(Path(os.environ["OPTLAB_DATA"]).expanduser())
    cache = cache_dir()
    if cache not in roots:
        roots.append(cache)
    return roots


def candidate_folders(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Every folder that may hold ``name``'s files, in search order."""
    return [(root / sub) if sub != "." else root for root in search_roots(data_dir) for sub in SUBFOLDERS[name]]


def download_folder(name: str) -> Path:
    return cache_dir() / SUBFOLDERS[name][0]


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_gzip(data: bytes) -> bool:
    return data[:2] == b"\x1f\x8b"


def gunzip(data: bytes, path: Path) -> bytes:
    """Decompress ``data`` (read from ``path``), turning every failure into a DataError."""
    try:
        return gzip.decompress(data)
    except EOFError as err:
        raise DataError(f"{path}: truncated gzip file ({err})") from err
    except (OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt gzip file ({err})") from err


def read_maybe_gzip(path: Path) -> tuple[bytes, bytes]:
    """``(bytes as stored, uncompressed bytes)``; gzip is detected by its magic, not the name."""
    stored = path.read_bytes()
    return stored, (gunzip(stored, path) if is_gzip(stored) else stored)


def verify(
    dataset: str,
    key: str,
    path: Path | str,
    *,
    stored: bytes | None = None,
    content: bytes | None = None,
    digest: str | None = None,
) -> str:
    """Check ``path`` against :data:`CHECKSUMS`; a provenance line, or DataError.

    ``stored`` (the file's bytes), ``content`` (its uncompressed bytes) or
    ``digest`` (the md5 of the file as stored) are used when given, to avoid
    reading the file twice.
    """
    entry = CHECKSUMS.get((dataset, key))
    if entry is None:
        return f"{path}: no published checksum for this file; structure checked only"
    if entry.of == "content":
        got = md5_bytes(content if content is not None else read_maybe_gzip(Path(path))[1])
        what = "uncompressed content"
    else:
        if stored is not None:
            if entry.of == "gzip-file" and not is_gzip(stored):
                return (f"{path}: not gzip-compressed; the published md5 {entry.md5} is of the .gz"
                        " file, so structure checked only")
            got = md5_bytes(stored)
        else:
            got = digest or md5_file(Path(path))
        what = "file"
    if got == entry.md5:
        return f"{path}: md5 of {what} {got} matches the published value"
    if entry.strict:
        raise DataError(
            f"{path}: checksum mismatch: md5 of {what} is {got}, expected {entry.md5}"
            " (corrupt or modified copy; replace it, or rename it if it is a deliberately"
            " different copy)"
        )
    return (f"{path}: md5 {got} differs from the canonical download's {entry.md5}"
            " (re-compressed copy?); structure checked only")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename.

    Readers never see a half-written file, and two writers racing each
    leave a complete file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download(url: str, dest: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` into ``dest`` (atomically). Raises OSError when unreachable.

    Module-level so that tests can replace it; nothing else touches the network.
    """
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - fixed https/http URLs
        atomic_write(dest, lambda f: shutil.copyfileobj(response, f, 1 << 20))


def downloads_enabled(download_arg: bool) -> bool:
    return download_arg and os.environ.get("OPTLAB_OFFLINE", "") in ("", "0")


def fetch(name: str) -> Path:
    """Download ``name``'s canonical files into the cache; the folder holding them.

    Each file is verified against :data:`CHECKSUMS` (strictly: a fresh
    download must be the canonical file) before it gets its final name.
    Raises OSError when the network cannot be reached.
    """
    base, files = DOWNLOADS[name]
    folder = download_folder(name)
    for filename in files:
        dest = folder / filename
        if dest.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{filename}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            download(base + filename, tmp)
            _verify_download(name, filename, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return folder


def _verify_download(name: str, filename: str, path: Path) -> None:
    key = filename[: -len(".gz")] if name in ("mnist", "fashion_mnist") else filename
    entry = CHECKSUMS[(name, key)]
    stored, content = read_maybe_gzip(path)
    got = md5_bytes(content if entry.of == "content" else stored)
    if got != entry.md5:
        raise DataError(
            f"downloaded {filename} for {name} has md5 {got}, expected {entry.md5}"
            " (mirror changed or transfer corrupted); nothing was kept"
        )


def missing_error(name: str, data_dir, needed: list[str], reason: str, partial: list[str]) -> FileNotFoundError:
    """A FileNotFoundError that says exactly what to put where."""
    folders = candidate_folders(name, data_dir)
    lines = [f"{name}: data files not found ({reason})."]
    lines += [f"  {p}" for p in partial]
    lines.append("Put these files (gzipped or not):" if name != "cifar10" else "Put one of these:")
    lines += [f"    {f}" for f in needed]
    lines.append("into one of these folders (searched in this order):")
    lines += [f"    {f}" for f in folders]
    lines.append(
        "or set the environment variable OPTLAB_DATA to a folder with a"
        f" '{SUBFOLDERS[name][0]}/' subfolder holding them (or pass data_dir= to load)."
    )
    base, files = DOWNLOADS[name]
    lines.append("Canonical download: " + ", ".join(base + f for f in files))
    return FileNotFoundError("\n".join(lines))


def fetch_or_explain(name: str, data_dir, needed: list[str], download_arg: bool, partial: list[str]) -> Path:
    """Download ``name`` when allowed and reachable; otherwise raise :func:`missing_error`."""
    if not downloads_enabled(download_arg):
        raise missing_error(name, data_dir, needed, "downloads disabled by download=False or OPTLAB_OFFLINE", partial)
    try:
        return fetch(name)
    except OSError as err:
        raise missing_error(name, data_dir, needed, f"download failed, offline? {err}", partial) from err
