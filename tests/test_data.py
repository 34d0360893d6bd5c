"""Tests for optlab.data: loaders (real files and synthetic ones), corruption, cache, pipeline.

Real datasets come from $OPTLAB_DATA (conftest points it at shared/data);
those tests skip with a reason when the files are absent. Everything else
is built in tmp_path. No test touches the network: the downloader is
replaced by a stub for every test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optlab import data
from optlab.data import _cifar, _sources

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# md5 values copied from shared/README.md (not from the implementation).
README_MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
README_CIFAR_JPEG_MD5 = "aed45d70bcf5c81787fb02f1f6773090"
MNIST_NAMES = list(README_MNIST_MD5)


def _shared(*parts: str) -> Path:
    root = os.environ.get("OPTLAB_DATA")
    path = Path(root, *parts) if root else None
    if path is None or not path.exists():
        pytest.skip(f"real data file {'/'.join(parts)} not found under OPTLAB_DATA={root!r} (see shared/README.md)")
    return path


class _NoNetwork:
    """Stands in for the downloader: records what was asked, then fails as offline."""

    def __init__(self):
        self.urls = []

    def __call__(self, url, dest, *, timeout=None):
        self.urls.append(url)
        raise OSError("network unreachable (test stub)")


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path):
    """A private cache folder and no network for every test."""
    monkeypatch.setenv("OPTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OPTLAB_OFFLINE", raising=False)
    stub = _NoNetwork()
    monkeypatch.setattr(_sources, "download", stub)
    return stub


# --------------------------------------------------------------------------
# Builders for synthetic files (written from the format specifications)


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX: 0x00 0x00 0x08 <ndim>, big-endian uint32 dims, then the bytes."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=50, n_test=20, gz=True, seed=0, **override) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        raw = override.get(name, idx_bytes(arr))
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def image_tree(per_class=(3, 2), seed=0) -> tuple[dict[str, bytes], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Files ``split/class/NNNN.png`` and the arrays the loader must return (split, class, name order)."""
    files, expected = {}, {}
    for s, (split, k) in enumerate(zip(("train", "test"), per_class)):
        imgs = random_images(10 * k, seed + s)
        labels = np.repeat(np.arange(10, dtype=np.int32), k)
        for i, (img, label) in enumerate(zip(imgs, labels)):
            files[f"{split}/{CIFAR_CLASSES[label]}/{i % k:04d}.png"] = png_bytes(img)
        expected[split] = (imgs, labels)
    return files, expected


