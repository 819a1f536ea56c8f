"""One optimizer's shared state on the ps tasks, and the runs that read and write it.

The resources (see `tf_backup.protocol`): `control`, `signature`,
`params/<s>` and `acc/<s>` per shard, and on ps 0 two kinds of int64 FIFO
queues of wake-up tokens:

* `wake/<w>`, one per worker: the chief enqueues the new step after each
  publish, and `WAKE` when a round stops, so a waiting worker blocks on its
  queue (`wait`) instead of polling `control`;
* `arrivals`: each push enqueues its tag, so the aggregator blocks on it
  (`wait_arrivals`) instead of polling the accumulators.

A token only says "look again": every decision is made on the control vector
(or the accumulator count) read in the same run, after the dequeue. A token
lost (a run delivered twice) costs at most one bounded wait.

With one ps task (or every shard on ps 0), the seqlock read, the publish and
the push each run as one graph on the ps, their order kept by control
dependencies, where they would otherwise take 3, 3 and 2 round trips; a
worker's wait then returns the parameters with the control vector.

A run that changes state is never cancelled at a deadline (a cancelled run may
have run part of its graph): the push-and-wait and the aggregator's wait-and-take
have no deadline of their own but the endpoint's, and a `tf_backup.waker.Waker`
ends them with a `POKE` token instead.
"""

from concurrent import futures
import dataclasses
import threading
from typing import Any, Callable, Collection, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_backup import accumulators
from tf_backup import endpoint as endpoint_lib
from tf_backup import protocol
from tf_backup import ps_update
from tf_backup.layout import Layout
from tf_backup.protocol import Control
from tf_backup.protocol import ControlView
from tf_backup.waker import Waker


class Snapshot(NamedTuple):
    """A seqlock read: the control vector, the flat parameters per shard, the control vector again."""

    before: ControlView
    flats: List[np.ndarray]
    after: ControlView

    @property
    def consistent(self) -> bool:
        """Whether `flats` are exactly the parameters of step `before.step`."""
        return protocol.consistent(self.before, self.after)


class Wake(NamedTuple):
    """What a worker's wait returns: the tokens it dequeued, and what it read after them.

    `snapshot` is a seqlock read of the parameters made in the same run (one
    ps task, and the parameters were asked for), else None.
    """

    tokens: np.ndarray
    control: ControlView
    snapshot: Optional[Snapshot]


class Arrivals(NamedTuple):
    """What the aggregator's wait returns.

    Attributes:
      count: fresh gradients in shard 0's accumulator, read after the wait.
      control: the control vector, read after the wait.
      sums: what the same run took (one shard only): (the body in the wire dtype, the exact
        tail), else None.
      tokens: the tokens dequeued.
    """

    count: int
    control: ControlView
    sums: Optional[tuple]
    tokens: np.ndarray


@dataclasses.dataclass
class _Runs:
    """The fused graphs on ps 0, built once (`SharedState._runs`), and their placeholders."""

    token: tf.Tensor  # the token a wake-up or poke enqueues
    waits: List[dict]  # per worker: drain its queue, then read
    push_waits: List[dict]  # per worker: push, then its wait
    push_waits_control: List[dict]  # the same, reading only the control vector
    pokes: List[tf.Operation]
    wake_all: tf.Operation
    poke_arrivals: tf.Operation
    arrivals: dict  # the aggregator's wait; `need`, `required`, `taken_for`, `always` feed it
    arrivals_take: dict
    need: tf.Tensor
    required: tf.Tensor
    taken_for: tf.Tensor
    always: tf.Tensor
    step_idx: tf.Tensor  # control[step_idx] = step: the commit of a publish
    step: tf.Tensor
    commit: tf.Operation  # the commit, then wake every worker in `awake`
    awake: tf.Tensor  # bool per worker (default all): whose queue a publish feeds
    wake_sizes: List[tf.Tensor]  # tokens waiting in each worker's queue
    hyper: Dict[str, tf.Tensor]  # (update on the ps) the scalars the fused take applies with
    known: tf.Tensor  # the step a waiting worker holds: its wait reads parameters only past it
    version_idx: Optional[tf.Tensor] = None  # one task: version, parameters, commit in one run
    version: Optional[tf.Tensor] = None
    new_values: Optional[List[tf.Tensor]] = None
    publish: Optional[tf.Operation] = None
    read: Optional[dict] = None


