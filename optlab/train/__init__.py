"""The training loop: pure jitted steps, whole epochs as one ``lax.scan`` (or a loop over one jitted step), and ``fit(config)``."""

from optlab._host import retain_host_memory, set_cpu_devices
from optlab.train._checkpoint import committed as committed_checkpoints
from optlab.train._checkpoint import restore_latest, save
from optlab.train._fit import DivergenceError, Experiment, build_model, build_optimizer, evaluate_run, fit
from optlab.train._lr_find import lr_find, lr_find_many, plot_lr_find, plot_lr_find_many
from optlab.train._plots import plot_run
from optlab.train._step import (
    TrainState,
    choose_epoch_loop,
    cross_entropy,
    current_learning_rate,
    epoch_permutation,
    init_state,
    make_evaluate,
    make_steps,
    make_train_epoch,
    make_train_epoch_stepwise,
    split_model,
)

__all__ = [
    "DivergenceError",
    "Experiment",
    "TrainState",
    "build_model",
    "build_optimizer",
    "choose_epoch_loop",
    "committed_checkpoints",
    "cross_entropy",
    "current_learning_rate",
    "epoch_permutation",
    "evaluate_run",
    "fit",
    "init_state",
    "lr_find",
    "lr_find_many",
    "make_evaluate",
    "make_steps",
    "make_train_epoch",
    "make_train_epoch_stepwise",
    "plot_lr_find",
    "plot_lr_find_many",
    "plot_run",
    "restore_latest",
    "retain_host_memory",
    "save",
    "set_cpu_devices",
    "split_model",
]