def write_tar(path: Path, files: dict[str, bytes], prefix: str = "", mode: str = "w:gz", seed: int = 0) -> None:
    names = list(files)
    np.random.default_rng(seed).shuffle(names)  # archive order must not matter
    with tarfile.open(path, mode) as tar:
        for name in names:
            info = tarfile.TarInfo(prefix + name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, payload in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(payload)


def cifar_pickles(n_per_batch=6, n_test=8, seed=0) -> tuple[dict[str, bytes], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Canonical python-version batches: rows are the R, G, B planes of each image."""
    rng = np.random.default_rng(seed)
    files, parts = {}, {"train": [], "test": []}
    batches = [*((f"data_batch_{i}", "train", n_per_batch) for i in range(1, 6)), ("test_batch", "test", n_test)]
    for name, split, n in batches:
        imgs = random_images(n, int(rng.integers(1 << 30)))
        labels = rng.integers(0, 10, n).tolist()
        rows = imgs.transpose(0, 3, 1, 2).reshape(n, 3072)
        files[name] = pickle.dumps({"batch_label": name, "labels": labels, "data": rows}, protocol=2)
        parts[split].append((imgs, np.array(labels, np.int32)))
    files["batches.meta"] = pickle.dumps({"label_names": CIFAR_CLASSES, "num_vis": 3072}, protocol=2)
    expected = {s: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v])) for s, v in parts.items()}
    return files, expected


def trust(monkeypatch, files: dict[str, Path]) -> None:
    """Register synthetic files' md5s as the published ones (the strict path then applies to them)."""
    for key, path in files.items():
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
        monkeypatch.setitem(_sources.CHECKSUMS, ("cifar10", key), _sources.Checksum(md5, "file", True))


# --------------------------------------------------------------------------
# Real data


def test_checksum_table_matches_readme():
    for name, md5 in README_MNIST_MD5.items():
        assert _sources.CHECKSUMS[("mnist", name)] == _sources.Checksum(md5, "content", True)
    assert _sources.CHECKSUMS[("cifar10", "cifar10-jpeg.tar.gz")].md5 == README_CIFAR_JPEG_MD5


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    _shared("mnist")
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTLAB_CACHE", str(tmp_path_factory.mktemp("mnist_cache")))
        ds = data.load("mnist")
    print(f"\nmnist load: {time.perf_counter() - start:.2f} s")
    return ds


@pytest.mark.parametrize("split,prefix,n", [("train", "train", 60000), ("test", "t10k", 10000)])
def test_mnist_real(mnist, split, prefix, n):
    folder = _shared("mnist")
    raw_images = gzip.decompress((folder / f"{prefix}-images-idx3-ubyte.gz").read_bytes())
    raw_labels = gzip.decompress((folder / f"{prefix}-labels-idx1-ubyte.gz").read_bytes())
    # Independent parse: 16-byte image header, 8-byte label header.
    ref_images = np.frombuffer(raw_images, np.uint8, offset=16).reshape(n, 28, 28, 1)
    ref_labels = np.frombuffer(raw_labels, np.uint8, offset=8)
    images, labels = getattr(mnist, f"{split}_images"), getattr(mnist, f"{split}_labels")
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(ref_labels, minlength=10))
    assert np.array_equal(labels, ref_labels) and np.array_equal(images, ref_images)
    assert images.min() == 0 and images.max() == 255
    for kind in ("images", "labels"):
        name = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
        assert hashlib.md5(raw_images if kind == "images" else raw_labels).hexdigest() == README_MNIST_MD5[name]
        assert any(name in line and "matches the published value" in line for line in mnist.provenance)
    assert mnist.num_classes == 10 and mnist.class_names == tuple("0123456789") and mnist.name == "mnist"


def test_mnist_uncompressed_copy_verifies(tmp_path, mnist):
    folder = _shared("mnist")
    for name in MNIST_NAMES:
        (tmp_path / "mnist").mkdir(exist_ok=True)
        (tmp_path / "mnist" / name).write_bytes(gzip.decompress((folder / f"{name}.gz").read_bytes()))
    ds = data.load("mnist", data_dir=tmp_path)
    assert np.array_equal(ds.train_images, mnist.train_images)
    assert np.array_equal(ds.test_labels, mnist.test_labels)
    assert sum("matches the published value" in line for line in ds.provenance) == 4


def test_digits():
    from sklearn.datasets import load_digits

    ds = data.load("digits")
    ref = load_digits()
    assert ds.train_images.shape == (1442, 8, 8, 1) and ds.test_images.shape == (355, 8, 8, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    # Stratified: each class has every fifth of its images (by sklearn order) in the test set.
    counts = lambda labels: np.bincount(labels, minlength=10)  # noqa: E731
    per_class = counts(ref.target)
    np.testing.assert_array_equal(counts(ds.test_labels), per_class // 5)
    np.testing.assert_array_equal(counts(ds.train_labels), per_class - per_class // 5)
    # round(255 * v / 16), half up, computed in float64 (exact for these values).
    expected = np.floor(ref.images * 255 / 16 + 0.5).astype(np.uint8)[..., None]
    is_test = np.zeros(len(ref.target), bool)
    for c in range(10):
        is_test[np.flatnonzero(ref.target == c)[4::5]] = True
    np.testing.assert_array_equal(ds.train_images, expected[~is_test])
    np.testing.assert_array_equal(ds.test_images, expected[is_test])
    np.testing.assert_array_equal(ds.test_labels, ref.target[is_test])
    assert ds.train_images.min() == 0 and ds.train_images.max() == 255
    assert ds.num_classes == 10 and ds.class_names == tuple("0123456789")


@pytest.fixture(scope="module")
def cifar_real(tmp_path_factory):
    tarball = _shared("cifar10-jpeg.tar.gz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTLAB_CACHE", str(tmp_path_factory.mktemp("cifar_cache")))
        start = time.perf_counter()
        first = data.load("cifar10")
        decode_s = time.perf_counter() - start
        start = time.perf_counter()
        second = data.load("cifar10")
        cached_s = time.perf_counter() - start
    print(f"\ncifar10 JPEG tarball: first load (decode) {decode_s:.1f} s, cached load {cached_s:.2f} s")
    return tarball, first, second, decode_s, cached_s


def test_cifar_real_jpeg_tarball(cifar_real):
    tarball, ds, _, _, _ = cifar_real
    assert ds.source == str(tarball)
    for split, n in (("train", 50000), ("test", 10000)):
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, n // 10))
        assert images.min() == 0 and images.max() == 255
    assert ds.class_names == tuple(CIFAR_CLASSES)
    assert any(README_CIFAR_JPEG_MD5 in line and "matches" in line for line in ds.provenance)
    assert any("JPEG copy" in line for line in ds.provenance)
    # Not sorted by class: a prefix holds every class, as in the pickles (data.limit_train).
    assert set(np.unique(ds.train_labels[:100])) == set(range(10))


def _documented_order(n: int) -> np.ndarray:
    """Image folders are read split, class, file name, then permuted with seed 0 (the module docstring)."""
    return np.random.default_rng(0).permutation(n)


_SPOT_CHECKS = [  # (member of the tarball, split, index in split/class/file-name order)
    ("train/airplane/0000.jpg", "train", 0),
    ("train/cat/0007.jpg", "train", 3 * 5000 + 7),
    ("train/truck/4999.jpg", "train", 49999),
    ("test/frog/0123.jpg", "test", 6 * 1000 + 123),
]


def test_cifar_real_order_matches_files(cifar_real):
    """Decode a few files straight from the tarball and find them where the documented order puts them."""
    from PIL import Image

    tarball, ds, _, _, _ = cifar_real
    wanted = {member: (split, index) for member, split, index in _SPOT_CHECKS}
    seen = set()
    with tarfile.open(tarball) as tar:
        for info in tar:
            member = next((m for m in wanted if info.name.endswith(m)), None)
            if member is None:
                continue
            with Image.open(io.BytesIO(tar.extractfile(info).read())) as im:
                expected = np.asarray(im.convert("RGB"))
            split, index = wanted[member]
            index = int(np.flatnonzero(_documented_order(50000 if split == "train" else 10000) == index)[0])
            np.testing.assert_array_equal(getattr(ds, f"{split}_images")[index], expected)
            assert getattr(ds, f"{split}_labels")[index] == CIFAR_CLASSES.index(member.split("/")[1])
            seen.add(member)
    assert seen == set(wanted)


def test_cifar_real_second_load_hits_cache(cifar_real):
    _, first, second, decode_s, cached_s = cifar_real
    assert any("read from cache" in line for line in second.provenance)
    assert cached_s < 0.5 * decode_s
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(first, field), getattr(second, field)), field


# --------------------------------------------------------------------------
# Synthetic sources


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_synthetic_structure_only(tmp_path, gz):
    arrays = write_idx_set(tmp_path / "fashion_mnist", gz=gz)
    ds = data.load("fashion_mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert ds.train_labels.dtype == np.int32 and ds.class_names[9] == "Ankle boot"
    assert all("structure checked only" in line for line in ds.provenance)


def test_fashion_mnist_canonical_gz_md5_verified(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "fashion_mnist")
    path = tmp_path / "fashion_mnist" / "train-labels-idx1-ubyte.gz"
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setitem(_sources.CHECKSUMS, ("fashion_mnist", "train-labels-idx1-ubyte"),
                        _sources.Checksum(md5, "gzip-file", False))
    ds = data.load("fashion_mnist", data_dir=tmp_path)
    assert sum("matches the published value" in line for line in ds.provenance) == 1


@pytest.mark.parametrize("form", ["folder", "tar.gz"])
def test_cifar_canonical_pickles(tmp_path, monkeypatch, form):
    files, expected = cifar_pickles()
    write_tree(tmp_path / "stage" / "cifar-10-batches-py", files)
    if form == "folder":
        shutil.move(tmp_path / "stage" / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
        trust(monkeypatch, {k: tmp_path / "cifar-10-batches-py" / k for k in files})
    else:
        write_tar(tmp_path / "cifar-10-python.tar.gz", files, prefix="cifar-10-batches-py/")
        trust(monkeypatch, {"cifar-10-python.tar.gz": tmp_path / "cifar-10-python.tar.gz"})
    ds = data.load("cifar10", data_dir=tmp_path)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), expected[split][0])
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), expected[split][1])
    assert ds.train_images.shape == (30, 32, 32, 3)
    assert any("matches the published value" in line for line in ds.provenance)


@pytest.mark.parametrize("layout", ["tar.gz", "tar.gz under one folder", "plain tar", "directory"])
def test_cifar_image_folder(tmp_path, layout):
    files, expected = image_tree()
    if layout == "directory":
        write_tree(tmp_path / "cifar10", files)
    elif layout == "plain tar":
        write_tar(tmp_path / "cifar10-images.tar", files, mode="w")
    else:
        write_tar(tmp_path / "cifar10-images.tar.gz", files, prefix="cifar-10-images/" if "folder" in layout else "")
    ds = data.load("cifar10", data_dir=tmp_path)
    for split in ("train", "test"):
        order = _documented_order(len(expected[split][1]))
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), expected[split][0][order])
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), expected[split][1][order])
    assert any("no published checksum" in line for line in ds.provenance)
    assert not any("JPEG" in line for line in ds.provenance)


