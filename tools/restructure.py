#!/usr/bin/env python3
"""Moves tf_backup into subpackages by where the code runs (issue 30), with `git mv` and text rewrites.

Run from anywhere, on a clean checkout of the repository:

    python restructure.py /path/to/repo                # moves, rewrites, stages (no commit), checks
    python restructure.py /path/to/repo --tree TREE.md # the same, and writes the new tree's table
    python restructure.py /path/to/repo --tree-only TREE.md   # only the table, of a restructured repo
    python restructure.py /path/to/repo --commit       # and commit, in two commits (see below)

Deterministic: the same checkout gives the same tree. It refuses a dirty tree (`--allow-dirty`),
a tree already restructured, and a top-level module it has no place for (add it to MOVES or STAYS
below): a module that a merge added is placed on purpose, not by default.

What it does, in order:
1. rewrites every tracked text file (code, docs, deploy, configs, results): dotted names
   (`tf_backup.worker.client`, `"tf_backup.frontend.extended"`, `-m tf_backup.local._task`), paths (`tf_backup/ps/layout.py`),
   `from tf_backup import X [as Y]` (one name per statement first), and, in Markdown, bare file
   names of moved modules (`worker.py` -> `worker/client.py`);
2. `git mv`s the modules into the subpackages, which get an `__init__.py` with a docstring only;
3. splits two modules by their top-level definitions, moved verbatim (no logic rewritten), where the
   import rules require it: the pure recovery moves out of `ps/recovery.py` into
   `protocol/restart.py`, and the Keras-reading chief's side of `ps/ps_update.py` into
   `chief/update_on_ps.py`; references (`restart.next_move`, `update_on_ps.rule_for`, in code and
   docs) follow, and imports are added or dropped to match;
4. sorts each run of module-level `from tf_backup...` lines; writes `tests/test_imports.py` (the import
   rules, by `ast`) and a section "Where the code lives" in docs/design.md;
5. stages everything (`git add`) and checks: every file compiles, no stale dotted name is left,
   pyflakes and tests/test_imports.py pass (skipped with a notice when not installed).

With `--commit`, steps 1-2 are one commit and steps 3-4 a second, each a working tree: git then
sees every move as a rename (`git log --follow` works), which a split in the same commit can hide.
On a failure before the end, a checkout that started clean is reset to where it was.
"""

import argparse
import ast
import os
import re
import subprocess
import sys
import textwrap
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

PKG = "tf_backup"

# Every top-level module of tf_backup today -> its place (dotted, under tf_backup).
MOVES: Dict[str, str] = {
    # protocol/: pure, no TensorFlow.
    "protocol": "protocol.protocol",
    "adaptive": "protocol.adaptive",
    # ps/: runs against the ps tasks, and on them (serve): no Keras.
    "endpoint": "ps.endpoint",
    "accumulators": "ps.accumulators",
    "layout": "ps.layout",
    "shared_state": "ps.shared_state",
    "fused_runs": "ps.fused_runs",
    "ps_update": "ps.ps_update",  # split: its chief's side (Keras) goes to chief/update_on_ps.py
    "waker": "ps.waker",
    "job": "ps.job",  # the job vector on ps 0: serve(), workers (join, leave) and the chief (liveness) read it
    "recovery": "ps.recovery",  # split: its pure moves go to protocol/restart.py
    "server": "ps.server",
    # worker/: a worker's step.
    "worker": "worker.client",
    # chief/: what only the chief runs.
    "aggregator": "chief.aggregator",
    "checkpoint": "chief.checkpoint",
    # frontend/: Keras and tf.distribute.
    "strategy": "frontend.strategy",
    "extended": "frontend.extended",
    "optimizer": "frontend.optimizer",
    "binding": "frontend.binding",
    "sparse": "frontend.sparse",
    "exchange": "frontend.exchange",
    "local_devices": "frontend.local_devices",
    "_tf_internal": "frontend._tf_internal",
    # sim/ and local/: optional, the core never imports them.
    "straggler_models": "sim.straggler_models",
    "stragglers": "sim.stragglers",
    "launch": "local.launch",
    "_task": "local._task",
}

# Top-level modules that stay: the public API, and what every room reads (the cluster too:
# `serve()` resolves its task with `topology.cluster_info`, so under frontend/ the ps would
# import the front end).
STAYS = ("__init__", "errors", "_checks", "memory", "cluster", "topology")

