"""The lectures' CIFAR-10 classifier: a small CNN with BatchNorm after each conv, Adam, crop+flip augmentation.

Accuracies from this repository's data are on the JPEG copy of CIFAR-10 (see ../shared/README.md).
"""


def get_config():
    return {
        "data": {"name": "cifar10", "normalization": "standardize", "batch_size": 128, "augment": True},
        "model": {"name": "cnn", "channels": [32, 64, 128], "batchnorm": "before", "dropout": 0.2},
        "optimizer": {"name": "adam", "learning_rate": 1e-3},
        "train": {"epochs": 30, "seed": 0},
    }
