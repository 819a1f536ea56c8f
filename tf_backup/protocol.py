"""The step protocol of synchronous SGD with backup workers.

Shared state of one job on the ps tasks (`tf_backup/job`, on ps task 0): the
job id, a `done` and an `abort` flag, and the chief's heartbeat. Shared state
of one `SyncReplicasOptimizer` (`tf_backup/<job id>/opt<k>/...`):

* `params/<s>`: the published parameters of shard `s`, flat. Variables are
  spread over the ps tasks by size, one shard per ps task.
* `acc/<s>`: a conditional accumulator per shard. A worker pushes the flat
  gradient of the shard's variables followed by a one-hot of its worker index,
  tagged with the global step of the parameters it computed on. The
  accumulator sums what it accepts, so the one-hot part of a take counts the
  contributions of each worker, and a stale push is dropped whole.
* `control`: an int64 vector (see `Control`): global step, the step being
  published, fit rounds, and per-worker counts of gradients pushed, taken and
  dropped, and of batches cancelled.
* `wake/<w>` and `arrivals`: int64 FIFO queues of wake-up tokens, so waits
  block on the ps instead of polling (see `SharedState`).
* `signature`: the variables' shapes and dtypes, so a worker built with a
  different model fails with an error naming the variable.

Every worker, each step (`WorkerClient.sync`):
  1. pushes its gradient tagged with step `s` of its parameters;
  2. waits until the global step passes `s` (blocked on its wake-up queue,
     which the chief feeds after each publish), or until the fit round is
     stopped;
  3. pulls the published parameters of the new step.
With one ps task the three are one round trip (`SharedState.push_wait`): a run
that pushes cannot be cancelled at a deadline without leaving it unknown
whether it pushed, so it has none of its own, and the worker's `Waker` thread
ends a wait that lasts past `WAKE_WAIT` with a token (health checks then run).
The chief's own worker reads only the control vector there: it takes the
parameters of step `s+1` from its aggregator, which kept what it published.

A batch whose step was superseded while the worker was still computing it can
be cancelled (`WorkerClient.sleep_unless_superseded`, used by the straggler
simulation): it is not pushed and the worker moves to the new step at once; or
restarted (`WorkerClient.restart_superseded`): the worker pulls the new step
and computes the same batch on it. The wait that sees the new step's token also
reads its parameters, so neither needs another round trip.

The chief's `Aggregator` thread, each step:
  1. waits until every shard's accumulator holds `replicas_to_aggregate` fresh
     gradients (blocked on the `arrivals` queue, which every push feeds, for
     as many tokens as gradients are still missing);
  2. takes them (which advances the accumulators' step, so any gradient still
     tagged `s` is dropped from that moment; with one shard, in the same run as
     the wait, which its own `Waker` ends), averages, and applies the average
     with the inner Keras optimizer to the chief's master copy;
  3. publishes: `version = s+1`, the new parameters, then `step = s+1`. A
     worker that reads `step`, the parameters, then `version` and finds
     `version == step` has read parameters of exactly that step.

A fit on any worker that ends (`Optimizer.finalize_variable_values`) stops the
round for everybody: the other workers' next wait returns at once and their fit
stops. A later `fit` starts a new round.
"""

import collections
import dataclasses
import threading
import time
from typing import Callable, List, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from tf_backup import accumulators
from tf_backup import cluster as cluster_lib
from tf_backup import errors

INT64_MAX = np.iinfo(np.int64).max
WAKE = -1  # a wake-up token that is not a step: "the control vector changed, look"
POKE = -2  # a `Waker`'s token: "your wait is past its deadline", nothing changed
WAKE_WAIT = 1.0  # the longest blocking wait on the ps before health checks run again
SLEEP_MARGIN = 0.003  # `sleep_unless_superseded` sleeps its last seconds locally (see there)
KEEP_PUBLISHED = 2  # the chief keeps its last published parameters for its own worker's pull


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """Settings of the step protocol, the same on every worker.

    Attributes:
      replicas_to_aggregate: N, the fresh gradients averaged into one step.
      num_workers: N + b, every worker of the cluster.
      staleness_check: whether a gradient tagged with an old step is dropped.
        False gives asynchronous SGD (with `replicas_to_aggregate=1`).
      step_timeout: the longest a worker waits for the global step to advance,
        and the chief for enough gradients, in seconds.
      chief_timeout: how long a silent chief heartbeat is tolerated, seconds.
      startup_timeout: how long a worker waits for the chief to create the
        shared state, seconds.
      poll_min, poll_max: the first and the longest sleep between polls.
    """

    replicas_to_aggregate: int
    num_workers: int
    staleness_check: bool = True
    step_timeout: float = 600.0
    chief_timeout: float = 120.0
    startup_timeout: float = 600.0
    poll_min: float = 0.0005
    poll_max: float = 0.01


class Control:
    """Slots of the int64 control vector of one optimizer's shared state."""

    STEP = 0  # committed global step: params hold this step's values
    VERSION = 1  # the step whose params are being (or were last) written
    ROUND = 2  # the highest fit round any worker has started
    STOP_ROUND = 3  # the highest fit round that has ended
    LAST_TAKEN = 4  # gradients averaged into the last step
    FINISHED = 5  # 1 once the chief reached its max_steps: every round stops
    TAKEN_FOR = 6  # s + 1 once the gradients of step s were taken (the accumulator's new step)
    CLOSED = 7  # the highest fit round the aggregator closed: nothing more is applied for it
    HEADER = 8

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.size = self.HEADER + 6 * num_workers

    def taken(self, w: int) -> int:
        return self.HEADER + w

    def pushed(self, w: int) -> int:
        return self.HEADER + self.num_workers + w

    def dropped(self, w: int) -> int:
        return self.HEADER + 2 * self.num_workers + w

    def last_tag(self, w: int) -> int:
        return self.HEADER + 3 * self.num_workers + w

    def ended(self, w: int) -> int:
        """The last fit round worker `w` has ended."""
        return self.HEADER + 4 * self.num_workers + w

    def cancelled(self, w: int) -> int:
        """Batches worker `w` cancelled (the step moved on while it computed; never pushed)."""
        return self.HEADER + 5 * self.num_workers + w

    def block(self, values, first: Callable[[int], int]) -> np.ndarray:
        start = first(0)
        return np.asarray(values[start:start + self.num_workers])


class Job:
    """Slots of the job-wide int64 vector `tf_backup/job` on ps task 0.

    `joined(w)` is set when worker `w` joins the job and `left(w)` when it has
    finished with the shared state; a ps task serves until the chief set `DONE`
    and every worker that joined has left (or a grace period passed), so no
    worker's last op meets a vanished ps. `beat(w)` is worker `w`'s heartbeat,
    bumped every second by a thread of its process: the chief declares a
    worker dead when it stops (`Liveness`), and alive again when it resumes.
    """

    JOB_ID = 0
    DONE = 1
    ABORT = 2
    HEARTBEAT = 3
    HEADER = 4
    NAME = "tf_backup/job"

    @staticmethod
    def size(num_workers: int) -> int:
        return Job.HEADER + 3 * num_workers

    @staticmethod
    def num_workers(values) -> int:
        return (len(values) - Job.HEADER) // 3

    @staticmethod
    def joined(w: int) -> int:
        return Job.HEADER + 3 * w

    @staticmethod
    def left(w: int) -> int:
        return Job.HEADER + 3 * w + 1

    @staticmethod
    def beat(w: int) -> int:
        return Job.HEADER + 3 * w + 2


def endpoint(task: cluster_lib.Task) -> accumulators.Endpoint:
    """This process's endpoint for the shared resources on `task`."""
    return accumulators.endpoint(task.target, task.device)


def job_variable(ps0: cluster_lib.Task, num_workers: int) -> accumulators.SharedVariable:
    return accumulators.SharedVariable(Job.NAME, tf.int64, [Job.size(num_workers)], endpoint(ps0))


