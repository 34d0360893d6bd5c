"""The ``optlab`` command: train, eval, lr-find, plot.

A thin layer: argument parsing here, all logic in importable functions
(`optlab.train.fit`, `optlab.train.lr_find`, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

from optlab import config as _config


def _load(config_path: str | None, overrides: list[str]) -> tuple[dict, str]:
    if config_path is None:
        cfg, hint = _config.default_config(), "digits_mlp"
    else:
        cfg, hint = _config.load_config_file(config_path), pathlib.Path(config_path).stem
    return _config.resolve(_config.apply_overrides(cfg, overrides)), hint


def cmd_train(args) -> int:
    from optlab.train import DivergenceError, fit

    if args.resume:
        run_dir = pathlib.Path(args.resume)
        if not (run_dir / "config.json").is_file():
            print(f"error: {run_dir} is not a run folder (no config.json)", file=sys.stderr)
            return 2
        saved = json.loads((run_dir / "config.json").read_text())
        if args.config is None:
            cfg = saved
        else:
            # The file's config is compared with the saved one by `fit`, like --set overrides:
            # only train.epochs and output.* may differ. Where the run lives stays the saved one.
            cfg = _config.load_config_file(args.config)
            cfg["output"] = saved.get("output", {})
        cfg = _config.resolve(_config.apply_overrides(cfg, args.set))
        hint = None
    else:
        cfg, hint = _load(args.config, args.set)
        run_dir = None
    try:
        result = fit(cfg, run_dir=run_dir, resume=bool(args.resume), name_hint=hint)
    except DivergenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    final = result["final"]
    print(f"run folder: {result['run_dir']}")
    print(f"final test accuracy {final.get('test_accuracy', float('nan')):.4f}, test loss {final.get('test_loss', float('nan')):.4f}")
    return 0


def cmd_eval(args) -> int:
    from optlab.train import evaluate_run

    res = evaluate_run(args.run_dir)
    # Strict JSON: a non-finite loss prints as null (json.dumps would write the invalid token NaN).
    res = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in res.items()}
    print(json.dumps(res, indent=2, allow_nan=False))
    return 0


def cmd_lr_find(args) -> int:
    from optlab.train import lr_find, lr_find_many, plot_lr_find, plot_lr_find_many

    cfg, hint = _load(args.config, args.set)
    out = pathlib.Path(args.out or pathlib.Path(cfg["output"]["dir"]) / f"lr-find-{hint}.png")
    kwargs = dict(min_lr=args.min_lr, max_lr=args.max_lr, num_steps=args.steps)
    if args.optimizers:
        results = lr_find_many(cfg, [o.strip() for o in args.optimizers.split(",") if o.strip()], **kwargs)
        plot_lr_find_many(results, out)
        for label, res in results.items():
            stopped = " (stopped at divergence)" if res["stopped_early"] else ""
            print(f"{label}: suggested learning rate {res['suggestion']:.3g} after {len(res['losses'])} steps{stopped}")
    else:
        res = lr_find(cfg, **kwargs)
        plot_lr_find(res, out)
        print(f"steps run: {len(res['losses'])}{' (stopped at divergence)' if res['stopped_early'] else ''}")
        print(f"suggested learning rate: {res['suggestion']:.3g}")
    print(f"plot: {out}")
    return 0


def _sweep_out_dir(args) -> pathlib.Path | None:
    """``--out``, else ``<output.dir>/sweep-<config name>``; None while output.dir is invalid.

    Read from the unresolved config: a multi-process sweep must not build the optimizer
    (which creates arrays) before ``jax.distributed`` is initialised; `resolve` reports a
    bad ``output.dir`` later.
    """
    if args.out:
        return pathlib.Path(args.out)
    raw = _config.apply_overrides(_config.load_config_file(args.config), args.set)
    output = raw.get("output", {})
    root = output.get("dir", _config.DEFAULTS["output"]["dir"]) if isinstance(output, dict) else None
    return pathlib.Path(root) / f"sweep-{pathlib.Path(args.config).stem}" if isinstance(root, str) else None


def cmd_sweep(args) -> int:
    import optlab.sweep as sweep

    if args.config is None:
        print("error: optlab sweep needs a config file with get_sweep()", file=sys.stderr)
        return 2
    multi = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in multi) and any(v is None for v in multi):
        print("error: a multi-process sweep needs all of --coordinator, --num-processes and --process-id",
              file=sys.stderr)
        return 2
    members = _config.load_sweep_file(args.config)
    if members is None:
        print(f"error: {args.config} defines no get_sweep()", file=sys.stderr)
        return 2
    out = _sweep_out_dir(args)
    # Like `optlab train`: never write over another sweep's results (stale plots would stay
    # next to new tables). Checked before any process starts training; only process 0 writes.
    if out is not None and not args.process_id and out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: sweep output folder {out} already exists and is not empty; "
              "choose another with --out or remove it", file=sys.stderr)
        return 2

    def sweep_here(distributed: bool = False):
        cfg, _ = _load(args.config, args.set)
        kwargs = dict(strategy=args.strategy, num_devices=args.devices, max_in_flight=args.max_in_flight, out_dir=out)
        return (sweep.run_distributed if distributed else sweep.run)(cfg, members, **kwargs), out

    if args.coordinator is None:
        # One CPU device per core, so that members sharded over devices use every core
        # (a no-op on accelerators, and where the user chose a device count).
        from optlab._host import cpu_cores, set_cpu_devices

        set_cpu_devices(max(args.devices or 0, cpu_cores()))
        res, out = sweep_here()
    else:
        import jax

        # Before the config is resolved: building the optimizer creates arrays, and JAX must
        # know about the other processes before it creates any.
        sweep.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        try:
            res, out = sweep_here(distributed=True)
        finally:
            jax.distributed.shutdown()  # waits for the other processes, so none is left in a collective
        if res.info["process_id"] != 0:
            block = res.info["members_by_process"][res.info["process_id"]]
            print(f"process {res.info['process_id']}: trained members {block[0]}..{block[1] - 1}; "
                  f"process 0 wrote {out}/results.csv")
            return 0
    print(sweep.markdown_table(res.rows))
    print(f"best member: {res.best}")
    strategies = [g["strategy"] for g in res.info.get("local", res.info)["groups"]]
    print(f"strategy: {strategies}, {res.info['seconds']:.1f} s")
    print(f"results: {out}/results.csv, {out}/results.md, plots in {out}/plots")
    return 0


def cmd_plot(args) -> int:
    from optlab.train import plot_run

    print(plot_run(args.run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optlab", description="Train networks with optlab's optimizers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config (default: the embedded digits MLP)")
    p.add_argument("config", nargs="?", help="a Python config file with get_config()")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate the last checkpoint of a run folder on the test set")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("lr-find", help="learning-rate range test (Smith 2017)")
    p.add_argument("config", nargs="?")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--max-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", help="where to write the plot")
    p.add_argument("--optimizers", help="comma-separated optimizer names to test side by side, e.g. sgd,adam,rmsprop")
    p.set_defaults(fn=cmd_lr_find)

    p = sub.add_parser("sweep", help="train a config's get_sweep() members as one compiled program")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--strategy", default="auto", choices=["auto", "vmap", "map", "chunked"])
    p.add_argument("--devices", type=int, default=None, help="local devices to shard members over (default: all)")
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="most members trained at once over all devices, padding copies included (default: what fits)",
    )
    p.add_argument("--out", help="output folder (default: runs/sweep-<config>)")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process sweep: process 0's address")
    p.add_argument("--num-processes", type=int, help="multi-process sweep: how many processes take part")
    p.add_argument("--process-id", type=int, help="multi-process sweep: this process's index, 0..N-1")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("plot", help="(re)draw the plots of a run folder")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_plot)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (_config.ConfigError, FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
