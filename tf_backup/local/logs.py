"""The tasks' log files, read back: TensorFlow's chatter left out, a tail for errors, an echo to stdout."""

import sys
from typing import Optional

_NOISE = ("I0000 ", "W0000 ", "WARNING: All log messages", "cuda", "oneDNN", "cpu_feature_guard",
          "rebuild TensorFlow", "computation_placer", "E0000 00:00")


def is_noise(line: str) -> bool:
    """TensorFlow's start-up chatter, left out of log tails and echoes."""
    return any(n in line for n in _NOISE)


def tail(path: str, lines: int = 40) -> str:
    """The last `lines` lines of a log, without the chatter; "(no log)" or "(empty log)" if none."""
    try:
        with open(path, errors="replace") as f:
            text = f.readlines()
    except OSError:
        return "(no log)"
    kept = [line for line in text if not is_noise(line)]
    return "".join(kept[-lines:]).rstrip() or "(empty log)"


class Echo:
    """Copies the complete new lines of a task's log to this process's stdout."""

    def __init__(self, path: Optional[str], offset: int = 0):
        self._path = path
        self._offset = offset  # where this cluster's lines start (a log is appended to, run after run)
        self._partial = ""

    def poll(self, final: bool = False) -> None:
        if self._path is None:
            return
        try:
            with open(self._path, errors="replace") as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except OSError:
            return
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = "" if final else lines.pop()
        out = [line for line in lines if line and not is_noise(line)]
        if out:
            sys.stdout.write("\n".join(out) + "\n")
            sys.stdout.flush()
