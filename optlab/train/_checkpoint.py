"""Checkpoints with orbax, committed by a marker written last.

Layout in a run folder::

    checkpoints/epoch_0003/        orbax pytree of the TrainState
    checkpoints/epoch_0003.json    metadata (epoch, history so far): written
                                   atomically *after* the arrays, so its
                                   presence means the checkpoint is complete

The marker also lists the SHA-256 of every file orbax wrote. A checkpoint
without its marker (the process died while saving), whose files do not match
their digests (truncated or corrupted later), or whose arrays fail to restore,
is skipped with a warning and the previous one is used. Verifying the digests
first keeps a damaged checkpoint away from orbax altogether.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

_NAME = re.compile(r"^epoch_(\d{4,})$")


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Replace ``path``'s contents all at once: a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _digests(folder: pathlib.Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[str(p.relative_to(folder))] = h.hexdigest()
    return out


def _damage(folder: pathlib.Path, expected: dict[str, str]) -> str | None:
    """A description of the first file that is missing or differs from its digest, else None."""
    actual = _digests(folder)
    for name, digest in expected.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != digest:
            return f"{name} does not match its SHA-256"
    return None


def save(folder: str | os.PathLike, epoch: int, state: Any, meta: dict, keep: int = 2) -> pathlib.Path:
    """Save ``state`` as the checkpoint of ``epoch`` and prune all but the newest ``keep``."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"epoch_{epoch:04d}"
    marker = folder / f"epoch_{epoch:04d}.json"
    if marker.exists():
        marker.unlink()
    if target.exists():
        shutil.rmtree(target)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target.absolute(), state)
    ckptr.wait_until_finished()
    atomic_write_text(marker, json.dumps({"epoch": epoch, **meta, "files": _digests(target)}))
    for old in committed(folder)[:-keep]:
        shutil.rmtree(folder / f"epoch_{old:04d}", ignore_errors=True)
        (folder / f"epoch_{old:04d}.json").unlink(missing_ok=True)
    return target


def committed(folder: str | os.PathLike) -> list[int]:
    """Epochs with a complete checkpoint (arrays and marker), oldest first."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (folder / f"{p.name}.json").is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def restore_latest(folder: str | os.PathLike, like: Any) -> tuple[Any, dict] | None:
    """Restore the newest complete checkpoint into the structure of ``like``.

    Returns ``(state, meta)`` or None when there is none. NamedTuples (the
    optimizer's states) come back intact because ``like`` gives the structure.
    A damaged checkpoint is skipped for the previous one. An intact one (every
    file matches its recorded digest) that does not fit ``like`` raises
    ``ValueError``: the run was made with another state layout (another
    optimizer configuration or optlab version), so falling back would start
    over and prune the run's checkpoints.
    """
    folder = pathlib.Path(folder)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    for epoch in reversed(committed(folder)):
        path = folder / f"epoch_{epoch:04d}"
        intact = False
        try:
            meta = json.loads((folder / f"epoch_{epoch:04d}.json").read_text())
            problem = _damage(path, meta.get("files", {}))
            if problem is not None:
                warnings.warn(f"checkpoint {path} is damaged ({problem}); trying the previous one", RuntimeWarning)
                continue
            intact = bool(meta.get("files"))
            state = ocp.StandardCheckpointer().restore(path.absolute(), abstract)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: use the previous one
            if intact:
                raise ValueError(
                    f"checkpoint {path} is intact but does not fit this run's state ({type(e).__name__}: {e}). "
                    "It was written with another state layout: another optimizer configuration or optlab "
                    "version. Nothing was changed; resume with the configuration and version that wrote it, "
                    "or start a new run folder."
                ) from e
            warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying the previous one", RuntimeWarning)
            continue
        meta.pop("files", None)
        return state, meta
    return None
