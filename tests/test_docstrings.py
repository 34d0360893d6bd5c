"""Every public docstring's examples run and print what they say; every public function has one.

The project's standard asks each public docstring for a short runnable
example. Here, for every callable name in ``__all__`` of ``optlab``,
``optlab.schedules`` and ``optlab.sweep``:

- the doctests of its own docstring (``recurse=False``: not those of methods)
  run in the globals of the module that defines it, and none fails;
- it has at least one example with a checked output (a line that prints
  something doctest compares), unless it is in the short exemption set below.

Outputs are compared with ``NORMALIZE_WHITESPACE | ELLIPSIS``; examples print
rounded floats, dtype names, shapes or plain lists, never JAX array reprs,
which change between JAX versions.
"""

from __future__ import annotations

import doctest
import sys
import types

import pytest

import optlab
from optlab import schedules, sweep

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _public_callables() -> dict:
    out = {}
    for mod in (optlab, schedules, sweep):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, types.ModuleType) or not callable(obj):
                continue  # submodules, constants (sweep.STRATEGIES)
            out[f"{mod.__name__}.{name}"] = obj
    return out


PUBLIC = _public_callables()

NO_EXAMPLE = {
    # Types: optax's transformation and state types (re-exported), the state
    # NamedTuples of optlab transforms, schedule containers and sweep records.
    # What they hold is shown by the examples of the functions that build them.
    "optlab.EmptyState",
    "optlab.FlatState",
    "optlab.GradientTransformation",
    "optlab.GradientTransformationExtraArgs",
    "optlab.HyperparamsState",
    "optlab.LbfgsState",
    "optlab.SwatsState",
    "optlab.schedules.Schedule",
    "optlab.schedules.OneCycle",
    "optlab.sweep.Member",
    "optlab.sweep.SweepResult",
    # Sweep entry points that train for minutes, write folders or need several
    # processes; tests/test_sweep*.py run them.
    "optlab.sweep.run",
    "optlab.sweep.run_distributed",
    "optlab.sweep.initialize_distributed",
    "optlab.sweep.plot_sweep",
    "optlab.sweep.write_report",
}

# Examples that train a small model (several seconds of compilation): run with `-m slow`.
SLOW = {"optlab.sweep.ensemble"}


def _doctests(name: str) -> list[doctest.DocTest]:
    obj = PUBLIC[name]
    module = sys.modules[obj.__module__]
    return doctest.DocTestFinder(recurse=False).find(obj, name, module=module, globs=vars(module))


def _params(names):
    return [pytest.param(n, id=n, marks=pytest.mark.slow if n in SLOW else ()) for n in sorted(names)]


def test_exemptions_name_public_callables():
    # A renamed or removed function must not leave a stale exemption behind.
    assert NO_EXAMPLE <= set(PUBLIC), sorted(NO_EXAMPLE - set(PUBLIC))
    assert SLOW <= set(PUBLIC) - NO_EXAMPLE, sorted(SLOW - (set(PUBLIC) - NO_EXAMPLE))


@pytest.mark.parametrize("name", _params(PUBLIC))
def test_doctests_pass(name):
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in _doctests(name):
        runner.run(test, out=report.append, clear_globs=True)
    assert runner.failures == 0, "".join(report)


@pytest.mark.parametrize("name", sorted(set(PUBLIC) - NO_EXAMPLE))
def test_has_checked_example(name):
    examples = [ex for test in _doctests(name) for ex in test.examples]
    assert examples, f"{name}: the docstring has no `>>>` example"
    assert any(ex.want.strip() for ex in examples), f"{name}: no example line has an expected output to check"
