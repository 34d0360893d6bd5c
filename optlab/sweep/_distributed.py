"""One sweep over several processes (hosts), with JAX's own multi-controller runtime.

Every process runs the same command. ``jax.distributed.initialize`` connects
them through a coordinator (process 0's ``host:port``); each process then
trains one contiguous block of the members on its *local* devices with `run`
(sharded over them as usual), and the numeric results are exchanged with one
all-gather, so that every process ends up with the whole table and process 0
writes the report.

Design choices, and why:

* Members are split into contiguous blocks, not strided: members of one
  structural group (same optimizer kind, same model) are usually adjacent, so
  a block touches fewer groups and each process compiles fewer programs.
* Results travel through ``multihost_utils.process_allgather`` (a collective;
  on CPU it runs over gloo, JAX's default CPU collectives since 0.4.3x), not
  through files: no shared filesystem is needed and no process polls for
  another's files. The numbers travel as the raw bits of float64 (viewed as
  pairs of uint32), so the merged table equals each process's own results
  bitwise whether or not ``jax_enable_x64`` is on.
* Only numbers cross: the swept values and group ids are recomputed by every
  process from the member list, which all processes hold.
* Final training states stay where they were trained: ``result.states[i]``
  is ``None`` for members trained by another process.
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

from optlab.sweep._run import SweepResult, _structure_key, make_members, run

_FIELDS = ("final_test_accuracy", "best_test_accuracy", "final_test_loss", "final_train_loss", "diverged_at_step")
_CURVES = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate")


def member_block(num_members: int, num_processes: int, process_id: int) -> range:
    """The members process ``process_id`` trains: ``[p n // P, (p + 1) n // P)`` (blocks differ by at most one).

    Example:
      >>> import optlab.sweep as sweep
      >>> [list(sweep.member_block(10, 3, p)) for p in range(3)]
      [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    """
    return range(process_id * num_members // num_processes, (process_id + 1) * num_members // num_processes)


def _check_address(address) -> None:
    host, sep, port = str(address).rpartition(":")
    if not isinstance(address, str) or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"`coordinator_address` (={address!r}) must look like 'host:port', e.g. '10.0.0.1:1234'")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> None:
    """Join the processes of a multi-process sweep (a thin, checked wrapper of ``jax.distributed.initialize``).

    Call it before anything else touches JAX: the runtime must know about the
    other processes before it creates its devices. Leaving all three
    arguments out lets JAX detect them on clusters it knows (SLURM, Open MPI,
    Cloud TPU). On CPU, cross-process collectives use gloo.

    Example (two shells on one machine)::

        initialize("127.0.0.1:12345", num_processes=2, process_id=0)   # shell 1
        initialize("127.0.0.1:12345", num_processes=2, process_id=1)   # shell 2
    """
    given = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError(
            "give all of `coordinator_address`, `num_processes` and `process_id`, or none of them "
            f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})"
        )
    if coordinator_address is not None:
        _check_address(coordinator_address)
        if not isinstance(num_processes, int) or isinstance(num_processes, bool) or num_processes < 1:
            raise ValueError(f"`num_processes` (={num_processes!r}) must be a positive integer")
        if not isinstance(process_id, int) or isinstance(process_id, bool) or not 0 <= process_id < num_processes:
            raise ValueError(f"`process_id` (={process_id!r}) must be an integer in [0, {num_processes})")
    if jax.distributed.is_initialized():
        return
    # Older JAX versions default to no CPU collectives at all; gloo needs nothing but TCP.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"initialization_timeout": int(timeout_s)}
    if coordinator_address is not None:
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)


def _pack(result: SweepResult, width: int, epochs: int) -> np.ndarray:
    """This process's numbers as a (width, fields) float64 matrix, NaN-padded, viewed as uint32 for transport."""
    cols = len(_FIELDS) + len(_CURVES) * epochs
    out = np.full((width, cols), np.nan, np.float64)
    for j, row in enumerate(result.rows):
        vals = [math.nan if row[k] is None else row[k] for k in _FIELDS]
        out[j] = np.concatenate([np.asarray(vals, np.float64)] + [result.curves[k][j] for k in _CURVES])
    return out.view(np.uint32)


def run_distributed(
    config: dict,
    members: list[dict],
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    out_dir: str | os.PathLike | None = None,
    plots: bool | None = None,
    quiet: bool = False,
    timeout_s: int = 300,
    **run_kwargs,
) -> SweepResult:
    """Run one sweep across ``num_processes`` processes; every process returns the whole table.

    Each process calls this with the same ``config`` and ``members``. Process
    ``p`` of ``P`` trains members ``[p n // P, (p + 1) n // P)`` with `run` on
    its local devices (``run_kwargs``: ``strategy``, ``num_devices``,
    ``max_in_flight``, ...), then the per-member results are all-gathered.
    Process 0 writes ``results.csv``, ``results.md``, ``best.json``,
    ``curves.npz`` and plots to ``out_dir``; every process returns once the
    report is written. The rows, curves and best member equal those of a
    single-process `run` over the same members (bitwise for the ``"map"``
    strategy, to float32 round-off for batched ones). ``result.states`` holds
    only this process's members (``None`` elsewhere). The distributed runtime
    is left running; call ``jax.distributed.shutdown()`` when done.

    If the runtime is not initialised yet, it is, with the given coordinator
    (see `initialize`).

    Example (the same command in two shells, ``process_id`` 0 and 1)::

        from optlab import sweep
        from optlab.config import default_config
        res = sweep.run_distributed(default_config(), sweep.grid(learning_rate=[0.01, 0.1], seeds=2),
                                    coordinator_address="127.0.0.1:12345", num_processes=2, process_id=0,
                                    out_dir="runs/sweep")
    """
    t_start = time.perf_counter()
    initialize(coordinator_address, num_processes, process_id, timeout_s=timeout_s)
    from jax.experimental import multihost_utils

    nproc, pid = jax.process_count(), jax.process_index()
    if num_processes is not None and (nproc, pid) != (num_processes, process_id):
        raise ValueError(
            f"JAX was already initialised as process {pid} of {nproc}, not {process_id} of {num_processes}"
        )
    # Every process validates every member, so a bad member stops all of them with the same message.
    expanded = make_members(config, members)
    n = len(expanded)
    if nproc > n:
        raise ValueError(f"`num_processes` (={nproc}) exceeds the number of members ({n}); some would idle")
    epochs = expanded[0].config["train"]["epochs"]
    if plots is None:
        plots = bool(expanded[0].config["output"]["plots"])

    mine = member_block(n, nproc, pid)
    local = run(config, [members[i] for i in mine], out_dir=None, quiet=quiet, **run_kwargs)
    width = max(len(member_block(n, nproc, q)) for q in range(nproc))
    seconds = np.array([local.info["seconds"], local.info["devices"]], np.float64).view(np.uint32)
    gathered, gathered_info = multihost_utils.process_allgather((_pack(local, width, epochs), seconds))
    gathered = np.asarray(gathered).view(np.float64)  # (processes, width, fields)
    gathered_info = np.asarray(gathered_info).view(np.float64)  # (processes, 2)

    group_of: dict[str, int] = {}
    groups = [group_of.setdefault(_structure_key(m.config), len(group_of)) for m in expanded]
    rows: list[dict] = []
    curves = {k: np.full((n, epochs), np.nan) for k in _CURVES}
    for q in range(nproc):
        for j, i in enumerate(member_block(n, nproc, q)):
            data = gathered[q, j]
            fields = dict(zip(_FIELDS, data[: len(_FIELDS)].tolist()))
            died = fields.pop("diverged_at_step")
            rows.append({
                "member": i, **expanded[i].values, "group": groups[i], **fields,
                "diverged_at_step": None if math.isnan(died) else int(died),
            })
            for c, key in enumerate(_CURVES):
                start = len(_FIELDS) + c * epochs
                curves[key][i] = data[start : start + epochs]
    ok = [r for r in rows if r["diverged_at_step"] is None and math.isfinite(r["final_test_accuracy"])]
    best = max(ok, key=lambda r: r["final_test_accuracy"]) if ok else {}
    states: list = [None] * n
    experiments: list = [None] * n
    for j, i in enumerate(mine):
        states[i], experiments[i] = local.states[j], local.experiments[j]
    info = {
        "processes": nproc,
        "process_id": pid,
        "members_by_process": [[b.start, b.stop] for b in (member_block(n, nproc, q) for q in range(nproc))],
        "devices": int(gathered_info[:, 1].sum()),
        "devices_by_process": [int(d) for d in gathered_info[:, 1]],
        "seconds_by_process": [float(s) for s in gathered_info[:, 0]],
        "backend": local.info["backend"],
        "local": local.info,
        "seconds": time.perf_counter() - t_start,
    }
    result = SweepResult(rows, best, curves, info, out_dir, states, experiments)
    if out_dir is not None:
        if pid == 0:
            from optlab.sweep._report import write_report

            write_report(result, out_dir, plots=plots)
        # Nobody returns before the report exists (a script may read it next).
        multihost_utils.sync_global_devices("optlab.sweep report written")
    return result