ROOMS: Dict[str, str] = {
    "protocol": '''"""The protocol, pure: no TensorFlow and no I/O, tested without a cluster.

`protocol`: the configuration, the slot maps of `control` and `tf_backup/job`
(`Control`, `Job`, `ControlView`), rounds, counts and transitions. `adaptive`:
the rule that chooses N each step. `restart`: the moves after a ps task or the
chief restarted (what the chief writes again, where a waiting worker goes).
"""
''',
    "ps": '''"""What runs against the ps tasks, and on them (`serve()`): no Keras.

`endpoint`: a session on one ps task; `accumulators`: the resources by
`shared_name`; `layout`: variables packed into one flat shard per ps task;
`shared_state`: one optimizer's resources and the runs on them; `ps_update`: the
update's kernels in a ps task's graph (`apply_on_ps`); `waker`: ends a blocked
run past its deadline; `job`: the job vector (start, join, leave, beats,
liveness); `recovery`: waiting for ps tasks that restarted empty; `server`:
`serve()`, a ps task's process.
"""
''',
    "worker": '''"""A worker's step against the shared state (`client.WorkerClient`): push, wait, pull, a superseded
batch cancelled or restarted, its recovery after a failed run, the end of a fit round.
"""
''',
    "chief": '''"""What only the chief runs: the aggregator thread (take, apply, publish, close rounds, adaptive N),
its checkpoints, and its side of the update applied on the ps (`update_on_ps`).
"""
''',
    "frontend": '''"""The Keras and `tf.distribute` front end: `BackupWorkerStrategy` and its extended classes,
`SyncReplicasOptimizer`, an optimizer bound to the shared state (`binding`), the exchange of
compiled steps, Embedding tables by rows (`sparse`), multi-device workers (`local_devices`), and
every private TensorFlow and Keras import (`_tf_internal`).
"""
''',
    "sim": '''"""Simulated stragglers: the seeded models and the Keras callback. Optional: the core never imports it."""
''',
    "local": '''"""A local cluster on one machine: `launch_local`, `LocalCluster` and the task entry point
(`python -m tf_backup.local._task`). Optional: the core never imports it (`tf_backup` re-exports
`launch_local`, `LocalCluster` and `LocalClusterError`).
"""
''',
}

ROOM_HOLDS = {
    "protocol": "the protocol, pure (no TensorFlow, no I/O)",
    "ps": "what runs against the ps tasks and on them (`serve()`); no Keras",
    "worker": "a worker's step: push, wait, pull; its recovery",
    "chief": "what only the chief runs: the aggregator, checkpoints, its side of `apply_on_ps`",
    "frontend": "Keras and `tf.distribute`: the strategy, the optimizer, bindings, compiled steps, TF internals",
    "sim": "simulated stragglers (optional)",
    "local": "local clusters: `launch_local`, `LocalCluster`, the task entry point (optional)",
}


class Split(NamedTuple):
    """Top-level definitions moved verbatim from one module (after the moves) into a new one."""

    src: str  # dotted, under tf_backup, after MOVES
    dst: str
    names: Tuple[str, ...]
    doc: str


SPLITS = (
    Split("ps.recovery", "protocol.restart",
          ("control_to_restore", "control_to_rejoin", "Move", "next_move", "push_kept", "state_lost"),
          '''"""The moves after a restart, pure: what the chief writes again, and where a waiting worker goes.

A ps task that came back empty, or a chief that restarted from its checkpoint,
has the chief write the control vector again in a new generation
(`control_to_restore`, `control_to_rejoin`). A worker that sees it chooses its
move (`next_move` -> `Move`), whether its last push counted (`push_kept`), and
whether the state it used is gone (`state_lost`). The waits and writes
themselves, which talk to the ps tasks, are `tf_backup.ps.recovery`.
"""
'''),
    Split("ps.ps_update", "chief.update_on_ps",
          ("rule_for", "hyper_values", "slot_variables", "ChiefSide"),
          '''"""(Chief.) Its side of the update applied on the ps tasks (`apply_on_ps=True`): it reads Keras.

Which kernel applies the inner Keras optimizer's rule (`rule_for`; a
`ValueError` that names any other optimizer), the step's scalars as Keras's
`update_step` computes them (`hyper_values`), and `ChiefSide`: the chief's
Keras copy of the master and the slots, for checkpoints. The kernels, built
into a ps task's graph, are `tf_backup.ps.ps_update`, which imports no Keras.
"""
'''),
)

