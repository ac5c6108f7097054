"""The documentation's examples run as written: every Python block of the README and of the
pages under docs/, and every docstring example of the package's modules."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

from tests.test_layout import modules

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page, i, block)
    for page in PAGES
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]
#: modules whose docstrings hold examples (found by their prompt, so a new one is run too)
DOCTEST_MODULES = sorted(name for name, f in modules().items() if ">>> " in f.read_text())
#: links between the pages, and to the result files, that must resolve
LINKS = [
    (page, target)
    for page in PAGES
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text())
    if not target.startswith("http")
]


def test_the_readme_is_a_short_entry_with_the_setup_commands_first():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    head = "\n".join(lines[:5])
    assert lines[0].startswith("# ") and 'pip install -e ".[dev]"' in head and "python -m pytest" in head


def test_there_are_examples_in_the_readme_and_the_docs():
    assert sum(page.name == "README.md" for page, _, _ in BLOCKS) >= 2
    assert len({page for page, _, _ in BLOCKS}) >= 3
    assert len(PAGES) >= 5


@pytest.mark.parametrize("page, index, block", BLOCKS, ids=[f"{p.name}-{i}" for p, i, _ in BLOCKS])
def test_an_example_runs(page, index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    exec(compile(block, f"{page.name} python block {index}", "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize("page, target", LINKS, ids=[f"{p.name}:{t}" for p, t in LINKS])
def test_a_link_resolves_inside_the_repository(page, target):
    where = (page.parent / target).resolve()
    assert where.exists(), f"{page.name} links to {target}, which does not exist"
    assert ROOT in where.parents, f"{page.name} links to {target}, outside the repository"


def test_the_doctest_modules_are_found():
    assert {"fiited_store.store", "fiited_store.config", "fiited_store.adapters.pytorch"} <= set(DOCTEST_MODULES)


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
