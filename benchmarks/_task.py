"""One task of `benchmarks.launcher.launch` (`python -m benchmarks._task PAYLOAD`)."""

import faulthandler
import importlib
import os
import pickle
import sys
import traceback


def main(payload_path: str) -> int:
    faulthandler.enable(all_threads=True)
    with open(payload_path, "rb") as f:
        module, name, args, result_path = pickle.load(f)
    try:
        fn = importlib.import_module(module)
        for part in name.split("."):
            fn = getattr(fn, part)
        result = fn(*args)
        with open(result_path + ".tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(result_path + ".tmp", result_path)
        return 0
    except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a live gRPC server can hold up interpreter teardown