class Layout:
    """How a list of variables maps onto flat shards, one per ps task.

    Variables go to shards largest first, each to the shard with the fewest
    elements so far; inside a shard they keep their order.
    """

    def __init__(self, variables: Sequence, num_shards: int):
        self.names = [getattr(v, "path", None) or getattr(v, "name", f"variable_{i}")
                      for i, v in enumerate(variables)]
        self.shapes = [tuple(int(d) for d in v.shape) for v in variables]
        self.dtypes = [tf.as_dtype(v.dtype) for v in variables]
        for name, dtype in zip(self.names, self.dtypes):
            if not dtype.is_floating:
                raise TypeError(
                    f"SyncReplicasOptimizer trains floating-point variables. Received "
                    f"variable `{name}` with dtype={dtype.name}"
                )
        self.sizes = [int(np.prod(s)) if s else 1 for s in self.shapes]
        self.dtype = tf.float64 if tf.float64 in self.dtypes else tf.float32
        loads = [0] * num_shards
        members = [[] for _ in range(num_shards)]
        for i in sorted(range(len(self.sizes)), key=lambda i: (-self.sizes[i], i)):
            s = loads.index(min(loads))
            members[s].append(i)
            loads[s] += self.sizes[i]
        self.shards = [sorted(m) for m in members]
        self.shard_sizes = loads

    @property
    def num_vars(self) -> int:
        return len(self.shapes)

    def signature(self) -> np.ndarray:
        """An int64 vector describing every variable's shape and dtype."""
        out = [len(self.shapes)]
        for shape, dtype in zip(self.shapes, self.dtypes):
            out += [len(shape), *shape, dtype.as_datatype_enum]
        return np.asarray(out, np.int64)

    def check_signature(self, chief_signature: np.ndarray) -> None:
        """Raises ValueError naming the first variable that differs from the chief's."""
        sig = [int(x) for x in chief_signature]
        chief_vars, pos = [], 1
        for _ in range(sig[0] if sig else 0):
            rank = sig[pos]
            chief_vars.append((tuple(sig[pos + 1:pos + 1 + rank]), tf.as_dtype(sig[pos + 1 + rank])))
            pos += rank + 2
        for i, (name, shape, dtype) in enumerate(zip(self.names, self.shapes, self.dtypes)):
            if i >= len(chief_vars):
                break
            if chief_vars[i] != (shape, dtype):
                raise ValueError(
                    f"Trainable variable {i} (`{name}`) is {shape} {dtype.name} on this worker "
                    f"but {chief_vars[i][0]} {chief_vars[i][1].name} on the chief: every worker "
                    "must build the same model."
                )
        if len(chief_vars) != self.num_vars:
            raise ValueError(
                f"This worker's model has {self.num_vars} trainable variables but the "
                f"chief's has {len(chief_vars)}: every worker must build the same model."
            )

    def pack(self, tensors: Sequence) -> List[tf.Tensor]:
        """Flattens per-variable tensors into one tensor per shard (graph ops)."""
        flats = []
        for members in self.shards:
            parts = [tf.reshape(tf.cast(tensors[i], self.dtype), [-1]) for i in members]
            flats.append(tf.concat(parts, 0) if parts else tf.zeros([0], self.dtype))
        return flats

    def unpack(self, flats: Sequence) -> List[tf.Tensor]:
        """The inverse of `pack`: per-variable tensors in the variables' dtypes."""
        out = [None] * self.num_vars
        for members, flat in zip(self.shards, flats):
            offset = 0
            for i in members:
                piece = flat[offset:offset + self.sizes[i]]
                out[i] = tf.cast(tf.reshape(piece, self.shapes[i]), self.dtypes[i])
                offset += self.sizes[i]
        return out


