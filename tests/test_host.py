"""Host settings: `optlab.train.retain_host_memory` and `optlab.train.set_cpu_devices`.

Both act on process-wide state that JAX or glibc fix early, so each check
runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from optlab.train import set_cpu_devices


def _run(code: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest forces 8 devices
    base.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=base, timeout=120)


@pytest.mark.parametrize(
    ("code", "env", "expected"),
    [
        ("n = optlab.train.set_cpu_devices(2)", {}, "2 2"),
        ("n = optlab.train.set_cpu_devices()", {}, f"{len(os.sched_getaffinity(0))} {len(os.sched_getaffinity(0))}"),
        # The user's own choice wins.
        ("n = optlab.train.set_cpu_devices(2)", {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, "3 3"),
        ("jax.config.update('jax_num_cpu_devices', 3); n = optlab.train.set_cpu_devices()", {}, "3 3"),
    ],
)
def test_set_cpu_devices(code, env, expected):
    out = _run(f"import jax, optlab.train\n{code}\nprint(n, len(jax.devices('cpu')))", **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == expected.split()


def test_set_cpu_devices_after_jax_started_names_the_cause():
    out = _run("import jax, jax.numpy as jnp, optlab.train\njnp.ones(2).block_until_ready()\noptlab.train.set_cpu_devices(3)")
    assert out.returncode != 0
    assert "set_cpu_devices(3): JAX has already started with 1 CPU device(s)" in out.stderr


@pytest.mark.parametrize("bad", [0, -1, 2.0, "2"])
def test_set_cpu_devices_rejects_bad_counts(bad):
    with pytest.raises((ValueError, TypeError), match="`n`"):
        set_cpu_devices(bad)


# The pattern of XLA:CPU's scratch buffer (allocated and freed on every call), with a block
# above the largest size glibc ever serves from its heap by default (32 MiB), so that without
# the setting every call gets fresh pages from the kernel and faults on each of them.
_FAULTS = """
import ctypes, resource, optlab.train
applied = optlab.train.retain_host_memory()
assert optlab.train.retain_host_memory() == applied  # idempotent
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)

def one_call():  # plain malloc/free, as XLA does (numpy would ask for huge pages)
    scratch = libc.malloc(64 * 2**20)
    ctypes.memset(scratch, 1, 64 * 2**20)
    libc.free(scratch)

one_call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_call()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("switch", ["1", "0"])
def test_retain_host_memory_stops_scratch_buffers_page_faulting(switch):
    out = _run(_FAULTS, OPTLAB_RETAIN_HOST_MEMORY=switch)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    pages = 64 * 2**20 / os.sysconf("SC_PAGE_SIZE")
    if switch == "1":
        assert applied == "True"
        assert float(faults) < 0.01 * pages  # the block is reused, its pages already mapped
    else:  # the control: the same program faults on every page of every call
        assert applied == "False"
        assert float(faults) > 0.9 * pages


def test_retain_host_memory_can_be_switched_off():
    out = _run("import optlab.train\nprint(optlab.train.retain_host_memory())", OPTLAB_RETAIN_HOST_MEMORY="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
