"""What the benchmark clusters run in each worker process (module-level, so tasks can import it).

Every worker trains a Keras MLP on its own random data. Compute is simulated by a sleep in a
Keras callback before each batch, on top of the (small) real step, so the figures do not depend
on how the processes share this machine's cores. Straggler delays come from a seeded
`tf_backup.sim.stragglers` model keyed by (worker, global step of the parameters the batch is computed
on), so every b sees the same delays at the same global step.

Every worker turns Python's garbage collector off (`keep_garbage`) before its first fit. Each
Keras `fit` under a `tf.distribute` strategy leaves ~1,100 objects in reference cycles, among them
the fit's input iterator (TF's `MultiDeviceIterator`); in our workers with stragglers, destroying
one stalled the collecting worker for 0.2-30 s (in steps of about 10 s), whenever the collector
happened to run: inside a later timed fit, or at the start of one. Kept alive, they cost a few MB
per fit. Tasks end with `os._exit`, so nothing is destroyed at exit either (WORKSPACE_NOTES).
"""

import gc
import math
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import numpy as np

INPUT_DIM = 40
CLASSES = 10


def hidden_for_params(params: float, depth: int = 2) -> int:
    """Width h of a 40-h-...-h-10 MLP (`depth` hidden layers) with about `params` parameters."""
    # params = (40 + 1) h + (depth - 1) (h + 1) h + (h + 1) 10 = (depth - 1) h^2 + (50 + depth) h + 10
    a, b = depth - 1, 50 + depth
    if a == 0:
        return max(2, int(round((params - 10) / b)))
    return max(2, int(round((-b + math.sqrt(b ** 2 + 4 * a * (params - 10))) / (2 * a))))


def mlp_params(hidden: int, depth: int = 2) -> int:
    return (depth - 1) * hidden * hidden + (50 + depth) * hidden + 10


def mlp_variable_sizes(hidden: int, depth: int = 2) -> List[int]:
    """The sizes of `build_mlp`'s trainable variables, in its order (kernel, bias per layer)."""
    out = [INPUT_DIM * hidden, hidden]
    for _ in range(depth - 1):
        out += [hidden * hidden, hidden]
    return out + [hidden * CLASSES, CLASSES]


def build_mlp(keras, hidden: int, seed: int = 0, depth: int = 2):
    """A 40-h-...-h-10 classifier with `depth` hidden ReLU layers of width h."""
    init = keras.initializers.GlorotUniform(seed=seed)
    return keras.Sequential(
        [keras.Input((INPUT_DIM,))]
        + [keras.layers.Dense(hidden, activation="relu", kernel_initializer=init) for _ in range(depth)]
        + [keras.layers.Dense(CLASSES, activation="softmax", kernel_initializer=init)])


def random_data(worker: int, rows: int = 1024):
    rng = np.random.default_rng(1000 + worker)
    x = rng.normal(size=(rows, INPUT_DIM)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=rows).astype(np.int32)
    return x, y


def keep_garbage() -> None:
    """Turns the garbage collector off in this worker process (see the module docstring)."""
    gc.disable()


