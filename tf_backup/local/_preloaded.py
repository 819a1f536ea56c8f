"""A preloading process of local clusters (`python -m tf_backup.local._preloaded LOG_DIR`).

It imports TensorFlow, Keras and tf_backup once, says so, then forks one task
process per request (`tf_backup.local.preload` is the other end). It never runs
a TensorFlow op: a fork is safe only before TensorFlow's runtime has started.

Requests come on stdin, one JSON object a line: {"number", "payload", "log", "env"}
(`env`: the task's whole environment). It answers on stdout, one JSON object a line:
  {"ready": pid}                  the imports are done;
  {"started": number, "pid": n}   request `number`'s task was forked;
  {"exited": pid, "code": c}      a task ended (c negative: killed by signal -c), as
                                  `subprocess.Popen.returncode` says it.
Its stdin closing (the process that started it ended or closed it) ends it, and
every task it forked still running: it leaves no task behind.

Its log goes to LOG_DIR/preload.log; its tasks share its command line, so find a
task's process by the pid file beside its log, not by its command line.
"""

import importlib
import json
import os
import select
import signal
import sys
import traceback

# What every task imports (its `fn`'s own modules come after the fork).
PRELOADED = ("tensorflow", "keras", "tf_backup", "tf_backup.local._task")

# How often the loop reaps its tasks while no request comes (an exit is reported within this).
_POLL_SECONDS = 0.05


def _say(message: dict) -> None:
    # os.write, not print: nothing may sit in a buffer that a forked task would inherit.
    os.write(1, (json.dumps(message) + "\n").encode())


def _run_task(request: dict) -> None:
    """In the forked child: becomes the task (`tf_backup.local._task`), never returns."""
    code = 1
    try:
        os.setsid()  # its own process group, as `start_new_session`: a kill of it kills nothing else
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the request pipe's end is closed in the task
        os.close(null)
        os.environ.clear()  # the task's environment, whole: the same as it would start with
        os.environ.update(request["env"])
        from tf_backup.local import _task  # pylint: disable=g-import-not-at-top
        code = _task.main(request["payload"])
    except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # pylint: disable=protected-access


def _reap(children: set) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _say({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def main() -> int:
    for module in PRELOADED:
        importlib.import_module(module)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher ends it (its stdin), not the terminal
    children: set = set()
    _say({"ready": os.getpid()})
    pending = b""
    try:
        while True:
            readable, _, _ = select.select([0], [], [], _POLL_SECONDS)
            _reap(children)
            if not readable:
                continue
            data = os.read(0, 1 << 16)
            if not data:
                return 0
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    _run_task(request)
                children.add(pid)
                _say({"started": request["number"], "pid": pid})
    finally:
        for pid in children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
