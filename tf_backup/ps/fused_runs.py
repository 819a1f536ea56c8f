"""The fused runs of one optimizer's shared state on ps 0: its graphs, built once per generation.

With one ps task (or every shard on ps 0), the seqlock read, the publish and
the push each run as one graph on the ps, their order kept by control
dependencies, where they would otherwise take 3, 3 and 2 round trips; a
worker's wait then returns the parameters with the control vector (only once
the step moved past its own). The aggregator's wait takes in the same run when
there is one shard, and with the update on the ps it applies there too.
`tf_backup.ps.shared_state.SharedState` builds them (`_runs`) and runs them.
"""

import dataclasses
from typing import Dict, List, Optional

import tensorflow as tf

from tf_backup.protocol import pushes
from tf_backup.protocol.slots import Control
from tf_backup.ps import accumulators


@dataclasses.dataclass
class Runs:
    """The fused graphs on ps 0, built once per generation (`SharedState._runs`), and their placeholders."""

    token: tf.Tensor  # the token a wake-up or poke enqueues
    waits: List[dict]  # per worker: drain its queue, then read
    push_waits: List[dict]  # per worker: push, then its wait
    push_waits_control: List[dict]  # the same, reading only the control vector
    push_waits_staged: List[dict]  # (shards on other tasks) per worker: push its `stage/<w>`, then its wait
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


def build(state, generation: int) -> Runs:
    """(In the control vector's endpoint graph.) Every fused run on `state` (a `SharedState`), ordered by control dependencies."""
    control, acc = state.control.ops, state.accs_of(generation)[0].ops
    params = [p.ops for p in state.params]
    one_task = state.on_one_task

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

    wake = [accumulators.fifo_queue(f"{state.prefix}/wake/{w}") for w in range(state.num_workers)]
    arrivals_queue = accumulators.fifo_queue(f"{state.prefix}/arrivals")
    block = tf.constant(True)  # every wait here waits for one token (bounded by the run's deadline)
    token = tf.compat.v1.placeholder(tf.int64, [])

    # A publish skips the queues of workers the chief declared dead: nobody drains them, and
    # one token a step would pile up for as long as the job runs. Other wake-ups go to all.
    awake = tf.compat.v1.placeholder_with_default(tf.ones([state.num_workers], tf.bool), [state.num_workers])

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
    running = tf.logical_or(always, before[Control.ROUND] > before[Control.STOP_ROUND])  # rounds.round_running
    due = tf.logical_and(tf.logical_and(required > 0, count >= required), running)

    mark_taken = lambda: tf.raw_ops.ResourceScatterUpdate(  # noqa: E731
        resource=control["handle"], indices=[Control.TAKEN_FOR], updates=tf.reshape(taken_for, [1]))

    def take():  # then TAKEN_FOR. What the accumulator's take returns (one tensor, or body and exact
        # tail); with the update on the ps, VERSION, take and apply: (exact tail, squared norm of the sum)
        if state.update is not None:
            version = tf.raw_ops.ResourceScatterUpdate(resource=control["handle"], indices=[Control.VERSION],
                                                       updates=tf.reshape(taken_for, [1]))
            taken = state.update.build_take_apply(0, state.accs_of(generation)[0], state.num_workers, required,
                                                 before=[version], hyper=hyper)["fetch"]
        else:
            taken = state.accs_of(generation)[0].take_op(required)
        with tf.control_dependencies(tf.nest.flatten(taken)):
            mark = mark_taken()
        with tf.control_dependencies([mark]):
            return tf.nest.map_structure(tf.identity, taken)

    hyper = {} if state.update is None else state.update.placeholders()  # (update on the ps) fed with every take
    zero_tail = tf.zeros([pushes.push_tail(state.num_workers)], state.layout.dtype)

    def not_taken():  # the take's structure, empty: a wait that took nothing sends nothing model-sized
        if state.update is not None:
            return zero_tail, tf.constant(0.0, state.layout.dtype)
        if not state.tail:
            return tf.zeros([0], state.layout.dtype)
        return tf.zeros([0], state.wire), tf.zeros([0], state.layout.dtype)

    took = tf.cond(due, take, not_taken)
    arrivals = {"tokens": arrived, "count": count, "control": before}

    step_idx, step = tf.compat.v1.placeholder(tf.int32, [None]), tf.compat.v1.placeholder(tf.int64, [None])
    commit = tf.raw_ops.ResourceScatterUpdate(resource=control["handle"], indices=step_idx, updates=step)

    # A push and the wait after it, in one run: the wait blocks on the worker's queue
    # with no deadline of its own; `Waker` ends it with a token instead.
    def push_of(applied):  # then the push's counters, then its token
        with tf.control_dependencies([applied]):
            pushed = tf.raw_ops.ResourceScatterUpdate(resource=control["handle"], indices=control["indices"],
                                                      updates=control["updates"])
        with tf.control_dependencies([pushed]):
            return tf.raw_ops.QueueEnqueueV2(handle=arrivals_queue, components=[acc["step"]])

    def staged_push(stage):  # the gradient written to `stage` (the body, with a tail: the tail is fed)
        value = read(stage.ops)
        gradient = tf.concat([tf.cast(value, state.layout.dtype), acc["tail"]], 0) if state.tail else value
        return push_of(tf.raw_ops.ResourceAccumulatorApplyGradient(handle=acc["handle"], local_step=acc["step"],
                                                                   gradient=gradient))

    # A push's own apply op, not the accumulator's `apply`: that one may have run already (other
    # shards' pushes, tools), and a control dependency on it would set an attribute of an op a
    # session ran (TensorFlow warns that this will become an error).
    push = push_of(tf.raw_ops.ResourceAccumulatorApplyGradient(
        handle=acc["handle"], local_step=acc["step"], gradient=acc["apply"].inputs[2]))

    runs = Runs(
        token=token,
        waits=[wait_on(q) for q in wake],
        push_waits=[wait_on(q, [push]) for q in wake],
        push_waits_control=[wait_on(q, [push], with_params=False) for q in wake],  # the chief has the params
        push_waits_staged=[wait_on(q, [staged_push(stage)], with_params=False) for q, stage in zip(wake, state.stages)],
        pokes=[tf.raw_ops.QueueEnqueueV2(handle=q, components=[token]) for q in wake],
        wake_all=enqueue_all(tf.no_op()),
        poke_arrivals=tf.raw_ops.QueueEnqueueManyV2(
            handle=arrivals_queue, components=[tf.fill([state.num_workers], token)]),
        arrivals=arrivals, arrivals_take={**arrivals, "due": due, "took": took}, hyper=hyper, known=known,
        need=need, required=required, taken_for=taken_for, always=always,
        step_idx=step_idx, step=step, commit=enqueue_all(commit, only_awake=True), awake=awake,
        wake_sizes=[tf.raw_ops.QueueSizeV2(handle=q) for q in wake],
    )
    if one_task:
        runs.version_idx = tf.compat.v1.placeholder(tf.int32, [None])
        runs.version = tf.compat.v1.placeholder(tf.int64, [None])
        runs.new_values = [tf.compat.v1.placeholder(state.wire, p["value"].shape) for p in params]
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
