"""Test configuration shared by the whole suite.

- 8 host CPU devices, so sharding tests run on any machine (set before jax loads).
- float32 by default (x64 off), warnings are errors (see pyproject.toml).
- ``key`` fixture: a PRNG key whose seed is shown in the test id on failure.
- ``OPTLAB_DATA`` defaults to ../shared/data next to the checkout, where CI
  finds the real MNIST and CIFAR-10 copies.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_shared = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "OPTLAB_DATA" not in os.environ and _shared.is_dir():
    os.environ["OPTLAB_DATA"] = str(_shared)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)

REFERENCES = pathlib.Path(__file__).resolve().parent / "references"


@pytest.fixture(params=[0], ids=lambda s: f"seed={s}")
def key(request):
    return jax.random.key(request.param)


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}, OPTLAB_DATA={os.environ.get('OPTLAB_DATA')}"


def shared_data_dir() -> pathlib.Path | None:
    d = os.environ.get("OPTLAB_DATA")
    return pathlib.Path(d) if d and pathlib.Path(d).is_dir() else None