# --------------------------------------------------------------------------
# Decoded-array cache


@pytest.mark.parametrize("layout", ["tarball", "directory"])
def test_cifar_cache_hit_and_invalidation(tmp_path, monkeypatch, layout):
    calls = []
    decode = _cifar._decode_images
    monkeypatch.setattr(_cifar, "_decode_images", lambda *a: calls.append(1) or decode(*a))
    files, expected = image_tree()
    source = tmp_path / ("cifar10-images.tar.gz" if layout == "tarball" else "cifar10")

    def write(files):
        write_tar(source, files) if layout == "tarball" else write_tree(source, files)

    write(files)
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        ds = data.load("cifar10", data_dir=tmp_path)
        timings.append(time.perf_counter() - start)
    assert len(calls) == 1, "second load must come from the cache"
    assert any("read from cache" in line for line in ds.provenance)
    np.testing.assert_array_equal(ds.train_images, expected["train"][0][_documented_order(len(expected["train"][1]))])

    # Change one image: the fingerprint changes, so the source is decoded again.
    changed = 255 - expected["test"][0][0]
    files["test/airplane/0000.png"] = png_bytes(changed)
    write(files)
    if layout == "directory":  # the fingerprint uses mtimes: make sure this one differs
        os.utime(source / "test/airplane/0000.png", ns=(1, 1))
    ds = data.load("cifar10", data_dir=tmp_path)
    assert len(calls) == 2
    first_test_image = int(np.flatnonzero(_documented_order(len(expected["test"][1])) == 0)[0])
    np.testing.assert_array_equal(ds.test_images[first_test_image], changed)
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npz"))) == 1, "stale cache entry not removed"
    print(f"\n{layout}: first load {timings[0] * 1e3:.0f} ms, cached {timings[1] * 1e3:.0f} ms")


