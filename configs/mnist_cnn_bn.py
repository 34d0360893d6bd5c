"""A small CNN with BatchNorm (before the ReLU) on MNIST, SGD with momentum and a cosine schedule."""

EPOCHS = 10
STEPS_PER_EPOCH = 60000 // 128


def get_config():
    return {
        "data": {"name": "mnist", "normalization": "standardize", "batch_size": 128},
        "model": {"name": "cnn", "channels": [16, 32], "batchnorm": "before", "input_size": 28, "init": "he_normal"},
        "optimizer": {
            "name": "sgd",
            "learning_rate": {"schedule": "cosine", "init_value": 0.1, "T_max": EPOCHS * STEPS_PER_EPOCH},
            "momentum": 0.9,
            "weight_decay": 5e-4,
        },
        "train": {"epochs": EPOCHS, "seed": 0},
    }
