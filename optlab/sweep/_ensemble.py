"""Model ensembles: members trained over seeds in one program, predictions averaged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from optlab._checks import check_int
from optlab.sweep._run import run
from optlab.sweep._spec import grid


def ensemble(config: dict, n: int, **run_kwargs) -> dict:
    """Train ``n`` members that differ only in their seed and average their predicted probabilities.

    Returns ``{"member_accuracies", "ensemble_accuracy", "sweep"}``: each
    member's test accuracy and that of the averaged softmax outputs (the
    lectures' model ensembles, Dietterich 2000).

    Example (scikit-learn's 8x8 digits, bundled: no download):
      >>> import optlab.sweep as sweep
      >>> config = {"data": {"name": "digits", "batch_size": 256}, "model": {"name": "mlp", "hidden": [8]},
      ...           "optimizer": {"name": "sgd", "learning_rate": 0.1}, "train": {"epochs": 1}}
      >>> out = sweep.ensemble(config, n=2, quiet=True)
      >>> sorted(out), len(out["member_accuracies"]), 0 <= out["ensemble_accuracy"] <= 1
      (['ensemble_accuracy', 'member_accuracies', 'sweep'], 2, True)
    """
    check_int("n", n)  # any integral number (numpy integers too), never a bool or a float
    n = int(n)
    if n < 2:
        raise ValueError(f"`n` (={n}) must be >= 2: an ensemble averages at least two members")
    base_seed = config.get("train", {}).get("seed", 0)
    result = run(config, grid(seeds=list(range(base_seed, base_seed + n))), **run_kwargs)
    exp = result.experiments[0]
    probs = []
    accs = []
    predict = jax.jit(lambda s, x, y: exp.eval_step(s, x, y)[1])
    for state in result.states:
        logits = []
        for start in range(0, exp.test_images.shape[0], 1000):
            x, y = exp.test_images[start : start + 1000], exp.test_labels[start : start + 1000]
            logits.append(predict(state, x, y))
        logits = jnp.concatenate(logits)
        p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        probs.append(p)
        accs.append(float(jnp.mean(jnp.argmax(p, -1) == exp.test_labels)))
    mean = jnp.mean(jnp.stack(probs), axis=0)
    ens = float(jnp.mean(jnp.argmax(mean, -1) == exp.test_labels))
    return {"member_accuracies": accs, "ensemble_accuracy": ens, "sweep": result}
