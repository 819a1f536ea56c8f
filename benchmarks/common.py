"""Shared pieces of the benchmarks: environment description, medians, tables."""

import datetime
import os
import platform
import statistics
import subprocess
import sys
from typing import Iterable, List, Optional, Sequence


def machine() -> str:
    """One line: CPU model, cores, memory, Python and TensorFlow versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return (f"{cpu}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}")


def header(title: str, argv: Optional[Sequence[str]] = None) -> List[str]:
    """Markdown lines: title, the command that made the table, machine, date, commit."""
    argv = list(sys.argv if argv is None else argv)
    command = "python -m " + _module_name(argv[0]) + "".join(f" {a}" for a in argv[1:])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return [f"# {title}", "", f"- command: `{command}`", f"- machine: {machine()}",
            f"- date: {datetime.date.today().isoformat()}, commit {commit}", ""]


def _module_name(path: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.getcwd())
    return rel[:-3].replace(os.sep, ".") if rel.endswith(".py") else rel


def median_range(values: Iterable[float], fmt: str = "{:.2f}") -> str:
    """'median (min–max)' of the values, or 'failed' if there are none."""
    values = list(values)
    if not values:
        return "failed"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def table(columns: Sequence[str], rows: Iterable[Sequence]) -> List[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines
