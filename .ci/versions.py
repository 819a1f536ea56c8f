#!/usr/bin/env python3
"""Runs tf_backup's compatibility subset on each TensorFlow release, each in a fresh virtual environment.

For each release: a new venv under --venvs, `pip install tensorflow==X` with the newest Keras 3
release pip resolves for it (or the one --keras names), tf_backup from this checkout with
`--no-deps`, then tf_backup's other requirements (read from setup.py) and its test extra, pinned
so that pip cannot replace the TensorFlow just installed. Then `pytest -m "compat and not slow"`
runs in this checkout with the venv's Python, under the --lock file if one is given (the shared
CPU lock), and a markdown table goes to --out: release, Keras, Python, tests passed and failed,
time. tf-nightly (--watched) is in the table as watched: its result does not change the exit status.

Every pip and pytest run has a timeout. The only network access is pip's, to the package registry.

    python .ci/versions.py --lock /tmp/tfb_cpu.lock                          # every release, docs/versions.md
    python .ci/versions.py --releases 2.16.2 --watched "" --out /tmp/v.md    # one release

Exit status: 0 when every required release passed its subset, 1 otherwise.
"""

import argparse
import ast
import contextlib
import dataclasses
import datetime
import fcntl
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASES = ["2.16.2", "2.17.1", "2.18.1", "2.19.1", "2.20.0", "2.21.0"]
NIGHTLY = "tf-nightly"
MARKER = "compat and not slow"


@dataclasses.dataclass
class Result:
    release: str
    watched: bool
    tensorflow: str = ""  # what `import tensorflow` reports in the venv
    keras: str = ""
    python: str = ""
    passed: List[str] = dataclasses.field(default_factory=list)
    failed: Dict[str, str] = dataclasses.field(default_factory=dict)  # test -> first line of its failure
    seconds: float = 0.0  # the pytest run's wall time
    install_seconds: float = 0.0  # the venv and pip's wall time
    error: str = ""  # why no test ran (an install that failed, a timeout)

    @property
    def ok(self) -> bool:
        return not self.error and not self.failed and bool(self.passed)


def requirements() -> List[str]:
    """setup.py's install_requires and test extra, read without running setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    reqs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs += ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            reqs += ast.literal_eval(node.value)["test"]
    if not reqs:
        raise RuntimeError("setup.py: no install_requires found")
    return reqs


def name_of(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def run(cmd: List[str], log, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=True, text=True,
                          **kwargs)


@contextlib.contextmanager
def locked(path: Optional[str]):
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tensorflow_range() -> Tuple[str, str]:
    """setup.py's TensorFlow requirement, `tensorflow>=LOW,<HIGH` (with any `!=` exclusions): (LOW, HIGH)."""
    (req,) = [r for r in requirements() if name_of(r) == "tensorflow"]
    parts = req.replace(" ", "")[len("tensorflow"):].split(",")
    low = [p[2:] for p in parts if p.startswith(">=")]
    high = [p[1:] for p in parts if p.startswith("<") and not p.startswith("<=")]
    if len(low) != 1 or len(high) != 1:
        raise RuntimeError(f"setup.py: expected tensorflow>=LOW,<HIGH. Found: {req!r}")
    return low[0], high[0]


def tensorflow_requirement(release: str) -> List[str]:
    """pip's arguments for a release: "2.16.2", "tf-nightly", or "oldest": the newest patch of setup.py's lowest minor."""
    if release == NIGHTLY:
        return [NIGHTLY, "--pre"]
    if release == "oldest":
        return [f"tensorflow~={tensorflow_range()[0]}.0"]
    return [f"tensorflow=={release}"]


def install(release: str, venv: str, keras: str, log, timeout: float) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", venv], log, 120)
    pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--no-input"]
    run(pip + tensorflow_requirement(release) + [f"keras=={keras}" if keras else "keras>=3,<4"], log, timeout)
    run(pip + ["--no-deps", ROOT], log, timeout)
    # The rest of tf_backup's requirements, with TensorFlow and Keras held at what was just installed.
    installed = versions(venv)
    pins = [f"keras=={installed['keras']}"]
    if release != NIGHTLY:  # (tf-nightly's version is not pip's spelling; nothing else requires TensorFlow)
        pins.append(f"tensorflow=={installed['tensorflow']}")
    others = [r for r in requirements() if name_of(r) not in ("tensorflow", "keras")]
    run(pip + others + pins, log, timeout)


def versions(venv: str) -> Dict[str, str]:
    code = ("import sys, platform, tensorflow as tf, keras; "
            "print(tf.__version__, keras.__version__, platform.python_version())")
    out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", code], capture_output=True, text=True,
                         timeout=300, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    tf_version, keras_version, python = out.stdout.split()[-3:]
    return dict(tensorflow=tf_version, keras=keras_version, python=python)