def test_cifar_damaged_cache_is_rebuilt(tmp_path):
    files, expected = image_tree()
    write_tar(tmp_path / "cifar10-images.tar.gz", files)
    data.load("cifar10", data_dir=tmp_path)
    (cached,) = (tmp_path / "cache" / "decoded").glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:1000])
    ds = data.load("cifar10", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.train_images, expected["train"][0][_documented_order(len(expected["train"][1]))])
    assert any("decoded once and cached" in line for line in ds.provenance)


# --------------------------------------------------------------------------
# Corrupt and missing files


def _mnist_case(tmp_path, case):
    """Build a fashion_mnist folder (lenient checksums) with one defect."""
    folder = tmp_path / "fashion_mnist"
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    good = idx_bytes(images)
    override = {}
    if case == "bad magic":
        override["train-images-idx3-ubyte"] = b"\x00\x00\x08\x04" + good[4:]
    elif case == "truncated data":
        override["train-images-idx3-ubyte"] = good[:-100]
    elif case == "trailing bytes":
        override["train-images-idx3-ubyte"] = good + b"\x00"
    elif case == "truncated header":
        override["train-images-idx3-ubyte"] = good[:10]
    elif case == "wrong image size":
        override["train-images-idx3-ubyte"] = idx_bytes(images[:, :27])
    elif case == "count mismatch":
        override["train-labels-idx1-ubyte"] = idx_bytes(np.zeros(49, np.uint8))
    elif case == "label out of range":
        override["train-labels-idx1-ubyte"] = idx_bytes(np.r_[np.zeros(20, np.uint8), 10, np.zeros(29, np.uint8)])
    write_idx_set(folder, **override)
    if case == "truncated gzip":
        path = folder / "t10k-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:5000])
    if case == "corrupt gzip":
        path = folder / "t10k-images-idx3-ubyte.gz"
        raw = bytearray(path.read_bytes())
        raw[-6] ^= 0xFF  # inside the CRC32/size trailer
        path.write_bytes(bytes(raw))
    return folder


@pytest.mark.parametrize("case,file,pattern", [
    ("bad magic", "train-images", r"bad magic number 0x00000804, expected 0x00000803"),
    ("truncated data", "train-images", r"wrong size .* 50 x 28 x 28.*\(truncated\)"),
    ("trailing bytes", "train-images", r"wrong size .*\(trailing bytes\)"),
    ("truncated header", "train-images", r"truncated header"),
    ("wrong image size", "train-images", r"expected 28 x 28"),
    ("count mismatch", "train-labels", r"50 images but 49 labels"),
    ("label out of range", "train-labels", r"label 10 at index 20 is out of range \[0, 10\)"),
    ("truncated gzip", "t10k-images", r"truncated gzip"),
    ("corrupt gzip", "t10k-images", r"corrupt gzip"),
])
def test_idx_corruption(tmp_path, case, file, pattern):
    _mnist_case(tmp_path, case)
    with pytest.raises(data.DataError, match=pattern) as info:
        data.load("fashion_mnist", data_dir=tmp_path)
    assert file in str(info.value)
    assert isinstance(info.value, ValueError)


def test_mnist_checksum_mismatch(tmp_path):
    folder = _shared("mnist")
    (tmp_path / "mnist").mkdir()
    for name in MNIST_NAMES:
        shutil.copy(folder / f"{name}.gz", tmp_path / "mnist" / f"{name}.gz")
    raw = bytearray(gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes()))
    raw[5000] ^= 0x01  # one pixel: structure intact, content not
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.DataError, match=r"t10k-images-idx3-ubyte.gz: checksum mismatch.*expected 2646ac64"):
        data.load("mnist", data_dir=tmp_path)


