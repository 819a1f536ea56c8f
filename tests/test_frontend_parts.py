"""The front end's parts without a cluster: the strategy's checked arguments, its reports, the step trace,
the iterator reaper."""

import dataclasses
import inspect
import pathlib
import threading
import types

import numpy as np
import pytest
import tensorflow as tf

import tf_backup
from tf_backup import _checks
from tf_backup import topology
from tf_backup.frontend import arguments
from tf_backup.frontend import extended as extended_lib
from tf_backup.frontend import iterator_reaper
from tf_backup.frontend import reports
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import slots


def info(num_workers=4):
    jobs = {"worker": [f"localhost:{1000 + i}" for i in range(num_workers)], "ps": ["localhost:1"]}
    return topology.cluster_info(tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(jobs), task_type="worker", task_id=0))


def args(**kwargs):
    """StrategyArguments with the strategy's own defaults, as the strategy builds it."""
    defaults = {name: p.default for name, p in inspect.signature(tf_backup.BackupWorkerStrategy).parameters.items()
                if name not in ("cluster_resolver", "devices")}
    return arguments.StrategyArguments(**{**defaults, **kwargs})


def test_arguments_are_the_strategy_signature_but_the_resolver_and_devices():
    params = [name for name in inspect.signature(tf_backup.BackupWorkerStrategy).parameters
              if name not in ("cluster_resolver", "devices")]
    assert [f.name for f in dataclasses.fields(arguments.StrategyArguments)] == params


def test_arguments_are_normalised_once_and_frozen():
    a = args(step_timeout=5, ps_restart_timeout=0, checkpoint_dir=pathlib.Path("/tmp/ckpt"), max_steps=np.int64(7))
    assert a.step_timeout == 5.0 and isinstance(a.step_timeout, float)
    assert a.ps_restart_timeout == 0.0 and isinstance(a.ps_restart_timeout, float)
    assert a.checkpoint_dir == "/tmp/ckpt" and a.max_steps == 7 and type(a.max_steps) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.step_timeout = 1.0


@pytest.mark.parametrize("kwargs, n, staleness_check", [
    (dict(), 4, True),
    (dict(num_backup_workers=1), 3, True),
    (dict(num_backup_workers=3), 1, True),
    (dict(asynchronous=True), 1, False),
])
def test_protocol_config_n_is_workers_less_backups(kwargs, n, staleness_check):
    config = args(poll_interval=0.25, **kwargs).protocol_config(info(4))
    assert (config.replicas_to_aggregate, config.num_workers, config.staleness_check) == (n, 4, staleness_check)
    assert config.adaptive is None and config.poll_max == 0.25 and config.poll_min == 0.0005


def test_protocol_config_adaptive_starts_at_the_upper_bound():
    config = args(num_backup_workers="auto", min_replicas_to_aggregate=2, adaptive_window=3).protocol_config(info(4))
    assert config.adaptive == config_lib.AdaptiveSettings(2, 4, window=3, warmup=3)
    assert config.replicas_to_aggregate == 4
    config = args(num_backup_workers="auto", max_replicas_to_aggregate=3).protocol_config(info(4))
    assert config.adaptive == config_lib.AdaptiveSettings(1, 3, window=50, warmup=5)
    assert config.replicas_to_aggregate == 3


@pytest.mark.parametrize("kwargs, apply_on_ps", [
    (dict(), "auto"),  # the binding decides from the inner optimizer
    (dict(ps_restart_timeout=60.0), False),  # a restart in place: only the chief can write a ps task again
    (dict(chief_rejoins=True), False),
    (dict(apply_on_ps=True), True),
    (dict(apply_on_ps=False), False),
])
def test_protocol_config_apply_on_ps_auto_gives_way_to_a_restart_in_place(kwargs, apply_on_ps):
    resolved = args(**kwargs).protocol_config(info(4)).apply_on_ps
    assert resolved == apply_on_ps and type(resolved) is type(apply_on_ps)


