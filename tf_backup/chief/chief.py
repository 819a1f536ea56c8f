"""`ChiefState`: the chief's part of one optimizer's binding.

The chief keeps the master copy the inner optimizer updates, its checkpoint,
and the `Aggregator`; at the start it decides (`tf_backup.chief.startup`)
whether it creates the shared state, rewrites its running job's, or finishes
a finished job, and does it. The front end's `Binding` builds one on the chief
and none elsewhere.
"""

import os
from typing import Callable, List, Optional, Sequence

from absl import logging
import keras
import tensorflow as tf

from tf_backup import cluster as cluster_lib
from tf_backup import errors
from tf_backup.chief import aggregator as aggregator_lib
from tf_backup.chief import checkpoint as checkpoint_lib
from tf_backup.chief import startup as startup_lib
from tf_backup.chief import update_on_ps
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import restart
from tf_backup.protocol import slots
from tf_backup.protocol.slots import Block
from tf_backup.ps import job as job_lib
from tf_backup.ps.layout import Layout
from tf_backup.ps.ps_update import UpdateRule
from tf_backup.ps.shared_state import SharedState


def make_master(variables: Sequence) -> List[keras.Variable]:
    """(Chief.) A chief-local copy of `variables`, which the inner optimizer updates."""
    with tf.init_scope():
        return [keras.Variable(tf.convert_to_tensor(v), dtype=v.dtype, trainable=True, name=f"master_{v.name}")
                for v in variables]