def make_sleep_callback(keras, worker: int, compute: float, straggler: Optional[str], seed: int,
                        step_source, strategy=None):
    """A callback sleeping `compute + delay(worker, step)` before each batch.

    `step_source()` gives the global step of the parameters at the start of a fit; afterwards the
    step comes from the batch logs (`global_step`, the step of the parameters just pulled). With
    `cancel` set (and a tf_backup `strategy`), the sleep ends early when the batch is superseded
    (`BackupWorkerStrategy.sleep_unless_superseded`): with "cancel" the batch is cancelled (not
    pushed); with "restart" the worker pulls the new step (`restart_superseded`) and sleeps that
    step's delay before the batch, which is then computed and pushed for the new step.
    """
    from tf_backup.sim import stragglers  # pylint: disable=g-import-not-at-top
    model = stragglers.parse(straggler or "none", seed=seed)

    class SleepCallback(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.active = True
            self.cancel = False
            self.param_step = 0
            self.slept = 0.0
            self.cut = 0
            self.first_batch = None  # time.time() at this fit's first batch
            self.gate = None  # called at each fit's first batch, before its sleep

        def on_train_begin(self, logs=None):
            self.first_batch = None
            step = step_source()
            if step is not None:
                self.param_step = step

        def on_train_batch_begin(self, batch, logs=None):
            if self.first_batch is None:
                if self.gate is not None:
                    self.gate()
                self.first_batch = time.time()
            if not self.active:
                return
            seconds = compute + model.delay(worker, self.param_step, compute)
            if self.cancel and strategy is not None:
                while strategy.sleep_unless_superseded(seconds):
                    self.cut += 1
                    if self.cancel != "restart":
                        break
                    step = strategy.restart_superseded()
                    if step is None:
                        break  # the round stopped: the batch ends the fit at once
                    self.param_step = step
                    seconds = compute + model.delay(worker, self.param_step, compute)
            elif seconds > 0:
                time.sleep(seconds)
                self.slept += seconds

        def on_train_batch_end(self, batch, logs=None):
            if logs and "global_step" in logs:
                self.param_step = int(logs["global_step"])
            else:
                self.param_step += 1

    return SleepCallback()


class FitBarrier:
    """A barrier of every worker of a tf_backup cluster, on the ps: `wait` returns once every worker called it.

    Made by every worker after the first optimizer is built (the chief creates the shared counter
    on ps 0, the others attach to it). Each `wait` is the next round of the barrier: this worker
    marks it reached, then polls until every worker has.

    With b >= 1 the other workers make steps without any one of them; a worker let loose before the
    others would run part of the round with fewer workers (and the chief would measure a short or
    empty window). Called in a fit's first batch, after Keras made the fit's input iterator (0.1-0.5 s
    per worker on 2 shared cores), it starts every worker's first batch within milliseconds.
    """

    def __init__(self, strategy, timeout: float = 300.0):
        from tf_backup.ps import accumulators  # pylint: disable=g-import-not-at-top
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        ext = strategy.extended
        info = ext.cluster
        self.w, self.timeout, self.rounds = info.worker_index, timeout, 0
        job_id = ext.monitor.job_id
        self.var = accumulators.SharedVariable(f"benchmarks/{job_id}/barrier", tf.int64, [info.num_workers],
                                               ext.endpoints.of(info.ps[0]))
        if info.is_chief:
            self.var.assign(np.zeros([info.num_workers], np.int64))
        else:
            self._poll(self.var.is_initialized, "the chief to create the barrier")

    def _poll(self, done, what) -> None:
        start = time.monotonic()
        while not done():
            if time.monotonic() - start > self.timeout:
                raise TimeoutError(f"worker {self.w} waited {self.timeout:.0f} s for "
                                   f"{what() if callable(what) else what}")
            time.sleep(0.002)

    def wait(self) -> None:
        self.rounds += 1
        self.var.scatter_max([self.w], [self.rounds])
        self._poll(lambda: self.var.read().min() >= self.rounds,
                   lambda: f"every worker at barrier round {self.rounds} (reached: {self.var.read().tolist()})")


def tf_backup_worker(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """One worker of a tf_backup run: a warm-up fit, then `reps` timed fits of `steps` batches.

    cfg: num_backup_workers, asynchronous, hidden, batch, compute, straggler, seed, steps, reps,
    warmup, policies (straggler policies, each run `reps` times in turn: "finish", a late worker
    finishes its stale batch; "cancel", its sleep is cut short when the step moves on and the batch
    is not pushed; "restart", the same batch starts afresh on the new step). The chief
    returns, per rep, the policy, the global steps it covered and its wall time, the step history
    (step, taken, end_time) and the gradient counts.
    """
    keep_garbage()
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=cfg.get("num_backup_workers", 0),
                                              asynchronous=cfg.get("asynchronous", False),
                                              step_timeout=300.0)
    w = strategy.worker_index

    def global_step():
        try:
            return strategy.stats()["global_step"]
        except ValueError:
            return None

    x, y = random_data(w)
    with strategy.scope():
        model = build_mlp(keras, cfg["hidden"], seed=cfg.get("seed", 0))
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.01)),
                      loss="sparse_categorical_crossentropy", jit_compile=False)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(cfg.get("batch", 32)).repeat()
    sleeper = make_sleep_callback(keras, w, cfg.get("compute", 0.0), cfg.get("straggler"),
                                  cfg.get("seed", 0), global_step, strategy=strategy)
    sleeper.active = False
    model.fit(dataset, epochs=1, steps_per_epoch=cfg.get("warmup", 3), verbose=0, callbacks=[sleeper])
    strategy.wait_for_fit_end()
    # Each timed fit starts at a barrier in its first batch: every worker then starts its first
    # sleep within milliseconds of the others.
    sleeper.gate = FitBarrier(strategy).wait
    sleeper.active = True
    reps = []
    for _ in range(cfg["reps"]):
        for policy in cfg.get("policies", ["finish"]):
            sleeper.cancel = policy if policy in ("cancel", "restart") else False
            start_step = global_step()
            start, cpu = time.monotonic(), time.process_time()
            model.fit(dataset, epochs=1, steps_per_epoch=cfg["steps"], verbose=0, callbacks=[sleeper])
            strategy.wait_for_fit_end()  # a worker late in its long sleep must not run into the next rep
            reps.append({"policy": policy, "start_step": start_step, "end_step": global_step(),
                         "wall": time.monotonic() - start, "cpu": time.process_time() - cpu,
                         "first_batch": sleeper.first_batch})
    if not strategy.is_chief:
        return {"reps": reps}
    history = [(r.step, r.taken, r.end_time) for r in strategy.step_history()]
    return {"reps": reps, "history": history, "stats": strategy.stats()}


