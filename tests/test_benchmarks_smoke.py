"""The benchmark scripts run end to end in their ``--quick`` mode and print their tables.

Each benchmark's ``main`` is called on tiny sizes with one or two rounds and
without PyTorch (tests must not need it). Only the shape of the output is
checked: the tables exist, have their header, a separator and one row per
measured case, and the numbers in them are positive. Timings are never
asserted on.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import sys

import pytest

# Minutes on a 2-core CPU: run with `pytest -m benchmark` (excluded from the default run and CI).
pytestmark = pytest.mark.benchmark

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def rows_of(markdown_table: str) -> list[list[str]]:
    lines = [line for line in markdown_table.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, markdown_table
    assert set(lines[1]) <= set("|-"), "second line must be the header separator"
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", cell)]


# module, arguments, rows expected, leading label columns
CASES = [
    ("bandwidth", ["--quick"], 4, 1),
    ("update_step", ["--quick", "--trees", "10 x 6.5k", "--optimizers", "sgd,adam", "--no-torch", "--rounds", "1"], 2, 1),
    ("compile_time", ["--quick", "--trees", "small1000", "--optimizers", "sgd"], 1, 1),
    ("train_step", ["--quick", "--workloads", "MNIST ConvNet", "--no-torch", "--rounds", "1"], 4, 2),
]


@pytest.mark.parametrize("module, argv, expected_rows, labels", CASES, ids=[c[0] for c in CASES])
def test_benchmark_quick_mode_prints_its_table(bench, capsys, module, argv, expected_rows, labels):
    result = bench(module).main(argv)
    out = capsys.readouterr().out
    assert "jax " in out and "cores" in out  # the environment line
    tables = [t for t in result["tables"] if "|" in t]
    assert len(tables) == 1
    assert tables[0] in out
    rows = rows_of(tables[0])
    assert len(rows) == expected_rows
    for row in rows:
        values = [c for c in row[labels:] if c != "n/a"]
        assert values and all(numbers(c) for c in values), row
        assert all(x >= 0 for c in values for x in numbers(c)), row


def test_update_step_ends_with_adam_against_the_gpu_targets(bench):
    argv = ["--quick", "--trees", "10 x 6.5k,50 small (20k)", "--optimizers", "adam", "--no-torch", "--rounds", "1"]
    summary = bench("update_step").main(argv)["tables"][-1].splitlines()
    assert summary[0].startswith("Adam per tree")
    assert [line.split(":")[0] for line in summary[1:]] == ["- 10 x 6.5k", "- 50 small (20k)"]
    for line in summary[1:]:
        percent = re.search(r"(\d+)% of the roofline, torch fused not timed$", line)
        assert percent and int(percent.group(1)) > 0, line


def test_update_step_rejects_an_unknown_optimizer(bench):
    with pytest.raises(SystemExit):
        bench("update_step").main(["--quick", "--optimizers", "adamax"])


def test_runs_summary_takes_the_median_over_runs(bench, tmp_path, capsys):
    paths = []
    for i in range(3):
        path = tmp_path / f"run{i}.json"
        argv = ["--quick", "--trees", "10 x 6.5k", "--optimizers", "sgd", "--no-torch", "--rounds", "1"]
        bench("update_step").main([*argv, "--variants", "optax-again,optlab", "--json", str(path)])
        paths.append(path)
    capsys.readouterr()
    result = bench("runs_summary").main([str(p) for p in paths])
    out = capsys.readouterr().out
    (rows,) = [rows_of(out)]
    assert [r[:2] for r in rows] == [["10 x 6.5k", "sgd"]]
    (ratios,) = [c["optlab"] for c in result["cells"].values()]
    assert len(ratios) == 3 and rows[0][3].startswith(f"{sorted(ratios)[1]:.2f} [")
    assert "optlab: " in out and "of 1 medians" in out


def test_runs_summary_names_a_file_that_is_not_an_update_step_run(bench, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"tables": []}')
    with pytest.raises(SystemExit, match="bad.json: not the --json output of update_step.py"):
        bench("runs_summary").main([str(bad)])


@pytest.mark.parametrize("n", [1, 2, 5])
def test_round_orders_are_seeded_permutations_without_back_to_back_repeats(bench, n):
    common = bench("_common")
    items = [f"c{i}" for i in range(n)]
    orders = common.round_orders(items, 40)
    assert orders == common.round_orders(items, 40)  # seeded: a run can be repeated
    assert all(sorted(o) == items for o in orders)
    if n > 1:
        assert all(a[-1] != b[0] for a, b in zip(orders, orders[1:]))
    if n > 2:  # two items without repeats can only alternate; more must take turns first
        assert len({o[0] for o in orders}) == n
