"""Programs of launch_local's and LocalCluster's own tests (test_launch.py): tasks that fail, sleep,
or report their environment.
"""

import time

from programs import common


def fail_on_worker_1():
    import os  # pylint: disable=g-import-not-at-top
    if os.environ["TF_BACKUP_TASK"] == "worker-1":
        raise RuntimeError("worker 1 broke on purpose")
    time.sleep(120)


def fail_until_started(times: int, marker_dir: str):
    """Fails (exit 1) in its first `times` processes of each task, then returns its task name and start count."""
    import os  # pylint: disable=g-import-not-at-top
    path = os.path.join(marker_dir, os.environ["TF_BACKUP_TASK"] + ".starts")
    starts = (int(open(path).read()) if os.path.exists(path) else 0) + 1
    common.write_atomic(path, str(starts))
    with open(path + ".times", "a") as f:  # when each process ran, for the supervisor's back-off
        f.write(f"{time.time()}\n")
    if starts <= times:
        raise RuntimeError(f"start {starts} fails on purpose")
    return os.environ["TF_BACKUP_TASK"], starts


def fail_after_the_chief_returned(seconds: float):
    """The chief returns at once; every other worker fails `seconds` later."""
    import os  # pylint: disable=g-import-not-at-top
    if os.environ["TF_BACKUP_TASK"] != "worker-0":
        time.sleep(seconds)
        raise RuntimeError("fails after the chief returned")
    return "chief"


def environment_variable(name: str):
    """The task process's value of environment variable `name` (None: unset)."""
    import os  # pylint: disable=g-import-not-at-top
    return os.environ.get(name)


def sleep_forever():
    time.sleep(600)


def chief_fails_and_exits_late(step_timeout: float, exit_after: float):
    """2 workers, b = 0: worker 1 leaves at once, so the chief's fit fails with StepTimeoutError.

    The chief then aborts the job, which ends its ps task at once, and exits
    `exit_after` seconds later, as a chief whose teardown takes a while (a large
    checkpoint): the ps task fails first, because of the chief's failure.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy, model, (x, y) = common.two_worker_regression(step_timeout)
    if strategy.worker_index == 1:
        return {"worker": 1}
    try:
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH), epochs=1, verbose=0, shuffle=False)
    except tf_backup.errors.StepTimeoutError:
        tf_backup.frontend.extended.shutdown_all(failed=True)  # aborts the job: the ps task exits now
        time.sleep(exit_after)
        raise
    return {"worker": 0}


def fail_on_workers(failing):
    """Workers whose index is in `failing` raise at once; the others return their task name."""
    import os  # pylint: disable=g-import-not-at-top
    task = os.environ["TF_BACKUP_TASK"]
    if int(task.rsplit("-", 1)[1]) in failing:
        raise RuntimeError(f"{task} broke on purpose")
    return task


def process_identity():
    """This task process's pid, parent, process group and task variables."""
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    return {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "task": os.environ["TF_BACKUP_TASK"],
            "tf_config_task": json.loads(os.environ["TF_CONFIG"])["task"],
            "marker": os.environ.get("TFB_TEST_MARKER"), "log_dir": os.environ["TF_BACKUP_LOG_DIR"]}


def return_fail_or_sleep():
    """worker-0 returns, worker-1 raises (exit code 1), any other task sleeps until it is killed."""
    import os  # pylint: disable=g-import-not-at-top
    task = os.environ["TF_BACKUP_TASK"]
    if task == "worker-1":
        raise RuntimeError("worker 1 broke on purpose")
    if task != "worker-0":
        time.sleep(600)
    return task
