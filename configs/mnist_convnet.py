"""The lectures' MNIST ConvNet (4,266 parameters): SGD lr 0.05, batch 128, 10 epochs, about 97.5% test accuracy."""


def get_config():
    return {
        "data": {"name": "mnist", "normalization": "unit", "batch_size": 128},
        "model": {"name": "convnet", "init": "default"},
        "optimizer": {"name": "sgd", "learning_rate": 0.05},
        "train": {"epochs": 10, "seed": 0},
    }
