"""The package's shape: no import circle, and each module keeps its state to itself.

Both are read off the source with ``ast``, imports inside functions included (a lazy
import is still a dependency), so a circle or a reach into another module's private
attributes fails here before it reaches a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: where each installed package's files live (pyproject's package-dir)
PACKAGE_DIRS = {
    "fiited_store": ROOT / "fiited_store",
    "fiited_store.storage": ROOT / "storage",
    "fiited_store.adapters": ROOT / "adapters",
}
#: NamedTuple's own API, which is public despite its underscore
NAMEDTUPLE_API = {"_asdict", "_replace", "_fields", "_make", "_field_defaults"}
#: reads of another module's private attributes the engine may still make (the issue's bound: 10)
MAX_FOREIGN_PRIVATE_READS = 10


def modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the installed packages."""
    out: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if name.startswith("fiited_store.storage") and package == "fiited_store":
                continue  # never a folder of fiited_store/ itself
            out[name] = f
    return out


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def imports_of(name: str, tree: ast.AST, mods: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its body."""
    out = set()
    package = name if _is_package(name, mods) else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in mods:
                    out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in mods:
                    out.add(sub)
                elif target in mods:
                    out.add(target)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, ast.parse(f.read_text()), mods) for m, f in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle():
    found = cycles(import_graph())
    assert not found, f"import circles: {found}"


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_engine_does_not_import_the_experiments():
    graph = import_graph()
    engine = [m for m in graph if not m.startswith("fiited_store.experiments") and m != "fiited_store.cli"]
    leaks = {m: sorted(d for d in graph[m] if d.startswith("fiited_store.experiments")) for m in engine}
    assert not {m: d for m, d in leaks.items() if d}


def _private_names_defined(tree: ast.AST) -> set[str]:
    """Private attributes a module gives its own objects: ``self._x = ...``, ``def _x``,
    class-level ``_x = ...``, and any ``obj._x = ...`` it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                targets = (
                    item.targets
                    if isinstance(item, ast.Assign)
                    else [item.target]
                    if isinstance(item, ast.AnnAssign)
                    else []
                )
                names.update(t.id for t in targets if isinstance(t, ast.Name) and t.id.startswith("_"))
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if (
                        isinstance(sub, ast.Attribute)
                        and sub.attr.startswith("_")
                        and isinstance(sub.value, ast.Name)
                        and sub.value.id == "self"
                    ):
                        names.add(sub.attr)
    return names


def foreign_private_reads() -> list[str]:
    """``obj._x`` in a module that does not itself define ``_x`` (not ``self``/``cls``, not a
    module's name, not NamedTuple's API, not a dunder)."""
    found = []
    for _name, f in modules().items():
        tree = ast.parse(f.read_text())
        own = _private_names_defined(tree)
        module_names = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module_names.update((a.asname or a.name).split(".")[0] for a in node.names)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
                continue
            a = node.attr
            if a.startswith("__") or a in NAMEDTUPLE_API or a in own:
                continue
            root = node.value
            while isinstance(root, ast.Attribute):  # torch._C._x: a module's, not an object's
                root = root.value
            if isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}:
                continue
            if isinstance(root, ast.Name) and root.id in module_names:
                continue
            found.append(f"{f.relative_to(ROOT)}:{node.lineno} .{a}")
    return found


def test_modules_keep_their_private_state_to_themselves():
    found = foreign_private_reads()
    assert len(found) <= MAX_FOREIGN_PRIVATE_READS, "\n".join(found)


def test_the_private_read_finder_sees_a_reach():
    tree = ast.parse("class A:\n    def f(self, store):\n        self._mine = 1\n        return store._theirs\n")
    own = _private_names_defined(tree)
    assert "_mine" in own and "_theirs" not in own