def _cifar_case(tmp_path, monkeypatch, case):
    if case in ("pickle truncated", "pickle checksum", "pickle hostile", "pickle incomplete"):
        files, _ = cifar_pickles()
        if case == "pickle truncated":
            files["data_batch_2"] = files["data_batch_2"][:-500]
        if case == "pickle hostile":
            files["data_batch_3"] = b"cos\nsystem\n(S'true'\ntR."
        folder = tmp_path / "cifar-10-batches-py"
        write_tree(folder, files)
        if case == "pickle incomplete":
            (folder / "data_batch_3").unlink()
        if case != "pickle checksum":
            trust(monkeypatch, {k: folder / k for k in files if (folder / k).exists()})
        return
    files, _ = image_tree()
    if case == "missing class":
        files = {k: v for k, v in files.items() if not k.startswith("test/truck/")}
    elif case == "unknown class":
        files["train/plane/0000.png"] = files.pop("train/airplane/0000.png")
    elif case == "wrong image size":
        files["train/dog/0001.png"] = png_bytes(random_images(1, 5)[0, :31])
    elif case == "not an image":
        files["train/dog/0001.png"] = b"definitely not a png"
    elif case == "stray file":
        files["train/dog/notes.txt"] = b"hello"
    name = "cifar10-jpeg.tar.gz" if case == "known name, other content" else "cifar10-images.tar.gz"
    write_tar(tmp_path / name, files)
    if case == "truncated tarball":
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case,pattern", [
    ("missing class", r"test/ must hold the 10 CIFAR-10 class folders; missing truck"),
    ("unknown class", r"unknown class folder train/'plane'"),
    ("wrong image size", r"train/dog/0001.png: image is 32x31, expected 32x32"),
    ("not an image", r"train/dog/0001.png: cannot decode image"),
    ("stray file", r"'train/dog/notes.txt' is not a .png/.jpg/.jpeg image"),
    ("truncated tarball", r"cifar10-images.tar.gz: truncated or corrupt archive"),
    ("known name, other content", r"cifar10-jpeg.tar.gz: checksum mismatch.*expected aed45d70"),
    ("pickle truncated", r"data_batch_2: not a valid CIFAR-10 python batch"),
    ("pickle checksum", r"batches.meta: checksum mismatch.*expected 5ff9c542"),
    ("pickle hostile", r"data_batch_3: not a valid CIFAR-10 python batch .*refusing to load global os.system"),
    ("pickle incomplete", r"incomplete CIFAR-10 python folder, missing data_batch_3"),
])
def test_cifar_corruption(tmp_path, monkeypatch, case, pattern):
    _cifar_case(tmp_path, monkeypatch, case)
    with pytest.raises(data.DataError, match=pattern):
        data.load("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("name,needed,subfolder", [
    ("mnist", [f"{n}.gz" for n in MNIST_NAMES], "mnist"),
    ("fashion_mnist", [f"{n}.gz" for n in MNIST_NAMES], "fashion_mnist"),
    ("cifar10", ["cifar-10-batches-py/", "cifar-10-python.tar.gz", "cifar10-jpeg.tar.gz"], "cifar10"),
])
def test_missing_files_offline_message(tmp_path, hermetic, name, needed, subfolder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        data.load(name, data_dir=tmp_path / "empty")
    message = str(info.value)
    assert "offline?" in message and "network unreachable (test stub)" in message
    for item in needed:
        assert item in message
    assert str(tmp_path / "empty" / subfolder) in message
    assert str(tmp_path / "cache" / subfolder) in message
    assert "OPTLAB_DATA" in message
    base, files = _sources.DOWNLOADS[name]
    assert hermetic.urls == [base + files[0]]  # tried the canonical URL, once, then gave up


def test_missing_files_partial_and_offline_env(tmp_path, hermetic, monkeypatch):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in MNIST_NAMES[:2]:
        (folder / f"{name}.gz").write_bytes(b"")
    monkeypatch.setenv("OPTLAB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"downloads disabled") as info:
        data.load("mnist", data_dir=tmp_path)
    missing = "missing t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    assert f"{folder} has only 2 of the 4 files; {missing}" in str(info.value)
    assert hermetic.urls == []


@pytest.mark.parametrize("tamper", [False, True])
def test_download_verified_then_kept(tmp_path, monkeypatch, tamper):
    source = _shared("mnist")
    fetched = []

    def fake_download(url, dest, *, timeout=None):
        name = url.rsplit("/", 1)[1]
        payload = (source / name).read_bytes()
        if tamper and name.startswith("t10k-labels"):
            raw = bytearray(gzip.decompress(payload))
            raw[-1] ^= 0x01
            payload = gzip.compress(bytes(raw))
        Path(dest).write_bytes(payload)
        fetched.append(url)

    monkeypatch.setattr(_sources, "download", fake_download)
    (tmp_path / "empty").mkdir()
    if tamper:
        with pytest.raises(data.DataError, match=r"downloaded t10k-labels-idx1-ubyte.gz for mnist has md5"):
            data.load("mnist", data_dir=tmp_path / "empty")
        assert not (tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
        assert not list((tmp_path / "cache" / "mnist").glob(".*part"))
    else:
        ds = data.load("mnist", data_dir=tmp_path / "empty")
        assert ds.source == str(tmp_path / "cache" / "mnist") and ds.train_images.shape == (60000, 28, 28, 1)
        assert all(u.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for u in fetched)


@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"name": "imagenet"}, ValueError, r"`name` \(='imagenet'\) must be one of 'digits', 'mnist'"),
    ({"name": "MNIST"}, ValueError, r"`name` \(='MNIST'\)"),
    ({"name": "mnist", "data_dir": "/nonexistent/optlab"}, FileNotFoundError,
     r"`data_dir` \(='/nonexistent/optlab'\) is not a directory"),
])
def test_load_bad_arguments(kwargs, error, pattern):
    name = kwargs.pop("name")
    with pytest.raises(error, match=pattern):
        data.load(name, **kwargs)


