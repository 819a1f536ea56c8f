"""Entry point of one task process of `launch_local` (`python -m tf_backup._task PAYLOAD`).

The process's stdout and stderr already go to the task's log file. The payload
is a pickle written by `LocalCluster`: the multiprocessing "spawn" preparation
data (sys.path, the parent's main module, so `fn` can be found), the task's
role ("serve": a ps task running `tf_backup.serve()`, or "fn"), and `fn` with
its arguments. The result is pickled next to the payload.
"""

import faulthandler
import multiprocessing.spawn
import os
import pickle
import sys
import traceback


def main(payload_path: str) -> int:
    faulthandler.enable(all_threads=True)  # a crash in TensorFlow's C++ still leaves Python stacks in the log
    with open(payload_path, "rb") as f:
        prep, rest = pickle.load(f)
    multiprocessing.spawn.prepare(prep)
    role, fn, args, kwargs, result_path = pickle.loads(rest)
    failed = False
    try:
        if role == "serve":
            from tf_backup import server  # pylint: disable=g-import-not-at-top
            result = server.serve(**kwargs)
        else:
            result = fn(*args, **kwargs)
        with open(result_path + ".tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(result_path + ".tmp", result_path)
    except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
        failed = True
    finally:
        if "tf_backup.extended" in sys.modules:
            try:
                sys.modules["tf_backup.extended"].shutdown_all(failed=failed)
            except BaseException:  # pylint: disable=broad-except
                traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: a live gRPC server can hold it up