class SharedState:
    """Handles to one optimizer's shared state on the ps tasks.

    Args:
      prefix: the resources' name prefix, `tf_backup/<job id>/opt<k>`.
      layout: the variables' shards.
      ps: the ps tasks (shard `s` lives on `ps[s]`).
      num_workers: N + b.
      endpoints: how this process reaches the ps tasks.
      wire_dtype: what gradients and parameters cross the network in (`ProtocolConfig.wire_dtype`;
        "float32" keeps the variables' dtype). The published parameters are held in it too:
        they are what every worker pulls.
      update: with `apply_on_ps`, the inner optimizer's rule that each ps task applies to its
        shard (`tf_backup.ps_update`): the master copy and the optimizer's slots then live on
        the ps tasks too, and nothing model-sized goes through the chief. None: the chief applies.
      nesterov: (SGD with momentum on the ps) Nesterov momentum.
    """

    def __init__(self, prefix: str, layout: Layout, ps: Sequence, num_workers: int,
                 endpoints: endpoint_lib.Endpoints, wire_dtype: str = "float32",
                 update: Optional[ps_update.UpdateRule] = None, nesterov: bool = False):
        self.prefix = prefix
        self.layout = layout
        self.wire = layout.dtype if wire_dtype == "float32" else tf.as_dtype(wire_dtype)
        # A push in a narrower wire dtype sends its tail (norm, one-hot) as a second, exact tensor;
        # in the variables' dtype it is one tensor, concatenated on the worker (no copy on the ps).
        self.tail = protocol.push_tail(num_workers) if self.wire != layout.dtype else 0
        self.num_workers = num_workers
        self.ctl = Control(num_workers)
        where = [endpoints.of(task) for task in ps]
        self.control = accumulators.SharedVariable(f"{prefix}/control", tf.int64, [self.ctl.size], where[0])
        sig = layout.signature()
        self.signature = accumulators.SharedVariable(f"{prefix}/signature", tf.int64, [len(sig)], where[0])
        self._where = where
        self.params = [
            accumulators.SharedVariable(f"{prefix}/params/{s}", self.wire, [size], where[s])
            for s, size in enumerate(layout.shard_sizes)
        ]
        self.update, self._nesterov = update, nesterov
        self.master: List[accumulators.SharedVariable] = []  # (update on the ps) the master copy per shard
        self.slots: List[List[accumulators.SharedVariable]] = []  # per slot, per shard
        if update is not None:
            # The published parameters are the master copy itself, unless they are narrower on the wire.
            self.master = self.params if self.wire == layout.dtype else [
                accumulators.SharedVariable(f"{prefix}/master/{s}", layout.dtype, [size], where[s])
                for s, size in enumerate(layout.shard_sizes)]
            self.slots = [[accumulators.SharedVariable(f"{prefix}/slot{k}/{s}", layout.dtype, [size], where[s])
                           for s, size in enumerate(layout.shard_sizes)] for k in range(update.num_slots)]
        self._updates: Dict[tuple, dict] = {}  # (generation, shard): the take-and-apply run
        self.generation = 0  # the newest generation (`set_generation`)
        # Transfers to several ps tasks run at once: the bytes of a push or a pull share this
        # host's link instead of waiting for each other's round trips (one thread per other task).
        self._pool = futures.ThreadPoolExecutor(max(1, len(where) - 1), thread_name_prefix=f"tf_backup-{prefix}")
        self._accs: Dict[int, List[accumulators.ConditionalAccumulator]] = {}  # per generation
        self._built: Dict[int, _Runs] = {}  # per generation
        self._lock = threading.Lock()

    @property
    def accs(self) -> List[accumulators.ConditionalAccumulator]:
        """The accumulators of the newest generation, one per shard (`accs_of`)."""
        return self.accs_of(self.generation)

    def accs_of(self, generation: int) -> List[accumulators.ConditionalAccumulator]:
        """The accumulators of `generation`, one per shard.

        Made on first use: making one creates it on the ps with this layout's
        shape, so a worker must check the chief's signature before touching them.
        Each generation has accumulators of its own names, so a push from a
        worker that has not seen the new generation yet lands in the old ones,
        never taken (on a restarted ps task, one made with the old name would
        start at step 0 and accept any tag: `tf_backup.recovery`).
        """
        with self._lock:
            if generation not in self._accs:
                where = self.prefix if not generation else f"{self.prefix}/g{generation}"
                self._accs[generation] = [
                    accumulators.ConditionalAccumulator(
                        f"{where}/acc/{s}", self.layout.dtype, [size + protocol.push_tail(self.num_workers)],
                        self._where[s], reduction_type="SUM", tail=self.tail, wire_dtype=self.wire)
                    for s, size in enumerate(self.layout.shard_sizes)
                ]
            return self._accs[generation]

    def set_generation(self, generation: int) -> None:
        """Takes the accumulators of `generation` (and the runs on them) from now on, unless newer ones are in use."""
        self.generation = max(self.generation, generation)

    def create(self, flats: Sequence, step: int = 0, replicas: int = 1,
               input_positions: Optional[Sequence[int]] = None) -> None:
        """Writes the initial state (chief only), `replicas` the first step's N.

        `input_positions`: per worker, the batches of its input already trained
        on (`Control.batches`; a resumed job's, from its checkpoint)."""
        control = np.zeros([self.ctl.size], np.int64)
        control[Control.REPLICAS] = replicas
        if input_positions is not None:
            control[[self.ctl.batches(w) for w in range(self.num_workers)]] = np.asarray(input_positions, np.int64)
        self._write(flats, step, control)

    def repopulate(self, flats: Sequence, step: int, control: np.ndarray) -> int:
        """(Chief.) Writes the whole state again, as of `step`, in a new generation; returns it.

        `control`: the control vector to write (the chief's last read, brought
        up to date); its STEP, VERSION and GENERATION are set here.
        """
        self.set_generation(self.generation + 1)
        self._write(flats, step, control)
        return self.generation

    def _write(self, flats: Sequence, step: int, control: np.ndarray) -> None:
        """The parameters, this generation's accumulators at `step`, then `control`: last, it marks the state ready."""
        self.signature.assign(self.layout.signature())
        for var, flat in zip(self.params, flats):
            var.assign(flat)
        for acc in self.accs:
            acc.set_global_step(step)
        control = np.array(control, np.int64)
        control[Control.STEP] = control[Control.VERSION] = step
        control[Control.GENERATION] = self.generation
        self.control.assign(control)

    def write_update_state(self, master: Sequence, slots: Sequence[Sequence]) -> None:
        """(Update on the ps; chief, before its aggregator starts.) The master copy and the slots, per shard."""
        if self.master is not self.params:
            self.each_shard(lambda s: self.master[s].assign(master[s]))
        for k, per_shard in enumerate(slots):
            self.each_shard(lambda s: self.slots[k][s].assign(per_shard[s]))

    def read_update_state(self):
        """(Update on the ps.) (master flats, [slot flats per shard] per slot), read from every task at once."""
        master = self.each_shard(lambda s: self.master[s].read())
        return master, [self.each_shard(lambda s: var[s].read()) for var in self.slots]

    def mark_version(self, step: int) -> None:
        """VERSION = step: the parameters are about to change (the seqlock's first half)."""
        self.control.scatter_update([Control.VERSION], [step])

    def take_apply(self, shard: int, required: int, hyper: Dict[str, float]):
        """(Update on the ps.) Takes shard `shard`'s sum and applies its mean there; returns (tail, squared norm of the sum).

        Call `mark_version` first: this changes the published parameters.
        """
        run = self._update_run(shard)
        feed = {run["required"]: int(required), **ps_update.hyper_feed(run["hyper"], hyper)}
        got = self._where[shard].run(run["fetch"], feed, what=f"take and apply of `{self.prefix}` shard {shard}",
                                     on_duplicate=endpoint_lib.OnDuplicate.RAISE)
        return got

    def _update_run(self, shard: int, generation: Optional[int] = None) -> dict:
        generation = self.generation if generation is None else generation
        key = (generation, shard)
        if key not in self._updates:
            built = self._where[shard].build(lambda: self._build_take_apply(shard, generation))
            with self._lock:
                self._updates.setdefault(key, built)
        return self._updates[key]

    def _hyper_placeholders(self) -> Dict[str, tf.Tensor]:
        return {k: tf.compat.v1.placeholder(tf.float32, [], name=k) for k in ps_update.hyper_names(self.update)}

    def _build_take_apply(self, shard: int, generation: int, required=None, before=(), hyper=None) -> dict:
        """(In shard `shard`'s endpoint graph.) Take, average, apply, then the wire copy; fetches (tail, sq norm).

        `required` and `hyper`: placeholders made outside (a branch of a `tf.cond` cannot hold one).
        """
        acc = self.accs_of(generation)[shard]
        required = tf.compat.v1.placeholder(tf.int32, []) if required is None else required
        hyper = self._hyper_placeholders() if hyper is None else hyper
        with tf.control_dependencies(list(before)):
            taken = tf.raw_ops.ResourceAccumulatorTakeGradient(handle=acc.ops["handle"], num_required=required,
                                                               dtype=self.layout.dtype)
        size = self.layout.shard_sizes[shard]
        body, tail = taken[:size], taken[size:]
        count = tf.maximum(tf.reduce_sum(tail[-self.num_workers:]), 1.0)
        master = self.master[shard].ops
        slots = [var[shard].ops["handle"] for var in self.slots]
        applied = ps_update.build_apply(self.update, master["handle"], slots, body / count, hyper,
                                        nesterov=self._nesterov)
        if self.master is not self.params:  # the narrow copy every worker pulls
            with tf.control_dependencies([applied]):
                value = tf.raw_ops.ReadVariableOp(resource=master["handle"], dtype=self.layout.dtype)
                applied = tf.raw_ops.AssignVariableOp(resource=self.params[shard].ops["handle"],
                                                      value=tf.cast(value, self.wire))
        with tf.control_dependencies([applied]):
            fetch = (tf.identity(tail), tf.reduce_sum(tf.square(body)))
        return {"required": required, "hyper": hyper, "fetch": fetch}

    def lost_elsewhere(self) -> List[str]:
        """The ps tasks other than the control vector's that no longer hold their shard (they restarted empty).

        (A restart of the control vector's task fails the chief's next run
        there; one of another task would go unnoticed by the chief while every
        worker waits for it: `tf_backup.recovery`.)

        Raises:
          errors.PsUnavailableError: a task did not answer.
        """
        home = self.control.endpoint
        return [var.endpoint.device for var in self.params if var.endpoint is not home and not var.is_initialized()]

    def intact(self) -> bool:
        """Whether every ps task still holds this state (False: one restarted empty since it was written).

        Raises:
          errors.PsUnavailableError: a task did not answer.
        """
        return all(var.is_initialized() for var in [self.control, self.signature, *self.params])

    def read_control(self) -> ControlView:
        return self.ctl.view(self.control.read())

    def read_params(self) -> List[np.ndarray]:
        """The published flat parameters, shard by shard, read from every task at once (no consistency check)."""
        return self.each_shard(lambda s: self.params[s].read())

    @property
    def on_one_task(self) -> bool:
        ep = self.control.endpoint
        return all(p.endpoint is ep for p in self.params) and self.accs[0].endpoint is ep

    @property
    def takes_in_wait(self) -> bool:
        """Whether `wait_arrivals` can take (one shard: its accumulator is on the control vector's task)."""
        return len(self.layout.shard_sizes) == 1

    def each_shard(self, fn: Callable[[int], Any], shards: Optional[Sequence[int]] = None) -> List[Any]:
        """`fn(s)` for every shard s (or those in `shards`), at once; results in order.

        Every call runs to its end; then the first failure, if any, is raised.
        """
        shards = list(range(len(self.params))) if shards is None else list(shards)
        if len(shards) <= 1:
            return [fn(s) for s in shards]
        running = [self._pool.submit(fn, s) for s in shards[1:]]
        first = None
        try:
            first = fn(shards[0])  # in this thread: one task's transfer needs no hand-over
        finally:
            futures.wait(running)
        return [first] + [f.result() for f in running]

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    # -- the runs --------------------------------------------------------------------

    def read_consistent(self) -> Snapshot:
        """A seqlock read (control, parameters, control) in one run (`on_one_task` only)."""
        got = self.control.endpoint.run(self._runs().read, what=f"read of `{self.prefix}` parameters")
        return self._snapshot(got)

    def publish(self, step: int, flats: Sequence, indices: Sequence[int], values: Sequence[int],
                dead: Collection[int] = ()) -> None:
        """VERSION = step, the parameters, then control[indices] = values (STEP among them).

        Then wakes every worker with the token `step`, but the `dead` ones (their queues would
        only grow; a worker that comes back finds its next token at the next publish).
        """
        runs = self._runs()
        feed = {runs.step_idx: np.asarray(indices, np.int32), runs.step: np.asarray(values, np.int64),
                runs.token: int(step)}
        if dead:
            feed[runs.awake] = np.asarray([w not in dead for w in range(self.num_workers)], bool)
        if flats is None:  # applied on the ps, VERSION already set (`mark_version`): the commit alone
            self.control.endpoint.run(runs.commit, feed, what=f"commit of `{self.prefix}` step {step}")
            return
        if not self.on_one_task:
            self.control.scatter_update([Control.VERSION], [step])
            self.each_shard(lambda s: self.params[s].assign(flats[s]))
            self.control.endpoint.run(runs.commit, feed, what=f"commit of `{self.prefix}` step {step}")
            return
        feed.update({runs.version_idx: [Control.VERSION], runs.version: [step]})
        feed.update({ph: np.asarray(flat, self.wire.as_numpy_dtype) for ph, flat in zip(runs.new_values, flats)})
        self.control.endpoint.run(runs.publish, feed, what=f"publish of `{self.prefix}` step {step}")

    def wake_queue_sizes(self) -> List[int]:
        """The tokens waiting in each worker's wake-up queue (for tests and measurements)."""
        runs = self._runs()
        return [int(x) for x in self.control.endpoint.run(runs.wake_sizes, what=f"wake-up queues of `{self.prefix}`")]

    def push_wait(self, w: int, flats: Sequence, tag: int, indices: Sequence[int], values: Sequence[int],
                  waker: Waker, seconds: float, with_params: bool = True,
                  generation: Optional[int] = None, known_step: int = -1) -> Optional[Wake]:
        """Pushes worker `w`'s gradient tagged `tag` (and control[indices] = values), then `wait`s, in one run.

        `generation`: the accumulators pushed to (default: the newest), those
        of the generation the worker has seen. `known_step`: the step of the
        worker's parameters; the wait reads the parameters only past it.

        The wait has no deadline of its own (a run cancelled at a deadline might
        or might not have pushed): `waker` ends it after `seconds` with a
        token. Returns what `wait` returns (without `with_params`, never a
        snapshot); None if the run was delivered twice (it pushed once; its
        result is lost).
        """
        generation = self.generation if generation is None else generation
        accs = self.accs_of(generation)
        # The other shards first, all at once; shard 0's push, last, feeds `arrivals`, so the
        # aggregator never sees a push that is not yet in every shard. This host's link is busy
        # for the whole gradient either way.
        self.each_shard(lambda s: accs[s].apply_grad(flats[s], tag), range(1, len(accs)))
        acc, control, runs = accs[0].ops, self.control.ops, self._runs(generation)
        feed = {**accs[0].feed(flats[0]), acc["step"]: int(tag),
                control["indices"]: np.asarray(indices, np.int32), control["updates"]: np.asarray(values, np.int64),
                runs.known: int(known_step)}
        fetches = (runs.push_waits if with_params else runs.push_waits_control)[w]
        with waker.armed(seconds):
            got = self.control.endpoint.run(fetches, feed, what=f"push and wait of worker {w} on `{self.prefix}`",
                                            on_duplicate=endpoint_lib.OnDuplicate.DONE)
        return None if got is None else self._wake(got)

    def wait(self, w: int, seconds: float, known_step: int = -1) -> Optional[Wake]:
        """Drains worker `w`'s wake-up queue, waiting up to `seconds` for a token if it is empty.

        Returns None if nothing came in time, else what the run read after the
        dequeue (with one ps task, a seqlock read of the parameters too, if the
        step is past `known_step`).
        """
        runs = self._runs()
        got = self.control.endpoint.run(runs.waits[w], {runs.known: int(known_step)}, wait=seconds,
                                        what=f"wait of worker {w} on `{self.prefix}`")
        return None if got is None else self._wake(got)

    def wait_arrivals(self, seconds: float, waker: Waker, need: int = 1, required: int = 0, taken_for: int = 0,
                      always: bool = False, hyper: Optional[Dict[str, float]] = None) -> Arrivals:
        """Waits for `need` pushes (`waker` ends the wait after `seconds`), then reads shard 0's count and control.

        With `required` > 0 (one shard only, `takes_in_wait`), the same run
        takes the gradients when `count >= required` and a fit round runs (or
        `always`), and sets control[TAKEN_FOR] = `taken_for`. Such a run must
        not be cancelled at a deadline once it may have taken, so it has none
        of its own: `waker` ends it with `POKE` tokens (`poke_aggregator`).
        With the update on the ps, the take applies it too (with `hyper`, the
        step's scalars) and `sums` is (the exact tail, the sum's squared norm).

        Raises:
          errors.DuplicateDeliveryError: the run was delivered twice; it ran
            once, and if it took, its gradients are lost (control[TAKEN_FOR] says).
        """
        runs = self._runs()
        feed = {runs.need: max(1, int(need))}
        if required:
            if not self.takes_in_wait:
                raise ValueError("wait_arrivals can take only with one shard (`takes_in_wait`).")
            feed.update({runs.required: int(required), runs.taken_for: int(taken_for), runs.always: bool(always)})
            if self.update is not None:  # the take applies too, with the step's scalars
                feed.update(ps_update.hyper_feed(runs.hyper, hyper))
        with waker.armed(seconds):
            got = self.control.endpoint.run(runs.arrivals_take if required else runs.arrivals, feed,
                                            what=f"wait for pushes to `{self.prefix}`",
                                            on_duplicate=endpoint_lib.OnDuplicate.RAISE)
        took = required and got["due"]
        return Arrivals(count=int(got["count"]), control=self.ctl.view(got["control"]),
                        sums=got["took"] if took else None, tokens=got["tokens"])

    def poke(self, w: int) -> None:
        """Puts a `POKE` token in worker `w`'s queue: its blocked wait returns (see `Waker`)."""
        runs = self._runs()
        self.control.endpoint.run(runs.pokes[w], {runs.token: protocol.POKE}, what=f"wake-up of worker {w}")

    def wake_all(self) -> None:
        """Wakes every worker's wait with the token `WAKE` (a round stopped, the job finished)."""
        runs = self._runs()
        self.control.endpoint.run(runs.wake_all, {runs.token: protocol.WAKE}, what=f"wake-up of `{self.prefix}`")

    def poke_aggregator(self, token: int = protocol.POKE) -> None:
        """Ends the aggregator's wait with `token`s, one per worker.

        `POKE`: its waker's deadline, or a stop. `WAKE`: a worker ended its fit
        round; the aggregator looks at the control vector and closes the round.
        """
        runs = self._runs()
        self.control.endpoint.run(runs.poke_arrivals, {runs.token: int(token)},
                                  what=f"wake-up of `{self.prefix}` aggregator")

    # -- results ---------------------------------------------------------------------

    def _snapshot(self, got: dict) -> Snapshot:
        return Snapshot(self.ctl.view(got["before"]), list(got["flats"]), self.ctl.view(got["after"]))

    def _wake(self, got: dict) -> Wake:
        read = "flats" in got and all(f.shape[0] == size for f, size in zip(got["flats"], self.layout.shard_sizes))
        return Wake(got["tokens"], self.ctl.view(got["before"]), self._snapshot(got) if read else None)

    # -- building the graphs -----------------------------------------------------------

    def _runs(self, generation: Optional[int] = None) -> _Runs:
        """The fused runs on the accumulators of `generation` (default: the newest)."""
        generation = self.generation if generation is None else generation
        if generation not in self._built:
            acc = self.accs_of(generation)[0].ops
            if acc["apply"].graph is not self.control.ops["read"].graph:
                raise AssertionError("shard 0's accumulator must be on the control vector's task")
            built = self.control.endpoint.build(lambda: self._build(generation))
            with self._lock:
                self._built.setdefault(generation, built)
        return self._built[generation]

    def _build(self, generation: int) -> _Runs:
        """(In the control vector's endpoint graph.) Every fused run, ordered by control dependencies."""
        control, acc = self.control.ops, self.accs_of(generation)[0].ops
        params = [p.ops for p in self.params]
        one_task = self.on_one_task

        def read(var):
            return tf.raw_ops.ReadVariableOp(resource=var["handle"], dtype=var["read"].dtype)

        # A wait reads the parameters only once the step moved past the one its worker holds
        # (`known`, default -1: always): a wait ended by its waker, or by a token of a step
        # still being published, would otherwise move the whole model for nothing (measured:
        # 14 model-sized reads a step out of one ps task on a 1 Gbit/s link).
        known = tf.compat.v1.placeholder_with_default(tf.constant(-1, tf.int64), [])

        def consistent_read(after_ops=(), with_params=True, only_if_moved=False) -> dict:
            with tf.control_dependencies(list(after_ops)):
                before = read(control)
            if not (one_task and with_params):
                return {"before": before}
            with tf.control_dependencies([before]):
                if only_if_moved:
                    moved = before[Control.STEP] > known
                    values = [tf.cond(moved, lambda p=p: read(p), lambda p=p: tf.zeros([0], p["read"].dtype))
                              for p in params]
                else:
                    values = [read(p) for p in params]
            with tf.control_dependencies(values):
                after = read(control)
            return {"before": before, "flats": values, "after": after}

        wake = [accumulators.fifo_queue(f"{self.prefix}/wake/{w}") for w in range(self.num_workers)]
        arrivals_queue = accumulators.fifo_queue(f"{self.prefix}/arrivals")
        block = tf.constant(True)  # every wait here waits for one token (bounded by the run's deadline)
        token = tf.compat.v1.placeholder(tf.int64, [])

        # A publish skips the queues of workers the chief declared dead: nobody drains them, and
        # one token a step would pile up for as long as the job runs. Other wake-ups go to all.
        awake = tf.compat.v1.placeholder_with_default(tf.ones([self.num_workers], tf.bool), [self.num_workers])

        def enqueue_all(after_op, only_awake=False):
            def enqueue(q):
                return tf.raw_ops.QueueEnqueueV2(handle=q, components=[token])

            def maybe(w, q):
                def put():
                    with tf.control_dependencies([enqueue(q)]):
                        return tf.constant(True)
                return tf.cond(awake[w], put, lambda: tf.constant(False))

            with tf.control_dependencies([after_op]):
                if not only_awake:
                    return tf.group(*[enqueue(q) for q in wake])
                return tf.group(*[maybe(w, q) for w, q in enumerate(wake)])

        def wait_on(q, after_ops=(), with_params=True) -> dict:
            with tf.control_dependencies(list(after_ops)):
                tokens = accumulators.drain(q, block)
            return {"tokens": tokens, **consistent_read([tokens], with_params, only_if_moved=True)}

        # The aggregator's wait: `need` tokens (1 + the fresh gradients still missing), then
        # the count and the control vector; with one shard, the take too when it is due.
        need = tf.compat.v1.placeholder_with_default(tf.constant(1, tf.int32), [])
        arrived = accumulators.drain(arrivals_queue, block, at_least=need)
        with tf.control_dependencies([arrived]):
            count = tf.raw_ops.ResourceAccumulatorNumAccumulated(handle=acc["handle"])
            before = read(control)
        required = tf.compat.v1.placeholder_with_default(tf.constant(0, tf.int32), [])
        taken_for = tf.compat.v1.placeholder_with_default(tf.constant(0, tf.int64), [])
        always = tf.compat.v1.placeholder_with_default(False, [])  # also between fit rounds (async)
        running = tf.logical_or(always, before[Control.ROUND] > before[Control.STOP_ROUND])  # protocol.round_running
        due = tf.logical_and(tf.logical_and(required > 0, count >= required), running)

        mark_taken = lambda: tf.raw_ops.ResourceScatterUpdate(  # noqa: E731
            resource=control["handle"], indices=[Control.TAKEN_FOR], updates=tf.reshape(taken_for, [1]))

        def take_apply():  # (update on the ps) VERSION, take, apply, TAKEN_FOR: (exact tail, squared norm of the sum)
            version = tf.raw_ops.ResourceScatterUpdate(resource=control["handle"], indices=[Control.VERSION],
                                                       updates=tf.reshape(taken_for, [1]))
            run = self._build_take_apply(0, generation, required, before=[version], hyper=hyper)
            with tf.control_dependencies(list(run["fetch"])):
                mark = mark_taken()
            with tf.control_dependencies([mark]):
                return tuple(tf.identity(t) for t in run["fetch"])

        def take():  # the accumulator's take: (body in the wire dtype, exact tail), or one tensor
            if self.update is not None:
                return take_apply()
            if not self.tail:
                sums = tf.raw_ops.ResourceAccumulatorTakeGradient(handle=acc["handle"], num_required=required,
                                                                  dtype=self.layout.dtype)
                with tf.control_dependencies([sums]):
                    mark = mark_taken()
                with tf.control_dependencies([mark]):
                    return tf.identity(sums)
            body, tail = self.accs_of(generation)[0].take_parts(required)
            with tf.control_dependencies([body, tail]):
                mark = mark_taken()
            with tf.control_dependencies([mark]):
                return tf.identity(body), tf.identity(tail)

        hyper = {} if self.update is None else self._hyper_placeholders()  # (update on the ps) fed with every take
        zero_tail = tf.zeros([protocol.push_tail(self.num_workers)], self.layout.dtype)

        def not_taken():  # zeros of the take's structure
            if self.update is not None:
                return zero_tail, tf.constant(0.0, self.layout.dtype)
            if not self.tail:
                return tf.zeros(acc["grad"].shape, self.layout.dtype)
            return tf.zeros(acc["grad"].shape, self.wire), zero_tail

        took = tf.cond(due, take, not_taken)
        arrivals = {"tokens": arrived, "count": count, "control": before}

        step_idx, step = tf.compat.v1.placeholder(tf.int32, [None]), tf.compat.v1.placeholder(tf.int64, [None])
        commit = tf.raw_ops.ResourceScatterUpdate(resource=control["handle"], indices=step_idx, updates=step)

        # A push and the wait after it, in one run: the wait blocks on the worker's queue
        # with no deadline of its own; `Waker` ends it with a token instead.
        with tf.control_dependencies([acc["apply"]]):
            pushed = tf.raw_ops.ResourceScatterUpdate(resource=control["handle"], indices=control["indices"],
                                                      updates=control["updates"])
        with tf.control_dependencies([pushed]):
            push = tf.raw_ops.QueueEnqueueV2(handle=arrivals_queue, components=[acc["step"]])

        runs = _Runs(
            token=token,
            waits=[wait_on(q) for q in wake],
            push_waits=[wait_on(q, [push]) for q in wake],
            push_waits_control=[wait_on(q, [push], with_params=False) for q in wake],  # the chief has the params
            pokes=[tf.raw_ops.QueueEnqueueV2(handle=q, components=[token]) for q in wake],
            wake_all=enqueue_all(tf.no_op()),
            poke_arrivals=tf.raw_ops.QueueEnqueueManyV2(
                handle=arrivals_queue, components=[tf.fill([self.num_workers], token)]),
            arrivals=arrivals, arrivals_take={**arrivals, "due": due, "took": took}, hyper=hyper, known=known,
            need=need, required=required, taken_for=taken_for, always=always,
            step_idx=step_idx, step=step, commit=enqueue_all(commit, only_awake=True), awake=awake,
            wake_sizes=[tf.raw_ops.QueueSizeV2(handle=q) for q in wake],
        )
        if one_task:
            runs.version_idx = tf.compat.v1.placeholder(tf.int32, [None])
            runs.version = tf.compat.v1.placeholder(tf.int64, [None])
            runs.new_values = [tf.compat.v1.placeholder(self.wire, p["value"].shape) for p in params]
            mark = tf.raw_ops.ResourceScatterUpdate(resource=control["handle"], indices=runs.version_idx,
                                                    updates=runs.version)
            with tf.control_dependencies([mark]):
                assigns = [tf.raw_ops.AssignVariableOp(resource=p["handle"], value=v)
                           for p, v in zip(params, runs.new_values)]
            with tf.control_dependencies(assigns):
                fused_commit = tf.raw_ops.ResourceScatterUpdate(resource=control["handle"], indices=step_idx,
                                                                updates=step)
            runs.publish = enqueue_all(fused_commit, only_awake=True)
            runs.read = consistent_read()
        return runs
