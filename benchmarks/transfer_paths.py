"""What one push and one pull of a model-sized tensor cost on each of TensorFlow's two session paths.

    python -m benchmarks.transfer_paths [--params=1e7] [--rounds=3] [--reps=10] [--glibc_malloc]

A client process and one ps task (a `tf.distribute.Server`) on localhost. The ps holds a float32
variable of `--params` elements. Two ways to reach it:

- **master** (what `tf_backup.ps.endpoint.Endpoint` does today): a session on the ps's own target, the
  placeholder and the fetch on the ps. A feed travels inside the RunStep request's protobuf, and a
  fetch inside its response.
- **recv**: a session on the client's own in-process server, the placeholder and the fetched identity
  on the client's device, the `assign_add` and the read on the ps. The graph is cut between the two
  tasks, and the tensor crosses in TensorFlow's worker-to-worker `RecvTensor` call. That call encodes
  large tensors without a protobuf copy.

Per path and op it prints the wall time and the CPU time of the client and of the ps per op (from
`getrusage` and `/proc/<pid>/stat`): the median over `--rounds` rounds of `--reps` ops, the paths
alternating within each round. Pushes run `assign_add`, so both paths apply the same op on the ps.
Both processes run with the malloc settings that `launch_local` gives tf_backup's tasks
(`tf_backup.memory.malloc_env`; the process starts itself again with them), unless
`--glibc_malloc` is given. glibc still maps a block above 32 MiB afresh each time, so a 40 MB tensor is
faulted in page by page on both paths; a ps shard of a 1e7 model over 4 ps tasks is 10 MB.
"""

import argparse
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import time

import numpy as np

PS_DEVICE = "/job:ps/replica:0/task:0/device:CPU:0"
CLIENT_DEVICE = "/job:client/replica:0/task:0/device:CPU:0"
RUN_TIMEOUT_MS = 60_000


def _serve(spec) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.distribute.Server(tf.train.ClusterSpec(spec), job_name="ps", task_index=0, protocol="grpc").join()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _process_cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=1e7, help="float32 elements moved per op")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10, help="ops per path and round")
    parser.add_argument("--glibc_malloc", action="store_true", help="glibc's default malloc settings")
    args = parser.parse_args()
    if not args.glibc_malloc:
        from tf_backup import memory  # pylint: disable=g-import-not-at-top
        missing = memory.malloc_env()
        if missing:  # glibc reads them at start: start again with them (the ps child inherits them)
            os.execve(sys.executable, [sys.executable, "-m", "benchmarks.transfer_paths", *sys.argv[1:]],
                      dict(os.environ, **missing))
    n = int(args.params)
    spec = {"ps": [f"localhost:{_free_port()}"], "client": [f"localhost:{_free_port()}"]}
    ps = multiprocessing.get_context("spawn").Process(target=_serve, args=(spec,), daemon=True)
    ps.start()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.compat.v1.disable_eager_execution()
    server = tf.distribute.Server(tf.train.ClusterSpec(spec), job_name="client", task_index=0, protocol="grpc")
    graph = tf.Graph()
    with graph.as_default():
        with tf.device(PS_DEVICE):
            var = tf.Variable(tf.zeros([n]), name="model")
            master_in = tf.compat.v1.placeholder(tf.float32, [n])
            master_push = var.assign_add(master_in, read_value=False)
            master_pull = tf.identity(var)
        with tf.device(CLIENT_DEVICE):
            recv_in = tf.compat.v1.placeholder(tf.float32, [n])
            sent = tf.identity(recv_in)
        with tf.device(PS_DEVICE):
            recv_push = var.assign_add(sent, read_value=False)
            value = var.read_value()
        with tf.device(CLIENT_DEVICE):
            recv_pull = tf.identity(value)
    data = np.random.default_rng(0).random(n, dtype=np.float32)
    # Every run has a deadline: a ps that died (it did once, under load) fails the run, naming the op,
    # instead of blocking for ever.
    config = tf.compat.v1.ConfigProto(operation_timeout_in_ms=RUN_TIMEOUT_MS)
    master = tf.compat.v1.Session("grpc://" + spec["ps"][0], graph=graph, config=config)
    recv = tf.compat.v1.Session(server.target, graph=graph, config=config)
    master.run(var.initializer)
    cases = {("master", "push"): (master, master_push, {master_in: data}),
             ("recv", "push"): (recv, recv_push, {recv_in: data}),
             ("master", "pull"): (master, master_pull, None),
             ("recv", "pull"): (recv, recv_pull, None)}
    samples = {key: [] for key in cases}
    for _ in range(args.rounds):
        for key, (session, op, feed) in cases.items():
            if not ps.is_alive():
                raise SystemExit(f"transfer_paths: the ps process exited (code {ps.exitcode}) before {key}")
            session.run(op, feed)  # warm: the first run of a path registers its graph
            c0, p0, t0 = _own_cpu(), _process_cpu(ps.pid), time.perf_counter()
            for _ in range(args.reps):
                session.run(op, feed)
            t1, c1, p1 = time.perf_counter(), _own_cpu(), _process_cpu(ps.pid)
            samples[key].append(tuple(1e3 * d / args.reps for d in (t1 - t0, c1 - c0, p1 - p0)))
    ps.terminate()
    malloc = "glibc's default malloc" if args.glibc_malloc else "tf_backup's malloc settings"
    print(f"{n:,} float32 elements ({4 * n / 1e6:.0f} MB) per op, {malloc}; ms per op, median of "
          f"{args.rounds} rounds of {args.reps}")
    print("| op | path | wall ms | client CPU ms | ps CPU ms | CPU ms, both |")
    print("|---|---|---|---|---|---|")
    for (path, op), rows in sorted(samples.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        wall, client, ps_cpu = (statistics.median(r[k] for r in rows) for k in range(3))
        print(f"| {op} | {path} | {wall:.0f} | {client:.0f} | {ps_cpu:.0f} | {client + ps_cpu:.0f} |")


if __name__ == "__main__":
    main()