class SharedState:
    """Handles to one optimizer's shared state on the ps tasks."""

    def __init__(self, prefix: str, layout: Layout, ps: Sequence[cluster_lib.Task], num_workers: int):
        self.prefix = prefix
        self.layout = layout
        self.num_workers = num_workers
        self.ctl = Control(num_workers)
        ps0 = ps[0]
        self.control = accumulators.SharedVariable(f"{prefix}/control", tf.int64, [self.ctl.size], endpoint(ps0))
        sig = layout.signature()
        self.signature = accumulators.SharedVariable(f"{prefix}/signature", tf.int64, [len(sig)], endpoint(ps0))
        self._ps = ps
        self.params = [
            accumulators.SharedVariable(f"{prefix}/params/{s}", layout.dtype, [size], endpoint(ps[s]))
            for s, size in enumerate(layout.shard_sizes)
        ]
        self._accs = None
        self._fused_ops = None

    @property
    def accs(self) -> List[accumulators.ConditionalAccumulator]:
        """The accumulators, one per shard.

        Made on first use: making one creates it on the ps with this layout's
        shape, so a worker must check the chief's signature before touching them.
        """
        if self._accs is None:
            self._accs = [
                accumulators.ConditionalAccumulator(
                    f"{self.prefix}/acc/{s}", self.layout.dtype, [size + self.num_workers],
                    endpoint(self._ps[s]), reduction_type="SUM")
                for s, size in enumerate(self.layout.shard_sizes)
            ]
        return self._accs

    def create(self, flats: Sequence, step: int = 0) -> None:
        """Writes the initial state (chief only). `control` goes last: it marks the state ready."""
        self.signature.assign(self.layout.signature())
        for var, flat in zip(self.params, flats):
            var.assign(flat)
        for acc in self.accs:
            acc.set_global_step(step)
        control = np.zeros([self.ctl.size], np.int64)
        control[Control.STEP] = control[Control.VERSION] = step
        self.control.assign(control)

    def read_control(self) -> np.ndarray:
        return self.control.read()

    # -- one round trip instead of several, and wake-ups instead of polls ------------
    #
    # The control vector, shard 0's accumulator and two kinds of int64 FIFO queues
    # are on ps 0 (`control`'s endpoint):
    #
    # * `wake/<w>`, one per worker: the chief enqueues the new step after each
    #   publish, and `WAKE` when a round stops, so a waiting worker blocks on its
    #   queue (`wait`) instead of polling `control`;
    # * `arrivals`: each push enqueues its tag, so the aggregator blocks on it
    #   (`wait_arrivals`) instead of polling the accumulators.
    #
    # A token only says "look again": every decision is made on the control vector
    # (or the accumulator count) read in the same run, after the dequeue. A token
    # lost (a run delivered twice) costs at most one bounded wait.
    #
    # With one ps task (or every shard on ps 0), the seqlock read, the publish and
    # the push each run as one graph on the ps, their order kept by control
    # dependencies, where they would otherwise take 3, 3 and 2 round trips; a
    # worker's wait then returns the parameters with the control vector.

    @property
    def on_one_task(self) -> bool:
        ep = self.control.endpoint
        return all(p.endpoint is ep for p in self.params) and self.accs[0].endpoint is ep

    def _fused(self) -> dict:
        if self._fused_ops is None:
            control, params, acc = self.control.ops, [p.ops for p in self.params], self.accs[0].ops
            dtype, prefix, one_task = self.layout.dtype, self.prefix, self.on_one_task
            num_workers = self.num_workers
            if acc["apply"].graph is not control["read"].graph:
                raise AssertionError("shard 0's accumulator must be on the control vector's task")

            def ops():
                def read(var):
                    return tf.raw_ops.ReadVariableOp(resource=var["handle"], dtype=var["read"].dtype)

                def consistent_read(after_ops=(), with_params=True):
                    with tf.control_dependencies(list(after_ops)):
                        before = read(control)
                    if not (one_task and with_params):
                        return [before]
                    with tf.control_dependencies([before]):
                        values = [read(p) for p in params]
                    with tf.control_dependencies(values):
                        after = read(control)
                    return [before, values, after]

                wake = [accumulators.fifo_queue(f"{prefix}/wake/{w}") for w in range(self.num_workers)]
                arrivals = accumulators.fifo_queue(f"{prefix}/arrivals")
                block = tf.constant(True)  # every wait here waits for one token (bounded by the run's deadline)
                token = tf.compat.v1.placeholder(tf.int64, [])

                def wake_all(after_op):
                    with tf.control_dependencies([after_op]):
                        return tf.group(*[tf.raw_ops.QueueEnqueueV2(handle=q, components=[token]) for q in wake])

                def wait_on(q, after_ops=(), with_params=True):
                    with tf.control_dependencies(list(after_ops)):
                        tokens = accumulators.drain(q, block)
                    return [tokens] + consistent_read([tokens], with_params)

                waits = []
                for q in wake:
                    read_after = wait_on(q)
                    waits.append(dict(tokens=read_after[0], read=read_after))
                # The aggregator's wait: `need` tokens (1 + the fresh gradients still missing), then
                # the count and the control vector; with one shard, the take too when it is due.
                need = tf.compat.v1.placeholder_with_default(tf.constant(1, tf.int32), [])
                arrived = accumulators.drain(arrivals, block, at_least=need)
                with tf.control_dependencies([arrived]):
                    count = tf.raw_ops.ResourceAccumulatorNumAccumulated(handle=acc["handle"])
                    before = read(control)
                required = tf.compat.v1.placeholder_with_default(tf.constant(0, tf.int32), [])
                taken_for = tf.compat.v1.placeholder_with_default(tf.constant(0, tf.int64), [])
                always = tf.compat.v1.placeholder_with_default(False, [])  # also between fit rounds (async)
                running = tf.logical_or(always, before[Control.ROUND] > before[Control.STOP_ROUND])
                due = tf.logical_and(tf.logical_and(required > 0, count >= required), running)

                def take():
                    sums = tf.raw_ops.ResourceAccumulatorTakeGradient(handle=acc["handle"], num_required=required,
                                                                      dtype=dtype)
                    with tf.control_dependencies([sums]):
                        mark = tf.raw_ops.ResourceScatterUpdate(
                            resource=control["handle"], indices=[Control.TAKEN_FOR], updates=tf.reshape(taken_for, [1]))
                    with tf.control_dependencies([mark]):
                        return tf.identity(sums)

                took = tf.cond(due, take, lambda: tf.zeros(acc["grad"].shape, dtype))

                version_idx, version = tf.compat.v1.placeholder(tf.int32, [None]), tf.compat.v1.placeholder(tf.int64, [None])
                step_idx, step = tf.compat.v1.placeholder(tf.int32, [None]), tf.compat.v1.placeholder(tf.int64, [None])
                commit = tf.raw_ops.ResourceScatterUpdate(resource=control["handle"], indices=step_idx,
                                                          updates=step)
                out = dict(waits=waits, arrivals=[arrived, count, before], token=token,
                           arrivals_take=[arrived, count, before, due, took], need=need, required=required,
                           taken_for=taken_for, always=always,
                           pokes=[tf.raw_ops.QueueEnqueueV2(handle=q, components=[token]) for q in wake],
                           commit=wake_all(commit), wake_all=wake_all(tf.no_op()),
                           poke_arrivals=tf.raw_ops.QueueEnqueueManyV2(
                               handle=arrivals, components=[tf.fill([num_workers], token)]),
                           step_idx=step_idx, step=step, version_idx=version_idx, version=version)
                with tf.control_dependencies([acc["apply"]]):
                    pushed = tf.raw_ops.ResourceScatterUpdate(resource=control["handle"],
                                                              indices=control["indices"],
                                                              updates=control["updates"])
                with tf.control_dependencies([pushed]):
                    out["push"] = tf.raw_ops.QueueEnqueueV2(handle=arrivals, components=[acc["step"]])
                # A push and the wait after it, in one run: the wait blocks on the worker's queue
                # with no deadline of its own; `Waker` ends it with a token instead.
                out["push_waits"] = [wait_on(q, [out["push"]]) for q in wake]
                # The same without the parameters: for the chief, which has them already.
                out["push_waits_control"] = [wait_on(q, [out["push"]], with_params=False) for q in wake]
                if one_task:
                    new_values = [tf.compat.v1.placeholder(dtype, p["value"].shape) for p in params]
                    mark = tf.raw_ops.ResourceScatterUpdate(resource=control["handle"], indices=version_idx,
                                                            updates=version)
                    with tf.control_dependencies([mark]):
                        assigns = [tf.raw_ops.AssignVariableOp(resource=p["handle"], value=v)
                                   for p, v in zip(params, new_values)]
                    with tf.control_dependencies(assigns):
                        fused_commit = tf.raw_ops.ResourceScatterUpdate(
                            resource=control["handle"], indices=step_idx, updates=step)
                    out.update(read=consistent_read(), publish=wake_all(fused_commit), new_values=new_values)
                return out

            self._fused_ops = self.control.endpoint.build(ops)
        return self._fused_ops

    def read_consistent(self):
        """(control before, flat parameters, control after), read in this order in one run."""
        ops = self._fused()
        return self.control.endpoint.run(ops["read"], what=f"read of `{self.prefix}` parameters")

    def publish(self, step: int, flats: Sequence, indices: Sequence[int], values: Sequence[int]) -> None:
        """VERSION = step, the parameters, then control[indices] = values (STEP among them).

        Then wakes every worker with the token `step`.
        """
        ops = self._fused()
        feed = {ops["step_idx"]: np.asarray(indices, np.int32), ops["step"]: np.asarray(values, np.int64),
                ops["token"]: int(step)}
        if not self.on_one_task:
            self.control.scatter_update([Control.VERSION], [step])
            for var, flat in zip(self.params, flats):
                var.assign(flat)
            self.control.endpoint.run(ops["commit"], feed, what=f"commit of `{self.prefix}` step {step}")
            return
        feed.update({ops["version_idx"]: [Control.VERSION], ops["version"]: [step]})
        feed.update({ph: np.asarray(flat, self.layout.dtype.as_numpy_dtype)
                     for ph, flat in zip(ops["new_values"], flats)})
        self.control.endpoint.run(ops["publish"], feed, what=f"publish of `{self.prefix}` step {step}")

    def push_wait(self, w: int, flats: Sequence, tag: int, indices: Sequence[int], values: Sequence[int],
                  waker: "Waker", seconds: float, with_params: bool = True):
        """`push`, then `wait(w, seconds)` in the same run (one round trip less per step).

        The wait has no deadline of its own (a run cancelled at a deadline might
        or might not have pushed): `waker` ends it after `seconds` with a
        token. Returns what `wait` returns (without `with_params`, never a
        snapshot of the parameters); None if the run was delivered twice (it
        pushed once; its result is lost).
        """
        for acc, flat in zip(self.accs[1:], flats[1:]):
            acc.apply_grad(flat, tag)
        acc, control, ops = self.accs[0].ops, self.control.ops, self._fused()
        feed = {acc["grad"]: np.asarray(flats[0], self.layout.dtype.as_numpy_dtype), acc["step"]: int(tag),
                control["indices"]: np.asarray(indices, np.int32), control["updates"]: np.asarray(values, np.int64)}
        waker.arm(seconds)
        try:
            fetches = ops["push_waits" if with_params else "push_waits_control"][w]
            got = self.control.endpoint.run(fetches, feed, what=f"push and wait of worker {w} "
                                            f"on `{self.prefix}`", on_duplicate="done")
        finally:
            waker.disarm()
        if got is None:
            return None
        snapshot = tuple(got[1:]) if len(got) == 4 else None
        return got[0], got[1], snapshot

    def poke(self, w: int) -> None:
        """Puts a `POKE` token in worker `w`'s queue: its blocked wait returns (see `Waker`)."""
        ops = self._fused()
        self.control.endpoint.run(ops["pokes"][w], {ops["token"]: POKE}, what=f"wake-up of worker {w}")

    def wake_all(self) -> None:
        """Wakes every worker's wait with the token `WAKE` (a round stopped, the job finished)."""
        ops = self._fused()
        self.control.endpoint.run(ops["wake_all"], {ops["token"]: WAKE}, what=f"wake-up of `{self.prefix}`")

    def poke_aggregator(self, token: int = POKE) -> None:
        """Ends the aggregator's wait with `token`s, one per worker.

        `POKE`: its waker's deadline, or a stop. `WAKE`: a worker ended its fit
        round; the aggregator looks at the control vector and closes the round.
        """
        ops = self._fused()
        self.control.endpoint.run(ops["poke_arrivals"], {ops["token"]: int(token)},
                                  what=f"wake-up of `{self.prefix}` aggregator")

    def wait(self, w: int, seconds: float, tokens_only: bool = False):
        """Drains worker `w`'s wake-up queue, waiting up to `seconds` for a token if it is empty.

        Returns None if nothing came in time; else `(tokens, control, snapshot)`,
        the control vector read after the dequeue and, with one ps task, the
        seqlock read `(before, flats, after)` of the parameters (else None).
        With `tokens_only`, just the tokens (or None).
        """
        ops = self._fused()
        fetches = ops["waits"][w]["tokens" if tokens_only else "read"]
        got = self.control.endpoint.run(fetches, wait=seconds, what=f"wait of worker {w} on `{self.prefix}`")
        if got is None or tokens_only:
            return got
        snapshot = tuple(got[1:]) if len(got) == 4 else None
        return got[0], got[1], snapshot

    @property
    def takes_in_wait(self) -> bool:
        """Whether `wait_arrivals` can take (one shard: its accumulator is on the control vector's task)."""
        return len(self.layout.shard_sizes) == 1

    def wait_arrivals(self, seconds: float, waker: "Waker", need: int = 1, required: int = 0, taken_for: int = 0,
                      always: bool = False):
        """Waits for `need` pushes (`waker` ends the wait after `seconds`), then reads shard 0's count and control.

        With `required` > 0 (one shard only, `takes_in_wait`), the same run
        takes the gradients when `count >= required` and a fit round runs (or
        `always`), and sets control[TAKEN_FOR] = `taken_for`. Such a run must
        not be cancelled at a deadline once it may have taken, so it has none
        of its own: `waker` ends it with `POKE` tokens (`poke_aggregator`).

        Returns `(count, control, sums, tokens)`: the gradient count and
        control vector read after the wait, the taken sum (None: nothing
        taken) and the tokens dequeued.

        Raises:
          tf.errors.AbortedError: the run was delivered twice; it ran once, and
            if it took, its gradients are lost (control[TAKEN_FOR] says).
        """
        ops = self._fused()
        feed = {ops["need"]: max(1, int(need))}
        if required:
            if not self.takes_in_wait:
                raise ValueError("wait_arrivals can take only with one shard (`takes_in_wait`).")
            feed.update({ops["required"]: int(required), ops["taken_for"]: int(taken_for), ops["always"]: bool(always)})
        waker.arm(seconds)
        try:
            got = self.control.endpoint.run(ops["arrivals_take"] if required else ops["arrivals"], feed,
                                            what=f"wait for pushes to `{self.prefix}`", on_duplicate="raise")
        finally:
            waker.disarm()
        return int(got[1]), got[2], (got[4] if required and got[3] else None), got[0]


