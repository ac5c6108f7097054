"""The README's examples and the modules' docstring examples run, as written."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize(
    "module",
    [
        "fiited_store",
        "fiited_store.adapters.pytorch",
        "fiited_store.adapters.keyed",
        "fiited_store.distributed.sharded_store",
        "fiited_store.distributed.routing",
        "fiited_store.distributed.batches",
    ],
)
def test_docstring_examples_run(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