def step_durations(history: List[tuple], start_step: int, steps: int,
                   all_in: Optional[float] = None) -> Dict[int, float]:
    """{step s: seconds from step s-1's publish to step s's} for the steady steps of one rep.

    Leaves out the rep's first step (it holds the fit's start-up) and everything from step
    `start_step + steps - 1` on (workers end their fit at different times). With `all_in` (a
    `time.time()`: when the last worker began its fit's first batch), also the steps that began
    before it, which the late workers could not take part in.
    """
    ends = {s: t for s, _, t in history}
    out = {}
    for s in range(start_step + 1, start_step + steps - 1):
        if s in ends and s - 1 in ends and (all_in is None or ends[s - 1] >= all_in):
            out[s] = ends[s] - ends[s - 1]
    return out


def simulate_protocol(delay, n: int, workers: int, compute: float, start_step: int, num_steps: int):
    """Publish times of a zero-overhead replay of the protocol, with stragglers that finish.

    The order-statistic ideal assumes every worker starts every step afresh. In tf_backup (as in
    TF1) a late worker is not cancelled: it finishes its stale batch, pushes a gradient that is
    dropped, and only then starts on the current step, so a long stall keeps it out of the next
    steps too. This replays exactly that (`benchmarks.scale_sim.sync_steps`) with no communication
    cost. Returns {step: publish time}, time 0 = all workers start `start_step`.
    """
    import itertools  # pylint: disable=g-import-not-at-top

    from benchmarks import scale_sim  # pylint: disable=g-import-not-at-top

    steps = scale_sim.sync_steps(delay, workers, n, compute, comm=0.0, start_step=start_step)
    return {s.step: s.published for s in itertools.islice(steps, num_steps)}


def cluster_task_pids() -> Optional[Dict[str, int]]:
    """{task name: pid} of every task process of this process's local cluster.

    Tasks of a `tf_backup.LocalCluster` run `python -m tf_backup.local._task <log dir>/<task>.payload`:
    the processes whose command line names this process's log dir, by task name ("ps-0",
    "worker-1", ...). None where there is no /proc or this process is not such a task.
    """
    import os  # pylint: disable=g-import-not-at-top
    try:
        with open("/proc/self/cmdline", "rb") as f:
            own = [a.decode() for a in f.read().split(b"\0") if a.endswith(b".payload")]
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    if not own:
        return None
    log_dir = os.path.dirname(own[0])
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue  # the process ended meanwhile
        payload = [a for a in args if a.endswith(".payload") and os.path.dirname(a) == log_dir]
        if payload:
            out[os.path.basename(payload[0])[:-len(".payload")]] = int(pid)
    return out


def cluster_cpu_seconds(pids: Optional[Dict[str, int]] = None) -> Optional[Dict[str, float]]:
    """CPU seconds (user + system) used so far by each task process of this process's local cluster.

    None where there is no /proc or this process is not a task (`cluster_task_pids`).
    """
    import os  # pylint: disable=g-import-not-at-top
    pids = cluster_task_pids() if pids is None else pids
    if pids is None:
        return None
    try:
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    out = {}
    for task, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        out[task] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cluster_net_bytes(pids: Optional[Dict[str, int]] = None) -> Optional[Dict[str, tuple]]:
    """{task: (bytes sent, bytes received) so far} on each task's emulated link (`benchmarks.netem`).

    The kernel's counters of `eth0` in each task process's network namespace, from
    /proc/<pid>/net/dev; tasks without an eth0 are left out, None where this process is not a
    task. Only for tasks placed by netem: a task in the root namespace would read this machine's
    own eth0 (and on loopback every task shares `lo`).
    """
    from benchmarks import netem  # pylint: disable=g-import-not-at-top
    pids = cluster_task_pids() if pids is None else pids
    if pids is None:
        return None
    out = {}
    for task, pid in pids.items():
        c = netem.proc_net_dev(pid)
        if c is not None:
            out[task] = (c.tx_bytes, c.rx_bytes)
    return out


