"""The scale simulator (benchmarks.scale_sim): its timing against closed forms, its gradients against Keras."""

import itertools

import numpy as np
import pytest

from benchmarks import scale_sim
from tf_backup.sim import stragglers


def first(iterator, k):
    return list(itertools.islice(iterator, k))


def test_without_backups_each_step_waits_for_its_slowest_worker():
    model = stragglers.parse("exp:0.05", seed=1)
    steps = first(scale_sim.sync_steps(model.delay, 5, 5, compute=0.1, comm=0.01), 30)
    published = 0.0
    for s in steps:
        published += max(0.1 + model.delay(w, s.step) for w in range(5)) + 0.01
        assert s.published == pytest.approx(published)
        assert sorted(w for w, _ in s.batches) == list(range(5))
        assert [b for _, b in s.batches] == [s.step] * 5  # one local batch per step each
    assert steps[-1].dropped == 0


def test_a_10x_slow_worker_is_never_averaged_and_its_stale_gradients_are_dropped():
    def delay(w, step):
        return 0.95 if w == 3 else 0.0

    steps = first(scale_sim.sync_steps(delay, 4, 3, compute=0.1, comm=0.0), 40)
    assert all(sorted(w for w, _ in s.batches) == [0, 1, 2] for s in steps)
    np.testing.assert_allclose([s.published for s in steps], 0.1 * np.arange(1, 41))
    # Worker 3 finishes a gradient every 1.05 s, each tagged with a step 10 behind: 3 by 4 s.
    assert steps[-1].dropped == 3


def test_restarted_stragglers_start_every_step_afresh_so_steps_are_the_order_statistic():
    model = stragglers.parse("pareto:1.5:0.05", seed=2)
    steps = first(scale_sim.sync_steps(model.delay, 6, 4, compute=0.1, comm=0.0, restart=True), 50)
    durations = np.diff([0.0] + [s.published for s in steps])
    ideal = stragglers.ideal_step_times(0.1 + model.delays(6, 50), 4)
    np.testing.assert_allclose(durations, ideal)
    assert steps[-1].dropped == 0  # a restarted batch is abandoned, never pushed


def test_async_staleness_comes_from_the_timing():
    updates = first(scale_sim.async_updates(lambda w, step: 0.0, 4, compute=0.1, comm=0.0), 40)
    # Equal compute: every worker's gradient was computed 3 updates ago (after the first round).
    stale = [k - u.read_version for k, u in enumerate(updates)]
    assert stale[:4] == [0, 1, 2, 3] and set(stale[4:]) == {3}
    assert all(u.oldest_read <= k + 1 for k, u in enumerate(updates))
    np.testing.assert_allclose([u.applied for u in updates[::4]], 0.1 * np.arange(1, 11))


def test_a_step_of_n_batches_is_the_average_of_the_n_worker_gradients():
    import keras  # pylint: disable=g-import-not-at-top

    config = {"dataset": "regression", "model": {"kind": "linear"}, "optimizer": "sgd",
              "learning_rate": 0.1, "batch_size": 8}
    trainer = scale_sim.Trainer(3, seed=0, config=config)
    before = [v.numpy() for v in trainer.model.trainable_variables]
    loss_fn = keras.losses.MeanSquaredError()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    grads = []
    for w, b in [(0, 0), (2, 1)]:
        rows = trainer.rows(w, b)
        assert len(rows) == 8 and all(r % 3 == w for r in rows)  # worker w's own shard
        with tf.GradientTape() as tape:
            loss = loss_fn(trainer.y[rows], trainer.model(trainer.x[rows], training=True))
        grads.append([g.numpy() for g in tape.gradient(loss, trainer.model.trainable_variables)])
    trainer.sync_step([(0, 0), (2, 1)])
    for v, v0, g0, g1 in zip(trainer.model.trainable_variables, before, *grads):
        np.testing.assert_allclose(v.numpy(), v0 - 0.1 * (g0 + g1) / 2, rtol=1e-5, atol=1e-6)


def test_the_smoke_run_writes_a_complete_table(tmp_path):
    import csv  # pylint: disable=g-import-not-at-top

    out = scale_sim.run(str(tmp_path), quick=True, argv=["scale_sim", "--smoke"], smoke=True)
    runs = out["runs"]
    assert sorted(runs) == [(4, "async"), (4, "sync b = 0"), (4, "sync b = 1"), (4, "sync b = 1, restart")]
    for (n, label), rs in runs.items():
        (r,) = rs
        times = [t for t, _, _ in r.curve]
        assert times == sorted(times) and times[-1] <= 3.0 and r.curve[0][:2] == (0.0, 0)
        assert all(0.0 <= a <= 1.0 for _, _, a in r.curve) and r.curve[-1][1] > 0
    # A step of b = 0 waits for all 4 workers: never more steps in the same simulated time than b = 1.
    assert runs[(4, "sync b = 0")][0].curve[-1][1] <= runs[(4, "sync b = 1")][0].curve[-1][1]
    assert runs[(4, "sync b = 0")][0].dropped == 0 < runs[(4, "sync b = 1")][0].dropped
    # Restarted stragglers make each step the order-statistic ideal: never fewer steps than finishing ones.
    assert runs[(4, "sync b = 1, restart")][0].curve[-1][1] >= runs[(4, "sync b = 1")][0].curve[-1][1]
    md = (tmp_path / "scale_sim.md").read_text()
    assert "- command: `python -m scale_sim --smoke`" in md and "| 4 | sync b = 1 | 5 |" in md
    with open(tmp_path / "scale_sim.csv") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert {r["mode"] for r in rows} == {"async", "sync b = 0", "sync b = 1", "sync b = 1, restart"}
