"""One optimizer's shared state on the ps tasks, and the runs that read and write it.

The resources (see `tf_backup.protocol.slots`): `control`, `signature`,
`params/<s>` and `acc/<s>` per shard, and on ps 0 two kinds of int64 FIFO
queues of wake-up tokens:

* `wake/<w>`, one per worker: the chief enqueues the new step after each
  publish, and `WAKE` when a round stops, so a waiting worker blocks on its
  queue (`wait`) instead of polling `control`;
* `arrivals`: each push enqueues its tag, so the aggregator blocks on it
  (`wait_arrivals`) instead of polling the accumulators.

With shards on other tasks, a worker's shard-0 gradient goes to `stage/<w>` on
ps 0 at the same time as its other shards (`push_wait`).

A token only says "look again": every decision is made on the control vector
(or the accumulator count) read in the same run, after the dequeue. A token
lost (a run delivered twice) costs at most one bounded wait.

With one ps task (or every shard on ps 0), the seqlock read, the publish and
the push each run as one graph on the ps (`tf_backup.ps.fused_runs`, built once
per generation); with several, transfers to every task run at once
(`each_shard`).

A run that changes state is never cancelled at a deadline (a cancelled run may
have run part of its graph): the push-and-wait and the aggregator's wait-and-take
have no deadline of their own but the endpoint's, and a `tf_backup.ps.waker.Waker`
ends them with a `POKE` token instead.
"""

from concurrent import futures
import threading
from typing import Any, Callable, Collection, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_backup.protocol import pushes
from tf_backup.protocol import staleness
from tf_backup.protocol import wakeups
from tf_backup.protocol.slots import Control
from tf_backup.protocol.slots import ControlView
from tf_backup.ps import accumulators
from tf_backup.ps import endpoint as endpoint_lib
from tf_backup.ps import fused_runs
from tf_backup.ps import ps_update
from tf_backup.ps import signature as signature_lib
from tf_backup.ps.layout import Layout
from tf_backup.ps.waker import Waker