# What each module holds, for TREE.md and docs/design.md (a module not listed: its docstring's first line).
HOLDS: Dict[str, str] = {
    "__init__.py": "the public API: `BackupWorkerStrategy`, `SyncReplicasOptimizer`, `serve`, `launch_local`, "
                   "`LocalCluster`, errors, ...",
    "errors.py": "the error types (`WorkersLostError`, `StepTimeoutError`, `PsUnavailableError`, ...)",
    "_checks.py": "argument checks; bounded polling (`poll_until`, `backoff`)",
    "memory.py": "glibc malloc settings for every task (`malloc_env`, `tune_malloc`)",
    "cluster.py": "resolver -> validated `ClusterInfo` (chief first, ps, this task); TCP wait for tasks",
    "topology.py": "TPU pods: host groups as workers (`with_ps`, `tpu_topology`, `cluster_info`)",
    "protocol/protocol.py": "the specification: `ProtocolConfig`, slot maps `Control`, `Job`, `ControlView`, rounds, "
                            "counts, transitions",
    "protocol/adaptive.py": "the adaptive-N rule: `AdaptiveN`, `ArrivalWindow`, `NoiseScale`, `choose`",
    "protocol/restart.py": "the moves after a restart: `control_to_restore`, `control_to_rejoin`, `next_move` -> "
                           "`Move`, `push_kept`, `state_lost`",
    "ps/endpoint.py": "`Endpoint` (a session on one ps task, deadlines, duplicate delivery), `Endpoints`",
    "ps/accumulators.py": "`SharedVariable`, `ConditionalAccumulator`, `SparseConditionalAccumulator`, queues",
    "ps/layout.py": "`Layout`: variables packed into equal flat shards, one per ps task; `largest_first`",
    "ps/shared_state.py": "`SharedState`: one optimizer's resources and the fused runs (`Wake`, `Arrivals`, "
                          "`Snapshot`)",
    "ps/ps_update.py": "the update applied on the ps: `UpdateRule`, its kernels (`build_apply`), `hyper_names`",
    "ps/waker.py": "`Waker`: ends a blocked run past its deadline with a `POKE` token",
    "ps/job.py": "the job vector: `JobMonitor` (start, join, check, leave), `Heartbeat`, `BeatWatch`, `Liveness`",
    "ps/recovery.py": "a ps restarted empty: `ChiefRecovery`, `await_generation`, `RECOVERABLE`",
    "ps/server.py": "`serve()`: a ps task that exits by itself when the job is done",
    "worker/client.py": "`WorkerClient`: push, wait, pull, stragglers, recovery, the end of a fit round",
    "chief/aggregator.py": "the chief's `Aggregator` thread (take, apply, step hooks, publish, close rounds), "
                           "`StepRecord`",
    "chief/checkpoint.py": "`Checkpoint`: the chief's checkpoints, with the input positions of their step",
    "chief/update_on_ps.py": "the chief's side of `apply_on_ps`: `rule_for`, `hyper_values`, `ChiefSide`",
    "frontend/strategy.py": "`BackupWorkerStrategy`: arguments, cluster, devices; stats and counters",
    "frontend/extended.py": "`BackupWorkerExtended` and its multi-device and TPU variants: what a worker holds",
    "frontend/optimizer.py": "`SyncReplicasOptimizer`, the Keras 3 wrapper",
    "frontend/binding.py": "`Binding`: an optimizer bound to the shared state; the graph part of a step",
    "frontend/sparse.py": "Embedding tables by rows: `SparseBinding`, `SparseTable`",
    "frontend/exchange.py": "compiled steps: `StepBuffers`, `ExchangingIterator`, `in_compiled_context`",
    "frontend/local_devices.py": "multi-device workers: device choice, in-host all-reduce, one push per host",
    "frontend/_tf_internal.py": "every private TensorFlow and Keras import, in one place",
    "sim/straggler_models.py": "the seeded straggler models (`phases:` too), `parse`, `ideal_step_times`",
    "sim/stragglers.py": "`StragglerCallback` (and the models, re-exported)",
    "local/launch.py": "`launch_local()`, `LocalCluster`: one subprocess per task, `TF_CONFIG`, logs, restarts",
    "local/_task.py": "the entry point of one task process (`python -m tf_backup.local._task`)",
}

TEXT_SUFFIXES = (".py", ".md", ".txt", ".json", ".yaml", ".yml", ".ini", ".cfg", ".toml", ".sh", "Dockerfile",
                 ".csv", "run")
DESIGN_HEADING = "## Where the code lives"
DESIGN_BEFORE = "## Each protocol step and the function that performs it"

_OLD = "|".join(sorted(MOVES, key=len, reverse=True))
DOTTED = re.compile(rf"\b{PKG}\.({_OLD})(?!\w)")
SLASHED = re.compile(rf"\b{PKG}/({_OLD})\.py\b")
BARE = re.compile(rf"(?<![\w/.\-])({_OLD})\.py\b")
FROM_PKG = re.compile(rf"\bfrom {PKG} import ({_OLD})\b(?!\s*,)( as \w+)?")
IMPORT_LINE = re.compile(rf"^from {PKG}[\w.]* import \w+( as \w+)?$")


class Failure(Exception):
    """Why the script stopped; nothing it did is committed."""