def make_step_timer(keras, cpu_window: Optional[int] = None, net: bool = False):
    """A callback recording `time.monotonic()` at the end of every batch.

    With `cpu_window` (the fit's batches), it also reads `cluster_cpu_seconds()` at the end of
    batch 1 and of batch `cpu_window - 2`, the span `steady_step_times` keeps: `cpu` is then
    {task: CPU seconds per batch over that span} (None if unavailable). With `net` too,
    `cluster_net_bytes()` at the same two points: `net` is then {task: (bytes sent, bytes
    received) per batch} on each task's emulated link (empty on loopback).
    """

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []
            self.steps = []  # the global step after each batch (tf_backup's logs; else the batch count)
            self.cpu = None
            self.net = None
            self._cpu_start = None
            self._net_start = None
            self._pids = None

        def on_train_begin(self, logs=None):
            # With `net`, the task processes are found once per fit (they do not change), so that
            # each read of the links' counters comes within a millisecond of its batch end: at the
            # same point of every step, whatever the other tasks are sending then.
            self._pids = cluster_task_pids() if net and cpu_window else None

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.monotonic())
            self.steps.append(int((logs or {}).get("global_step", batch + 1)))
            if cpu_window is None or cpu_window < 4:
                return
            if batch == 1:
                pids = self._pids if self._pids is not None else cluster_task_pids()
                self._net_start = cluster_net_bytes(pids) if net else None
                self._cpu_start = cluster_cpu_seconds(pids)
            elif batch == cpu_window - 2 and self._cpu_start is not None:
                pids = self._pids if self._pids is not None else cluster_task_pids()
                n = cpu_window - 3
                if self._net_start is not None:
                    end = cluster_net_bytes(pids) or {}
                    self.net = {k: ((end[k][0] - v[0]) / n, (end[k][1] - v[1]) / n)
                                for k, v in self._net_start.items() if k in end}
                end = cluster_cpu_seconds(pids) or {}
                self.cpu = {k: (end[k] - v) / n for k, v in self._cpu_start.items() if k in end}

    return StepTimer()