# --------------------------------------------------------------------------
# Normalisation

_PIXELS = np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1).repeat(3, axis=-1)
_STATS = data.Stats(np.array([0.25, 0.5, 0.75], np.float32), np.array([0.5, 0.25, 0.125], np.float32))


@pytest.mark.parametrize("mode,reference,lo,hi", [
    ("raw", lambda v: v, 0.0, 255.0),
    ("unit", lambda v: v / 255, 0.0, 1.0),
    ("centered", lambda v: v / 255 - 0.5, -0.5, 0.5),
    ("standardize", lambda v: (v / 255 - np.array([0.25, 0.5, 0.75])) / np.array([0.5, 0.25, 0.125]), -0.5, 1.5),
])
@pytest.mark.parametrize("backend", ["numpy", "jax", "jit"])
def test_normalize_closed_form(mode, reference, lo, hi, backend):
    stats = _STATS if mode == "standardize" else None
    if backend == "numpy":
        out = data.normalize(_PIXELS, mode, stats)
        assert isinstance(out, np.ndarray)
    elif backend == "jax":
        out = data.normalize(jnp.asarray(_PIXELS), mode, stats)
        assert isinstance(out, jax.Array)
    else:
        out = jax.jit(lambda x: data.normalize(x, mode, stats))(jnp.asarray(_PIXELS))
    assert out.dtype == np.float32 and out.shape == _PIXELS.shape
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(_PIXELS.astype(np.float64)), rtol=1e-6, atol=1e-6)
    assert float(out[0, 0, 0, 0]) == pytest.approx(lo) and float(out[-1, 0, 0, 0]) == pytest.approx(hi)


def test_channel_stats_and_standardize():
    images = np.random.default_rng(3).integers(0, 256, (40, 5, 6, 3), dtype=np.uint8)
    images[..., 2] //= 4  # channels with different statistics
    stats = data.channel_stats(images)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(stats.std, x.std(axis=(0, 1, 2)), rtol=1e-6)
    z = data.normalize(images, "standardize", stats).astype(np.float64)
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1.0, atol=1e-5)


@pytest.mark.parametrize("args,error,pattern", [
    ((_PIXELS, "bogus"), ValueError, r"`mode` \(='bogus'\) must be one of 'unit', 'centered', 'standardize', 'raw'"),
    ((_PIXELS.astype(np.float32), "unit"), TypeError, r"`images` must be uint8 .* got dtype float32"),
    ((_PIXELS, "standardize"), ValueError, r"`stats` \(=None\) is required"),
    ((_PIXELS, "standardize", data.Stats(np.zeros(2), np.ones(2))), ValueError, r"`stats.mean` has shape \(2,\)"),
    ((_PIXELS, "standardize", data.Stats(np.zeros(3), np.array([1.0, 0.0, 1.0]))), ValueError,
     r"`stats.std` .* must be > 0"),
])
def test_normalize_errors(args, error, pattern):
    with pytest.raises(error, match=pattern):
        data.normalize(*args)


# --------------------------------------------------------------------------
# Batching


@pytest.mark.parametrize("n,batch,drop,shape", [
    (100, 10, True, (10, 10)),
    (103, 10, True, (10, 10)),
    (103, 10, False, (11, 10)),
    (7, 16, False, (1, 16)),
    (1, 1, True, (1, 1)),
])
def test_shuffle_batches_permutation(n, batch, drop, shape):
    key = jax.random.key(7)
    idx = np.asarray(data.shuffle_batches(key, n, batch, drop))
    assert idx.shape == shape and idx.dtype == np.int32
    flat = idx.ravel()
    assert flat.min() >= 0 and flat.max() < n
    head = flat[: min(n, flat.size)]
    assert len(np.unique(head)) == head.size, "the first min(n, size) entries are a permutation prefix"
    if not drop:
        np.testing.assert_array_equal(np.unique(flat), np.arange(n))  # every example appears
        np.testing.assert_array_equal(flat[n:], flat[np.arange(flat.size - n) % n])  # padding repeats the start
    np.testing.assert_array_equal(idx, np.asarray(data.shuffle_batches(key, n, batch, drop)))