@dataclasses.dataclass
class StepRecord:
    """What the chief did in one global step.

    Attributes:
      step: the global step the gradients were computed on (the new step is
        `step + 1`).
      taken: fresh gradients averaged into this step.
      contributions: per worker, how many of its gradients were averaged.
      wait_seconds: time from the previous step's publish to the take.
      apply_seconds: time to take, apply and publish.
      end_time: `time.time()` when the step was published.
    """

    step: int
    taken: int
    contributions: List[int]
    wait_seconds: float
    apply_seconds: float
    end_time: float


def _sleep_schedule(config: ProtocolConfig):
    delay = config.poll_min
    while True:
        yield delay
        delay = min(delay * 1.5, config.poll_max)


class JobMonitor:
    """Reads the job-wide state from a worker, at most once a second."""

    def __init__(self, job_var: accumulators.SharedVariable, info: cluster_lib.ClusterInfo,
                 config: ProtocolConfig):
        self._var = job_var
        self._worker_index = info.worker_index
        chief = info.chief
        self._chief = chief
        self._config = config
        self._last_check = 0.0
        self._heartbeat = None
        self._heartbeat_time = time.monotonic()
        self.job_id = None
        self.done = False

    def join(self, waiter: cluster_lib.Task) -> int:
        """Waits for the chief to start a job on the ps tasks, joins it; returns its id."""
        if self.job_id is not None:
            return self.job_id
        start = time.monotonic()
        while True:
            if self._var.is_initialized():
                values = self._var.read()
                # A finished job's state (DONE) is a previous run's: wait for the new chief.
                if values[Job.JOB_ID] and not values[Job.DONE]:
                    # `left` is cleared: this may be a restarted worker rejoining.
                    self._var.scatter_update([Job.joined(self._worker_index), Job.left(self._worker_index)],
                                             [1, 0])
                    self.job_id = int(values[Job.JOB_ID])
                    self._heartbeat, self._heartbeat_time = values[Job.HEARTBEAT], time.monotonic()
                    return self.job_id
            if time.monotonic() - start > self._config.startup_timeout:
                raise errors.StepTimeoutError(
                    f"Worker {waiter} waited {self._config.startup_timeout:.0f} s for the chief "
                    f"{self._chief} to start the job (startup_timeout)."
                )
            time.sleep(0.1)

    def left_workers(self) -> List[int]:
        """The workers that have left the job (their process ended or shut down)."""
        values = self._var.read()
        return [w for w in range(Job.num_workers(values)) if values[Job.left(w)]]

    def check(self, force: bool = False) -> None:
        """Updates `done`; raises if the chief aborted or went silent."""
        now = time.monotonic()
        if not force and now - self._last_check < 1.0:
            return
        self._last_check = now
        values = self._var.read()
        if self.job_id is not None and values[Job.JOB_ID] != self.job_id:
            raise errors.ChiefUnavailableError(
                f"The job on the ps tasks changed (job id {self.job_id} -> {values[Job.JOB_ID]}): "
                f"the chief {self._chief} was restarted. Restart this worker to rejoin."
            )
        if values[Job.ABORT]:
            raise errors.ChiefUnavailableError(
                f"The chief {self._chief} aborted the job; its log says why."
            )
        self.done = bool(values[Job.DONE])
        if values[Job.HEARTBEAT] != self._heartbeat:
            self._heartbeat, self._heartbeat_time = values[Job.HEARTBEAT], now
        elif not self.done and now - self._heartbeat_time > self._config.chief_timeout:
            raise errors.ChiefUnavailableError(
                f"The chief {self._chief} has sent no heartbeat for "
                f"{now - self._heartbeat_time:.0f} s (chief_timeout={self._config.chief_timeout:.0f} s)."
            )


@dataclasses.dataclass
class WorkerEvent:
    """A worker the chief declared dead, or saw come back.

    Attributes:
      worker: the worker index.
      task: the worker's task (`/job:worker/task:2 (host:port)`).
      event: "died" (no heartbeat for `worker_timeout`) or "rejoined".
      step: the global step when the chief noticed.
      last_step: the step the worker last pushed a gradient for (-1: none).
      time: `time.time()` when the chief noticed.
    """

    worker: int
    task: str
    event: str
    step: int
    last_step: int
    time: float