def test(venv: str, result: Result, junit: str, log, timeout: float, lock: Optional[str]) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    cmd = [os.path.join(venv, "bin", "python"), "-m", "pytest", "-q", "-m", MARKER, "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    with locked(lock):
        start = time.monotonic()
        try:
            run(cmd, log, timeout, cwd=ROOT, env=env)
        except subprocess.CalledProcessError:
            pass  # failures are read from the junit file below
        except subprocess.TimeoutExpired:
            result.error = f"pytest timed out after {timeout:.0f} s"
        result.seconds = time.monotonic() - start
    read_report(junit, result)


def read_report(junit: str, result: Result) -> None:
    """The passed and failed tests of a pytest junit file, into `result`."""
    if not os.path.exists(junit):
        result.error = result.error or "pytest wrote no report (see the log)"
        return
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            result.failed[name] = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else "failed"
        elif case.find("skipped") is None:
            result.passed.append(name)


def prepare(result: Result, args, keras: str) -> None:
    """Phase 1 (no CPU lock needed): the venv, and the versions it ended with."""
    venv = os.path.join(args.venvs, result.release)
    start = time.monotonic()
    with open(os.path.join(args.venvs, f"{result.release}.log"), "w") as log:
        try:
            if not args.reuse or not os.path.exists(venv):
                install(result.release, venv, keras, log, args.install_timeout)
            result.__dict__.update(versions(venv))
        except subprocess.CalledProcessError as e:
            result.error = f"install failed: `{' '.join(e.cmd[3:6])} ...` exited {e.returncode}"
        except subprocess.TimeoutExpired as e:
            result.error = f"install timed out: `{' '.join(e.cmd[3:6])} ...`"
    result.install_seconds = time.monotonic() - start
    print(f"versions: {result.release}: installed TF {result.tensorflow or '-'}, Keras {result.keras or '-'} "
          f"{result.error}", flush=True)


def check(result: Result, args) -> None:
    """Phase 2 (under the lock): the compatibility subset in the venv."""
    venv = os.path.join(args.venvs, result.release)
    if not result.error:
        with open(os.path.join(args.venvs, f"{result.release}.log"), "a") as log:
            test(venv, result, os.path.join(args.venvs, f"{result.release}.xml"), log, args.test_timeout,
                 args.lock)
    if not args.keep:
        shutil.rmtree(venv, ignore_errors=True)
    print(f"versions: {result.release}: {len(result.passed)} passed, {len(result.failed)} failed "
          f"{sorted(result.failed)} {result.error} ({result.seconds:.0f} s)", flush=True)


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({model or 'unknown'}), no GPU used"


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain",
                                                                                       "--", "tf_backup", "tests",
                                                                                       "setup.py") else "")


def table(results: List[Result], argv: List[str], started: datetime.datetime, tested: str,
          not_run: Sequence[str] = ()) -> str:
    lines = [
        "# TensorFlow releases tf_backup was checked on",
        "",
        "Written by `.ci/versions.py`: each release in a fresh virtual environment, then the compatibility",
        f"subset of the tests (`pytest -m \"{MARKER}\"`: the core cluster tests, a compiled step, one fault row,",
        "the binary's short run, the README example, the TF1 reference check). Keras is the newest Keras 3",
        "release pip resolves with that TensorFlow unless the command pins one. tf-nightly is watched, not required.",
        "Times are wall times on a shared machine: the tests' from the CPU lock's acquisition, the install's with",
        "pip's cache warm or cold as it happened.",
        "",
        f"- command: `python .ci/versions.py {' '.join(argv)}`",
        f"- machine: {machine()}",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- commit: {tested}",
        "",
        "| TensorFlow | Keras | Python | required | passed | failed | tests' time | install time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r.watched, [int(p) if p.isdigit() else p for p in re.split(r'[.]', r.release)])):
        shown = r.release if r.tensorflow in ("", r.release) else f"{r.release} ({r.tensorflow})"
        failed = r.error or ("; ".join(f"`{t}`: {why}" for t, why in sorted(r.failed.items())) or "none")
        total = len(r.passed) + len(r.failed)
        install = f"{r.install_seconds / 60:.1f} min" if r.install_seconds else "-"  # "-": not measured
        lines.append(f"| {shown} | {r.keras or '-'} | {r.python or '-'} | {'watched' if r.watched else 'yes'} | "
                     f"{len(r.passed)}/{total} | {failed} | {r.seconds / 60:.1f} min | {install} |")
    if not_run:
        lines += ["", f"Not run yet (the run was stopped, or is still going): {', '.join(not_run)}."]
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", nargs="*", default=RELEASES, help="TensorFlow releases that must pass")
    parser.add_argument("--watched", nargs="*", default=[NIGHTLY], help=f"releases in the table only ({NIGHTLY})")
    parser.add_argument("--keras", nargs="*", default=[], metavar="RELEASE=KERAS",
                        help="pin Keras for a release, e.g. 2.16.2=3.3.3 (default: the newest pip resolves)")
    parser.add_argument("--venvs", default="/tmp/tfb_versions", help="where the venvs and logs go")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "versions.md"), help="the markdown table")
    parser.add_argument("--lock", default=None, help="a file to flock around each pytest run (the CPU lock)")
    parser.add_argument("--install_timeout", type=float, default=1200.0, help="seconds for each pip install")
    parser.add_argument("--test_timeout", type=float, default=900.0, help="seconds for each pytest run")
    parser.add_argument("--keep", action="store_true", help="keep the venvs (default: removed after each run)")
    parser.add_argument("--reuse", action="store_true", help="test in a kept venv instead of a fresh one")
    args = parser.parse_args(argv)
    pins = {}
    for item in args.keras:
        release, sep, keras = item.partition("=")
        if not sep or not keras:
            parser.error(f"--keras takes RELEASE=KERAS. Received: {item!r}")
        pins[release] = keras
    started, tested = datetime.datetime.now(datetime.timezone.utc), commit()  # the code as the tests found it
    results = [Result(r, False) for r in args.releases] + [Result(r, True) for r in args.watched if r]
    os.makedirs(args.venvs, exist_ok=True)
    for result in results:  # every install first: pip needs no CPU lock, and a failed one shows at once
        prepare(result, args, pins.get(result.release, ""))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for i, result in enumerate(results):
        check(result, args)
        with open(args.out, "w") as f:  # after each release: a run stopped early keeps what it found
            f.write(table(results[:i + 1], argv, started, tested, not_run=[r.release for r in results[i + 1:]]))
    print(f"versions: table written to {args.out}")
    return 0 if all(r.ok for r in results if not r.watched) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
