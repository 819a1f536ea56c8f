"""What overlapping a step's pushes and pulls by parts would save: the bare data path, no protocol (issue 31).

    sudo python -m benchmarks.overlap_parts [--rate=1e9] [--parts=1,4,8] [--params=1e7] [--rounds=3]

The question before building it into the protocol: at 1 Gbit/s our float32 step is 1290 ms against a
link model of 740 (100 ms compute + the push, M/B = 320, then the pull, 320), and MWMS's is 870. Pipelined
by parts, the link model is 100 + M/B + M/(C B): 500 ms at C = 4 parts. On this machine's 2 cores the
copies of TensorFlow's session path may eat the gain, so this measures it.

The cell of `benchmarks.bandwidth_cell --ps=4 --variant='{"apply_on_ps": true}'`: 4 ps tasks, 4 workers,
b = 0, 1e7 float32 parameters cut evenly over the ps tasks, 100 ms of simulated compute per step, every
task in its own network namespace (`benchmarks/netem.py`, so root; `--rate=0`: all on localhost,
unshaped). What runs is only the data path, with the ops tf_backup uses, on TensorFlow's session runtime:

- each ps task's shard is cut into C parts, each with its own `ResourceConditionalAccumulator` and
  float32 variable (the master copy, which the workers pull);
- a worker pushes part 0 to every ps task at once, then part 1, ...; a second thread pulls part c
  from every ps task at once as soon as it is applied (a dequeue of a token, then the read, one run);
- an applier (threads in worker 0's process, one per ps task, as the chief's aggregator would) runs on
  each ps task, part after part, one run each: take the part's W gradients (blocking until they are
  in), average, `ResourceApplyGradientDescent`, and a token into every worker's queue on that task.

C = 1 is today's step: the push whole, then (once every shard is applied) the pull whole. Missing
from the bare path, as against tf_backup: the aggregator's decision and control vector, the model's
forward and backward (4 rows), Keras, the py_function. Step time: worker 0's, the mean of
`--steps` steps after 3 warm-up steps; the modes alternate within each of `--rounds` rounds on the
same servers. At the end worker 0 checks that every part holds exactly what its steps applied. CPU: user + system seconds of all the processes per step over the timed steps (each
worker reads its own at its span's ends, worker 0 the ps tasks' too).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent import futures

import numpy as np

RUN_TIMEOUT_MS = 120_000  # a run blocked longer than this fails: a lost task never hangs the benchmark
COMPUTE = 0.1
WARMUP = 3


def _device(p: int) -> str:
    return f"/job:ps/replica:0/task:{p}/device:CPU:0"


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _part_sizes(params: int, ps: int, parts: int):
    """Per ps task, its shard's parts' sizes (even shards, even parts)."""
    shard = [params // ps + (1 if p < params % ps else 0) for p in range(ps)]
    return [[s // parts + (1 if c < s % parts else 0) for c in range(parts)] for s in shard]


def _serve(args) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    spec = json.loads(args.spec)
    tf.distribute.Server(tf.train.ClusterSpec({"ps": spec}), job_name="ps", task_index=args.task,
                         protocol="grpc").join()


class _Mode:
    """The graph of one mode (C parts) in one worker process: per ps task, its sessions' ops."""

    def __init__(self, tf, spec, workers: int, params: int, parts: int, w: int):
        self.parts, self.ps, self.w = parts, len(spec), w
        self.sizes = _part_sizes(params, self.ps, parts)
        self.graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(operation_timeout_in_ms=RUN_TIMEOUT_MS)
        name = f"overlap/c{parts}"
        with self.graph.as_default():
            self.push, self.pull, self.token, self.read, self.init, self.apply = [], [], [], [], [], []
            self.step = tf.compat.v1.placeholder(tf.int64, [])
            for p in range(self.ps):
                with tf.device(_device(p)):
                    queue = lambda k: tf.raw_ops.FIFOQueueV2(  # noqa: E731
                        component_types=[tf.int64], shapes=[[]], capacity=-1, shared_name=f"{name}/q{p}/{k}")
                    mine = queue(w)
                    pushes, pulls, tokens, reads, inits, applies = [], [], [], [], [], []
                    for c, n in enumerate(self.sizes[p]):
                        acc = tf.raw_ops.ResourceConditionalAccumulator(
                            dtype=tf.float32, shape=[n], shared_name=f"{name}/acc{p}/{c}", container="",
                            reduction_type="SUM")
                        var = tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[n], shared_name=f"{name}/var{p}/{c}",
                                                     container="")
                        grad = tf.compat.v1.placeholder(tf.float32, [n])
                        pushes.append((grad, tf.raw_ops.ResourceAccumulatorApplyGradient(
                            handle=acc, local_step=self.step, gradient=grad)))
                        token = tf.raw_ops.QueueDequeueV2(handle=mine, component_types=[tf.int64])
                        tokens.append(token)
                        with tf.control_dependencies(token):
                            pulls.append(tf.raw_ops.ReadVariableOp(resource=var, dtype=tf.float32))
                        reads.append(tf.raw_ops.ReadVariableOp(resource=var, dtype=tf.float32))
                        inits.append(tf.raw_ops.AssignVariableOp(resource=var, value=tf.zeros([n])))
                        taken = tf.raw_ops.ResourceAccumulatorTakeGradient(handle=acc, num_required=workers,
                                                                           dtype=tf.float32)
                        applied = tf.raw_ops.ResourceApplyGradientDescent(
                            var=var, alpha=tf.constant(0.01), delta=taken / float(workers))
                        with tf.control_dependencies([applied]):
                            applies.append(tf.group(*[tf.raw_ops.QueueEnqueueV2(
                                handle=queue(k), components=[tf.constant(c, tf.int64)]) for k in range(workers)]))
                    self.push.append(pushes)
                    self.pull.append(pulls)
                    self.token.append(tokens)
                    self.read.append(reads)
                    self.init.append(inits)
                    self.apply.append(applies)
        self.sessions = [tf.compat.v1.Session(f"grpc://{addr}", graph=self.graph, config=config) for addr in spec]

    def close(self):
        for s in self.sessions:
            s.close()