class Liveness:
    """The chief's view of which workers are alive, from their heartbeats.

    A worker that joined the job is dead when its heartbeat (`Job.beat`) has
    not moved for `worker_timeout` seconds and it has not left the job; one
    that has not joined yet is dead `startup_timeout` seconds after the chief
    started watching. A dead worker whose heartbeat moves again (its process
    was restarted) is alive again. The chief itself is always alive.
    """

    def __init__(self, job_var: accumulators.SharedVariable, info: cluster_lib.ClusterInfo,
                 worker_timeout: float, startup_timeout: float, clock: Callable[[], float] = time.monotonic):
        self._var = job_var
        self._info = info
        self._worker_timeout = worker_timeout
        self._startup_timeout = startup_timeout
        self._clock = clock
        now = clock()
        self._beats = [None] * info.num_workers
        self._since = [now] * info.num_workers
        self.dead: set = set()
        self.left: set = set()
        self.events: List[WorkerEvent] = []

    @property
    def gone(self) -> set:
        """The workers that are dead or left the job: nothing waits for them."""
        return self.dead | self.left

    def update(self, step: int, last_steps: Sequence[int]) -> List[WorkerEvent]:
        """Reads the heartbeats; returns the new events (also kept in `events`)."""
        values = self._var.read()
        now = self._clock()
        new = []
        for w in range(self._info.num_workers):
            if w == self._info.worker_index:
                continue
            beat, joined = int(values[Job.beat(w)]), bool(values[Job.joined(w)])
            if values[Job.left(w)]:
                self.left.add(w)
                continue
            self.left.discard(w)
            if beat != self._beats[w]:
                if self._beats[w] is not None or beat:
                    self._since[w] = now
                self._beats[w] = beat
                if w in self.dead:
                    self.dead.discard(w)
                    new.append(self._event(w, "rejoined", step, last_steps))
                continue
            timeout = self._worker_timeout if joined else self._startup_timeout
            if w not in self.dead and now - self._since[w] > timeout:
                self.dead.add(w)
                new.append(self._event(w, "died", step, last_steps))
        self.events.extend(new)
        return new

    def _event(self, w: int, event: str, step: int, last_steps: Sequence[int]) -> WorkerEvent:
        return WorkerEvent(worker=w, task=str(self._info.workers[w]), event=event, step=int(step),
                           last_step=int(last_steps[w]), time=time.time())

    def silent_seconds(self, w: int) -> float:
        return self._clock() - self._since[w]


class Waker(threading.Thread):
    """Ends a blocked run after a deadline by sending it a token (`SharedState.push_wait`).

    A run cancelled at its deadline leaves undecided whatever it had started:
    a push and a wait in one run may or may not have pushed. So that run has
    no deadline of its own (beyond the endpoint's, which fails the job), and
    this thread, armed before it and disarmed after, runs `poke()` (a token
    into the waiting queue) if it lasts longer than `seconds`. A poke racing
    with the run's own return leaves one spare token: the next wait returns at
    once and looks again.
    """

    def __init__(self, poke: Callable[[], None], name: str):
        super().__init__(name=name, daemon=True)
        self._poke = poke
        self._cond = threading.Condition()
        self._deadline: Optional[float] = None
        self._closed = False
        self.pokes = 0

    def arm(self, seconds: float) -> None:
        with self._cond:
            if self._closed:  # its thread is gone: the run would wait for the endpoint's deadline
                raise RuntimeError(f"{self.name} was closed (its optimizer binding was shut down).")
            self._deadline = time.monotonic() + seconds
            if not self.is_alive():
                self.start()
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._deadline = None
            self.pokes += 1  # before the poke: the run it ends may return before `_poke` does
            try:
                self._poke()
            except Exception as e:  # pylint: disable=broad-except
                # The ps is gone: the blocked run fails at the endpoint's deadline.
                logging.warning("tf_backup: %s could not wake a blocked wait: %s", self.name, e)


