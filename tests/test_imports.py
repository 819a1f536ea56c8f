"""Import rules of the house by where the code runs, from the sources (`ast`; nothing is imported).

- `tf_backup/protocol/` imports no TensorFlow or Keras, not even through another tf_backup module;
- `tf_backup/ps/` imports no Keras, not even through another tf_backup module;
- the core never imports `tf_backup.sim` or `tf_backup.local`: only they do, and the package's
  `__init__`, which re-exports `launch_local`, `LocalCluster` and `LocalClusterError`;
- no circle among tf_backup's modules, nor among its rooms (each subpackage is a room; the
  top-level modules but `__init__` are one more, `shared`).

Every import counts, a function's too: deferring an import hides a dependency, it does not remove
it. The parents' `__init__` that Python runs first are not counted (the package's re-exports all).
Each rule asserts on a list, so that a failure names the module and what it imports.
"""

import ast
import os
from typing import Dict, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "tf_backup"
ROOMS = ("protocol", "ps", "worker", "chief", "frontend", "sim", "local")
OPTIONAL = ("tf_backup.sim", "tf_backup.local")


def _modules() -> Dict[str, str]:
    """Every module of the package: dotted name -> path."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if os.path.isfile(os.path.join(dirpath, d, "__init__.py")))
        for f in sorted(filenames):
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(dirpath, f)
    return found


MODULES = _modules()


def _imports(name: str, path: str) -> List[str]:
    """What `name` imports, absolute; `from a import b` is `a.b` when that is a module of the package."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return sorted(out)


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _ours(imported: str) -> Optional[str]:
    """The package's module that `imported` names (its nearest existing parent), or None."""
    while imported not in MODULES:
        if "." not in imported:
            return None
        imported = imported.rpartition(".")[0]
    return imported


GRAPH = {name: sorted({m for m in map(_ours, IMPORTS[name]) if m and m != name}) for name in MODULES}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _third_party_through(start: str, banned: Set[str]) -> List[str]:
    """Each way `start` reaches a banned top-level package: "start -> ... -> module imports x"."""
    paths = {start: [start]}
    queue = [start]
    found = []
    while queue:
        module = queue.pop(0)
        for imported in IMPORTS[module]:
            if imported.split(".")[0] in banned:
                found.append(" -> ".join(paths[module]) + f" imports {imported}")
        for dep in GRAPH[module]:
            if dep not in paths:
                paths[dep] = paths[module] + [dep]
                queue.append(dep)
    return found


def _cycles(graph: Dict[str, List[str]]) -> List[str]:
    """One circle per strongly connected component of `graph`, as "a -> b -> a"."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, []):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    circles = []
    for component in components:  # a shortest way back to its first member, by breadth
        first, members = component[0], set(component)
        paths = {first: [first]}
        queue = [first]
        circle = None
        while queue and circle is None:
            v = queue.pop(0)
            for w in graph[v]:
                if w == first:
                    circle = paths[v] + [first]
                    break
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        circles.append(" -> ".join(circle))
    return sorted(circles)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ROOMS) else "shared"


def test_every_room_is_a_package_with_modules():
    missing = [room for room in ROOMS if not any(_under(m, f"{PACKAGE}.{room}") and m != f"{PACKAGE}.{room}"
                                                 for m in MODULES)]
    assert missing == [], f"rooms without modules: {missing}"


def test_protocol_imports_no_tensorflow():
    offenders = [way for m in sorted(MODULES) if _under(m, f"{PACKAGE}.protocol")
                 for way in _third_party_through(m, {"tensorflow", "keras", "tf_keras"})]
    assert offenders == [], "\n".join(offenders)


def test_ps_imports_no_keras():
    offenders = [way for m in sorted(MODULES) if _under(m, f"{PACKAGE}.ps")
                 for way in _third_party_through(m, {"keras", "tf_keras"})]
    assert offenders == [], "\n".join(offenders)


def test_the_core_never_imports_sim_or_local():
    offenders = [f"{m} imports {imported}" for m in sorted(MODULES)
                 if m != PACKAGE and not any(_under(m, p) for p in OPTIONAL)
                 for imported in IMPORTS[m] if any(_under(imported, p) for p in OPTIONAL)]
    assert offenders == [], "\n".join(offenders)


def test_no_circle_between_modules():
    circles = _cycles(GRAPH)
    assert circles == [], "\n".join(circles)


def test_no_circle_between_rooms():
    rooms: Dict[str, Set[str]] = {}
    for m, deps in GRAPH.items():
        if m == PACKAGE:
            continue  # the public API imports every room
        for dep in deps:
            if dep != PACKAGE and _room(dep) != _room(m):
                rooms.setdefault(_room(m), set()).add(_room(dep))
    circles = _cycles({room: sorted(deps) for room, deps in rooms.items()})
    assert circles == [], "\n".join(circles)


def test_the_rules_see_real_imports():
    """The rules are not vacuous: the parse finds the edges every reader knows."""
    assert "tf_backup.ps.shared_state" in GRAPH["tf_backup.worker.client"]
    assert "tf_backup.protocol.rounds" in GRAPH["tf_backup.chief.aggregator"]
    assert "tensorflow" in IMPORTS["tf_backup.ps.shared_state"]
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a -> b -> c -> a"]
