"""One sweep over two processes (``jax.distributed`` over loopback) equals the same sweep in one process.

The two processes are real: ``python -m optlab.cli sweep ... --coordinator
127.0.0.1:PORT --num-processes 2 --process-id I``, one CPU device each, on a
free port of 127.0.0.1 only. They are killed on failure or after a deadline,
so the test cannot hang.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from optlab import sweep
from optlab.config import load_config_file, load_sweep_file

REPO = pathlib.Path(__file__).resolve().parents[1]
DEADLINE_S = 100  # a hang guard: both processes normally finish in well under a minute

CONFIG = '''
from optlab import sweep
from optlab.config import default_config


def get_config():
    cfg = default_config()
    cfg["data"]["limit_train"] = 128
    cfg["model"]["hidden"] = [16]
    cfg["train"].update(epochs=2, checkpoint_every=0)
    cfg["output"] = {"plots": False}
    return cfg


def get_sweep():
    return sweep.grid(learning_rate=[0.05, 0.2], momentum=[0.0, 0.9])
'''


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(config_file: pathlib.Path, out: pathlib.Path, logs: pathlib.Path) -> list[str]:
    """Launch processes 0 and 1; return their logs. Kills both if either fails or the deadline passes."""
    port = free_loopback_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    procs, files = [], []
    try:
        for pid in range(2):
            log = open(logs / f"process{pid}.log", "w")  # files, not pipes: a full pipe could stall a process
            files.append(log)
            cmd = [sys.executable, "-m", "optlab.cli", "sweep", str(config_file), "--out", str(out),
                   "--strategy", "map", "--max-in-flight", "2",  # a set in-flight count skips a memory probe
                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=logs))
        end = time.monotonic() + DEADLINE_S
        while any(p.poll() is None for p in procs):
            # One process failing leaves the other waiting for it in a collective: stop at once.
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > end:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in files:
            f.close()
    texts = [(logs / f"process{pid}.log").read_text() for pid in range(2)]
    codes = [p.returncode for p in procs]
    tails = "".join(f"\n--- process {pid}:\n{text[-3000:]}" for pid, text in enumerate(texts))
    assert codes == [0, 0], f"exit codes {codes}{tails}"
    return texts


def test_two_processes_equal_one_process(tmp_path):
    config_file = tmp_path / "tiny_sweep.py"
    config_file.write_text(CONFIG)
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    logs.mkdir()
    texts = run_two_processes(config_file, out, logs)
    assert "trained members 2..3" in texts[1]  # process 1 held the second half
    assert "| member |" in texts[0]  # process 0 printed the merged table

    members = load_sweep_file(config_file)
    alone = sweep.run(load_config_file(config_file), members, strategy="map", num_devices=1, max_in_flight=4,
                      quiet=True)
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(members) == 4
    for got, want in zip(table, alone.rows, strict=True):
        assert int(got["member"]) == want["member"] and int(got["group"]) == want["group"] == 0
        assert float(got["optimizer.learning_rate"]) == want["optimizer.learning_rate"]
        assert float(got["optimizer.momentum"]) == want["optimizer.momentum"]
        assert got["diverged_at_step"] == "" and want["diverged_at_step"] is None
        for key in ("final_test_accuracy", "best_test_accuracy", "final_test_loss", "final_train_loss"):
            np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-6, err_msg=key)
    with np.load(out / "curves.npz") as curves:
        for key, want in alone.curves.items():
            np.testing.assert_allclose(curves[key], want, rtol=1e-6, err_msg=key)
    assert json.loads((out / "best.json").read_text())["member"] == alone.best["member"]
    assert not (out / "plots").exists()  # the config's output.plots=False holds across processes
    md = (out / "results.md").read_text()
    assert '"members_by_process": [[0, 2], [2, 4]]' in md and '"devices_by_process": [1, 1]' in md


@pytest.mark.parametrize(("num_members", "num_processes"), [(4, 2), (5, 2), (7, 3), (3, 3), (10, 4)])
def test_member_blocks_cover_each_member_once(num_members, num_processes):
    blocks = [sweep.member_block(num_members, num_processes, p) for p in range(num_processes)]
    assert [i for b in blocks for i in b] == list(range(num_members))  # contiguous, in order, no overlap
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("127.0.0.1:1234", 2, None), "all of `coordinator_address`, `num_processes` and `process_id`"),
        ((None, 2, 0), "all of"),
        (("127.0.0.1", 2, 0), r"`coordinator_address` \(='127.0.0.1'\) must look like 'host:port'"),
        (("127.0.0.1:http", 2, 0), "host:port"),
        (("127.0.0.1:1234", 0, 0), r"`num_processes` \(=0\)"),
        (("127.0.0.1:1234", 2, 2), r"`process_id` \(=2\) must be an integer in \[0, 2\)"),
        (("127.0.0.1:1234", 2, -1), r"`process_id` \(=-1\)"),
    ],
)
def test_distributed_arguments_checked_before_connecting(args, match):
    with pytest.raises(ValueError, match=match):
        sweep.initialize_distributed(*args)