class WorkerClient:
    """One worker's side of the protocol for one optimizer (eager Python).

    `sync` runs inside the training step through a `tf.py_function`.

    `local_params` (the chief's: `Aggregator.published`) returns the flat
    parameters this process published for a step, or None: the chief's steps
    then read only the control vector from the ps, not the parameters it sent
    there itself.
    """

    def __init__(self, state: SharedState, config: ProtocolConfig, info: cluster_lib.ClusterInfo,
                 monitor: JobMonitor, chief_error: Optional[Callable[[], Optional[str]]] = None,
                 dead_workers: Optional[Callable[[], Sequence[int]]] = None,
                 local_params: Optional[Callable[[int], Optional[List[np.ndarray]]]] = None):
        self.state = state
        self.config = config
        self.info = info
        self.w = info.worker_index
        self.monitor = monitor
        self._chief_error = chief_error
        self._dead_workers = dead_workers or (lambda: ())
        self.step = 0
        self.round = 1
        self._round_announced = False
        self._round_stopped = False
        self.pushed = 0
        self.dropped = 0
        self._taken_seen = 0
        self._unresolved = 0
        self._last_tag = -1
        self._last_control = None
        self.cancelled = 0
        self.missed_wakeups = 0  # waits that ran to their deadline although their condition held
        self._local_params = local_params
        self.local_pulls = 0  # steps whose parameters came from `local_params`, not the ps
        self._superseded = False  # the step moved past `self.step` during this batch
        self._superseded_read = (None, None)  # (control, snapshot) read when it did
        self._waker = Waker(lambda: state.poke(self.w), f"tf_backup-waker-{state.prefix}")
        self.on_stop: List[Callable[[], None]] = []

    # -- waiting -----------------------------------------------------------------

    def _check_health(self, force: bool = False) -> None:
        if self._chief_error is not None:
            message = self._chief_error()
            if message:
                raise errors.AggregatorError(f"The aggregator on this chief failed: {message}")
        self.monitor.check(force=force)

    def _wait(self, done: Callable[[np.ndarray], bool], what: str, timeout: float, push=None):
        """Blocks on this worker's wake-up queue until `done(control)`; returns (control, snapshot).

        `snapshot` is a seqlock read of the parameters made in the same run as
        the control vector (one ps task), or None. `push`: the arguments of a
        `SharedState.push_wait` whose run is the first wait.
        """
        start = time.monotonic()
        while True:
            waited = time.monotonic() - start
            seconds = min(WAKE_WAIT, max(0.001, timeout - waited))
            if push is not None:
                got = self.state.push_wait(self.w, *push, waker=self._waker, seconds=seconds,
                                           with_params=self._local_params is None)
                push = None
                if got is None:  # delivered twice: it pushed, its result is lost
                    continue
                if (got[0] == POKE).all() and done(got[1]):  # ended by the waker, yet the step had moved on
                    self.missed_wakeups += 1
                    return got[1], got[2]
            else:
                got = self.state.wait(self.w, seconds)
            if got is None:  # nothing happened: look anyway (a token may have been lost)
                ctl, snapshot = self.state.read_control(), None
                if done(ctl):
                    self.missed_wakeups += 1
                    return ctl, snapshot
            else:
                _, ctl, snapshot = got
            if done(ctl):
                return ctl, snapshot
            self._check_health()
            if self.monitor.done:
                return ctl, snapshot
            waited = time.monotonic() - start
            if waited > timeout:
                raise errors.StepTimeoutError(
                    f"Worker {self.w} {self.info.task} waited {waited:.0f} s for {what}. "
                    f"{self._diagnose(ctl)}"
                )

    def sleep_unless_superseded(self, seconds: float) -> bool:
        """Sleeps `seconds`, or less if this worker's batch becomes useless first (then True).

        The batch is useless once the global step passes `self.step` (the step
        of its parameters) or the fit round stops. Both wake this worker at once
        (its wake-up queue). `sync` then skips that batch's push: it is
        cancelled. Asynchronous training never cancels.
        """
        if self._superseded:
            return True  # already cancelled: nothing to wait for
        deadline = time.monotonic() + seconds
        if not self.config.staleness_check or self._round_stopped:
            time.sleep(max(0.0, seconds))
            return False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if remaining <= SLEEP_MARGIN:
                # A wait on the ps that ends at its deadline returns ~2-3 ms late (the run
                # is cancelled there); the last few ms are slept here, not woken.
                time.sleep(remaining)
                return False
            got = self.state.wait(self.w, remaining - SLEEP_MARGIN)
            if got is None:
                continue
            tokens, ctl, snapshot = got
            # Every change a later wait looks for comes with a token after it; one
            # taken here is acted on now (or was about an older step or round).
            if tokens.max(initial=WAKE) > self.step or ((tokens == WAKE).any() and self._stopped(ctl)):
                self._superseded = True
                # The same run read the parameters after the token (one ps task): the
                # batch's `sync` or `restart_superseded` uses them instead of a pull.
                self._superseded_read = (ctl, snapshot)
                return True

    def restart_superseded(self):
        """After `sleep_unless_superseded` returned True: moves to the current step now.

        Pulls the parameters of the current global step, so the batch is
        computed on them and pushed for that step instead of being cancelled at
        `sync`. Counted as a cancelled batch all the same (its computation on
        the old step was abandoned). If the round stopped meanwhile, this
        worker stops as at the end of a step.

        Returns:
          The flat parameters pulled, or None if no sleep was superseded.
        """
        if not self._superseded:
            return None
        flats, ctl = self.pull(*self._superseded_read)
        self._superseded, self._superseded_read = False, (None, None)
        self.cancelled += 1
        if self._stopped(ctl):
            self._stop()
        return flats

    def _diagnose(self, ctl: np.ndarray) -> str:
        c = self.state.ctl
        tags = c.block(ctl, c.last_tag)
        pushed = c.block(ctl, c.pushed)
        step = int(ctl[Control.STEP])
        fresh = [w for w in range(self.info.num_workers) if pushed[w] and tags[w] >= step]
        lagging = [
            f"worker {w} {self.info.workers[w]} (last pushed for step {tags[w] if pushed[w] else 'none'})"
            for w in range(self.info.num_workers) if w not in fresh
        ]
        return (
            f"Global step {step}; {self.config.replicas_to_aggregate} fresh gradients are needed "
            f"per step and workers {fresh} pushed for this step. Not pushed: "
            f"{', '.join(lagging) or 'none'}. Chief: {self.info.chief}."
        )

    def wait_until_ready(self) -> None:
        """Waits for the chief to create the shared state (non-chief workers)."""
        start = time.monotonic()
        sleeps = _sleep_schedule(dataclasses.replace(self.config, poll_max=0.1))
        while not self.state.control.is_initialized():
            if time.monotonic() - start > self.config.startup_timeout:
                raise errors.StepTimeoutError(
                    f"Worker {self.w} {self.info.task} waited {self.config.startup_timeout:.0f} s "
                    f"for the chief {self.info.chief} to create the shared state "
                    f"`{self.state.prefix}` on {self.info.ps[0]}."
                )
            self.monitor.check()
            time.sleep(next(sleeps))
        if self.state.signature.is_initialized():
            self.state.layout.check_signature(self.state.signature.read())
        self._resume(self.state.read_control())

    def _resume(self, ctl: np.ndarray) -> None:
        """Continues this worker's counts and fit round from the shared state.

        A fresh job's counts are zero. A worker restarted into a running job
        continues its predecessor's counts, so `taken + dropped == pushed`
        stays true; the predecessor's unsettled pushes are settled as usual.
        """
        # (A worker that never pushed, cancelled or ended a round is new to the job.)
        c = self.state.ctl
        self.pushed = int(ctl[c.pushed(self.w)])
        self.dropped = int(ctl[c.dropped(self.w)])
        self.cancelled = int(ctl[c.cancelled(self.w)])
        self._taken_seen = int(ctl[c.taken(self.w)])
        self._unresolved = max(0, self.pushed - self.dropped - self._taken_seen)
        self._last_tag = int(ctl[c.last_tag(self.w)]) if self.pushed else -1
        if not (self.pushed or self.cancelled or int(ctl[c.ended(self.w)])):
            # New to the job: its k-th fit is round k, as every worker's (each runs the same
            # program). One that starts late, after the others' first fit ended, thus finds
            # that round over and its first fit ends at once, in step with them after.
            self.round = 1
        else:
            # Restarted: its predecessor's round being trained, or the next one between rounds.
            self.round = max(1, int(ctl[Control.ROUND]), int(ctl[Control.STOP_ROUND]) + 1)

    # -- pulling -----------------------------------------------------------------

    def pull(self, ctl: Optional[np.ndarray] = None, snapshot=None):
        """Reads the published parameters of one consistent step.

        Args:
          ctl: a control vector just read, if any.
          snapshot: a seqlock read `(before, flats, after)` just made, if any:
            used as it is when consistent.

        Returns:
          (flats, control): the flat parameters per shard, and a control vector
          whose STEP is the step they belong to.
        """
        seen = snapshot[0] if snapshot is not None else ctl
        if seen is not None and self._local_params is not None:
            # The chief: published here before STEP said so (also when a wait that ran past
            # WAKE_WAIT read the parameters from the ps all the same).
            flats = self._local_params(int(seen[Control.STEP]))
            if flats is not None:
                self.local_pulls += 1
                self._observe(seen)
                return list(flats), seen
        if snapshot is not None:
            before, flats, after = snapshot
            if before[Control.STEP] == before[Control.VERSION] == after[Control.VERSION]:
                self._observe(before)
                return list(flats), before
        start = time.monotonic()
        sleeps = _sleep_schedule(self.config)
        while True:
            if self.state.on_one_task:
                ctl, flats, after = self.state.read_consistent()
                if ctl[Control.STEP] == ctl[Control.VERSION] == after[Control.VERSION]:
                    self._observe(ctl)
                    return list(flats), ctl
                ctl = after
            else:
                if ctl is None or ctl[Control.STEP] != ctl[Control.VERSION]:
                    ctl = self.state.read_control()
                if ctl[Control.STEP] == ctl[Control.VERSION]:
                    flats = [p.read() for p in self.state.params]
                    after = self.state.read_control()
                    if after[Control.VERSION] == ctl[Control.STEP]:
                        self._observe(ctl)
                        return flats, ctl
                    ctl = after
            if time.monotonic() - start > self.config.step_timeout:
                raise errors.StepTimeoutError(
                    f"Worker {self.w} {self.info.task} could not read a consistent copy of the "
                    f"parameters in {self.config.step_timeout:.0f} s (the chief {self.info.chief} "
                    f"kept publishing step {ctl[Control.VERSION]})."
                )
            time.sleep(next(sleeps))

    def _observe(self, ctl: np.ndarray) -> None:
        """Moves to the pulled step and settles the fate of earlier pushes."""
        self.step = int(ctl[Control.STEP])
        self._last_control = ctl
        taken = int(ctl[self.state.ctl.taken(self.w)])
        if not self._unresolved:
            self._taken_seen = taken
        elif self.config.staleness_check:
            if self.step > self._last_tag:
                # Every push before now was either taken (counted in TAKEN) or dropped.
                self.dropped += max(0, self._unresolved - (taken - self._taken_seen))
                self._taken_seen, self._unresolved = taken, 0
        elif taken - self._taken_seen >= self._unresolved:
            self._taken_seen, self._unresolved = taken, 0  # asynchronous: all applied

    # -- one step ----------------------------------------------------------------

    def metrics(self) -> np.ndarray:
        """[global step, gradients in the last step, dropped so far (all workers), stopped]."""
        ctl = self._last_control
        c = self.state.ctl
        if ctl is None:
            return np.asarray([self.step, 0, self.dropped, int(self._round_stopped)], np.int64)
        others = c.block(ctl, c.dropped).copy()
        others[self.w] = self.dropped
        return np.asarray(
            [self.step, ctl[Control.LAST_TAKEN], others.sum(), int(self._round_stopped)], np.int64
        )

    def _stopped(self, ctl: np.ndarray) -> bool:
        return ctl[Control.STOP_ROUND] >= self.round or ctl[Control.FINISHED] or self.monitor.done

    def sync(self, flats: Sequence):
        """Pushes one gradient, waits for the step, pulls. Returns (flats, metrics).

        A batch superseded while it was computed (`sleep_unless_superseded`) is
        cancelled: nothing is pushed, the new step is pulled at once.
        """
        c = self.state.ctl
        if self._round_stopped:
            return [p.read() for p in self.state.params], self.metrics()
        if not self._round_announced:
            self.state.control.scatter_max([Control.ROUND], [self.round])
            self._round_announced = True
        snapshot = ctl = None
        if self._superseded:
            ctl, snapshot = self._superseded_read
            self._superseded, self._superseded_read = False, (None, None)
            self.cancelled += 1
        else:
            tag = self.step if self.config.staleness_check else INT64_MAX
            push = (flats, tag, [c.pushed(self.w), c.last_tag(self.w), c.dropped(self.w), c.cancelled(self.w)],
                    [self.pushed + 1, self.step, self.dropped, self.cancelled])
            self.pushed += 1
            self._unresolved += 1
            self._last_tag = self.step
            if self.config.staleness_check:
                tag_step = self.step
                ctl, snapshot = self._wait(
                    lambda ctl: ctl[Control.STEP] > tag_step or self._stopped(ctl),
                    f"global step {tag_step + 1}",
                    self.config.step_timeout, push=push,
                )
            else:
                # Asynchronous: wait for this worker's own gradients only, as TF1's
                # asynchronous training, whose pushes were the updates themselves.
                seen, pending, slot = self._taken_seen, self._unresolved, c.taken(self.w)
                ctl, snapshot = self._wait(
                    lambda ctl: ctl[slot] - seen >= pending or self.monitor.done,
                    "the chief to apply this worker's gradient",
                    self.config.step_timeout, push=push,
                )
        flats, ctl = self.pull(ctl, snapshot)
        if self._stopped(ctl):
            self._stop()
        return flats, self.metrics()

    def close(self) -> None:
        """Ends the waker thread."""
        self._waker.close()

    @property
    def round_stopped(self) -> bool:
        """Whether this worker has seen its fit round stop (its fit ends after the current batch)."""
        return self._round_stopped

    def _stop(self) -> None:
        self._round_stopped = True
        for callback in self.on_stop:
            callback()

    def end_round(self, wait_for_others: bool = False):
        """Ends this worker's fit round: stops the others, returns final parameters.

        Args:
          wait_for_others: wait (up to `chief_timeout`) until every worker has
            ended the round too, so counts read afterwards are final. The chief
            does this; a worker that does not end in time is named in a warning.
        """
        c = self.state.ctl
        self.state.control.scatter_max([Control.STOP_ROUND, c.ended(self.w), c.cancelled(self.w)],
                                       [self.round, self.round, self.cancelled])
        self.state.wake_all()
        self.state.poke_aggregator(WAKE)  # it closes the round once it sees nothing more to apply
        self._superseded, self._superseded_read = False, (None, None)
        if wait_for_others:
            self.wait_for_round_end(self.round, self.config.chief_timeout, "chief_timeout")
        self.wait_for_round_closed(self.round, self.config.chief_timeout)
        flats, _ = self.pull()
        self.round += 1
        self._round_announced = False
        self._round_stopped = False
        return flats

    def wait_for_round_closed(self, round_: int, timeout: float) -> bool:
        """Waits until the chief's aggregator has closed fit round `round_` (or the job finished).

        Only then are the published parameters the round's final ones: an
        apply of gradients taken before the round stopped may still be on its
        way, and asynchronous training applies every worker's last gradient.
        Past `timeout` seconds (`chief_timeout`), a warning names what it
        waited for and this returns False; also False if the job ended first.
        """
        what = f"the chief {self.info.chief} to close fit round {round_}"
        try:
            ctl, _ = self._wait(lambda ctl: ctl[Control.CLOSED] >= round_ or ctl[Control.FINISHED], what, timeout)
        except errors.StepTimeoutError as e:
            logging.warning("tf_backup: %s; this worker's final parameters may miss the round's last steps "
                            "(chief_timeout).", e)
            return False
        return bool(ctl[Control.CLOSED] >= round_ or ctl[Control.FINISHED])

    def wait_for_round_end(self, round_: int, timeout: float, setting: str = "timeout") -> List[str]:
        """Waits until every worker has ended fit round `round_`; returns the tasks that did not in time.

        Workers that left the job or that the chief declared dead are not waited
        for. Past `timeout` seconds, a warning names the late workers.
        """
        c = self.state.ctl
        start = time.monotonic()
        sleeps = _sleep_schedule(self.config)
        while True:
            ended = c.block(self.state.read_control(), c.ended)
            late = [w for w in range(self.info.num_workers) if ended[w] < round_]
            if late:  # a worker that left the job (e.g. refused at build) or died never ends it
                gone = set(self.monitor.left_workers()) | set(self._dead_workers())
                late = [w for w in late if w not in gone]
            if not late:
                return []
            if time.monotonic() - start > timeout:
                names = [str(self.info.workers[w]) for w in late]
                logging.warning(
                    "tf_backup: workers %s did not end fit round %d within %.0f s (%s); their counts "
                    "may be incomplete.", ", ".join(names), round_, timeout, setting)
                return names
            time.sleep(next(sleeps))


