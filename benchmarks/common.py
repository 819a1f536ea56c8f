"""Shared pieces of the benchmarks: environment description, medians, tables, failed runs."""

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
        # Code changed since that commit (results aside): the table is not that commit's.
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)benchmarks/results"], capture_output=True, text=True,
                                 check=False).stdout.strip()
        if changed and commit != "unknown":
            commit += " with uncommitted changes"
    except OSError:
        commit = "unknown"
    try:
        load = "load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min) when written".format(*os.getloadavg())
    except OSError:
        load = "load average unknown"
    return [f"# {title}", "", f"- command: `{command}`", f"- machine: {machine()}; {load}",
            f"- date: {datetime.date.today().isoformat()}, commit {commit}", ""]


def _module_name(path: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.getcwd())
    return rel[:-3].replace(os.sep, ".") if rel.endswith(".py") else rel


def synthetic_mlp(strategy, rows: int, hidden: int):
    """(model, x, y): a 40-H-H-10 classifier under `strategy` with SGD, and this worker's random data."""
    import keras  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(strategy.worker_index)
    x = rng.normal(size=(rows, 40)).astype(np.float32)
    y = rng.integers(0, 10, size=rows).astype(np.int32)
    with strategy.scope():
        model = keras.Sequential([keras.Input((40,)), keras.layers.Dense(hidden, activation="relu"),
                                  keras.layers.Dense(hidden, activation="relu"),
                                  keras.layers.Dense(10, activation="softmax")])
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.01)),
                      loss="sparse_categorical_crossentropy", jit_compile=False)
    return model, x, y


def write_markdown(path: str, lines: Sequence[str]) -> None:
    """Writes a result table (making its directory) and prints it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


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


# -- shared by the benchmarks driven by `python -m benchmarks.run` ----------------------------------

def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (linear interpolation) of the values; nan if there are none."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    values = list(values)
    return float(np.quantile(values, q)) if values else float("nan")


def med(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def write_results(out_dir: str, name: str, title: str, notes: Sequence[str], columns: Sequence[str],
                  rows: Sequence[Sequence], csv_columns: Sequence[str], csv_rows: Sequence[Sequence],
                  failures: Sequence[str] = (), argv: Optional[Sequence[str]] = None,
                  extra: Sequence[str] = (), image: Optional[str] = None) -> List[str]:
    """Writes `<out_dir>/<name>.md` (header, notes, table, failed runs) and `<name>.csv`.

    The CSV starts with `#` comment lines naming the command, machine and date, then one
    header row and the numeric rows. Returns the Markdown lines.
    """
    os.makedirs(out_dir, exist_ok=True)
    head = header(title, argv)
    lines = head + list(notes) + [""] + table(columns, rows) + [""]
    lines += list(extra)
    lines.append("Failed runs: " + ("none." if not failures else ""))
    lines += [f"- {f}" for f in failures]
    if image:
        lines += ["", f"![{title}]({os.path.basename(image)})"]
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_csv(os.path.join(out_dir, f"{name}.csv"), head, csv_columns, csv_rows)
    return lines


def write_csv(path: str, head: Sequence[str], columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A CSV of `rows` after `#` lines naming the command, machine and date (from `header`'s lines)."""
    import csv  # pylint: disable=g-import-not-at-top
    with open(path, "w", newline="") as f:
        for line in head[2:5]:
            f.write("# " + line.lstrip("- ") + "\n")
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([f"{x:.6g}" if isinstance(x, float) else x for x in row])


def plot(path: str, panels: Sequence[dict], title: str) -> bool:
    """Line plots side by side, one per panel, saved as a PNG; False (with a notice) without matplotlib.

    A panel is {"xlabel", "ylabel", "series": [(label, xs, ys), ...]} with optional "bars": True
    (then each series is (label, [category, ...], [value, ...]) and one bar group is drawn),
    "hline": y, and "logx": True.
    """
    try:
        import matplotlib  # pylint: disable=g-import-not-at-top
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    except ImportError:
        print(f"notice: matplotlib is not installed (pip install -e '.[bench]'): no plot {path}",
              flush=True)
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        series = panel["series"]
        if panel.get("bars"):
            import numpy as np  # pylint: disable=g-import-not-at-top
            cats = list(series[0][1]) if series else []
            width = 0.8 / max(1, len(series))
            for i, (label, _, ys) in enumerate(series):
                ax.bar(np.arange(len(cats)) + i * width, ys, width, label=label)
            ax.set_xticks(np.arange(len(cats)) + 0.4 - width / 2)
            ax.set_xticklabels(cats)
        else:
            for label, xs, ys in series:
                ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=label)
        if panel.get("hline") is not None:
            ax.axhline(panel["hline"], color="gray", linestyle="--", linewidth=1)
        if panel.get("logx"):
            ax.set_xscale("log")
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def failure_reason(error: BaseException) -> str:
    """One line saying why a cluster run failed: TensorFlow's own words where the task log has them."""
    import re  # pylint: disable=g-import-not-at-top
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    named = [l for l in lines if "not yet implemented" in l] or [
        l for l in lines if re.match(r"^[\w.]*(Error|Exception): ", l)]
    return (named[-1] if named else lines[0] if lines else type(error).__name__)[:300]


def attempt(name: str, label: str, failures: List[str], launch):
    """`launch()`, or None when it fails: then "<label>: <reason>" goes to `failures` and is printed.

    One failed cluster does not end a benchmark; its table lists the failure instead.
    """
    try:
        return launch()
    except Exception as e:  # pylint: disable=broad-except
        msg = failure_reason(e)
        failures.append(f"{label}: {msg}")
        print(f"{name}: {label} FAILED: {msg}", flush=True)
        return None