def test_shuffle_batches_keys_differ_and_mix():
    a = np.asarray(data.shuffle_batches(jax.random.key(0), 1000, 100))
    b = np.asarray(data.shuffle_batches(jax.random.key(1), 1000, 100))
    assert not np.array_equal(a, b)
    assert not np.array_equal(np.sort(a.ravel()), a.ravel()), "not shuffled"
    # Raw uint32 keys work too and are deterministic.
    np.testing.assert_array_equal(data.shuffle_batches(jax.random.PRNGKey(3), 50, 5),
                                  data.shuffle_batches(jax.random.PRNGKey(3), 50, 5))


@pytest.mark.parametrize("n,batch,drop,pattern", [
    (10, 0, True, r"`batch_size` \(=0\) must be >= 1"),
    (0, 4, True, r"`n` \(=0\) must be >= 1"),
    (10, 11, True, r"`batch_size` \(=11\) exceeds the number of examples \(=10\)"),
])
def test_shuffle_batches_errors(n, batch, drop, pattern):
    with pytest.raises(ValueError, match=pattern):
        data.shuffle_batches(jax.random.key(0), n, batch, drop)


@pytest.mark.parametrize("n,batch", [(10, 3), (9, 3), (2, 5)])
def test_sequential_batches_cover_once(n, batch):
    idx, mask = data.sequential_batches(n, batch)
    idx, mask = np.asarray(idx), np.asarray(mask)
    assert idx.shape == mask.shape == (-(-n // batch), batch)
    np.testing.assert_array_equal(idx[mask], np.arange(n))


def _tagged(n: int):
    """Images whose every pixel is the example's index, and labels equal to it."""
    images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None], (n, 32, 32, 3))
    return images, jnp.arange(n, dtype=jnp.int32)


def test_epoch_batches_gathers_in_shuffle_order():
    images, labels = _tagged(50)
    key = jax.random.key(11)
    xb, yb = data.epoch_batches(key, images, labels, 8)
    assert xb.shape == (6, 8, 32, 32, 3) and yb.shape == (6, 8)
    idx = data.shuffle_batches(jax.random.split(key)[0], 50, 8)
    np.testing.assert_array_equal(yb, idx)
    np.testing.assert_array_equal(xb[:, :, 5, 5, 1], idx.astype(np.float32))
    xb2, yb2 = data.epoch_batches(key, images, labels, 8)
    np.testing.assert_array_equal(xb, xb2)
    np.testing.assert_array_equal(yb, yb2)


def test_epoch_batches_with_augmentation_in_scan():
    images, labels = _tagged(64)
    xb, yb = data.epoch_batches(jax.random.key(2), images + 1.0, labels, 16, augment=data.augment_cifar)
    assert xb.shape == (4, 16, 32, 32, 3) and xb.dtype == jnp.float32
    # Padding brings in zeros, but every nonzero pixel still carries its own example's tag.
    np.testing.assert_array_equal(jnp.max(xb, axis=(2, 3, 4)), yb + 1.0)

    def step(total, batch):
        x, y = batch
        return total + jnp.sum(y), jnp.mean(x)

    total, _ = jax.lax.scan(step, jnp.int32(0), (xb, yb))
    assert int(total) == int(np.sum(yb))


def test_epoch_batches_errors():
    images, labels = _tagged(10)
    with pytest.raises(ValueError, match=r"same\s+number of examples"):
        data.epoch_batches(jax.random.key(0), images, labels[:9], 2)
    with pytest.raises(TypeError, match=r"`augment` .* must be callable"):
        data.epoch_batches(jax.random.key(0), images, labels, 2, augment="flip")


def test_time_input_pipeline():
    images = jnp.zeros((256, 32, 32, 3), jnp.uint8)
    t = data.time_input_pipeline(jax.random.key(0), images, jnp.zeros(256, jnp.int32), 64,
                                 augment=data.augment_cifar, repeats=2)
    assert t.num_batches == 4 and t.seconds_per_epoch > 0 and t.first_call_seconds > 0
    assert t.examples_per_second == pytest.approx(256 / t.seconds_per_epoch)


def test_to_device_keeps_dtypes():
    d = data.to_device(data.load("digits"))
    assert isinstance(d.train_images, jax.Array) and d.train_images.dtype == jnp.uint8
    assert d.test_labels.dtype == jnp.int32 and d.test_images.shape == (355, 8, 8, 1)


# --------------------------------------------------------------------------
# Augmentation