def make_link_reader(keras, window: int):
    """A callback reading this process's own link counters (`benchmarks.netem`: eth0 of its namespace).

    At the end of batch 1 and of batch `window - 2` (the span `make_step_timer` keeps): `net` is
    then (bytes sent, bytes received) per batch; None without such a link. Read at this worker's
    own batch ends, its push and pull of each step are inside the span whole.
    """
    import os  # pylint: disable=g-import-not-at-top

    from benchmarks import netem  # pylint: disable=g-import-not-at-top

    class LinkReader(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.net = None
            self._start = None

        def on_train_batch_end(self, batch, logs=None):
            if window < 4:
                return
            if batch == 1:
                self._start = netem.proc_net_dev(os.getpid())
            elif batch == window - 2 and self._start is not None:
                end = netem.proc_net_dev(os.getpid())
                n = window - 3
                self.net = ((end.tx_bytes - self._start.tx_bytes) / n, (end.rx_bytes - self._start.rx_bytes) / n)

    return LinkReader()


def steady_step_times(ends: List[float]) -> List[float]:
    """Per-batch times of one fit from its batch-end stamps, leaving out the first and last batch."""
    d = np.diff(ends)
    return [float(x) for x in d[1:-1]] if len(d) > 2 else [float(x) for x in d]


def _timed_fits(keras, model, dataset, cfg, extra_callbacks=(), cpu: Optional[List] = None,
                net: Optional[List] = None, own_link: bool = False):
    """Step times of `reps` timed fits after a warm-up fit; with `cpu` (a list), also each fit's CPU per step.

    With cfg["per_global_step"], a fit's entry is one number: seconds per global step between its
    second and its last-but-one batch end (with backup workers this worker's batches skip steps).
    With `net` (a list), each fit's bytes per step: with `cpu`, on each task's link
    (`make_step_timer`); with `own_link`, on this process's own (`make_link_reader`).
    """
    model.fit(dataset, epochs=1, steps_per_epoch=cfg.get("warmup", 3), verbose=0, callbacks=list(extra_callbacks))
    reps = []
    for _ in range(cfg["reps"]):
        timer = make_step_timer(keras, cpu_window=cfg["steps"] if cpu is not None else None,
                                net=net is not None and not own_link)
        reader = make_link_reader(keras, cfg["steps"]) if net is not None and own_link else None
        model.fit(dataset, epochs=1, steps_per_epoch=cfg["steps"], verbose=0,
                  callbacks=[timer] + ([reader] if reader else []) + list(extra_callbacks))
        if cfg.get("per_global_step"):
            steps = timer.steps[-2] - timer.steps[1]
            reps.append([(timer.ends[-2] - timer.ends[1]) / max(steps, 1)])
        else:
            reps.append(steady_step_times(timer.ends))
        if cpu is not None:
            cpu.append(timer.cpu)
        if net is not None:
            net.append(reader.net if reader else timer.net)
    return reps


def patch_keras_for_multi_worker_mirrored():
    """Works around Keras 3.15 `fit` on a multi-worker `MultiWorkerMirroredStrategy`.

    Its train step reduces the scalar logs with `strategy.reduce("MEAN", v, axis=0)`, which fails
    ("Invalid reduction dimension 0 for input with 0 dimensions"). Logs are reduced with "first"
    instead (this worker's values): one scalar all-reduce less per step for MWMS, so the
    comparison favours MWMS slightly.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer  # pylint: disable=g-import-not-at-top
    if getattr(tf_trainer.reduce_per_replica, "_patched", False):
        return
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        return original(values, strategy, "first" if reduction in ("auto", "mean") else reduction)

    reduce_per_replica._patched = True  # pylint: disable=protected-access
    tf_trainer.reduce_per_replica = reduce_per_replica


def build_for_multi_worker_mirrored(model, data_batch) -> None:
    """Builds a compiled model under a multi-worker MWMS from a plain batch, in place of Keras' own build.

    Keras 3.15 `fit` builds loss/metrics from one batch of the distributed iterator, reduced with
    strategy.reduce("MEAN", PerReplica), which fails on a multi-worker MWMS ("Attempt to convert a
    value (PerReplica...) with an unsupported type"). The replacement still reads (and drops) that
    one batch, as Keras does before it resets the fit's iterator: a shuffled pipeline then feeds
    the fit the same order under MWMS as under tf_backup (its second iteration's).
    """
    model._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access

    def read_one_batch(iterator=None, data_batch=None):
        del data_batch
        for _, _, it in iterator or ():
            next(it)
            break

    model._maybe_symbolic_build = read_one_batch  # pylint: disable=protected-access


def overhead_worker(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """One worker of the overhead benchmark: cfg["system"] is "tf_backup" (b = 0) or "mwms".

    For each width in cfg["hiddens"] a fresh model (`depth` hidden layers, default 2) is built and
    timed over `reps` fits of `steps` batches (batch 32 per worker, SGD, `compute` seconds of sleep per batch, plus a `straggler`
    delay keyed by worker and global step if given; tf_backup with `num_backup_workers`, and
    `strategy_kwargs` for `BackupWorkerStrategy` and `optimizer_kwargs` for `SyncReplicasOptimizer`
    if given). Worker 0 returns {hidden: [[step seconds, ...] per rep], ("cpu", hidden): [{task: CPU
    s per step} or None per rep]}; with cfg["net_counters"] also ("net", hidden): [{task: (bytes
    sent, received) per step} or None per rep] (`benchmarks.netem` links, read at worker 0's batch
    ends), and every other worker returns {("net", hidden): [(bytes sent, received) per step on its
    own link, read at its own batch ends, or None per rep]}.
    """
    keep_garbage()
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if cfg["system"] == "mwms":
        patch_keras_for_multi_worker_mirrored()
        # The malloc settings our processes get (`BackupWorkerStrategy`, `serve`), so both systems
        # run with the same allocator: with glibc's defaults MWMS is slower too (WORKSPACE_NOTES).
        from tf_backup import memory  # pylint: disable=g-import-not-at-top
        memory.tune_malloc()
        strategy = multi_worker_mirrored()
        worker = strategy.cluster_resolver.task_id
        make_optimizer = lambda: keras.optimizers.SGD(0.01)  # noqa: E731
    else:
        import tf_backup  # pylint: disable=g-import-not-at-top
        strategy_kwargs = dict(dict(num_backup_workers=cfg.get("num_backup_workers", 0), step_timeout=300.0),
                               **cfg.get("strategy_kwargs", {}))
        strategy = tf_backup.BackupWorkerStrategy(**strategy_kwargs)
        worker = strategy.worker_index
        make_optimizer = lambda: tf_backup.SyncReplicasOptimizer(  # noqa: E731
            keras.optimizers.SGD(0.01), **cfg.get("optimizer_kwargs", {}))
    x, y = random_data(worker)
    batch = cfg.get("batch", 32)
    if cfg["system"] == "mwms":
        # Keras distributes it: a global batch of batch * workers rows, split into `batch` rows per
        # worker; sharding off, as each worker already reads its own data.
        batch *= strategy.num_replicas_in_sync
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = dataset.with_options(options)
    sleeper = make_sleep_callback(keras, worker, cfg.get("compute", 0.0), cfg.get("straggler"), 0, lambda: None)
    out = {}
    for hidden in cfg["hiddens"]:
        with strategy.scope():
            model = build_mlp(keras, hidden, seed=0, depth=cfg.get("depth", 2))
            model.compile(optimizer=make_optimizer(), loss="sparse_categorical_crossentropy",
                          jit_compile=cfg.get("jit_compile", False))
            if cfg["system"] == "mwms":
                build_for_multi_worker_mirrored(model, (x[:32], y[:32]))
        cpu = [] if worker == 0 else None
        net = [] if cfg.get("net_counters") else None
        sleeps = cfg.get("compute") or cfg.get("straggler")
        out[hidden] = _timed_fits(keras, model, dataset, cfg, [sleeper] if sleeps else [], cpu=cpu, net=net,
                                  own_link=worker != 0)
        out[("cpu", hidden)] = cpu
        if net is not None:
            out[("net", hidden)] = net
    if worker == 0:
        return out
    # The other workers' own link counters, read at their own batch ends (`make_link_reader`).
    return {key: value for key, value in out.items() if isinstance(key, tuple) and key[0] == "net"} or None


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


def launch_overhead(system: str, workers: int, cfg: Dict[str, Any], timeout: float = 600, num_ps: int = 1,
                    network=None):
    """Runs `overhead_worker` on a local cluster: tf_backup (+ `num_ps` ps) or MWMS (TF_CONFIG per process).

    `network`: a `benchmarks.netem` network whose `hosts` and `command_prefix` place every task
    (default: localhost).
    """
    place = dict(hosts=network.hosts, command_prefix=network.command_prefix) if network is not None else {}
    if system == "mwms":
        from benchmarks import launcher  # pylint: disable=g-import-not-at-top
        return launcher.launch(overhead_worker, {"worker": workers}, args=(cfg,), timeout=timeout, **place)
    import tf_backup  # pylint: disable=g-import-not-at-top
    return tf_backup.launch_local(overhead_worker, workers, num_ps=num_ps, args=(cfg,), timeout=timeout, **place)


class _AccuracyRun(NamedTuple):
    """What `accuracy_worker` needs of the system under test (tf_backup or MWMS)."""
    strategy: Any
    worker: int
    is_chief: bool
    dataset: Any  # the input `fit` gets (distributed by the strategy)
    plain_batch: Any  # MWMS: one (x, y) batch of the same shapes, undistributed (Keras' build)
    wrap: Callable  # the Keras optimizer -> what `compile` gets
    global_step: Callable  # (batch index in this fit, logs) -> the global step after that batch
    barrier: Callable  # every worker waits here at each run's first batch
    fit_end: Callable  # after each fit, before the next run starts
    info: Any  # the dataset's `trainers.data.DatasetInfo`


def _tf_backup_accuracy_run(cfg, data, tf) -> _AccuracyRun:
    import tf_backup  # pylint: disable=g-import-not-at-top
    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=cfg.get("num_backup_workers", 0),
                                              asynchronous=cfg["mode"] == "async", step_timeout=300.0,
                                              ps_restart_timeout=cfg.get("ps_restart_timeout", 0.0))
    w = strategy.worker_index
    ds, info = data.load("mnist1d", split="train", batch_size=cfg["batch_size"], num_shards=strategy.num_workers,
                         shard_index=w, shuffle_seed=cfg["seed"] + w, repeat=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(options)
    barrier = []

    def wait():
        if not barrier:
            barrier.append(FitBarrier(strategy))
        barrier[0].wait()

    return _AccuracyRun(strategy, w, strategy.is_chief, strategy.distribute_dataset(ds), None,
                        tf_backup.SyncReplicasOptimizer, lambda batch, logs: int(logs["global_step"]), wait,
                        strategy.wait_for_fit_end, info)


def _mwms_accuracy_run(cfg, data, tf) -> _AccuracyRun:
    """MWMS on the same task: each worker reads its own shard, `batch_size` rows per worker and step."""
    from tf_backup import memory  # pylint: disable=g-import-not-at-top
    if cfg["mode"] != "sync" or math.isfinite(cfg.get("seconds", math.inf)):
        raise ValueError("MWMS runs synchronous fits of a fixed length (every worker must stop at the same "
                         f"step): mode='sync' and no `seconds`. Received: mode={cfg['mode']!r}, "
                         f"seconds={cfg.get('seconds')!r}")
    patch_keras_for_multi_worker_mirrored()
    memory.tune_malloc()  # as in `overhead_worker`: both systems with the same allocator settings
    strategy = multi_worker_mirrored()
    w, workers = strategy.cluster_resolver.task_id, strategy.num_replicas_in_sync

    def shard(ctx=None):
        return data.load("mnist1d", split="train", batch_size=cfg["batch_size"], num_shards=workers,
                         shard_index=w, shuffle_seed=cfg["seed"] + w, repeat=True)

    def wait():
        # One scalar all-reduce: returns once every worker has reached it.
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)

    ds, info = shard()
    return _AccuracyRun(strategy, w, w == 0, strategy.distribute_datasets_from_function(lambda ctx: shard()[0]),
                        next(iter(ds)), lambda optimizer: optimizer, lambda batch, logs: batch + 1, wait,
                        lambda: None, info)


MWMS_COLLECTIVE_TIMEOUT = 600.0


def multi_worker_mirrored():
    """MultiWorkerMirroredStrategy whose collectives (the start barrier, every all-reduce) time out.

    Without `timeout_seconds` a worker whose peer is gone waits in its all-reduce for ever; with
    it the collective fails with DeadlineExceeded after `MWMS_COLLECTIVE_TIMEOUT` seconds.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=MWMS_COLLECTIVE_TIMEOUT)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def accuracy_worker(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """One worker of the time-to-accuracy benchmark on the offline default task (MNIST-1D, CNN).

    cfg: system ("tf_backup", the default, or "mwms": MultiWorkerMirroredStrategy, whose runs need
    mode "sync" and `stop_step` instead of `seconds`), mode ("async", "sync", "sync_backup"),
    num_backup_workers, seconds (the wall-time budget of a run: the chief's fit stops at the first
    batch end past it, which ends the round for every worker), steps (batches per worker per run,
    at most), reps (runs, each from a fresh model and optimizer), every_seconds (wall time between
    snapshots), straggler, seed, and the default config's model/optimizer fields; optionally compute
    (seconds every worker sleeps before each batch besides the straggler delay; `slow` models
    multiply it), stop_step (the run also ends once the global step reaches it) and mark_steps
    (global steps whose first batch end's wall time is recorded: the straggler phases' ends). Every
    run starts at a barrier of all workers in its first batch. The chief keeps its weights every
    `every_seconds` with the wall time since that barrier and the global step, and after training
    evaluates every snapshot on the test split (not timed). Returns, on the chief, `runs`: per run a
    list of (seconds, global step, test accuracy); `marks`: per run the seconds at which each of
    `mark_steps` was reached (None: not reached); `replicas`, `noise_scale`: per run the N of every
    step and the adaptive rule's noise-scale estimate after it (None: a fixed N; empty for MWMS);
    `weights`: per run the final weights.
    """
    keep_garbage()
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from trainers import data  # pylint: disable=g-import-not-at-top
    from trainers import models  # pylint: disable=g-import-not-at-top
    from trainers import train  # pylint: disable=g-import-not-at-top

    mwms = cfg.get("system", "tf_backup") == "mwms"
    run = (_mwms_accuracy_run if mwms else _tf_backup_accuracy_run)(cfg, data, tf)
    strategy, w = run.strategy, run.worker
    info = run.info
    model_args = {k: v for k, v in cfg["model"].items() if k != "kind"}

    def global_step():
        if mwms:
            return None  # the sleep callback counts batches: each is a global step
        try:
            return strategy.stats()["global_step"]
        except ValueError:
            return None

    class Snapshots(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.points, self.start, self.next_at = [], None, 0

        def on_train_begin(self, logs=None):
            self.start = time.monotonic()
            self.base = global_step() or 0
            self.points = [(0.0, 0, [v.copy() for v in self.model.get_weights()])]
            self.next_at = cfg["every_seconds"]
            self.marks = {m: None for m in cfg.get("mark_steps", ())}
            self.step = 0

        def on_train_batch_end(self, batch, logs=None):
            elapsed = time.monotonic() - self.start
            self.step = step = run.global_step(batch, logs) - self.base
            for m in self.marks:
                if self.marks[m] is None and step >= m:
                    self.marks[m] = elapsed
            if elapsed >= self.next_at:
                self.points.append((elapsed, step, [v.copy() for v in self.model.get_weights()]))
                self.next_at += cfg["every_seconds"] * (1 + int((elapsed - self.next_at) // cfg["every_seconds"]))
            if not mwms and (elapsed >= cfg["seconds"] or step >= cfg.get("stop_step", math.inf)):
                self.model.stop_training = True  # the budget is spent: the round ends for everybody

    runs, marks, replicas, noise = [], [], [], []

    def start_together(snaps):
        # At each run's first batch (after Keras made the run's input iterator): every worker waits
        # for the others; the chief's clock starts after that.
        run.barrier()
        snaps.start = time.monotonic()

    steps = min(cfg["steps"], cfg["stop_step"]) if mwms else cfg["steps"]
    for _ in range(cfg["reps"]):
        with strategy.scope():
            model = models.build(cfg["model"]["kind"], info.input_shape, info.num_classes, seed=cfg["seed"],
                                 **model_args)
            model.compile(optimizer=run.wrap(train.make_optimizer(cfg["optimizer"], cfg["learning_rate"])),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=False)
            if mwms:
                build_for_multi_worker_mirrored(model, run.plain_batch)
        sleeper = make_sleep_callback(keras, w, cfg.get("compute", 0.0), cfg["straggler"], cfg["seed"], global_step)
        snaps = Snapshots()
        sleeper.gate = lambda snaps=snaps: start_together(snaps)
        model.fit(run.dataset, epochs=1, steps_per_epoch=steps, verbose=0,
                  callbacks=[sleeper, snaps] if run.is_chief else [sleeper])
        run.fit_end()  # the next run starts together (a late worker may still be asleep)
        if run.is_chief:
            end_step = snaps.step if mwms else strategy.stats()["global_step"] - snaps.base
            end = (time.monotonic() - snaps.start, end_step, [v.copy() for v in model.get_weights()])
            runs.append(snaps.points + [end])
            marks.append([snaps.marks[m] for m in cfg.get("mark_steps", ())])
            history = [] if mwms else strategy.step_history()
            replicas.append([r.replicas for r in history])
            noise.append([r.noise_scale for r in history])
    if not run.is_chief:
        return None
    test, _ = data.load("mnist1d", split="test", batch_size=500)
    batches = [(x.numpy(), y.numpy()) for x, y in test]
    x_test, y_test = np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
    evaluator = models.build(cfg["model"]["kind"], info.input_shape, info.num_classes, seed=cfg["seed"], **model_args)
    predict = tf.function(lambda x: tf.argmax(evaluator(x, training=False), axis=-1), jit_compile=False)
    out = []
    for points in runs:
        curve = []
        for seconds, step, weights in points:
            evaluator.set_weights(weights)
            accuracy = float(np.mean(predict(x_test).numpy() == y_test.reshape(-1)))
            curve.append((seconds, step, accuracy))
        out.append(curve)
    return {"runs": out, "marks": marks, "replicas": replicas, "noise_scale": noise,
            "weights": [points[-1][2] for points in runs]}


def memory_worker(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """One worker of the ps-memory benchmark: one long fit of `steps` batches, no sleeps.

    cfg: steps, num_backup_workers, hidden, compute (seconds each worker sleeps before each
    batch), worker_timeout, progress_dir (every 20 batches each worker writes its global step to
    `<progress_dir>/<task>.step`, which the driver reads). The chief returns its stats and the ps's
    wake-up queue sizes at the end.
    """
    keep_garbage()
    import os  # pylint: disable=g-import-not-at-top
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=cfg["num_backup_workers"],
                                              worker_timeout=cfg["worker_timeout"], step_timeout=120.0,
                                              max_steps=cfg["steps"])
    path = os.path.join(cfg["progress_dir"], os.environ["TF_BACKUP_TASK"] + ".step")

    class Progress(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(cfg["compute"])

        def on_train_batch_end(self, batch, logs=None):
            if batch % 20 == 0:
                with open(path + ".tmp", "w") as f:
                    f.write(str(int(logs["global_step"])))
                os.replace(path + ".tmp", path)

    x, y = random_data(strategy.worker_index)
    with strategy.scope():
        model = build_mlp(keras, cfg["hidden"])
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.01)),
                      loss="sparse_categorical_crossentropy", jit_compile=False)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()
    model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=cfg["steps"], verbose=0,
              callbacks=[Progress()])
    if not strategy.is_chief:
        return None
    return {"stats": strategy.stats(), "wake_queue_sizes": strategy.extended.latest_binding().state.wake_queue_sizes()}