def test_protocol_config_refuses_as_many_backups_as_workers():
    a = args(num_backup_workers=4)  # valid until the cluster is known
    with pytest.raises(ValueError, match=r"below the number of workers \(4\).*num_backup_workers=4"):
        a.protocol_config(info(4))


def test_gradient_stats_from_a_control_vector():
    control = slots.Control(3)
    values = np.zeros(control.size, np.int64)
    values[slots.Control.STEP] = 9
    for w, (pushed, taken, cancelled, batches) in enumerate([(9, 9, 0, 9), (8, 6, 1, 9), (2, 0, 5, 7)]):
        values[control.pushed(w)], values[control.taken(w)] = pushed, taken
        values[control.cancelled(w)], values[control.batches(w)] = cancelled, batches
    stats = reports.GradientStats.read(control.view(values))
    assert stats.dropped == (0, 2, 2)
    assert stats.as_dict() == {"global_step": 9, "pushed": [9, 8, 2], "taken": [9, 6, 0], "dropped": [0, 2, 2],
                               "cancelled": [0, 1, 5], "batches": [9, 9, 7]}
    assert all(type(x) is int for x in stats.as_dict()["pushed"])  # plain ints: the dict pickles and dumps as JSON


def test_step_trace_records_only_the_step_run_traces_now():
    mixin = extended_lib._BackupWorkerMixin  # pylint: disable=protected-access
    ext = types.SimpleNamespace(_trace=None)
    mixin.mark_step_applied(ext)  # an apply outside `run`: no trace to record into, nothing kept
    first, second = object(), object()
    with mixin.tracing_step(ext) as outer:
        mixin.mark_compiled_step(ext, first)
        with mixin.tracing_step(ext) as inner:
            mixin.mark_step_applied(ext)
            mixin.mark_compiled_step(ext, second)
            mixin.mark_compiled_step(ext, second)
        mixin.mark_compiled_step(ext, first)
    assert inner == extended_lib.StepTrace(applied=True, compiled=[second])
    assert outer == extended_lib.StepTrace(applied=False, compiled=[first])
    assert ext._trace is None  # pylint: disable=protected-access


class _Gated:
    """Blocks the thread that destroys it until the test opens `gate` (as TensorFlow's iterator
    destructor can block it), then records (that thread's name, whether the gate was open, `label`)."""

    def __init__(self, seen, gate, label):
        self.seen, self.gate, self.label = seen, gate, label

    def __del__(self):
        opened = self.gate.wait(10.0)  # the test opens it only after `release` returned
        self.seen.append((threading.current_thread().name, opened, self.label))


def _poll(condition, what):
    _checks.poll_until(condition, timeout=10.0, first=0.01, longest=0.05,
                       on_timeout=lambda waited: AssertionError(f"{what}: not in {waited:.0f} s"))


def test_the_iterator_reaper_drops_on_its_own_thread_in_order_ends_when_idle_and_keeps_nothing_once_closed():
    reaper = iterator_reaper.IteratorReaper(name="reaper-under-test", idle=0.2)
    seen, gate = [], threading.Event()
    # Dropped in this thread, a _Gated would wait here for a gate nobody opens yet, and record False.
    first, second = {"it": [_Gated(seen, gate, "first")]}, {"it": _Gated(seen, gate, "second")}
    assert reaper.release(first, "it") and reaper.release(second, "it")
    assert seen == [] and first == {} == second and reaper.running
    gate.set()
    _poll(lambda: reaper.dropped == 2, "both dropped")
    assert seen == [("reaper-under-test", True, "first"), ("reaper-under-test", True, "second")]
    _poll(lambda: not reaper.running, "the idle thread ended")  # no wait of it is unbounded
    assert reaper.release({"it": _Gated(seen, gate, "third")}, "it")  # a new thread for the next one
    _poll(lambda: reaper.dropped == 3, "the third dropped")
    assert seen[-1] == ("reaper-under-test", True, "third") and reaper.released == 3
    reaper.close()
    kept = {"it": object()}
    assert not reaper.release(kept, "it") and "it" in kept  # closed: the caller keeps (and drops) it
    assert reaper.released == 3
    _poll(lambda: not reaper.running, "the closed reaper's thread ended")
