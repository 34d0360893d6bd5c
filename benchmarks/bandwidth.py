"""Memory bandwidth of this machine, measured with JAX itself (STREAM-style kernels).

An optimizer step is memory-bound: Adam reads parameters, gradients and two
moments and writes three arrays back, 28 bytes per float32 parameter. Its
floor on a machine is (bytes moved) / (bandwidth), so `update_step.py`
reports its effective GB/s as a fraction of the *triad* bandwidth measured
here, in the same process, with the same compiler and threads.

Kernels (float32 arrays far larger than the caches; the output is written
into a donated buffer, as a training step writes its parameters in place):

===============  ===================  =================
copy             ``a = b``            8 bytes / element
scale            ``a = s * b``        8 bytes / element
triad            ``a = b + s * c``    12 bytes / element
axpy (in place)  ``a = a + s * b``    12 bytes / element
===============  ===================  =================

``s`` is a runtime scalar, so nothing is folded away. The first three write
an array they do not read; a CPU then usually reads its cache lines before
writing them (write-allocate), moving more bytes than counted. The in-place
axpy reads what it writes, like an optimizer step updating its parameters
and moments in place, so it is the roofline ``update_step.py`` compares to.
Run: ``python benchmarks/bandwidth.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from _common import (
    base_parser,
    calibrate,
    emit,
    environment,
    fmt_time,
    interleaved,
    median,
    spread_pct,
    table,
    threaded_runner,
)

KERNELS = {
    # name: (function of (out, b, c, s), bytes per element)
    "copy": (lambda out, b, c, s: jnp.copy(b), 8),
    "scale": (lambda out, b, c, s: s * b, 8),
    "triad": (lambda out, b, c, s: b + s * c, 12),
    "axpy (in place)": (lambda out, b, c, s: out + s * b, 12),
}


def measure(n: int = 1 << 25, rounds: int = 7, target_s: float = 0.05) -> dict:
    """GB/s of each kernel on float32 arrays of ``n`` elements: {name: {"gbps", "spread", "time"}}."""
    key_b, key_c = jax.random.split(jax.random.key(0))
    b = jax.random.normal(key_b, (n,), jnp.float32)
    c = jax.random.normal(key_c, (n,), jnp.float32)
    s = jnp.asarray(1.0001, jnp.float32)
    runners, per_byte = {}, {}
    for name, (fn, nbytes) in KERNELS.items():
        step = jax.jit(lambda out, b, c, s, fn=fn: (fn(out, b, c, s),), donate_argnums=0, keep_unused=True)
        runners[name] = threaded_runner(step, (jnp.zeros(n, jnp.float32),), b, c, s)
        per_byte[name] = nbytes * n
    for run in runners.values():
        run(2)
    number = {k: calibrate(r, target_s) for k, r in runners.items()}
    times = interleaved(runners, rounds, number, warmup=1)
    out = {}
    for name, ts in times.items():
        gbps = [per_byte[name] / t / 1e9 for t in ts]
        out[name] = {"gbps": median(gbps), "spread": spread_pct(gbps), "time": median(ts), "bytes": per_byte[name]}
    return out


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="elements per array (default 2**25, quick 2**16)")
    args = parser.parse_args(argv)
    n = args.n or (1 << 16 if args.quick else 1 << 25)
    rounds = args.rounds or (2 if args.quick else 9)
    res = measure(n, rounds, target_s=0.005 if args.quick else 0.1)
    rows = [
        [name, f"{r['bytes'] / n:.0f}", fmt_time(r["time"]), f"{r['gbps']:.1f}", f"{r['spread']:.0f}%"]
        for name, r in res.items()
    ]
    size = f"{4 * n / 2**20:.0f} MiB" if n >= 1 << 18 else f"{4 * n / 2**10:.0f} KiB"
    title = f"Memory bandwidth with JAX: float32 arrays of {n:,} elements ({size}), median of {rounds} rounds"
    tables = [table(["kernel", "bytes/elem", "time/call", "GB/s", "spread (IQR)"], rows, title)]
    return emit({"environment": environment(), "bandwidth": res, "n": n, "tables": tables}, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
