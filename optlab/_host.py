"""Host memory settings that make per-step dispatch on XLA:CPU cheap.

XLA:CPU allocates a program's scratch buffer (``temp_size_in_bytes`` of its
memory analysis: 17 MB for one MNIST ConvNet step at batch 128) with
``malloc`` on every call and frees it at the end. glibc serves blocks that
large with ``mmap`` or hands them back to the kernel on ``free`` (its
thresholds adapt at run time, and what it does depends on which thread frees
what), so from one call to the next the same buffer can come back as fresh
pages: every 4 KiB page then faults and is zeroed again. Measured on the
2-core CPU of this project: 4,156 minor faults per step, and the MNIST
ConvNet step at 8.2 ms instead of 2.6 ms. A ``lax.scan`` over an epoch pays
this once per epoch, a Python loop over a jitted step pays it every step, and
whether a given program is hit changes with unrelated details (returning one
more metric was enough).

`retain_host_memory` asks glibc to keep freed memory in the process
(``mallopt``): no ``mmap`` for large blocks, no trimming of the heap's top
below 1 GiB, and one arena for all threads (a thread's own arena cannot hold a
block above 64 MiB, so glibc would ``mmap`` it after all). The process keeps its peak memory instead of returning it, which
is what a training process wants. Nothing changes numerically.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def retain_host_memory() -> bool:
    """Keep freed host memory in the process so XLA:CPU's per-call buffers do not page-fault.

    Called by `optlab.train.fit`, `optlab.train.lr_find`, `optlab.sweep.run`
    and the ``optlab`` command line; call it at the start of your own script
    if you loop over a jitted step on the CPU. Idempotent. Does nothing (and
    returns False) outside Linux/glibc, or when the environment variable
    ``OPTLAB_RETAIN_HOST_MEMORY`` is ``0``.

    Returns:
      True if the allocator settings are in effect.

    Example:
      >>> from optlab.train import retain_host_memory
      >>> retain_host_memory() in (True, False)
      True
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("OPTLAB_RETAIN_HOST_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # musl and others have no mallopt tuning of this kind
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success. The first two also switch off glibc's dynamic thresholds.
    # One arena: a thread's own arena lives in 64 MiB heaps, and a larger block (the CIFAR-10
    # CNN's scratch buffer is 144 MB) would be mmap-ed there on every call whatever the settings
    # (measured: 36,832 faults and 95 ms per step; 58.8 ms with one arena).
    _applied = (
        bool(mallopt(_M_MMAP_MAX, 0))
        and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
        and bool(mallopt(_M_ARENA_MAX, 1))
    )
    return _applied


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_name() -> str:
    """The processor's model name, for benchmark and experiment reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_cpu_devices(n: int | None = None) -> int:
    """Expose ``n`` CPU devices to JAX (default: one per core this process may use).

    XLA:CPU runs most of a program's kernels on one thread; a sweep sharded
    over several CPU devices (`optlab.sweep.run` puts members on every local
    device) runs one program per device at once and so uses every core:
    measured on 2 cores, the MNIST ConvNet initialisation sweep ran its epochs
    1.5x faster with 2 devices than with 1 (docs/benchmarks.md). A single run
    is unaffected: it uses the first device.

    JAX fixes its devices when it starts, so call this right after
    ``import jax``, before any computation. Where the device count was
    already chosen (``jax_num_cpu_devices`` set, or
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``) that choice
    is kept. The ``optlab sweep`` command calls this.

    Args:
      n: number of CPU devices, or None for the cores in this process's affinity mask.

    Returns:
      The number of CPU devices JAX will have.

    Raises:
      RuntimeError: JAX has already started its backends with another count.
    """
    import jax

    from optlab._checks import check_int

    if n is not None:
        check_int("n", n, minimum=1)
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        flag = [f for f in os.environ["XLA_FLAGS"].split() if "xla_force_host_platform_device_count" in f]
        return int(flag[-1].split("=")[1])
    current = jax.config.jax_num_cpu_devices
    if current != -1 and n is None:
        return int(current)
    want = n if n is not None else cpu_cores()
    if current == want:
        return want
    try:
        jax.config.update("jax_num_cpu_devices", int(want))
    except RuntimeError as e:
        raise RuntimeError(
            f"set_cpu_devices({n!r}): JAX has already started with {len(jax.devices('cpu'))} CPU device(s); "
            "call it right after `import jax`, before any JAX computation"
        ) from e
    return int(want)
