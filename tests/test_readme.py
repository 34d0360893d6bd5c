"""The README's Python examples run as written (they are the design's documentation)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# Blocks that define config-file functions are shown as files, not run here.
RUNNABLE = [b for b in BLOCKS if "def get_sweep" not in b and "run_distributed" not in b]


def test_readme_has_examples():
    assert len(RUNNABLE) >= 3


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs(index):
    # Examples build on the ones before them, as a reader would run them.
    namespace: dict = {}
    for block in RUNNABLE[: index + 1]:
        exec(compile(block, f"README.md[python block {index}]", "exec"), namespace)  # noqa: S102


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in text and "<!-- test-command -->" in ci