def log(msg: str) -> None:
    print(f"restructure: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# The repository


class Repo:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.touched: Set[str] = set()

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def git(self, *args: str) -> str:
        out = subprocess.run(["git", *args], cwd=self.root, check=True, capture_output=True, text=True)
        return out.stdout

    def tracked(self) -> List[str]:
        return sorted(p for p in self.git("ls-files", "-z").split("\0") if p)

    def read(self, rel: str) -> str:
        with open(self.path(rel), encoding="utf-8") as f:
            return f.read()

    def write(self, rel: str, text: str) -> None:
        os.makedirs(os.path.dirname(self.path(rel)) or ".", exist_ok=True)
        with open(self.path(rel), "w", encoding="utf-8") as f:
            f.write(text)
        self.touched.add(rel)


def module_path(dotted: str) -> str:
    """`ps.recovery` -> `tf_backup/ps/recovery.py`."""
    return f"{PKG}/{dotted.replace('.', '/')}.py"


def preconditions(repo: Repo, allow_dirty: bool) -> None:
    if not os.path.isfile(repo.path(f"{PKG}/__init__.py")):
        raise Failure(f"{repo.root} has no {PKG}/__init__.py: run this from a tf_backup checkout")
    rooms = [r for r in ROOMS if os.path.isdir(repo.path(f"{PKG}/{r}"))]
    if rooms:
        raise Failure(f"{PKG}/{rooms[0]}/ exists: this tree is restructured already (start from a clean checkout)")
    if not allow_dirty:
        dirty = repo.git("status", "--porcelain", "--untracked-files=all").strip()
        if dirty:
            raise Failure("the working tree is not clean (or pass --allow-dirty):\n" + dirty)
    top = sorted(os.path.basename(p)[:-3] for p in repo.tracked()
                 if p.startswith(f"{PKG}/") and p.endswith(".py") and p.count("/") == 1)
    unknown = [m for m in top if m not in MOVES and m not in STAYS]
    if unknown:
        raise Failure("no place for " + ", ".join(f"{PKG}/{m}.py" for m in unknown)
                      + ": add each to MOVES (or STAYS) at the top of this script")
    nested = sorted({p.split("/")[1] for p in repo.tracked() if p.startswith(f"{PKG}/") and p.count("/") > 1})
    if nested:
        raise Failure(f"{PKG} has subdirectories already ({', '.join(nested)}): place them in this script first")
    for m in sorted(MOVES):
        if m not in top:
            log(f"warning: {PKG}/{m}.py is gone; references to it are rewritten all the same")
    for split in SPLITS:
        src_old = next(k for k, v in MOVES.items() if v == split.src)
        tree = ast.parse(repo.read(f"{PKG}/{src_old}.py"))
        missing = [n for n in split.names if n not in top_level_definitions(tree)]
        if missing:
            raise Failure(f"{PKG}/{src_old}.py no longer defines {', '.join(missing)}: update SPLITS")


# ---------------------------------------------------------------------------------------------------
# Text rewrites


def _new_from(match: re.Match) -> str:
    old, alias = match.group(1), match.group(2)
    parent, _, leaf = MOVES[old].rpartition(".")
    if not alias and leaf != old:
        alias = f" as {old}"  # the name the code uses stays bound
    return f"from {PKG}.{parent} import {leaf}{alias or ''}"


def split_multi_imports(text: str, modules: Sequence[str]) -> str:
    """`from M import a, b` (M one of `modules`) -> one statement per name, so that each can move alone."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    lines = text.splitlines(keepends=True)
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules and len(node.names) > 1:
            first = lines[node.lineno - 1]
            indent = first[:len(first) - len(first.lstrip())]
            last = lines[node.end_lineno - 1]
            comment = last[last.index("#"):].rstrip("\n") if "#" in last[node.end_col_offset:] else ""
            new = "".join(f"{indent}from {node.module} import {a.name}{f' as {a.asname}' if a.asname else ''}"
                          f"{'  ' + comment if comment else ''}\n" for a in node.names)
            edits.append((node.lineno, node.end_lineno, new))
    for start, end, new in sorted(edits, reverse=True):
        lines[start - 1:end] = [new]
    return "".join(lines)


def rewrite_names(text: str, markdown: bool) -> str:
    """Dotted names, paths, `from tf_backup import X`, and (Markdown) bare file names of moved modules."""
    text = DOTTED.sub(lambda m: f"{PKG}.{MOVES[m.group(1)]}", text)
    text = SLASHED.sub(lambda m: module_path(MOVES[m.group(1)]), text)
    if markdown:
        text = BARE.sub(lambda m: module_path(MOVES[m.group(1)])[len(PKG) + 1:], text)
    return FROM_PKG.sub(_new_from, text)


def module_aliases(tree: ast.AST, dotted: str) -> Set[str]:
    """The names a module binds to `dotted` (`from a import b [as c]`, `import a.b as c`)."""
    parent, _, leaf = dotted.rpartition(".")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == parent:
            found.update(a.asname or a.name for a in node.names if a.name == leaf)
        elif isinstance(node, ast.Import):
            found.update(a.asname for a in node.names if a.name == dotted and a.asname)
    return found


def used_names(nodes) -> Set[str]:
    out = set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                out.add(n.id)
    return out


def rewrite_split_references(text: str, split: Split, python: bool, markdown: bool) -> str:
    """`restart.next_move` -> `restart.next_move` (and dotted, and `from ... import`); imports follow (Python).

    In Markdown a bare `ps/recovery.py` (a file list) names both halves.
    """
    names = "|".join(split.names)
    src_full, dst_full = f"{PKG}.{split.src}", f"{PKG}.{split.dst}"
    src_leaf, dst_leaf = split.src.rpartition(".")[2], split.dst.rpartition(".")[2]
    if markdown:
        src_rel, dst_rel = (module_path(m)[len(PKG) + 1:] for m in (split.src, split.dst))
        text = re.sub(rf"(`?)(?<![\w/.\-]){re.escape(src_rel)}\b(`?)",
                      lambda m: f"`{src_rel}`, `{dst_rel}`" if m.group(1) and m.group(2)
                      else f"{m.group(1)}{src_rel}, {dst_rel}{m.group(2)}", text)
        # A two-column table of modules gets a row for the new one, after the source's.
        text = re.sub(rf"^(\| `{re.escape(module_path(split.src))}` \|[^|\n]*\|)$",
                      lambda m: m.group(1) + f"\n| `{module_path(split.dst)}` | {HOLDS[dst_rel]} |", text,
                      flags=re.M)
    text = re.sub(rf"\b{re.escape(src_full)}\.({names})\b", rf"{dst_full}.\1", text)
    text = re.sub(rf"\bfrom {re.escape(src_full)} import ({names})\b(?!\s*,)", rf"from {dst_full} import \1", text)
    aliases = {src_leaf}
    if python:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            return text
        aliases |= module_aliases(tree, src_full)
    for alias in sorted(aliases):
        text = re.sub(rf"(?<![\w.]){re.escape(alias)}\.({names})\b", rf"{dst_leaf}.\1", text)
    if python:
        text = fix_split_imports(text, split)
    return text


def fix_split_imports(text: str, split: Split) -> str:
    """Adds `from tf_backup.<dst parent> import <dst>` where the code now uses it; drops the source's if unused."""
    src_full = f"{PKG}.{split.src}"
    src_parent, _, src_leaf = src_full.rpartition(".")
    dst_parent, _, dst_leaf = f"{PKG}.{split.dst}".rpartition(".")
    tree = ast.parse(text)
    used = used_names([tree])  # an import binds a name without a Name node: only real uses count
    if not any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == dst_leaf
               and n.attr in split.names for n in ast.walk(tree)):
        return text
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    if any((a.asname or a.name) == dst_leaf for n in imports for a in n.names):
        return text
    for n in ast.walk(tree):
        if dst_leaf in (getattr(n, "name", None), getattr(n, "arg", None)) or (
                isinstance(n, ast.Name) and n.id == dst_leaf and not isinstance(n.ctx, ast.Load)):
            raise Failure(f"`{dst_leaf}` is already a name in a file that needs it as a module")
    anchors = [n for n in imports if (isinstance(n, ast.ImportFrom) and n.level == 0 and n.module == src_parent
                                      and any(a.name == src_leaf for a in n.names))
               or (isinstance(n, ast.Import) and any(a.name == src_full for a in n.names))]
    fallback = not anchors
    if fallback:
        anchors = [n for n in tree.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(PKG)][-1:]
    if not anchors:
        raise Failure(f"no import to put `from {dst_parent} import {dst_leaf}` beside")
    lines = text.splitlines(keepends=True)
    scopes = set()
    for anchor in sorted(anchors, key=lambda n: -n.lineno):
        scope = scope_of(tree, anchor)
        first, last = lines[anchor.lineno - 1], lines[anchor.end_lineno - 1]
        indent = first[:len(first) - len(first.lstrip())]
        comment = "  " + last[last.index("# pylint"):].rstrip("\n") if "# pylint" in last else ""
        span = lines[anchor.lineno - 1:anchor.end_lineno]
        bound = [b for _, b in import_bindings(anchor)]
        if not fallback and len(anchor.names) == 1 and bound[0] not in used:
            span = []  # the source module is no longer used here
        if id(scope) not in scopes:
            span = span + [f"{indent}from {dst_parent} import {dst_leaf}{comment}\n"]
        scopes.add(id(scope))
        lines[anchor.lineno - 1:anchor.end_lineno] = span
    return "".join(lines)


