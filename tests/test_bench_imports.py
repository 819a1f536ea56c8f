"""No import circle among the benchmarks' modules, from the sources (`ast`; nothing is imported).

Every import counts, a function's too: the benchmarks defer most imports into their functions
(task processes import only what they run), and a deferred import still makes a circle; one
(workloads -> scale_sim -> time_to_accuracy -> workloads) hid that way until issue 30.
"""

import ast
import graphlib
import os
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "benchmarks"


def _modules() -> Dict[str, str]:
    """Every module of benchmarks/: dotted name -> path."""
    folder = os.path.join(ROOT, PACKAGE)
    return {f"{PACKAGE}.{f[:-3]}": os.path.join(folder, f)
            for f in sorted(os.listdir(folder)) if f.endswith(".py") and f != "__init__.py"}


MODULES = _modules()


def _imported_modules(path: str) -> List[str]:
    """The benchmarks modules `path` imports, anywhere in it: `from benchmarks import x`,
    `from benchmarks.x import y`, `import benchmarks.x`."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return sorted(m for m in out if m in MODULES)


GRAPH = {name: [m for m in _imported_modules(path) if m != name] for name, path in MODULES.items()}


def _circle(graph: Dict[str, List[str]]) -> List[str]:
    """One circle of `graph` as [a, b, ..., a], or [] when it has none."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        return list(reversed(e.args[1]))  # graphlib lists it against the edges
    return []


def test_no_circle_between_benchmark_modules():
    assert _circle(GRAPH) == []


def test_the_rule_sees_real_imports():
    """Not vacuous: it finds a module-level import, a function's, and a circle."""
    assert "benchmarks.common" in GRAPH["benchmarks.tradeoff"]  # at the top
    assert "benchmarks.tradeoff_workload" in GRAPH["benchmarks.tradeoff"]  # inside `run`
    assert "benchmarks.accuracy_workload" in GRAPH["benchmarks.time_to_accuracy"]  # inside `run`
    assert _circle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) in (
        ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
