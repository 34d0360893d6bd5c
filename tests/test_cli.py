"""Tests of the ``optlab`` command: train, eval, plot, lr-find, and its exit codes.

Most tests call ``optlab.cli.main`` in-process (compiled programs are shared with the
rest of the session); one runs ``python -m optlab.cli`` to check the real exit status.
What the commands print is checked against the run folder they wrote.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import pathlib
import re
import subprocess
import sys

import pytest

from optlab.cli import main

TINY = {
    "data": {"name": "digits", "normalization": "standardize", "batch_size": 32, "limit_train": 256},
    "model": {"name": "mlp", "hidden": [16]},
    "optimizer": {"name": "sgd", "learning_rate": 0.2},
    "train": {"epochs": 3, "seed": 0},
    "output": {"plots": False},
}
PNG = b"\x89PNG\r\n\x1a\n"


def run(*argv: str) -> tuple[int, str, str]:
    """``optlab ARGV`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("configs") / "tiny.py"
    path.write_text(f"def get_config():\n    return {TINY!r}\n")
    return path


@pytest.fixture(scope="module")
def trained(tiny_file, tmp_path_factory):
    """``optlab train tiny.py --set ...`` (2 epochs instead of the file's 3)."""
    out_dir = tmp_path_factory.mktemp("runs")
    code, stdout, stderr = run("train", tiny_file, "--set", f"output.dir={out_dir}", "--set", "output.name=tiny",
                               "--set", "train.epochs=2")
    return code, stdout, stderr, out_dir / "tiny"


def _metrics(run_dir: pathlib.Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_prints_the_run_folder_and_applies_overrides(trained):
    code, stdout, stderr, run_dir = trained
    assert code == 0, stderr
    assert f"run folder: {run_dir}" in stdout.splitlines()
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["output"]["name"] == "tiny"
    rows = _metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert re.search(r"^epoch +2 ", stdout, re.M)  # one console line per epoch
    final = float(rows[-1]["test_accuracy"])
    assert f"final test accuracy {final:.4f}" in stdout


def test_eval_prints_the_newest_checkpoint_on_the_test_set(trained):
    *_, run_dir = trained
    code, stdout, stderr = run("eval", run_dir)
    assert code == 0, stderr
    res = json.loads(stdout)
    final = _metrics(run_dir)[-1]
    assert res["epoch"] == 2 and res["step"] == 2 * (256 // 32)
    assert res["test_accuracy"] == pytest.approx(float(final["test_accuracy"]), abs=1e-6)
    assert res["test_loss"] == pytest.approx(float(final["test_loss"]), rel=1e-5)


def test_plot_draws_the_run(trained):
    *_, run_dir = trained
    png = run_dir / "plots" / "training.png"
    png.unlink(missing_ok=True)  # the config has output.plots=False; the command draws it anyway
    code, stdout, stderr = run("plot", run_dir)
    assert code == 0, stderr
    assert pathlib.Path(stdout.strip()) == png
    assert png.read_bytes()[:8] == PNG


def test_resume_of_a_finished_run_trains_nothing(trained):
    *_, run_dir = trained
    before = _metrics(run_dir)
    code, stdout, stderr = run("train", "--resume", run_dir)
    assert code == 0, stderr
    assert f"run folder: {run_dir}" in stdout
    assert _metrics(run_dir) == before


def test_train_into_an_existing_run_folder_exits_2(trained):
    *_, run_dir = trained
    code, _, stderr = run("train", "--set", f"output.dir={run_dir.parent}", "--set", f"output.name={run_dir.name}")
    assert code == 2
    assert "already exists" in stderr and "--resume" in stderr


def test_lr_find_prints_a_suggestion_and_writes_its_plot(tiny_file, tmp_path):
    code, stdout, stderr = run("lr-find", tiny_file, "--steps", "30", "--set", f"output.dir={tmp_path}")
    assert code == 0, stderr
    steps = int(re.search(r"^steps run: (\d+)", stdout, re.M).group(1))
    assert 5 <= steps <= 30
    suggestion = float(re.search(r"^suggested learning rate: (\S+)$", stdout, re.M).group(1))
    assert 1e-6 <= suggestion <= 10.0
    plot = pathlib.Path(re.search(r"^plot: (.+)$", stdout, re.M).group(1))
    assert plot == tmp_path / "lr-find-tiny.png"
    assert plot.read_bytes()[:8] == PNG


def test_lr_find_for_several_optimizers_reports_one_suggestion_each(tiny_file, tmp_path):
    code, stdout, stderr = run(
        "lr-find", tiny_file, "--steps", "20", "--optimizers", "sgd,adam", "--set", f"output.dir={tmp_path}"
    )
    assert code == 0, stderr
    found = dict(re.findall(r"^(\w+): suggested learning rate (\S+) after", stdout, re.M))
    assert set(found) == {"sgd", "adam"}
    assert all(1e-6 <= float(v) <= 10.0 for v in found.values())
    assert (tmp_path / "lr-find-tiny.png").read_bytes()[:8] == PNG


ERRORS = [
    # (arguments after the config file or in place of it, text expected on stderr)
    (["train", "{tiny}", "--set", "train.epoch=3"], "`train.epoch`"),
    (["train", "{tiny}", "--set", "optimizer.bogus=1"], "`optimizer.bogus`"),
    (["train", "{tiny}", "--set", "optimizer.learning_rate=-1"], "learning_rate"),
    (["train", "{tiny}", "--set", "train.epochs"], "key.sub=value"),
    (["train", "{tmp}/missing.py"], "does not exist"),
    (["train", "--resume", "{tmp}"], "not a run folder"),
    (["eval", "{tmp}"], "not a run folder"),
    (["plot", "{tmp}"], "no metrics.csv"),
    (["lr-find", "{tiny}", "--set", "data.bogus=1"], "`data.bogus`"),
    (["lr-find", "{tiny}", "--min-lr", "1", "--max-lr", "0.1"], "min_lr"),
    (["lr-find", "{tiny}", "--optimizers", "sgd,bogus"], "unknown optimizer 'bogus'"),
]


@pytest.mark.parametrize("argv, expected", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_errors_exit_2_with_a_message(argv, expected, tiny_file, tmp_path):
    code, _, stderr = run(*[a.format(tiny=tiny_file, tmp=tmp_path) for a in argv])
    assert code == 2
    assert stderr.startswith("error: ")
    assert expected in stderr
    assert "Traceback" not in stderr


def test_divergence_exits_1(tiny_file, tmp_path):
    lr = {"schedule": "piecewise_constant", "boundaries": [16], "values": [0.05, 1e6]}
    code, _, stderr = run("train", tiny_file, "--set", f"output.dir={tmp_path}", "--set", "output.name=div",
                          "--set", "model.activation=identity", "--set", f"optimizer.learning_rate={lr!r}",
                          "--set", "train.epochs=4")
    assert code == 1
    assert stderr.startswith("error: training diverged")
    assert str(tmp_path / "div" / "checkpoints" / "epoch_0002") in stderr


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "optlab.cli", "train", str(tmp_path / "missing.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def test_a_config_file_given_with_resume_is_compared_with_the_saved_one(tiny_file, tmp_path):
    code, _, stderr = run("train", tiny_file, "--set", f"output.dir={tmp_path}", "--set", "output.name=r",
                          "--set", "train.epochs=1")
    assert code == 0, stderr
    run_dir = tmp_path / "r"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    other = tmp_path / "other.py"
    # (config given with --resume, differing keys the error must name; [] = accepted)
    cases = [
        ({**TINY, "optimizer": {"name": "sgd", "learning_rate": 0.1}}, ["optimizer.learning_rate"]),
        ({**TINY, "model": {"name": "mlp", "hidden": [32]}, "data": {**TINY["data"], "batch_size": 64}},
         ["data.batch_size", "model.hidden"]),
        ({**TINY, "train": {"epochs": 2, "seed": 0}}, []),  # only the length differs: continue the run
    ]
    for cfg, differing in cases:
        other.write_text(f"def get_config():\n    return {cfg!r}\n")
        code, stdout, stderr = run("train", other, "--resume", run_dir)
        if differing:
            assert code == 2, stdout
            assert stderr.startswith("error: --resume: the config differs") and f"at {differing}" in stderr
            assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
        else:
            assert code == 0, stderr
            assert [int(r["epoch"]) for r in _metrics(run_dir)] == [1, 2]
            saved = json.loads((run_dir / "config.json").read_text())
            assert saved["train"]["epochs"] == 2 and saved["output"]["name"] == "r"  # the run's output kept


def test_eval_prints_strict_json_when_the_test_loss_is_not_finite(tiny_file, tmp_path):
    # Huge but finite weights after epoch 2 (one step per epoch, the rate jumps to 3e38) overflow
    # the test logits; evaluation runs only at the end, so epoch 2 is checkpointed unevaluated.
    lr = {"schedule": "piecewise_constant", "boundaries": [1], "values": [0.05, 3e38]}
    from optlab.train import fit

    cfg = {**TINY, "data": {**TINY["data"], "limit_train": 32}, "optimizer": {"name": "sgd", "learning_rate": lr},
           "train": {"epochs": 3, "eval_every": 10}}
    fit(cfg, run_dir=tmp_path / "huge", quiet=True, stop_after_epochs=2)
    code, stdout, stderr = run("eval", tmp_path / "huge")
    assert code == 0, stderr

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    res = json.loads(stdout, parse_constant=refuse)
    assert res["epoch"] == 2 and res["test_loss"] is None and 0 <= res["test_accuracy"] <= 1