class Aggregator(threading.Thread):
    """The chief's loop: take N fresh gradients, apply with the inner optimizer, publish.

    Args:
      state: the optimizer's shared state.
      config: protocol settings.
      info: the cluster.
      apply_fn: a function from the averaged flat gradients (one per shard) to
        the new flat parameters (one per shard); it runs the inner optimizer on
        the chief's master copy.
      step: the global step to start from (a restored checkpoint's).
      max_steps: stop every round once the global step reaches this (None:
        the workers' fits decide).
      liveness: the workers' heartbeats; when fewer workers are alive than a
        step needs, the aggregator fails with `WorkersLostError`'s message
        instead of waiting for gradients that cannot come.
      on_publish: called with the new step after each step is published, in
        this thread (the master copy does not change meanwhile): checkpoints.
    """

    def __init__(self, state: SharedState, config: ProtocolConfig, info: cluster_lib.ClusterInfo,
                 apply_fn: Callable, step: int = 0, max_steps: Optional[int] = None,
                 liveness: Optional[Liveness] = None,
                 on_publish: Optional[Callable[[int], None]] = None):
        super().__init__(name=f"tf_backup-aggregator-{state.prefix}", daemon=True)
        self.state = state
        self.config = config
        self.info = info
        self.apply_fn = apply_fn
        self.step = step
        # The step the master copy's values belong to: `step`, or `step + 1` once the apply for it
        # ran and its publish has not (yet) succeeded. The chief's checkpoint saves this step.
        self.master_step = step
        self.max_steps = max_steps
        self.liveness = liveness
        self.on_publish = on_publish
        self.history: List[StepRecord] = []
        self.error: Optional[str] = None
        self.taken = np.zeros([config.num_workers], np.int64)
        self.lost_steps = 0  # steps published without an update (a take delivered twice)
        self.missed_wakeups = 0  # waits that ran to their deadline with enough gradients in
        self._stop_event = threading.Event()
        self._waker = Waker(state.poke_aggregator, f"tf_backup-aggregator-waker-{state.prefix}")
        self._published: "collections.OrderedDict[int, List[np.ndarray]]" = collections.OrderedDict()
        self._published_lock = threading.Lock()
        self._last_publish = time.monotonic()
        self._last_liveness = 0.0

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            try:
                self.state.poke_aggregator()
            except errors.PsUnavailableError:
                pass  # the ps is gone: the wait ends at its deadline
            self.join(timeout)

    def published(self, step: int) -> Optional[List[np.ndarray]]:
        """The flat parameters this aggregator published for `step`, if among its last `KEEP_PUBLISHED`."""
        with self._published_lock:
            return self._published.get(step)

    def run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # pylint: disable=broad-except
            self.error = f"{type(e).__name__}: {e}"
            logging.error("tf_backup aggregator failed at step %d: %s", self.step, self.error)
        finally:
            self._waker.close()

    def _loop(self) -> None:
        # No deadline on the gradients themselves: the workers (the chief's own
        # training loop among them) wait for the step with theirs, and a worker
        # that died is noticed from its heartbeat (`_check_workers`). Between
        # checks, the loop blocks on the `arrivals` queue, which every push feeds.
        n = self.config.replicas_to_aggregate
        finished = False
        others = self.state.accs[1:]
        fused = self.state.takes_in_wait  # one shard: the wait takes too, in the same run
        count = 0  # fresh gradients seen in the accumulator: the wait asks for the rest
        while not self._stop_event.is_set():
            if self._check_workers():
                return
            if self.max_steps is not None and self.step >= self.max_steps:
                if not finished:
                    self.state.control.scatter_update([Control.FINISHED], [1])
                    self.state.wake_all()
                    finished = True
                self._stop_event.wait(max(self.config.poll_max, 0.05))
                continue
            need = max(1, n - count)
            try:
                got = self.state.wait_arrivals(
                    min(WAKE_WAIT, 0.5), self._waker, need=need, required=n if fused else 0, taken_for=self.step + 1,
                    always=not self.config.staleness_check)
            except tf.errors.AbortedError as e:  # delivered twice (Endpoint.run): did its take run?
                if "received twice" not in (e.message or ""):
                    raise
                count = 0
                if self.state.read_control()[Control.TAKEN_FOR] == self.step + 1:
                    self._lost_take(e)
                    self._apply_publish(None)
                continue
            count, ctl, sums, tokens = got
            # Ended by the waker with fewer pushes' tokens than asked for: if enough gradients
            # are in all the same, their tokens went missing.
            timed_out = (tokens == POKE).any() and (tokens != POKE).sum() < need
            if sums is not None:  # taken (also when stopping: the accumulators have moved on)
                self.missed_wakeups += int(timed_out)
                self._apply_publish([sums], start=time.monotonic())
                count = 0
                continue
            if self._stop_event.is_set():
                break
            paused = ctl[Control.ROUND] <= ctl[Control.STOP_ROUND]
            if paused and ctl[Control.CLOSED] < ctl[Control.STOP_ROUND] and self._nothing_left(ctl, count):
                self._close_round(int(ctl[Control.STOP_ROUND]))
            if paused and self.config.staleness_check:
                continue  # between fit rounds (asynchronous training applies every gradient)
            if count >= n and all(acc.num_accumulated() >= n for acc in others):
                self.missed_wakeups += int(timed_out)
                self._take_apply_publish()
                count = 0

    def _nothing_left(self, ctl: np.ndarray, count: int) -> bool:
        """Whether the stopped rounds in `ctl` have nothing more to apply.

        `ctl` was read after the loop's last take (none in flight). With the
        staleness check, no take starts once the round stopped. Asynchronous
        training applies every gradient: it waits until every worker still in
        the job ended the round (each waited for its last gradient to be
        applied) and nothing is left in the accumulator.
        """
        if self.config.staleness_check:
            return True
        if count:
            return False
        c, stop = self.state.ctl, ctl[Control.STOP_ROUND]
        gone = self.liveness.gone if self.liveness is not None else set()
        ended = c.block(ctl, c.ended)
        return all(ended[w] >= stop or w in gone for w in range(self.config.num_workers))

    def _close_round(self, round_: int) -> None:
        """Marks the fit rounds up to `round_` closed and wakes the workers waiting in `end_round`."""
        self.state.control.scatter_max([Control.CLOSED], [round_])
        self.state.wake_all()

    def _check_workers(self) -> bool:
        """Reads the heartbeats (once a second); True when too few workers are left."""
        if self.liveness is None or time.monotonic() - self._last_liveness < 1.0:
            return False
        self._last_liveness = time.monotonic()
        events = self.liveness.update(self.step, self._last_steps())
        for e in events:
            logging.warning("tf_backup: worker %s %s at global step %d (its last gradient was for step %d).",
                            e.task, e.event, e.step, e.last_step)
        ctl = self.state.read_control()  # after the job vector: a worker ends its round before it leaves
        if ctl[Control.ROUND] <= ctl[Control.STOP_ROUND] or ctl[Control.FINISHED]:
            return False  # no round is being trained: nothing waits for gradients
        gone = self.liveness.gone
        alive = self.config.num_workers - len(gone)
        needed = self.config.replicas_to_aggregate
        if alive >= needed or not self.liveness.dead:
            return False
        tags = self._last_steps(ctl)
        lost = "; ".join(
            f"{self.info.workers[w]}: last gradient for step {tags[w]}, silent for "
            f"{self.liveness.silent_seconds(w):.0f} s" for w in sorted(self.liveness.dead))
        self.error = (
            f"WorkersLostError: only {alive} of {self.config.num_workers} workers are alive at global "
            f"step {self.step} but each step needs {needed}. Missing: {lost}."
        )
        logging.error("tf_backup: %s", self.error)
        return True

    def _last_steps(self, ctl: Optional[np.ndarray] = None) -> List[int]:
        """Per worker, the step of its last pushed gradient (-1: none)."""
        ctl = self.state.read_control() if ctl is None else ctl
        c = self.state.ctl
        tags, pushed = c.block(ctl, c.last_tag), c.block(ctl, c.pushed)
        return [int(t) if p else -1 for t, p in zip(tags, pushed)]

    def _lost_take(self, e: tf.errors.AbortedError) -> None:
        # A take delivered twice ran once and its gradients are lost (see
        # accumulators.Endpoint.run). Every accumulator has moved on, so the step
        # moves on without an update; its gradients count as dropped.
        logging.warning("tf_backup: step %d lost its gradients (%s); publishing it unchanged.",
                        self.step, e.message.splitlines()[0] if e.message else e)
        self.lost_steps += 1

    def _take_apply_publish(self) -> None:
        start = time.monotonic()
        n = self.config.replicas_to_aggregate
        try:
            sums = [acc.take_grad(n) for acc in self.state.accs]
        except tf.errors.AbortedError as e:
            self._lost_take(e)
            sums = None
        self._apply_publish(sums, start)

    def _apply_publish(self, sums: Optional[List[np.ndarray]], start: Optional[float] = None) -> None:
        """Applies the taken sums (one per shard; None: the take was lost) and publishes the next step."""
        start = time.monotonic() if start is None else start
        workers = self.config.num_workers
        if sums is None:
            counts = np.zeros([workers], np.int64)
            new_flats = [p.read() for p in self.state.params]
        else:
            counts = np.rint(sums[0][-workers:]).astype(np.int64)
            new_flats = self.apply_fn([s[:-workers] / s[-workers:].sum() for s in sums])
        c = self.state.ctl
        new_step = self.step + 1
        self.master_step = new_step  # applied: a checkpoint from here on holds step `new_step`
        self.taken += counts
        new_flats = [np.asarray(f, self.state.layout.dtype.as_numpy_dtype) for f in new_flats]
        with self._published_lock:  # before the ps says `new_step`: the chief's worker reads it here
            self._published[new_step] = new_flats
            while len(self._published) > KEEP_PUBLISHED:
                self._published.popitem(last=False)
        self.state.publish(
            new_step, new_flats,
            [Control.STEP, Control.LAST_TAKEN] + [c.taken(w) for w in range(workers)],
            [new_step, int(counts.sum())] + [int(t) for t in self.taken],
        )
        end = time.monotonic()
        self.history.append(
            StepRecord(
                step=self.step,
                taken=int(counts.sum()),
                contributions=[int(x) for x in counts],
                wait_seconds=start - self._last_publish,
                apply_seconds=end - start,
                end_time=time.time(),
            )
        )
        self._last_publish = end
        self.step = new_step
        if self.on_publish is not None:
            self.on_publish(new_step)
