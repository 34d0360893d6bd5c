"""ResNet-9 for a time-to-94% run on CIFAR-10 (in the spirit of Page's DAWNBench entry):
SGD with Nesterov momentum, one-cycle learning rate, label smoothing, crop+flip augmentation.

Accuracies from this repository's data are on the JPEG copy of CIFAR-10 (see ../shared/README.md).
"""

EPOCHS = 10
BATCH = 512
STEPS_PER_EPOCH = 50000 // BATCH


def get_config():
    return {
        "data": {"name": "cifar10", "normalization": "standardize", "batch_size": BATCH, "augment": True},
        "model": {"name": "resnet9", "width": 64},
        "optimizer": {
            "name": "sgd",
            "learning_rate": {
                "schedule": "one_cycle",
                "max_lr": 0.4,
                "total_steps": EPOCHS * STEPS_PER_EPOCH,
                "pct_start": 0.25,
                "anneal_strategy": "linear",
            },
            # OneCycleLR's cycled momentum (0.95 -> 0.85 -> 0.95), as PyTorch does by default.
            "momentum": {
                "schedule": "one_cycle",
                "part": "momentum",
                "max_lr": 0.4,
                "total_steps": EPOCHS * STEPS_PER_EPOCH,
                "pct_start": 0.25,
                "anneal_strategy": "linear",
            },
            "nesterov": True,
            "weight_decay": 5e-4,
        },
        "train": {"epochs": EPOCHS, "seed": 0, "label_smoothing": 0.2},
    }
