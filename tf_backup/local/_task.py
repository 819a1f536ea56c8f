"""Entry point of one task process of `launch_local` (`python -m tf_backup.local._task PAYLOAD`).

The process's stdout and stderr already go to the task's log file. The payload
is a pickle written by `LocalCluster`: the multiprocessing "spawn" preparation
data (sys.path, the parent's main module, so `fn` can be found), the task's
role ("serve": a ps task running `tf_backup.serve()`, or "fn"), and `fn` with
its arguments. The result is pickled next to the payload; an error, as JSON
beside it (`<result>.error`, `error_record`), for `LocalCluster` to say which
task's failure caused the others'.
"""

import faulthandler
import json
import multiprocessing.spawn
import os
import pickle
import sys
import traceback


def error_record(error: BaseException) -> dict:
    """What `LocalCluster` reads of a task's error: its type, message, and whether the chief ended it.

    `chief_unavailable`: a `ChiefUnavailableError`, which a task raises when the
    chief aborted the job or went silent: the chief's failure, if any, is the cause.
    """
    errors = sys.modules.get("tf_backup.errors")  # loaded if tf_backup ran; not imported for this
    return {"type": f"{type(error).__module__}.{type(error).__qualname__}",
            "message": str(error)[:2000],
            "chief_unavailable": errors is not None and isinstance(error, errors.ChiefUnavailableError)}


def main(payload_path: str) -> int:
    faulthandler.enable(all_threads=True)  # a crash in TensorFlow's C++ still leaves Python stacks in the log
    with open(payload_path, "rb") as f:
        prep, rest = pickle.load(f)
    multiprocessing.spawn.prepare(prep)
    role, fn, args, kwargs, result_path = pickle.loads(rest)
    failed = False
    try:
        if role == "serve":
            from tf_backup.ps import server  # pylint: disable=g-import-not-at-top
            result = server.serve(**kwargs)
        else:
            result = fn(*args, **kwargs)
        with open(result_path + ".tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(result_path + ".tmp", result_path)
    except BaseException as e:  # pylint: disable=broad-except
        traceback.print_exc()
        failed = True
        with open(result_path + ".error", "w") as f:
            json.dump(error_record(e), f)
    finally:
        if "tf_backup.frontend.extended" in sys.modules:
            try:
                sys.modules["tf_backup.frontend.extended"].shutdown_all(failed=failed)
            except BaseException:  # pylint: disable=broad-except
                traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: a live gRPC server can hold it up
