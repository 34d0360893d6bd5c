"""A ten-line sweep: learning rate x momentum on the digits MLP, two seeds each (`optlab sweep configs/digits_sweep.py`)."""

from optlab import sweep
from optlab.config import default_config


def get_config():
    cfg = default_config()
    cfg["train"]["epochs"] = 10
    return cfg


def get_sweep():
    return sweep.grid(learning_rate=[0.003, 0.01, 0.03, 0.1, 0.3], momentum=[0.0, 0.9], seeds=2)
