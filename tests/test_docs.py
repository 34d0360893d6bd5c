"""``docs/optimizers.md`` cannot drift from the code.

The reference page writes every public function's signature on a line of its
own, in the fixed form

    > `optlab.sgd(learning_rate, momentum=0.0, ...)`

(indentation allowed, for lines inside lists). These lines are parsed as a
Python ``def`` and compared with ``inspect.signature`` of the object they name:
same parameter names, order, kinds and defaults (type included, so ``0`` and
``0.0`` differ). On top of that:

- every name of ``optlab.__all__`` and ``optlab.schedules.__all__`` appears
  on the page, and every public function has a signature line;
- every named optimizer has its own ``### name`` section, and its
  "Hyperparameters in the state" line lists exactly what the optimizer stores
  with all its optional features switched on;
- every ``python`` code block runs;
- every ``(#anchor)`` link points at a heading.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re

import jax.numpy as jnp
import pytest

import optlab
from optlab import schedules

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "optimizers.md"
TEXT = DOC.read_text(encoding="utf-8")
LINES = TEXT.splitlines()

SIGNATURE = re.compile(r"^\s*> `(optlab(?:\.\w+)+)\((.*)\)`\s*$")
EMPTY = object()  # "no default", distinct from a default of None

# The named optimizers, and for each the arguments that switch every optional,
# stored hyperparameter on (a literal 0 would compile it out). A new optimizer
# exported from optlab fails `test_every_exported_optimizer_is_documented`
# until it is added here and documented.
ALL_ON = {
    "sgd": dict(learning_rate=0.1, momentum=0.9, dampening=0.1, weight_decay=0.1),
    "classical_momentum": dict(learning_rate=0.1),
    "nesterov_momentum": dict(learning_rate=0.1),
    "adagrad": dict(weight_decay=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    "rmsprop": dict(weight_decay=0.1, momentum=0.9),
    "adam": dict(weight_decay=0.1),
    "adamw": dict(),
    "adadelta": dict(weight_decay=0.1),
    "rprop": dict(),
    "adaptive_gains": dict(learning_rate=0.1),
    "swats": dict(),
    "lbfgs": dict(),
}


def _lbfgs():
    # lbfgs lives in optlab.optimizers._lbfgs; once it is exported as optlab.lbfgs
    # this fallback is never taken.
    from optlab.optimizers._lbfgs import lbfgs

    return getattr(optlab, "lbfgs", lbfgs)


def resolve(dotted: str):
    """The object a dotted ``optlab.x.y`` name refers to."""
    if dotted == "optlab.lbfgs":
        return _lbfgs()
    obj = optlab
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def signature_lines() -> list[tuple[int, str, str]]:
    found = []
    for i, line in enumerate(LINES, start=1):
        m = SIGNATURE.match(line)
        if m:
            found.append((i, m.group(1), m.group(2)))
    return found


def documented_parameters(arglist: str) -> list[tuple[str, str, object]]:
    """(name, inspect kind name, default or EMPTY) for a written argument list."""
    fn = ast.parse(f"def f({arglist}): pass").body[0]
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for arg, d in zip(positional, defaults):
        kind = "POSITIONAL_ONLY" if arg in a.posonlyargs else "POSITIONAL_OR_KEYWORD"
        out.append((arg.arg, kind, EMPTY if d is None else ast.literal_eval(d)))
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL", EMPTY))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "KEYWORD_ONLY", EMPTY if d is None else ast.literal_eval(d)))
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD", EMPTY))
    return out


def code_parameters(obj) -> list[tuple[str, str, object]]:
    params = inspect.signature(obj).parameters.values()
    return [(p.name, p.kind.name, EMPTY if p.default is p.empty else p.default) for p in params]


def same_value(a, b) -> bool:
    """Equal and of the same type, element by element for tuples."""
    if isinstance(a, tuple) or isinstance(b, tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_value, a, b))
    return type(a) is type(b) and a == b


# --- signatures ------------------------------------------------------------------------------

SIGNATURES = signature_lines()


def test_page_has_signature_lines():
    assert len(SIGNATURES) > 50, "the signature-line format of docs/optimizers.md changed; update SIGNATURE"


@pytest.mark.parametrize(("line", "name", "arglist"), SIGNATURES, ids=[f"{n}@{i}" for i, n, _ in SIGNATURES])
def test_signature_line_matches_code(line, name, arglist):
    written = documented_parameters(arglist)
    actual = code_parameters(resolve(name))
    assert [w[:2] for w in written] == [c[:2] for c in actual], (
        f"docs/optimizers.md:{line}: parameters of {name} differ from the code"
    )
    for (pname, _, w), (_, _, c) in zip(written, actual):
        if w is EMPTY or c is EMPTY:
            assert w is c, f"docs/optimizers.md:{line}: {name}: `{pname}` default written {w!r}, code {c!r}"
        else:
            assert same_value(w, c), f"docs/optimizers.md:{line}: {name}: `{pname}` default written {w!r}, code {c!r}"


def test_defaults_are_compared_strictly():
    # The comparison must tell 0 from 0.0 and (1, 2) from (1.0, 2.0); otherwise a
    # signature line could drift in type without failing.
    assert not same_value(0, 0.0)
    assert not same_value((1, 2), (1.0, 2.0))
    assert same_value((1e-06, 50.0), (1e-06, 50.0))
    assert documented_parameters("a, b=0.5, *, c='x', **kw") == [
        ("a", "POSITIONAL_OR_KEYWORD", EMPTY),
        ("b", "POSITIONAL_OR_KEYWORD", 0.5),
        ("c", "KEYWORD_ONLY", "x"),
        ("kw", "VAR_KEYWORD", EMPTY),
    ]


# --- coverage --------------------------------------------------------------------------------


def _public_functions(module, names):
    return [n for n in names if inspect.isfunction(getattr(module, n))]


def _exported_optimizers() -> set[str]:
    names = set()
    for n in _public_functions(optlab, optlab.__all__):
        f = getattr(optlab, n)
        first = next(iter(inspect.signature(f).parameters), None)
        if f.__module__.startswith("optlab.optimizers") and first == "learning_rate":
            names.add(n)
    return names


def test_every_exported_optimizer_is_documented():
    assert _exported_optimizers() | {"lbfgs"} == set(ALL_ON)


@pytest.mark.parametrize("name", sorted(ALL_ON))
def test_optimizer_has_section_and_signature(name):
    assert f"### {name}" in LINES, f"no `### {name}` section"
    assert f"optlab.{name}" in {n for _, n, _ in SIGNATURES}, f"no signature line for optlab.{name}"


@pytest.mark.parametrize(
    "dotted",
    [f"optlab.{n}" for n in _public_functions(optlab, optlab.__all__)]
    + [f"optlab.schedules.{n}" for n in _public_functions(schedules, schedules.__all__)],
)
def test_public_function_has_signature_line(dotted):
    assert dotted in {n for _, n, _ in SIGNATURES}


@pytest.mark.parametrize("name", sorted(set(optlab.__all__) | set(schedules.__all__)))
def test_public_name_is_mentioned(name):
    assert re.search(r"`[^`\n]*\b" + re.escape(name) + r"\b[^`\n]*`", TEXT), f"`{name}` is not mentioned"


# --- hyperparameters in the state ------------------------------------------------------------


def _section(name: str) -> list[str]:
    start = LINES.index(f"### {name}")
    end = next((i for i in range(start + 1, len(LINES)) if LINES[i].startswith(("### ", "## "))), len(LINES))
    return LINES[start:end]


def _documented_state_names(name: str) -> set[str]:
    marker = "- **Hyperparameters in the state:**"
    rows = [line for line in _section(name) if line.startswith(marker)]
    assert len(rows) == 1, f"section {name} needs exactly one '{marker}' line"
    return set(re.findall(r"`(\w+)`", rows[0]))


@pytest.mark.parametrize("name", sorted(ALL_ON))
def test_state_hyperparameters_line_matches_code(name):
    opt = resolve(f"optlab.{name}")(**ALL_ON[name])
    state = opt.init({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)})
    assert set(optlab.hyperparams(state)) == _documented_state_names(name)


# --- examples and links ----------------------------------------------------------------------

BLOCKS = [(TEXT[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", TEXT, re.S)]


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line{n}" for n, _ in BLOCKS])
def test_code_block_runs(line, code, monkeypatch):
    monkeypatch.setattr(optlab, "lbfgs", _lbfgs(), raising=False)
    exec(compile(code, f"docs/optimizers.md:{line}", "exec"), {"__name__": "docs_example"})


def _github_anchor(heading: str) -> str:
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_internal_links_point_at_headings():
    anchors = {_github_anchor(line.lstrip("#")) for line in LINES if re.match(r"#{1,6} ", line)}
    links = set(re.findall(r"\]\(#([^)]+)\)", TEXT))
    assert links, "no internal links found"
    assert links <= anchors, f"broken links: {sorted(links - anchors)}"
