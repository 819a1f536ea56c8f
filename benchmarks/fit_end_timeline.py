"""Where the end of a time-to-accuracy run goes: one `sync_backup` mode's runs with a timeline per task kept.

Issue 21 asked to reproduce one run of the full time-to-accuracy benchmark (b = 2, 6 workers)
that took 147.0 s of a 120 s budget (benchmarks/results/full/time_to_accuracy.md). This runs
that mode's runs (the same config, seed and stragglers) and writes, per run, every task's log and
`timeline.txt`: wall-clock times of each worker's `end_round`, `wait_for_round_end`,
`wait_for_round_closed` (begin, end), of every sleep over 1 s (the straggler delays), and of its
return. One cluster at a time; about 3 minutes a run on 2 cores.

    python -m benchmarks.fit_end_timeline --runs=3 --backups=2 --out_dir=/tmp/fit_end

`--silent_worker=k` makes the likely cause happen: worker k reaches ps 0 through a
`tests.relay.Relay` whose connections go silent when its `end_round` begins (a connection that
stops answering, as in the one run that stalled). `--ps_restart_timeout` is passed on.
"""

import argparse
import functools
import json
import os
import time


def timed_worker(cfg, log_path, silent_worker=-1):
    """`accuracy_workload.accuracy_worker` with the end of the fit and the long sleeps written to
    `log_path`."""
    import tf_backup.worker.client as worker_lib  # pylint: disable=g-import-not-at-top
    from benchmarks import accuracy_workload  # pylint: disable=g-import-not-at-top
    task = os.environ["TF_BACKUP_TASK"]
    from tests.relay import relay_ps0_in_tf_config  # pylint: disable=g-import-not-at-top
    relay = relay_ps0_in_tf_config() if task == f"worker-{silent_worker}" else None

    def note(what):
        with open(log_path, "a") as f:
            f.write(f"{time.time():.3f} {task} {what}\n")

    def timed(name):
        method = getattr(worker_lib.WorkerClient, name)

        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            note(f"{name} begin")
            if relay is not None and name == "end_round":
                relay.silence_all()
                note("connection to ps 0 silent")
            try:
                return method(self, *args, **kwargs)
            finally:
                note(f"{name} end")
        setattr(worker_lib.WorkerClient, name, wrapper)

    for name in ["end_round", "wait_for_round_end", "wait_for_round_closed"]:
        timed(name)
    sleep = time.sleep

    def noted_sleep(seconds):
        if seconds > 1.0:
            note(f"sleep {seconds:.1f}")
        sleep(seconds)

    time.sleep = noted_sleep  # this task process only
    note("start")
    out = accuracy_workload.accuracy_worker(cfg)
    note("return")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backups", type=int, default=2, help="b; N = 4, so 4 + b workers")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--out_dir", default="/tmp/fit_end")
    parser.add_argument("--silent_worker", type=int, default=-1,
                        help="this worker's connection to ps 0 goes silent at the end of its fit (-1: none)")
    parser.add_argument("--ps_restart_timeout", type=float, default=0.0)
    args = parser.parse_args()
    import tf_backup  # pylint: disable=g-import-not-at-top

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "mnist1d.json")) as f:
        base = json.load(f)
    for i in range(args.runs):
        log_dir = os.path.join(args.out_dir, f"run{i}")
        os.makedirs(log_dir, exist_ok=True)
        cfg = dict(base, mode="sync_backup", num_backup_workers=args.backups, seconds=args.seconds, steps=100000,
                   reps=1, every_seconds=4.0, straggler="pareto:1.5:0.02", seed=0,
                   ps_restart_timeout=args.ps_restart_timeout)
        start = time.time()
        out = tf_backup.launch_local(timed_worker, 4 + args.backups, timeout=900, log_dir=log_dir,
                                     args=(cfg, os.path.join(log_dir, "timeline.txt"), args.silent_worker))
        curve = out[0]["runs"][0]
        print(f"run {i}: wall {curve[-1][0]:.1f} s, steps {curve[-1][1]}, accuracy {curve[-1][2]:.3f}, "
              f"cluster {time.time() - start:.0f} s; timeline in {log_dir}/timeline.txt", flush=True)


if __name__ == "__main__":
    main()
