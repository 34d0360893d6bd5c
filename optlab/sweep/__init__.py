"""Hyperparameter sweeps and ensembles as one compiled program.

    import optlab.sweep as sweep
    members = sweep.grid(learning_rate=[0.01, 0.03, 0.1], momentum=[0.0, 0.9], seeds=2)
    result = sweep.run(config, members, out_dir="runs/sweep")
    result.best, result.rows

The same sweep over several processes (hosts): `run_distributed` (see its module).
"""

from optlab.sweep._distributed import initialize as initialize_distributed
from optlab.sweep._distributed import member_block, run_distributed
from optlab.sweep._ensemble import ensemble
from optlab.sweep._report import markdown_table, plot_sweep, write_report
from optlab.sweep._run import STRATEGIES, Member, SweepResult, choose_strategy, make_members, run
from optlab.sweep._spec import grid, log_uniform, random, uniform, zip

__all__ = [
    "STRATEGIES",
    "Member",
    "SweepResult",
    "choose_strategy",
    "ensemble",
    "grid",
    "initialize_distributed",
    "log_uniform",
    "make_members",
    "markdown_table",
    "member_block",
    "plot_sweep",
    "random",
    "run",
    "run_distributed",
    "uniform",
    "write_report",
    "zip",
]