def _gradients(rng, modes):
    """Per mode, per ps task, per part: the gradient a worker pushes every step (the same each step)."""
    return {c: [[rng.random(n, dtype=np.float32) for n in sizes] for sizes in m.sizes] for c, m in modes.items()}


def _check_values(modes, workers: int, steps: int) -> None:
    """(Worker 0, at the end.) Every part holds -lr x steps x the mean of the workers' gradients, or SystemExit."""
    every = [_gradients(np.random.default_rng(w), modes) for w in range(workers)]
    for c, m in modes.items():
        for p in range(m.ps):
            got = m.sessions[p].run(m.read[p])
            for part, value in enumerate(got):
                want = -0.01 * steps * np.mean([g[c][p][part] for g in every], axis=0)
                if not np.allclose(value, want, rtol=1e-3, atol=1e-6):
                    raise SystemExit(f"overlap_parts: C={c}, ps {p}, part {part}: the applied values are wrong "
                                     f"(max error {np.abs(value - want).max():.3g})")


def _work(args) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.compat.v1.disable_eager_execution()
    spec, w = json.loads(args.spec), args.task
    modes = {c: _Mode(tf, spec, args.workers, int(args.params), c, w) for c in args.parts}
    ps = len(spec)
    ps_pids = json.loads(args.ps_pids) if w == 0 else []
    push_pool, pull_pool = futures.ThreadPoolExecutor(ps), futures.ThreadPoolExecutor(ps)
    # The whole push (a pipelined step's) and the appliers run beside this thread; their results are
    # waited for with a deadline, and a failure or a run past it ends the worker saying which.
    pusher_pool, applier_pool = futures.ThreadPoolExecutor(1), futures.ThreadPoolExecutor(ps)
    rng = np.random.default_rng(w)
    each = lambda fn, pool=pull_pool: list(pool.map(fn, range(ps)))  # noqa: E731
    cpu = lambda: sum(_cpu_seconds(pid) for pid in [os.getpid(), *ps_pids])  # noqa: E731
    grads = _gradients(rng, modes)
    if w == 0:
        for m in modes.values():
            each(lambda p: m.sessions[p].run(m.init[p]))
    # Every worker starts a mode together (the accumulators' takes keep them in step after that).
    out = {c: [] for c in args.parts}
    appliers = []

    def finish(future, what):
        try:
            future.result(timeout=RUN_TIMEOUT_MS / 1e3)
        except futures.TimeoutError:
            raise SystemExit(f"overlap_parts: worker {w}: {what} still running after {RUN_TIMEOUT_MS / 1e3:.0f} s")

    def apply_loop(m, p, steps):
        for _ in range(steps):
            for c in range(m.parts):
                m.sessions[p].run(m.apply[p][c])
    steps_per_mode = WARMUP + args.steps
    for r in range(args.rounds):
        for c in args.parts:
            m, g = modes[c], grads[c]
            if w == 0:
                appliers = [applier_pool.submit(apply_loop, m, p, steps_per_mode) for p in range(ps)]
            step0 = r * steps_per_mode  # the accumulators' step: takes so far in this mode
            times, cpus = [], []
            for i in range(steps_per_mode):
                time.sleep(COMPUTE)
                tag = step0 + i

                def push_all(m=m, g=g, tag=tag):
                    for part in range(m.parts):
                        each(lambda p: m.sessions[p].run(m.push[p][part][1], {m.push[p][part][0]: g[p][part],
                                                                             m.step: tag}), push_pool)
                if c == 1:  # today's step: push whole, then every shard applied, then pull whole
                    push_all()
                    each(lambda p: m.sessions[p].run(m.token[p][0]))
                    each(lambda p: m.sessions[p].run(m.read[p][0]))
                else:
                    pusher = pusher_pool.submit(push_all)
                    for part in range(m.parts):
                        each(lambda p: m.sessions[p].run(m.pull[p][part]))
                    finish(pusher, f"the push of step {tag} (C = {c})")
                times.append(time.monotonic())
                cpus.append(cpu())
            if w == 0:
                for p, applier in enumerate(appliers):
                    finish(applier, f"the applier of ps {p} (C = {c}, round {r})")
            out[c].append((times[WARMUP - 1], times[-1], cpus[-1] - cpus[WARMUP - 1]))
    if w == 0:  # every step of every mode applied exactly the workers' mean gradient once
        _check_values(modes, args.workers, args.rounds * steps_per_mode)
    print(json.dumps({"worker": w, "spans": out}), flush=True)
    for m in modes.values():
        m.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1e9, help="bit/s per link and direction (0: localhost)")
    parser.add_argument("--parts", default="1,4,8", help="comma-separated C values (1 = today's step)")
    parser.add_argument("--params", type=float, default=1e7)
    parser.add_argument("--ps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--ps_pids", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.parts = [int(x) for x in str(args.parts).split(",")]
    if args.serve:
        return _serve(args)
    if args.work:
        return _work(args)
    if any(c < 1 for c in args.parts) or args.ps < 1 or args.workers < 1 or args.steps < 1 or args.rounds < 1:
        raise SystemExit(f"overlap_parts: --parts, --ps, --workers, --steps, --rounds must be >= 1: {vars(args)}")
    from benchmarks import netem  # pylint: disable=g-import-not-at-top
    from tf_backup import memory  # pylint: disable=g-import-not-at-top
    tasks = [f"ps-{p}" for p in range(args.ps)] + [f"worker-{w}" for w in range(args.workers)]
    net = netem.emulated(tasks, args.rate) if args.rate > 0 else netem.Loopback(tasks, "--rate=0")
    env = dict(os.environ, **memory.malloc_env())
    procs = []
    try:
        if net.shaped:
            spec = [f"{net.hosts[f'ps-{p}']}:2222" for p in range(args.ps)]
        else:
            spec = [f"localhost:{_free_port()}" for _ in range(args.ps)]
        common = ["--spec", json.dumps(spec), "--params", str(args.params), "--workers", str(args.workers),
                  "--steps", str(args.steps), "--rounds", str(args.rounds), "--parts",
                  ",".join(map(str, args.parts))]
        me = [sys.executable, "-m", "benchmarks.overlap_parts"]
        for p in range(args.ps):
            procs.append(subprocess.Popen(net.exec_argv(f"ps-{p}", me + ["--serve", "--task", str(p)] + common),
                                          env=env))
        pids = ["--ps_pids", json.dumps([pr.pid for pr in procs])]
        workers = [subprocess.Popen(net.exec_argv(f"worker-{w}", me + ["--work", "--task", str(w)] + common + pids),
                                    env=env, stdout=subprocess.PIPE, text=True) for w in range(args.workers)]
        procs += workers
        outs = [wk.communicate(timeout=900)[0] for wk in workers]
        if any(wk.returncode for wk in workers):
            raise SystemExit(f"overlap_parts: a worker failed: {[wk.returncode for wk in workers]}")
        results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
        for pr in procs:
            try:
                pr.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        net.close()
    gbit = args.rate / 1e9
    mbytes = 4 * args.params
    print(f"{int(args.params):,} float32 parameters, {args.ps} ps tasks, {args.workers} workers, b = 0, "
          f"{1e3 * COMPUTE:.0f} ms compute; "
          + (f"{gbit:g} Gbit/s per host each way" if args.rate > 0 else "localhost, unshaped"))
    link = 8 * mbytes / args.rate * 1e3 if args.rate > 0 else 0.0
    print("| parts C | ms/step per round | median | link model ms | CPU ms/step, all processes (median) |")
    print("|---|---|---|---|---|")
    for c in args.parts:
        spans = results[0]["spans"][str(c)]
        per = [1e3 * (b - a) / args.steps for a, b, _ in spans]
        cpu = [1e3 * sum(r["spans"][str(c)][k][2] for r in results) / args.steps for k in range(len(spans))]
        model = 1e3 * COMPUTE + (2 * link if c == 1 else link + link / c) if link else float("nan")
        print(f"| {c} | {', '.join(f'{x:.0f}' for x in per)} | {statistics.median(per):.0f} | {model:.0f} | "
              f"{statistics.median(cpu):.0f} |")


if __name__ == "__main__":
    main()
