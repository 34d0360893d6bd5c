"""Long training runs on real data (``pytest -m slow``): the shipped configs reach their documented accuracy."""

from __future__ import annotations

import pathlib

import pytest

import optlab.data
from optlab.config import load_config_file
from optlab.train import fit

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
def test_mnist_convnet_config_reaches_97_percent_in_10_epochs(tmp_path):
    try:
        optlab.data.load("mnist", download=False)
    except FileNotFoundError as e:
        pytest.skip(f"MNIST is not available offline: {e}")
    cfg = load_config_file(CONFIGS / "mnist_convnet.py")
    assert cfg["train"]["epochs"] == 10
    cfg["output"] = {"dir": str(tmp_path), "plots": False}
    result = fit(cfg, run_dir=tmp_path / "run", quiet=True)
    assert len(result["history"]) == 10
    assert result["final"]["test_accuracy"] >= 0.97, result["final"]