def scope_of(tree: ast.AST, target: ast.AST):
    """The innermost function (or the module: None) whose body holds `target`."""
    found = [None]

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if child is target:
                found[0] = scope
            visit(child, child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope)

    visit(tree, None)
    return found[0]


def sort_import_runs(text: str) -> str:
    """Sorts each run of consecutive module-level `from tf_backup... import x` lines (Google style: by text)."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if IMPORT_LINE.match(lines[i]):
            j = i
            while j < len(lines) and IMPORT_LINE.match(lines[j]):
                j += 1
            lines[i:j] = sorted(lines[i:j])
            i = j
        else:
            i += 1
    return "\n".join(lines)


def rewrite_files(repo: Repo, phase: int) -> None:
    """Phase 1: the moves' names. Phase 2: the splits' names (after the splits)."""
    multi = [PKG] + [f"{PKG}.{s.src}" for s in SPLITS] + [f"{PKG}.{k}" for k, v in MOVES.items()
                                                          if any(s.src == v for s in SPLITS)]
    changed = 0
    for rel in repo.tracked():
        if not (rel.endswith(TEXT_SUFFIXES) or "/" not in rel) or not os.path.isfile(repo.path(rel)):
            continue
        try:
            text = repo.read(rel)
        except UnicodeDecodeError:
            continue
        python, markdown = rel.endswith(".py"), rel.endswith(".md")
        if phase == 1:
            new = split_multi_imports(text, multi) if python else text
            new = rewrite_names(new, markdown)
        else:
            new = text
            for split in SPLITS:
                new = rewrite_split_references(new, split, python, markdown)
        if python:
            new = sort_import_runs(new)
        if new != text:
            repo.write(rel, new)
            changed += 1
    log(f"phase {phase}: rewrote names in {changed} files")


# ---------------------------------------------------------------------------------------------------
# Moves and splits


def move_modules(repo: Repo) -> None:
    for room, doc in ROOMS.items():
        repo.write(f"{PKG}/{room}/__init__.py", doc)
    moved = 0
    for old, new in sorted(MOVES.items()):
        src = f"{PKG}/{old}.py"
        if os.path.isfile(repo.path(src)):
            repo.git("mv", src, module_path(new))
            repo.touched.add(module_path(new))
            moved += 1
    log(f"moved {moved} modules into {len(ROOMS)} subpackages")


def top_level_definitions(tree: ast.Module) -> Dict[str, ast.stmt]:
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def import_bindings(node: ast.stmt) -> List[Tuple[ast.alias, str]]:
    if isinstance(node, ast.Import):
        return [(a, a.asname or a.name.split(".")[0]) for a in node.names]
    return [(a, a.asname or a.name) for a in node.names]


def render_import(node: ast.stmt, keep: Sequence[ast.alias]) -> str:
    parts = [f"{a.name} as {a.asname}" if a.asname else a.name for a in keep]
    if isinstance(node, ast.Import):
        return "\n".join(f"import {p}" for p in parts)
    return f"from {'.' * node.level}{node.module or ''} import {', '.join(parts)}"


def squeeze_blank_lines(text: str) -> str:
    """At most two blank lines anywhere, one between imports, none at the end."""
    text = re.sub(r"\n{4,}", "\n\n\n", text).rstrip("\n") + "\n"
    tree = ast.parse(text)
    lines = text.split("\n")
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    for a, b in sorted(zip(imports, imports[1:]), key=lambda p: -p[0].lineno):
        gap = range(a.end_lineno, b.lineno - 1)  # 0-based indexes of the lines between them
        if len(gap) > 1 and all(not lines[i].strip() for i in gap):
            del lines[a.end_lineno:b.lineno - 2]
    return "\n".join(lines)


def split_module(repo: Repo, split: Split) -> None:
    src_rel, dst_rel = module_path(split.src), module_path(split.dst)
    text = repo.read(src_rel)
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    top = top_level_definitions(tree)
    spans = []
    for name in split.names:
        node = top[name]
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        while start > 1 and lines[start - 2].startswith("#"):
            start -= 1  # its comment goes with it
        spans.append((start, node.end_lineno))
    spans.sort()
    moved_nodes = [top[n] for n in split.names]
    chunks = ["".join(lines[s - 1:e]).rstrip("\n") + "\n" for s, e in spans]

    # The destination's imports: the source's that the moved code uses, and the source's own names.
    needed = used_names(moved_nodes) - set(split.names)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    groups: List[List[str]] = [[]]
    for i, node in enumerate(imports):
        if i and node.lineno - imports[i - 1].end_lineno > 1:
            groups.append([])
        keep = [a for a, bound in import_bindings(node) if bound in needed]
        if keep:
            groups[-1].append(render_import(node, keep))
    imported = {bound for node in imports for _, bound in import_bindings(node)}
    own = sorted((needed & set(top)) - imported - set(split.names))
    if own:
        ours = [f"from {PKG}.{split.src} import {n}" for n in own]
        if groups[-1] and groups[-1][0].startswith(f"from {PKG}"):
            groups[-1] = sorted(groups[-1] + ours)
        else:
            groups.append(ours)
    header = "\n\n".join("\n".join(g) for g in groups if g)
    dst = split.doc + "\n" + header + "\n\n\n" + "\n\n".join(chunks)
    repo.write(dst_rel, squeeze_blank_lines(dst))

    # The source without them, and without the imports only they used.
    for s, e in sorted(spans, reverse=True):
        del lines[s - 1:e]
    rest = "".join(lines)
    rest_tree = ast.parse(rest)
    left = used_names([n for n in rest_tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))])
    still = sorted(left & set(split.names))
    if still:
        raise Failure(f"{src_rel} still uses {', '.join(still)} after the split: update SPLITS")
    rest_lines = rest.splitlines(keepends=True)
    for node in sorted((n for n in rest_tree.body if isinstance(n, (ast.Import, ast.ImportFrom))),
                       key=lambda n: -n.lineno):
        bindings = import_bindings(node)
        keep = [a for a, bound in bindings if bound in left]
        if len(keep) == len(bindings):
            continue
        new = [render_import(node, keep) + "\n"] if keep else []
        rest_lines[node.lineno - 1:node.end_lineno] = new
    repo.write(src_rel, squeeze_blank_lines("".join(rest_lines)))
    log(f"split {len(split.names)} definitions of {src_rel} into {dst_rel}")


# ---------------------------------------------------------------------------------------------------
# Generated files


def module_lines(repo: Repo, rel: str) -> int:
    with open(repo.path(rel), encoding="utf-8") as f:
        return sum(1 for _ in f)


def first_doc_line(repo: Repo, rel: str) -> str:
    doc = ast.get_docstring(ast.parse(repo.read(rel))) or ""
    return doc.strip().split("\n")[0]


def tree_rows(repo: Repo) -> List[Tuple[str, str, int]]:
    rows = []
    for dirpath, dirnames, filenames in os.walk(repo.path(PKG)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(("__", ".")))
        for f in sorted(filenames):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), repo.root)
                inner = rel[len(PKG) + 1:]
                if inner.endswith("/__init__.py"):
                    holds = "(the subpackage: a docstring only)"
                else:
                    holds = HOLDS.get(inner) or first_doc_line(repo, rel)
                rows.append((rel, holds, module_lines(repo, rel)))
    order = ["", "protocol", "ps", "worker", "chief", "frontend", "sim", "local"]

    def key(row):
        inner = row[0][len(PKG) + 1:]
        room = inner.split("/")[0] if "/" in inner else ""
        return (order.index(room) if room in order else len(order), room, "/" in inner,
                not inner.endswith("__init__.py"), inner)

    return sorted(rows, key=key)


def write_tree(repo: Repo, out: str) -> None:
    rows = tree_rows(repo)
    head = repo.git("rev-parse", "--short", "HEAD").strip()
    if repo.git("status", "--porcelain", "--untracked-files=no", "--", PKG).strip():
        head += " with the restructure staged on it"
    table = ["| path | what it holds | lines |", "|---|---|---:|"]
    table += [f"| `{p}` | {h} | {n} |" for p, h, n in rows]
    total = sum(n for _, _, n in rows)
    big = [(p, n) for p, _, n in rows if n > 400]
    text = (f"# The tree of tf_backup by where the code runs\n\n"
            f"Generated by `restructure.py` from the tree at {head}; lines are `wc -l`.\n\n"
            + "\n".join(table) + f"\n\n{len(rows)} files, {total} lines. Over 400 lines: "
            + (", ".join(f"`{p}` ({n})" for p, n in big) or "none") + ".\n")
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    log(f"wrote {out}")


TEST_IMPORTS = r'''"""Import rules of the house by where the code runs, from the sources (`ast`; nothing is imported).

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
    assert "tf_backup.ps.shared_state" in GRAPH["tf_backup.worker.client.client"]
    assert "tf_backup.protocol.protocol.protocol" in GRAPH["tf_backup.chief.aggregator"]
    assert "tensorflow" in IMPORTS["tf_backup.ps.shared_state"]
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a -> b -> c -> a"]
'''


def write_test_imports(repo: Repo) -> None:
    rel = "tests/test_imports.py"
    if os.path.exists(repo.path(rel)):
        raise Failure(f"{rel} exists already: merge it with this script's by hand")
    repo.write(rel, TEST_IMPORTS)
    log(f"wrote {rel}")


def design_section(repo: Repo) -> str:
    rooms = [("`tf_backup/` (top level)", "the public API (`__init__`) and what every room reads: `errors`, "
              "`_checks`, `memory`, `cluster` (`ClusterInfo`), `topology` (TPU pods)")]
    for room in ROOMS:
        mods = sorted(p[len(PKG) + 2 + len(room):] for p, _, _ in tree_rows(repo)
                      if p.startswith(f"{PKG}/{room}/") and not p.endswith("__init__.py"))
        rooms.append((f"`tf_backup/{room}/`", f"{ROOM_HOLDS[room]}: " + ", ".join(f"`{m[:-3]}`" for m in mods)))
    table = "\n".join(["| room | what it holds |", "|---|---|"] + [f"| {r} | {h} |" for r, h in rooms])
    return textwrap.dedent("""\
        {heading}

        The package is cut by where the code runs and who owns the state, so that a feature lands in
        one or two rooms (issue 30). The public API (`tf_backup.BackupWorkerStrategy`,
        `SyncReplicasOptimizer`, `serve`, `launch_local`, `LocalCluster`, `errors`, `topology`) is where
        it was; the simulated stragglers are `tf_backup.sim.stragglers`.

        {table}

        Where the cut differs from the issue's guide, and why:

        - `cluster.py` and `topology.py` stay at the top level: every room reads the cluster, and a ps
          task's `serve()` resolves its task with `topology.cluster_info`, so under the front end the
          ps would import the front end.
        - `job.py` (the job vector on ps 0: start, join, leave, heartbeats, liveness) is in `ps/`: the
          ps tasks' `serve()`, every worker and the chief all read it, and the rooms above `ps/` import
          it without a circle.
        - `recovery.py` is split, its definitions moved unchanged: the pure moves (`control_to_restore`,
          `control_to_rejoin`, `next_move`, `Move`, `push_kept`, `state_lost`) are
          `protocol/restart.py`; the waits and writes against the ps tasks (`ChiefRecovery`,
          `await_generation`, `RECOVERABLE`) are `ps/recovery.py`, which the chief and the workers use.
        - `ps_update.py` is split the same way: the kernels a ps task's graph runs stay in
          `ps/ps_update.py`, which imports no Keras; what reads the inner Keras optimizer (`rule_for`,
          `hyper_values`, `ChiefSide`) is the chief's, `chief/update_on_ps.py`.

        The rules are a test (`tests/test_imports.py`, from the sources with `ast`): `protocol/`
        imports no TensorFlow or Keras and `ps/` no Keras, not even through another module; nothing but
        `sim/`, `local/` and the package's `__init__` imports `sim/` or `local/`; no circle among the
        modules, nor among the rooms (protocol <- ps <- worker, chief <- frontend; sim and local
        apart).

        """).format(heading=DESIGN_HEADING, table=table)


def update_design(repo: Repo) -> None:
    rel = "docs/design.md"
    if not os.path.isfile(repo.path(rel)):
        log(f"warning: no {rel}; the section on the tree is not written")
        return
    text = repo.read(rel)
    section = design_section(repo)
    if DESIGN_BEFORE in text:
        text = text.replace(DESIGN_BEFORE, section + DESIGN_BEFORE, 1)
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    repo.write(rel, text)
    log(f"added '{DESIGN_HEADING}' to {rel}")


# ---------------------------------------------------------------------------------------------------
# Checks


STALE = re.compile(rf"\b{PKG}\.({'|'.join(k for k in MOVES if k not in ROOMS)})(?!\w)"
                   rf"|\b{PKG}/({'|'.join(k for k in MOVES if k not in ROOMS)})\.py\b")


def check(repo: Repo) -> bool:
    ok = True
    for rel in repo.tracked():
        if rel.endswith(".py") and os.path.isfile(repo.path(rel)):
            try:
                compile(repo.read(rel), rel, "exec")
            except SyntaxError as e:
                log(f"check: {rel} does not compile: {e}")
                ok = False
        if rel.endswith(TEXT_SUFFIXES) and os.path.isfile(repo.path(rel)):
            try:
                text = repo.read(rel)
            except UnicodeDecodeError:
                continue
            for n, line in enumerate(text.split("\n"), 1):
                if STALE.search(line):
                    log(f"check: stale name {rel}:{n}: {line.strip()}")
                    ok = False
    env = dict(os.environ, PYTHONPATH=repo.root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    lint = [p for p in (PKG, "trainers", "benchmarks", "tests") if os.path.isdir(repo.path(p))]
    for what, cmd in (("pyflakes", [sys.executable, "-m", "pyflakes", *lint]),
                      ("import rules", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                        "tests/test_imports.py"])):
        run = subprocess.run(cmd, cwd=repo.root, capture_output=True, text=True, env=env)
        if run.returncode != 0 and "No module named" in run.stderr:
            log(f"check: {what} skipped ({run.stderr.strip().splitlines()[-1]})")
            continue
        if run.returncode != 0:
            log(f"check: {what} failed:\n{run.stdout}{run.stderr}")
            ok = False
        else:
            log(f"check: {what} clean")
    return ok


# ---------------------------------------------------------------------------------------------------


COMMIT_MOVES = """Subpackages by where the code runs: tf_backup's modules moved (git mv), every name rewritten

protocol/ (pure), ps/, worker/, chief/, frontend/, sim/, local/; made by restructure.py (issue 30).
"""

COMMIT_SPLITS = """Split recovery.py and ps_update.py where the import rules need it; the rules as a test

The pure recovery moves into protocol/restart.py, the chief's (Keras) side of apply_on_ps into
chief/update_on_ps.py: top-level definitions moved verbatim. tests/test_imports.py; docs/design.md
"Where the code lives".
Made by restructure.py (issue 30).
"""


def stage(repo: Repo) -> None:
    repo.git("add", "--", *sorted(p for p in repo.touched if os.path.exists(repo.path(p))))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("repo", help="the repository root (a clean checkout)")
    parser.add_argument("--tree", help="also write the new tree's table (Markdown) to this file")
    parser.add_argument("--tree-only", metavar="TREE", help="only write the table, of a restructured tree")
    parser.add_argument("--allow-dirty", action="store_true", help="run on a tree with uncommitted changes")
    parser.add_argument("--no-check", action="store_true", help="skip the checks at the end")
    parser.add_argument("--commit", action="store_true",
                        help="commit in two steps (the moves; then the splits, the test and the design note), "
                             "so that `git log --follow` finds each module's history")
    args = parser.parse_args(argv)
    repo = Repo(args.repo)
    try:
        if args.tree_only:
            write_tree(repo, args.tree_only)
            return 0
        preconditions(repo, args.allow_dirty)
        base = repo.git("rev-parse", "HEAD").strip()
        rewrite_files(repo, phase=1)
        move_modules(repo)
        stage(repo)
        if args.commit:
            repo.git("commit", "-q", "-m", COMMIT_MOVES)
        for split in SPLITS:
            split_module(repo, split)
        stage(repo)  # the new modules are tracked: phase 2 rewrites them too
        rewrite_files(repo, phase=2)
        write_test_imports(repo)
        update_design(repo)
        stage(repo)
        if args.commit:
            repo.git("commit", "-q", "-m", COMMIT_SPLITS)
            log(f"committed two commits on {base[:10]} (undo: git reset --hard {base[:10]})")
        else:
            log("staged; nothing is committed (review with `git status`, `git diff --cached -M`)")
        if args.tree:
            write_tree(repo, args.tree)
        if not args.no_check and not check(repo):
            log("checks failed (see above)")
            return 1
        return 0
    except (Failure, subprocess.CalledProcessError) as e:
        why = f"{' '.join(e.cmd)} failed: {e.stderr}" if isinstance(e, subprocess.CalledProcessError) else str(e)
        log(f"stopped: {why}")
        if repo.touched and not args.allow_dirty:  # it started clean: leave it so
            repo.git("reset", "-q", "--hard", "HEAD")
            repo.git("clean", "-fdq")
            log("the checkout is back as it was")
        return 2


if __name__ == "__main__":
    sys.exit(main())