class Snapshot(NamedTuple):
    """A seqlock read: the control vector, the flat parameters per shard, the control vector again."""

    before: ControlView
    flats: List[np.ndarray]
    after: ControlView

    @property
    def consistent(self) -> bool:
        """Whether `flats` are exactly the parameters of step `before.step`."""
        return staleness.consistent(self.before, self.after)


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
      sums: what the same run took (one shard only): the accumulator's take (one array, or the
        body in the wire dtype and the exact tail; with the update on the ps, the tail and the
        sum's squared norm), else None.
      tokens: the tokens dequeued.
    """

    count: int
    control: ControlView
    sums: Any
    tokens: np.ndarray


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
      rule: with `apply_on_ps`, the inner optimizer's rule that each ps task applies to its
        shard: the master copy and the optimizer's slots then live on the ps tasks too
        (`update`, a `ps_update.UpdateState`), and nothing model-sized goes through the chief.
        None: the chief applies.
      nesterov: (SGD with momentum on the ps) Nesterov momentum.
    """

    def __init__(self, prefix: str, layout: Layout, ps: Sequence, num_workers: int,
                 endpoints: endpoint_lib.Endpoints, wire_dtype: str = "float32",
                 rule: Optional[ps_update.UpdateRule] = None, nesterov: bool = False):
        self.prefix = prefix
        self.layout = layout
        self.wire = layout.dtype if wire_dtype == "float32" else tf.as_dtype(wire_dtype)
        # A push in a narrower wire dtype sends its tail (norm, one-hot) as a second, exact tensor;
        # in the variables' dtype it is one tensor, concatenated on the worker (no copy on the ps).
        self.tail = pushes.push_tail(num_workers) if self.wire != layout.dtype else 0
        self.num_workers = num_workers
        self.ctl = Control(num_workers)
        where = [endpoints.of(task) for task in ps]
        self.control = accumulators.SharedVariable(f"{prefix}/control", tf.int64, [self.ctl.size], where[0])
        self.signature = accumulators.SharedVariable(f"{prefix}/signature", tf.int64,
                                                     [len(signature_lib.values(layout, self.wire))], where[0])
        self._where = where
        self.params = [
            accumulators.SharedVariable(f"{prefix}/params/{s}", self.wire, [size], where[s])
            for s, size in enumerate(layout.shard_sizes)
        ]
        self.update: Optional[ps_update.UpdateState] = None if rule is None else ps_update.UpdateState(
            rule, nesterov, prefix, self.params, layout.dtype, self.each_shard)
        # With shards on other tasks, each worker's shard-0 gradient is first written here (`stage/<w>`,
        # on ps 0) beside its other shards' pushes, and the push itself reads it on ps 0 (`push_wait`).
        stage_dtype, stage_size = ((self.wire, layout.shard_sizes[0]) if self.tail else
                                   (layout.dtype, layout.shard_sizes[0] + pushes.push_tail(num_workers)))
        # Every shard on ps 0 (the control vector's task, where shard 0's accumulator is too): the
        # seqlock read, the publish and the push are each one run there (`fused_runs`).
        self.on_one_task = all(e is where[0] for e in where)
        self.stages = [] if self.on_one_task else [
            accumulators.SharedVariable(f"{prefix}/stage/{w}", stage_dtype, [stage_size], where[0])
            for w in range(num_workers)]
        self.generation = 0  # the newest generation (`set_generation`)
        # Transfers to several ps tasks run at once: the bytes of a push or a pull share this
        # host's link instead of waiting for each other's round trips (one thread per other task).
        self._pool = futures.ThreadPoolExecutor(max(1, len(where) - 1), thread_name_prefix=f"tf_backup-{prefix}")
        self._accs: Dict[int, List[accumulators.ConditionalAccumulator]] = {}  # per generation
        self._built: Dict[int, fused_runs.Runs] = {}  # per generation
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
        start at step 0 and accept any tag: `tf_backup.ps.recovery`).
        """
        with self._lock:
            if generation not in self._accs:
                where = self.prefix if not generation else f"{self.prefix}/g{generation}"
                self._accs[generation] = [
                    accumulators.ConditionalAccumulator(
                        f"{where}/acc/{s}", self.layout.dtype, [size + pushes.push_tail(self.num_workers)],
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
        self.signature.assign(signature_lib.values(self.layout, self.wire))
        for var, flat in zip(self.params, flats):
            var.assign(flat)
        for acc in self.accs:
            acc.set_global_step(step)
        control = np.array(control, np.int64)
        control[Control.STEP] = control[Control.VERSION] = step
        control[Control.GENERATION] = self.generation
        self.control.assign(control)

    def check_signature(self) -> None:
        """Raises ValueError naming what differs from the chief's signature on ps 0 (`tf_backup.ps.signature.check`)."""
        signature_lib.check(self.layout, self.wire, self.signature.read())

    def mark_version(self, step: int) -> None:
        """VERSION = step: the parameters are about to change (the seqlock's first half)."""
        self.control.scatter_update([Control.VERSION], [step])

    def take_apply(self, shard: int, required: int, hyper: Dict[str, float]):
        """(Update on the ps.) Shard `shard` takes and applies (`UpdateState.take_apply`): (tail, sq norm of the sum)."""
        return self.update.take_apply(shard, self.accs[shard], self.num_workers, self.generation, required, hyper)

    def lost_elsewhere(self) -> List[str]:
        """The ps tasks other than the control vector's that no longer hold their shard (they restarted empty).

        (A restart of the control vector's task fails the chief's next run
        there; one of another task would go unnoticed by the chief while every
        worker waits for it: `tf_backup.ps.recovery`.)

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
        acc, control, runs = accs[0].ops, self.control.ops, self._runs(generation)
        # Shard 0's push, last, feeds `arrivals`, so the aggregator never sees a push that is not
        # yet in every shard. Its bytes go first all the same, to `stage/<w>` beside the other
        # shards' pushes, all at once: pushed after them, they kept ps 0's link idle while the
        # others' were busy, then every worker's went through ps 0's link alone (at 1 Gbit/s and
        # 4 ps tasks, the push took 2 M/B instead of M/B). The push then reads them on ps 0.
        feed = accs[0].feed(flats[0])
        if self.stages:
            staged = feed.pop(acc["grad"])
            self.each_shard(lambda s: accs[s].apply_grad(flats[s], tag) if s else self.stages[w].assign(staged))
            fetches = runs.push_waits_staged[w]
        else:
            fetches = (runs.push_waits if with_params else runs.push_waits_control)[w]
        feed.update({acc["step"]: int(tag), control["indices"]: np.asarray(indices, np.int32),
                     control["updates"]: np.asarray(values, np.int64), runs.known: int(known_step)})
        with waker.armed(seconds):
            got = self.control.endpoint.run(fetches, feed, what=f"push and wait of worker {w} on `{self.prefix}`",
                                            on_duplicate=endpoint_lib.OnDuplicate.DONE)
        return None if got is None else self._wake(got)

    def wait(self, w: int, seconds: float, known_step: int = -1, waker: Optional[Waker] = None) -> Optional[Wake]:
        """Drains worker `w`'s wake-up queue, waiting up to `seconds` for a token if it is empty.

        Returns what the run read after the dequeue (with one ps task, a seqlock
        read of the parameters too, if the step is past `known_step`). Without
        `waker`, the run is cancelled at `seconds` and None means nothing came.
        With it, the run has no deadline of its own: `waker` ends the wait with
        a `POKE` token, so a read of the parameters that began in time is never
        cut off (and sent again) at the deadline, which on a slow link it
        would be.
        """
        runs = self._runs()
        feed, what = {runs.known: int(known_step)}, f"wait of worker {w} on `{self.prefix}`"
        if waker is None:
            got = self.control.endpoint.run(runs.waits[w], feed, wait=seconds, what=what)
        else:
            with waker.armed(seconds):
                got = self.control.endpoint.run(runs.waits[w], feed, what=what)
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
        self.control.endpoint.run(runs.pokes[w], {runs.token: wakeups.POKE}, what=f"wake-up of worker {w}")

    def wake_all(self) -> None:
        """Wakes every worker's wait with the token `WAKE` (a round stopped, the job finished)."""
        runs = self._runs()
        self.control.endpoint.run(runs.wake_all, {runs.token: wakeups.WAKE}, what=f"wake-up of `{self.prefix}`")

    def poke_aggregator(self, token: int = wakeups.POKE) -> None:
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

    def _runs(self, generation: Optional[int] = None) -> fused_runs.Runs:
        """The fused runs on the accumulators of `generation` (default: the newest)."""
        generation = self.generation if generation is None else generation
        if generation not in self._built:
            acc = self.accs_of(generation)[0].ops
            if acc["apply"].graph is not self.control.ops["read"].graph:
                raise AssertionError("shard 0's accumulator must be on the control vector's task")
            built = self.control.endpoint.build(lambda: fused_runs.build(self, generation))
            with self._lock:
                self._built.setdefault(generation, built)
        return self._built[generation]
