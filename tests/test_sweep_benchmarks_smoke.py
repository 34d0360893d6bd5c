"""Smoke runs of the sweep benchmarks and the weight-initialisation experiment (tiny sizes, no timing assertions).

Each script's ``main`` runs in its ``--quick`` mode on a few MNIST batches
and must print a Markdown table with a row per member / contender. MNIST
comes from ``OPTLAB_DATA`` (set by conftest.py when the shared data exist);
without it those tests are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mnist_available() -> bool:
    root = os.environ.get("OPTLAB_DATA")
    return bool(root) and (pathlib.Path(root) / "mnist" / "train-images-idx3-ubyte.gz").is_file()


needs_mnist = pytest.mark.skipif(not _mnist_available(), reason="MNIST not found under OPTLAB_DATA")


def _load(relpath: str):
    name = "smoke_" + relpath.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    if str(ROOT) not in sys.path:  # the benchmarks import benchmarks._common
        sys.path.insert(0, str(ROOT))
    spec.loader.exec_module(module)
    return module


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text`` whose header starts with ``header_start``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"| {header_start}"):
            rows = []
            for body in lines[i + 2 :]:
                if not body.startswith("|"):
                    break
                rows.append([c.strip() for c in body.strip("|").split("|")])
            return rows
    raise AssertionError(f"no table with a header starting {header_start!r} in:\n{text}")


@pytest.mark.benchmark
@needs_mnist
def test_weight_init_experiment_quick(tmp_path, capsys):
    mod = _load("experiments/weight_init.py")
    res = mod.main(["--quick", "--out", str(tmp_path / "wi")])
    out = capsys.readouterr().out
    rows = _table_rows(out, "init")
    assert [r[0] for r in rows] == ["`default`", "`uniform`"]  # the first two of INIT_NAMES
    for r in rows:
        assert r[2].endswith("%") and 0 <= float(r[2][:-1]) <= 100
    assert (tmp_path / "wi" / "weight_init.md").read_text() == res["markdown"]
    assert (tmp_path / "wi" / "results.csv").is_file()
    assert res["strategy"] == ["map"]  # a ConvNet sweep on the CPU
    assert res["in_lecture_range"] is False  # 2 batches of training are far from the lectures' 97%


@pytest.mark.benchmark
@needs_mnist
@pytest.mark.parametrize("contenders", ["sweep,flax,torch1", "cli"])
def test_init_table_quick(contenders, capsys):
    if "torch" in contenders:
        pytest.importorskip("torch")
    mod = _load("benchmarks/init_table.py")
    inits = "default" if contenders == "cli" else "default,he_normal"  # one process per init: keep it short
    res = mod.main(["--quick", "--contenders", contenders, "--inits", inits])
    out = capsys.readouterr().out
    names = contenders.split(",")
    timing = _table_rows(out, "contender")
    assert [r[0] for r in timing] == names
    assert all(float(r[2]) > 0 for r in timing)
    accuracy = _table_rows(out, "init")
    assert [r[0] for r in accuracy] == inits.split(",")
    assert all(0 <= float(c[:-1]) <= 100 for r in accuracy for c in r[1:])
    assert set(res["records"]) == set(names)
    if "sweep" in names:  # every ratio is to the sweep of the same round, so its own is 1
        assert timing[0][5].startswith("1.00")


@pytest.mark.benchmark
@needs_mnist
def test_sweep_throughput_quick(capsys):
    mod = _load("benchmarks/sweep_throughput.py")
    res = mod.main(["--quick", "--models", "convnet", "--strategies", "vmap,map"])
    out = capsys.readouterr().out
    rows = _table_rows(out, "members")
    assert [(r[0], r[1]) for r in rows] == [("1", "vmap"), ("1", "map"), ("2", "vmap"), ("2", "map")]
    assert all(float(r[2].replace(",", "")) > 0 for r in rows)
    assert {(r["members"], r["strategy"]) for r in res["results"]} == {(1, "vmap"), (1, "map"), (2, "vmap"), (2, "map")}


@pytest.mark.benchmark
@needs_mnist
def test_sweep_throughput_formulations_quick(capsys):
    mod = _load("benchmarks/sweep_throughput.py")
    res = mod.main(["--quick", "--formulations"])
    rows = _table_rows(capsys.readouterr().out, "ConvNet formulation")
    assert len(rows) == 4 and rows[0][4].startswith("1.00")
    assert all(float(r[1]) > 0 for r in rows)
    assert len(res["formulations"]) == 4