def _shift(img: np.ndarray, dy: int, dx: int, fill=0.0) -> np.ndarray:
    """out[i, j] = img[i + dy, j + dx], ``fill`` outside: an independent numpy reference."""
    h, w = img.shape[:2]
    out = np.full_like(img, fill)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[ys, xs] = img[max(0, dy): max(0, dy) + (ys.stop - ys.start), max(0, dx): max(0, dx) + (xs.stop - xs.start)]
    return out


@pytest.mark.parametrize("fill", [0.0, -1.0])
def test_augment_crop_is_a_shift(fill):
    images = np.random.default_rng(0).random((48, 32, 32, 3), dtype=np.float32) + 0.5
    out = np.asarray(data.augment_cifar(jax.random.key(5), images, flip=False, fill=fill))
    shifts = []
    for img, res in zip(images, out):
        offsets = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
        found = [(dy, dx) for dy, dx in offsets if np.array_equal(res, _shift(img, dy, dx, fill))]
        assert len(found) == 1, "each output must be exactly one shifted copy of its own input"
        shifts.append(found[0])
    assert len(set(shifts)) >= 15, "shifts must vary per example"
    assert {abs(dy) for dy, _ in shifts} >= {0, 4} and {abs(dx) for _, dx in shifts} >= {0, 4}


@pytest.mark.parametrize(
    ("dtype", "fill", "match"),
    [
        (np.uint8, -1, r"`fill` \(=-1\).*uint8.*\[0, 255\]"),  # would wrap to 255 (white, not black)
        (np.uint8, 256, r"`fill` \(=256\).*uint8.*\[0, 255\]"),
        (np.uint8, 0.5, r"`fill` \(=0\.5\).*uint8.*\[0, 255\]"),  # would truncate to 0
        (np.uint8, [0, 128, 300], r"`fill` \(=\[0, 128, 300\]\).*uint8.*\[0, 255\]"),  # per channel
        (np.int8, 128, r"`fill` \(=128\).*int8.*\[-128, 127\]"),
        (np.float16, 1e6, r"`fill` \(=1000000\.0\).*float16"),  # would overflow to inf
    ],
)
def test_augment_fill_must_be_representable_in_the_image_dtype(dtype, fill, match):
    with pytest.raises(ValueError, match=match):
        data.augment_cifar(jax.random.key(0), np.ones((8, 5, 5, 3), dtype), padding=3, fill=fill)


@pytest.mark.parametrize(
    ("dtype", "fill"),
    [(np.uint8, 255), (np.uint8, 7.0), (np.uint8, np.array([0, 128, 255])), (np.int8, -128),
     (np.float32, -1.5), (np.float16, 60000.0)],
)
def test_augment_fill_in_range_pads_with_exactly_that_value(dtype, fill):
    out = np.asarray(data.augment_cifar(jax.random.key(0), np.ones((8, 5, 5, 3), dtype), padding=3, fill=fill))
    assert out.dtype == dtype
    fills = np.broadcast_to(np.asarray(fill, dtype), (3,))
    for ch in range(3):  # every pixel is the image's 1 or the channel's fill, and some are the fill
        values = set(out[..., ch].ravel().tolist())
        assert values <= {1, fills[ch].item()} and fills[ch].item() in values


def test_augment_flip_actually_flips():
    images = np.random.default_rng(1).random((256, 32, 32, 3), dtype=np.float32)
    out = np.asarray(data.augment_cifar(jax.random.key(9), images, padding=0))
    same = np.array([np.array_equal(o, x) for o, x in zip(out, images)])
    mirrored = np.array([np.array_equal(o, x[:, ::-1]) for o, x in zip(out, images)])
    assert np.all(same ^ mirrored)
    assert 0.3 < mirrored.mean() < 0.7


@pytest.mark.parametrize("shape,dtype", [
    ((8, 32, 32, 3), jnp.float32),
    ((8, 32, 32, 3), jnp.uint8),
    ((5, 28, 28, 1), jnp.float32),
])
def test_augment_shapes_dtypes_determinism(shape, dtype):
    images = jnp.asarray(np.random.default_rng(0).integers(1, 255, shape), dtype)
    a = data.augment_cifar(jax.random.key(1), images)
    assert a.shape == shape and a.dtype == dtype
    np.testing.assert_array_equal(a, data.augment_cifar(jax.random.key(1), images))
    assert not np.array_equal(a, data.augment_cifar(jax.random.key(2), images))


@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"padding": -1}, ValueError, r"`padding` \(=-1\) must be >= 0"),
    ({"padding": 1.5}, TypeError, r"`padding` \(=1.5\) must be an integer"),
    ({"flip": "yes"}, TypeError, r"`flip` \(='yes'\) must be a bool"),
])
def test_augment_errors(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        data.augment_cifar(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), **kwargs)


def test_public_names():
    for name in data.__all__:
        assert hasattr(data, name), name
    core = {"load", "Dataset", "DataError", "normalize", "shuffle_batches", "augment_cifar", "epoch_batches"}
    assert core <= set(data.__all__)