class ChiefState:
    """The chief's part of one binding: master copy, checkpoint, start-up, aggregator.

    Build it, then `start()` once the Embedding tables added their step hooks.

    Args:
      inner: the user's (inner) Keras optimizer, not built yet.
      rule: the update applied on the ps (`update_on_ps.rule_for`); None: applied here.
      state, layout, config, info: the binding's shared state, shards, settings and cluster.
      var_list: the model's dense variables (the master copy starts as their values).
      index: the optimizer's index under its strategy (its checkpoint is `opt<index>` in `checkpoint_dir`).
      checkpoint_dir: the strategy's checkpoint directory; None: no checkpoints.
      checkpoint_every_steps: steps between two periodic saves.
      monitor: the job monitor (whether the chief `rejoined` its job, and its `job_id`).
      max_steps: the aggregator's last step (None: the fits decide).
      make_liveness: builds the watch over the workers' heartbeats, when the aggregator is made.
      has_tables: the optimizer has Embedding tables (`sparse_variables`).

    Attributes:
      master, checkpoint, on_ps, aggregator: the master copy, the checkpoint (None
        without `checkpoint_dir`), the `ChiefSide` of `apply_on_ps` (None without) and
        the `Aggregator`.
      startup: what the chief did at its start (`tf_backup.chief.startup.Startup`).

    Raises:
      ValueError: the checkpoint or the running state belongs to another model, or a rejoining
        chief has Embedding tables.
    """

    def __init__(self, *, inner, rule: Optional[UpdateRule], state: SharedState, layout: Layout,
                 config: config_lib.ProtocolConfig, info: cluster_lib.ClusterInfo, var_list: Sequence,
                 index: int, checkpoint_dir: Optional[str], checkpoint_every_steps: int, monitor: job_lib.JobMonitor,
                 max_steps: Optional[int], make_liveness: Callable[[], job_lib.Liveness], has_tables: bool):
        self.state, self.layout, self.num_workers = state, layout, info.num_workers
        self.master = make_master(var_list)
        self.checkpoint: Optional[checkpoint_lib.Checkpoint] = None
        self.on_ps: Optional[update_on_ps.ChiefSide] = None
        step, positions = 0, None
        with tf.init_scope():
            inner.build(self.master)
            if checkpoint_dir is not None:
                self.checkpoint = checkpoint_lib.Checkpoint(
                    os.path.join(checkpoint_dir, f"opt{index}"), self.master, inner, checkpoint_every_steps)
                step = self.checkpoint.restore()
                positions = self._restored_positions()
            flats = self.master_flats()
            running = self._running_state(has_tables) if monitor.rejoined else None
            self.startup = startup_lib.decide(step, monitor.rejoined, None if running is None else
                                              startup_lib.RunningJob(running.step, running.finished))
            if rule is not None:
                self.on_ps = update_on_ps.ChiefSide(inner, rule, state, self.master)
            self._carry_out(self.startup, flats, positions, running, config, monitor.job_id)
        self.aggregator = aggregator_lib.Aggregator(
            state, config, info, self._make_apply_fn(inner), step=self.startup.step,
            max_steps=max_steps, liveness=make_liveness(), checkpoint=self.checkpoint,
            master_flats=self.master_flats,
            taken=None if running is None else running.block(Block.TAKEN), on_ps=self.on_ps,
        )

    def _carry_out(self, startup: startup_lib.Startup, flats: List[tf.Tensor], positions: Optional[List[int]],
                   running: Optional[slots.ControlView], config: config_lib.ProtocolConfig, job_id: int) -> None:
        """Writes the shared state as `startup` says (nothing for a finished job)."""
        if startup.start.creates_state:
            if self.on_ps is not None:  # before the control vector says the state is ready
                self.state.update.write(*self.on_ps.flats())
            self.state.create(flats, step=startup.step, replicas=config.replicas_to_aggregate,
                              input_positions=positions)
        elif startup.start is startup_lib.Start.FINISH:
            # The chief died before the job was done (the workers may have left): it takes the last
            # published parameters and finishes.
            for v, value in zip(self.master, self.layout.unpack(self.state.read_params())):
                v.assign(value)
            logging.warning("tf_backup: the chief rejoined job %d, which had reached its last step %d; "
                            "it finishes it.", job_id, startup.step)
        else:  # REJOIN: the workers carry on in the rewritten state
            self.state.repopulate(flats, startup.step, restart.control_to_rejoin(running, config.replicas_to_aggregate))
            logging.warning("tf_backup: the chief rejoined job %d at global step %d (its checkpoint); "
                            "the job had reached step %d.", job_id, startup.step, running.step)

    def start(self) -> None:
        self.aggregator.start()

    def master_flats(self) -> List[tf.Tensor]:
        """The master copy packed into shards, in the wire dtype: what the ps tasks publish."""
        wire = self.state.wire
        return [tf.cast(f, wire) for f in self.layout.pack([tf.convert_to_tensor(v) for v in self.master])]

    def _make_apply_fn(self, inner):
        layout, master, wire = self.layout, self.master, self.state.wire

        @tf.function(jit_compile=False, autograph=False)
        def apply_fn(flat_grads):
            inner.apply(layout.unpack(flat_grads), master)
            return [tf.cast(f, wire) for f in layout.pack([v.value for v in master])]

        return apply_fn

    def _running_state(self, has_tables: bool) -> Optional[slots.ControlView]:
        """(A chief that rejoined its job.) The control vector of this optimizer's state if it is on the ps.

        Raises:
          ValueError: the state belongs to another model (its signature differs), or the
            optimizer has Embedding tables (their rows cannot go back to the checkpoint yet).
        """
        if not self.state.control.is_initialized():
            return None
        if has_tables:
            raise ValueError(
                "chief_rejoins=True does not support a SyncReplicasOptimizer with Embedding tables in "
                "`sparse_variables` yet: their rows on the ps cannot go back to the checkpoint. Use "
                "chief_rejoins=False (a restarted chief starts a new job).")
        self.state.check_signature()
        ctl = self.state.read_control()
        self.state.set_generation(ctl.generation)
        return ctl

    def _restored_positions(self) -> Optional[List[int]]:
        """The restored checkpoint's input positions, if they fit this job's workers."""
        positions = self.checkpoint.restored_positions
        if positions is not None and len(positions) != self.num_workers:
            logging.warning(
                "tf_backup: the checkpoint in %s was saved by a job of %d workers, this one has %d: "
                "every worker reads its input from the start.", self.checkpoint.directory, len(positions),
                self.num_workers)
            return None
        return positions

    def dead_workers(self):
        return () if self.aggregator.liveness is None else self.aggregator.liveness.dead

    def close(self, failed: bool) -> None:
        """Stops the aggregator and saves a last checkpoint (also after a failure)."""
        self.aggregator.stop()
        if self.checkpoint is not None and not self.aggregator.is_alive() and self._refreshed():
            # The master's step: a ps that died between an apply and its publish leaves the
            # master one step ahead of the last published step (and the inner optimizer's count).
            self.checkpoint.save(self.aggregator.master_step, why="failed" if failed else "end",
                                 input_positions=self.aggregator.input_positions(self.aggregator.master_step))

    def _refreshed(self) -> bool:
        """Whether the master copy holds the last step (read back from the ps), before the last checkpoint.

        False when the update is on the ps and a ps task cannot be read: the
        checkpoint would label old values with the new step, so none is written.
        """
        if self.on_ps is None:
            return True
        try:
            self.on_ps.refresh()
            return True
        except (errors.PsUnavailableError, tf.errors.OpError) as e:
            logging.warning("tf_backup: no last checkpoint: the master copy on the ps tasks cannot be read (%s).", e)
            return False
