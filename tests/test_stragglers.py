"""Straggler models, the ideal step time and the straggler callback (no cluster)."""

import random

import keras
import numpy as np
import pytest

from tf_backup.sim import stragglers


class FakeTime:
    """Stands in for the `time` module inside `stragglers`: sleeping advances a fake clock."""

    def __init__(self):
        self.now = 1000.0
        self.slept = []

    def sleep(self, seconds):
        assert seconds > 0
        self.slept.append(seconds)
        self.now += seconds

    def monotonic(self):
        return self.now


@pytest.fixture
def fake_time(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(stragglers, "time", fake)
    return fake


def write_trace(tmp_path, text, name="trace.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- parse -----------------------------------------------------------------------


def test_parse_none():
    model = stragglers.parse("none")
    assert isinstance(model, stragglers.NoStragglers)
    assert model.spec == "none"
    assert model.delay(3, 7, compute_seconds=2.0) == 0.0


def test_parse_slow_one_and_several_workers():
    model = stragglers.parse("slow:2:3")
    assert isinstance(model, stragglers.SlowWorkers)
    assert (model.spec, model.workers, model.factor) == ("slow:2:3", (2,), 3.0)
    model = stragglers.parse(" SLOW : 3,0,3 : 1.5 ", seed=4)
    assert (model.spec, model.workers, model.factor, model.seed) == ("slow:0,3:1.5", (0, 3), 1.5, 4)
    assert stragglers.parse("slow:0:1").factor == 1.0  # FACTOR 1: slow in name only.


def test_parse_exp_and_pareto():
    model = stragglers.parse("exp:0.25")
    assert isinstance(model, stragglers.ExponentialDelay)
    assert (model.spec, model.mean) == ("exp:0.25", 0.25)
    model = stragglers.parse("pareto:1.5:2.0")
    assert isinstance(model, stragglers.ParetoDelay)
    assert (model.spec, model.shape, model.scale) == ("pareto:1.5:2", 1.5, 2.0)
    assert model.mean == pytest.approx(4.0)  # scale / (shape - 1)
    assert stragglers.parse("pareto:1:1").mean == float("inf")


def test_parse_trace(tmp_path):
    path = write_trace(tmp_path, "# step delays, 2 workers\n0.1, 0.2\n\n0.3,0.4\n")
    model = stragglers.parse(f"trace:{path}")
    assert isinstance(model, stragglers.TraceDelay)
    assert model.spec == f"trace:{path}"
    np.testing.assert_array_equal(model.table, [[0.1, 0.2], [0.3, 0.4]])


def test_normalized_spec_parses_to_an_equal_model(tmp_path):
    path = write_trace(tmp_path, "1,2\n")
    for spec in ["none", "Slow:1,0:2.50", "exp:1e-3", "pareto:3:0.01", f"trace:{path}", "pareto:3:0.01 + slow:1:2"]:
        model = stragglers.parse(spec, seed=9)
        assert stragglers.parse(model.spec, seed=9) == model
        assert stragglers.parse(model.spec, seed=9).spec == model.spec


@pytest.mark.parametrize("spec", [
    "", "foo", "foo:1", "none:1", "none:",
    "slow", "slow:0", "slow:0:", "slow::2", "slow:0,:2", "slow:x:2", "slow:-1:2", "slow:1.5:2",
    "slow:²:2", "slow:0:x", "slow:0:0.5", "slow:0:nan", "slow:0:2:3",
    "exp", "exp:", "exp:x", "exp:0", "exp:-1", "exp:inf", "exp:nan", "exp:1:2",
    "pareto", "pareto:x", "pareto:1", "pareto:0:1", "pareto:1:0", "pareto:-1:1", "pareto:1:x",
    "pareto:1:1:1", "pareto:inf:1",
    "trace", "trace:", "trace:  ",
    "phases", "phases:", "phases:none", "phases:none;", "phases:none;0:exp:1", "phases:none;x:exp:1",
    "phases:none;5:", "phases:none;5:exp:1;5:none", "phases:none;9:exp:1;5:none", "phases:none;5:bogus",
    "phases:none;5:phases:none;6:none",
    "+", "none+", "+none", "none++none", "none+bogus", "none+phases:none;5:none", "none+trace:x", "exp:0+none",
])
def test_bad_spec_raises_value_error_naming_it(spec):
    with pytest.raises(ValueError) as error:
        stragglers.parse(spec)
    assert f"Straggler spec {spec!r} is not valid: expected" in str(error.value)


def test_bad_spec_message_says_what_was_expected():
    with pytest.raises(ValueError) as error:
        stragglers.parse("pareto:x")
    assert str(error.value).startswith(
        "Straggler spec 'pareto:x' is not valid: expected pareto:SHAPE:SCALE with SHAPE > 0 "
        "and SCALE > 0 (seconds)")
    with pytest.raises(ValueError, match="expected one of none, slow:"):
        stragglers.parse("gamma:1")


@pytest.mark.parametrize("content", [
    None,  # missing file
    "",  # no rows
    "# only a comment\n\n",
    "0.1,0.2\n0.3\n",  # ragged
    "0.1,abc\n",  # not numeric
    "0.1,-0.2\n",  # negative
    "0.1,nan\n",  # not finite
])
def test_bad_trace_file_raises_value_error_naming_path(tmp_path, content):
    path = str(tmp_path / "bad.csv")
    if content is not None:
        write_trace(tmp_path, content, name="bad.csv")
    with pytest.raises(ValueError) as error:
        stragglers.parse(f"trace:{path}")
    assert f"Straggler spec 'trace:{path}' is not valid" in str(error.value)
    assert repr(path) in str(error.value)


def test_trace_that_is_a_directory_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="Cannot read trace file"):
        stragglers.parse(f"trace:{tmp_path}")


def test_parse_type_errors_and_bad_seed():
    with pytest.raises(TypeError, match="must be a str"):
        stragglers.parse(3)
    with pytest.raises(TypeError, match="must be a str"):
        stragglers.parse(None)
    with pytest.raises(TypeError, match="seed"):
        stragglers.parse("none", seed=1.5)
    with pytest.raises(ValueError, match="seed=-1"):
        stragglers.parse("none", seed=-1)


def test_describe_is_one_line_naming_the_kind(tmp_path):
    path = write_trace(tmp_path, "1,2\n3,4\n")
    for spec, word in [("none", "none"), ("slow:0,2:3", "slow"), ("exp:0.1", "exp"),
                       ("pareto:1.5:0.2", "pareto"), ("pareto:0.5:0.2", "infinite"),
                       (f"trace:{path}", "2 steps x 2 workers")]:
        text = stragglers.parse(spec).describe()
        assert word in text and "\n" not in text


# --- delays ----------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["exp:0.5", "pareto:2:0.1"])
def test_same_seed_same_delays_other_seed_other_delays(spec):
    a = stragglers.parse(spec, seed=1).delays(num_workers=3, num_steps=50)
    b = stragglers.parse(spec, seed=1).delays(num_workers=3, num_steps=50)
    c = stragglers.parse(spec, seed=2).delays(num_workers=3, num_steps=50)
    np.testing.assert_array_equal(a, b)
    assert not np.any(a == c)
    assert a.shape == (50, 3) and np.all(a >= 0)
    assert len(np.unique(a)) == a.size  # Workers and steps get distinct draws.


def test_delay_does_not_depend_on_call_order():
    model = stragglers.parse("exp:1", seed=5)
    keys = [(w, s) for w in range(4) for s in range(25)]
    forward = {key: model.delay(*key) for key in keys}
    random.Random(0).shuffle(keys)
    shuffled = {key: stragglers.parse("exp:1", seed=5).delay(*key) for key in keys}
    assert shuffled == forward
    matrix = model.delays(num_workers=4, num_steps=25)
    assert all(matrix[s, w] == value for (w, s), value in forward.items())


def test_slow_is_factor_minus_one_times_compute_for_slow_workers_only():
    model = stragglers.parse("slow:0,2:3")
    assert model.delay(0, 5, compute_seconds=0.5) == 1.0
    assert model.delay(2, 9, compute_seconds=0.25) == 0.5
    assert model.delay(1, 5, compute_seconds=0.5) == 0.0
    assert model.delay(3, 5, compute_seconds=0.5) == 0.0
    assert model.delay(0, 5) == 0.0  # No compute time given: no delay.
    compute = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(model.delays(3, 2, compute_seconds=compute),
                                  [[2.0, 0.0, 6.0], [8.0, 0.0, 12.0]])


def test_exponential_sample_mean_is_within_5_percent():
    mean = 0.2
    draws = stragglers.parse(f"exp:{mean}", seed=11).delays(num_workers=4, num_steps=5000)
    assert draws.size == 20000
    assert abs(draws.mean() - mean) < 0.05 * mean


def test_pareto_tail_matches_lomax_survival():
    shape, scale = 2.0, 0.1
    draws = stragglers.parse(f"pareto:{shape}:{scale}", seed=13).delays(4, 5000).ravel()
    for x in [0.05, 0.1, 0.3, 1.0]:
        survival = (1.0 + x / scale) ** -shape  # 0.444, 0.25, 0.0625, 0.0083
        assert abs(np.mean(draws > x) - survival) < 0.01, x


def test_trace_replays_and_wraps_around(tmp_path):
    path = write_trace(tmp_path, "# w0, w1\n0.1,0.2\n0.3,0.4\n0.5,0.6\n")
    model = stragglers.parse(f"trace:{path}")
    assert model.delay(0, 0) == 0.1
    assert model.delay(1, 2) == 0.6
    assert model.delay(1, 4) == 0.4  # Step 4 is row 4 % 3 = 1.
    assert model.delay(0, 3001) == 0.3
    np.testing.assert_array_equal(model.delays(2, 4), [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6],
                                                       [0.1, 0.2]])


def test_trace_worker_without_column_raises_naming_path_and_columns(tmp_path):
    path = write_trace(tmp_path, "0.1,0.2\n")
    model = stragglers.parse(f"trace:{path}")
    with pytest.raises(ValueError) as error:
        model.delay(2, 0)
    assert repr(path) in str(error.value)
    assert "has 2 worker column(s)" in str(error.value)
    assert "worker=2" in str(error.value)


def test_delay_argument_errors():
    model = stragglers.parse("exp:1")
    with pytest.raises(ValueError, match="worker=-1"):
        model.delay(-1, 0)
    with pytest.raises(ValueError, match="step=-1"):
        model.delay(0, -1)
    with pytest.raises(TypeError, match="worker"):
        model.delay(1.0, 0)
    with pytest.raises(ValueError, match="compute_seconds"):
        model.delay(0, 0, compute_seconds=-1.0)
    with pytest.raises(ValueError, match="num_workers=0"):
        model.delays(0, 3)


# --- ideal_step_times ------------------------------------------------------------


def test_phases_switch_models_at_their_steps_and_keep_each_models_draws():
    model = stragglers.parse("phases: pareto:1.5:0.02 ; 500:slow:4,5:5", seed=3)
    assert isinstance(model, stragglers.PhasedDelay)
    assert model.spec == "phases:pareto:1.5:0.02;500:slow:4,5:5"
    assert stragglers.parse(model.spec, seed=3) == model
    pareto, slow = stragglers.parse("pareto:1.5:0.02", seed=3), stragglers.parse("slow:4,5:5", seed=3)
    delays = model.delays(num_workers=6, num_steps=1000, compute_seconds=0.1)
    np.testing.assert_array_equal(delays[:500], pareto.delays(6, 1000, 0.1)[:500])
    np.testing.assert_array_equal(delays[500:], slow.delays(6, 1000, 0.1)[500:])
    assert np.all(delays[500:, :4] == 0) and np.allclose(delays[500:, 4:], 0.4)
    assert [model.phase(s) for s in (0, 499, 500, 10**6)] == [0, 0, 1, 1]
    described = model.describe()
    assert "\n" not in described and "from step 0: pareto" in described and "from step 500: slow" in described


def test_a_sum_adds_its_parts_delays_and_its_first_part_draws_what_it_would_alone():
    model = stragglers.parse("pareto:1.5:0.02 + slow:5:3 + exp:0.01", seed=3)
    assert isinstance(model, stragglers.SumDelay)
    assert model.spec == "pareto:1.5:0.02+slow:5:3+exp:0.01"
    pareto = stragglers.parse("pareto:1.5:0.02", seed=3).delays(6, 200, 0.1)
    exp = stragglers.parse("exp:0.01", seed=5).delays(6, 200, 0.1)  # part 2: seed + 2
    delays = model.delays(num_workers=6, num_steps=200, compute_seconds=0.1)
    np.testing.assert_allclose(delays[:, :5], pareto[:, :5] + exp[:, :5])
    np.testing.assert_allclose(delays[:, 5], pareto[:, 5] + 0.2 + exp[:, 5])
    assert not np.allclose(exp, stragglers.parse("exp:0.01", seed=3).delays(6, 200, 0.1))  # independent parts
    described = model.describe()
    assert "\n" not in described and described.count(" + ") == 2 and "worker(s) 5 3x slower" in described


def test_a_sum_in_a_phase():
    model = stragglers.parse("phases:pareto:1.5:0.02;10:pareto:1.5:0.02+slow:3:20;20:none", seed=1)
    assert model.spec == "phases:pareto:1.5:0.02;10:pareto:1.5:0.02+slow:3:20;20:none"
    delays = model.delays(num_workers=4, num_steps=30, compute_seconds=0.03)
    pareto = stragglers.parse("pareto:1.5:0.02", seed=1).delays(4, 30, 0.03)
    np.testing.assert_array_equal(delays[:10], pareto[:10])
    np.testing.assert_array_equal(delays[10:20, :3], pareto[10:20, :3])
    np.testing.assert_allclose(delays[10:20, 3], pareto[10:20, 3] + 19 * 0.03)
    assert np.all(delays[20:] == 0)


def test_three_phases():
    model = stragglers.parse("phases:none;10:exp:0.5;20:none", seed=0)
    delays = model.delays(num_workers=2, num_steps=30)
    assert np.all(delays[:10] == 0) and np.all(delays[10:20] > 0) and np.all(delays[20:] == 0)


def test_ideal_step_times_is_the_nth_order_statistic():
    times = np.array([[3.0, 1.0, 2.0, 5.0],
                      [4.0, 4.0, 1.0, 0.5]])
    np.testing.assert_array_equal(stragglers.ideal_step_times(times, 1), [1.0, 0.5])
    np.testing.assert_array_equal(stragglers.ideal_step_times(times, 2), [2.0, 1.0])
    np.testing.assert_array_equal(stragglers.ideal_step_times(times, 3), [3.0, 4.0])
    np.testing.assert_array_equal(stragglers.ideal_step_times(times, 4), [5.0, 4.0])
    np.testing.assert_array_equal(times[0], [3.0, 1.0, 2.0, 5.0])  # Input untouched.


def test_ideal_step_times_with_a_slow_worker_ignores_it_given_one_backup():
    model = stragglers.parse("slow:3:10")
    compute = np.full((5, 4), 0.1)
    times = compute + model.delays(4, 5, compute_seconds=compute)
    np.testing.assert_allclose(stragglers.ideal_step_times(times, 3), 0.1)  # 3 of 4.
    np.testing.assert_allclose(stragglers.ideal_step_times(times, 4), 1.0)  # Plain sync.


@pytest.mark.parametrize("n", [0, 5, -1, 1.5, True])
def test_ideal_step_times_bad_n(n):
    with pytest.raises(ValueError) as error:
        stragglers.ideal_step_times(np.ones((2, 4)), n)
    assert f"n={n!r}" in str(error.value)
    assert "[1, 4]" in str(error.value)


def test_ideal_step_times_needs_a_matrix():
    with pytest.raises(ValueError, match="2-D"):
        stragglers.ideal_step_times(np.ones(4), 1)
    with pytest.raises(ValueError, match="2-D"):
        stragglers.ideal_step_times(np.ones((3, 0)), 1)


# --- StragglerCallback -----------------------------------------------------------


class FakeStrategy:
    """Stands in for BackupWorkerStrategy.sleep_unless_superseded: cuts the sleeps it is told to."""

    def __init__(self, fake_time, cut_after):
        self.fake_time = fake_time
        self.cut_after = cut_after  # per call: seconds after which the batch is superseded, or None
        self.asked = []

    def sleep_unless_superseded(self, seconds):
        self.asked.append(seconds)
        cut = self.cut_after[len(self.asked) - 1]
        self.fake_time.now += seconds if cut is None else min(cut, seconds)
        return cut is not None and cut < seconds


def test_callback_with_cancel_counts_cut_sleeps_and_records_what_was_slept(fake_time, tmp_path):
    path = write_trace(tmp_path, "2.0\n3.0\n0.5\n")
    strategy = FakeStrategy(fake_time, [0.25, None, 0.1])
    callback = stragglers.StragglerCallback(stragglers.parse(f"trace:{path}"), worker=0, cancel=strategy)
    for batch in range(3):
        run_batch(callback, fake_time, batch, 0.0)
    assert strategy.asked == [2.0, 3.0, 0.5]  # the whole delay is offered to the strategy
    assert fake_time.slept == []  # it does the sleeping
    assert callback.delays == pytest.approx([0.25, 3.0, 0.1])
    assert callback.cancelled == 2 and callback.total_delay == pytest.approx(3.35)


class FakeRestartingStrategy(FakeStrategy):
    """Also stands in for restart_superseded: returns the given steps in turn (None: the round stopped)."""

    def __init__(self, fake_time, cut_after, restart_steps):
        super().__init__(fake_time, cut_after)
        self.restart_steps = list(restart_steps)
        self.restarts = 0

    def restart_superseded(self):
        self.restarts += 1
        return self.restart_steps.pop(0)


def test_callback_with_restart_sleeps_a_fresh_delay_after_each_cut_sleep(fake_time, tmp_path):
    path = write_trace(tmp_path, "2.0\n3.0\n0.5\n4.0\n1.5\n")
    # Batch 0: 2.0 cut at 0.25, restarted; 3.0 cut at 0.5, restarted; 0.5 in full.
    # Batch 1: 4.0 cut at 1.0, and the round has stopped: no restart, no further sleep.
    strategy = FakeRestartingStrategy(fake_time, [0.25, 0.5, None, 1.0], [7, 8, None])
    callback = stragglers.StragglerCallback(stragglers.parse(f"trace:{path}"), worker=0, cancel=strategy,
                                            restart=True)
    for batch in range(2):
        run_batch(callback, fake_time, batch, 0.0)
    assert strategy.asked == [2.0, 3.0, 0.5, 4.0]  # each attempt draws the model's next delay
    assert strategy.restarts == 3 and callback.step == 4
    assert callback.delays == pytest.approx([1.25, 1.0])  # per batch: what its attempts slept
    assert callback.cancelled == 3 and callback.restarted == 2
    assert fake_time.slept == []


def test_callback_restart_needs_a_strategy_that_restarts():
    model = stragglers.parse("none")
    with pytest.raises(ValueError, match="cancel=None"):
        stragglers.StragglerCallback(model, worker=0, restart=True)
    with pytest.raises(TypeError, match="restart_superseded"):
        stragglers.StragglerCallback(model, worker=0, cancel=FakeStrategy(None, []), restart=True)
    with pytest.raises(TypeError, match="restart='yes'"):
        stragglers.StragglerCallback(model, worker=0, restart="yes")


def test_callback_cancel_must_be_a_strategy():
    with pytest.raises(TypeError, match="cancel=3"):
        stragglers.StragglerCallback(stragglers.parse("none"), worker=0, cancel=3)


def run_batch(callback, fake_time, batch, compute_seconds):
    callback.on_train_batch_begin(batch)
    fake_time.now += compute_seconds
    callback.on_train_batch_end(batch)


def test_callback_slow_worker_sleeps_factor_minus_one_times_previous_batch(fake_time):
    callback = stragglers.StragglerCallback(stragglers.parse("slow:1:3"), worker=1)
    for batch, compute in enumerate([0.5, 0.25, 0.125]):
        run_batch(callback, fake_time, batch, compute)
    callback.on_train_batch_begin(3)
    # Batch 0 has no previous batch; then 2 x 0.5, 2 x 0.25, 2 x 0.125.
    assert callback.delays == [0.0, 1.0, 0.5, 0.25]
    assert fake_time.slept == [1.0, 0.5, 0.25]
    assert callback.total_delay == 1.75
    assert callback.step == 4
    assert callback.capped == 0


def test_callback_fast_worker_never_sleeps(fake_time):
    callback = stragglers.StragglerCallback(stragglers.parse("slow:1:3"), worker=0)
    for batch in range(4):
        run_batch(callback, fake_time, batch, 0.5)
    assert fake_time.slept == []
    assert callback.delays == [0.0] * 4
    assert callback.total_delay == 0.0


def test_callback_sleeps_model_delays_in_order_and_caps(fake_time):
    model = stragglers.parse("exp:10", seed=3)
    callback = stragglers.StragglerCallback(model, worker=2, max_delay=5.0)
    for batch in range(40):
        run_batch(callback, fake_time, batch, 0.01)
    wanted = [model.delay(2, step) for step in range(40)]
    expected = [min(d, 5.0) for d in wanted]
    assert callback.delays == expected
    assert fake_time.slept == expected  # Exponential delays are > 0.
    assert callback.total_delay == pytest.approx(sum(expected))
    assert callback.capped == sum(d > 5.0 for d in wanted)
    assert 0 < callback.capped < 40


def test_callback_counts_steps_across_fit_calls(tmp_path, fake_time):
    path = write_trace(tmp_path, "0.1\n0.2\n0.3\n0.4\n0.5\n")
    callback = stragglers.StragglerCallback(stragglers.parse(f"trace:{path}"), worker=0)
    for batch in [0, 1, 2]:  # First fit.
        run_batch(callback, fake_time, batch, 0.0)
    for batch in [0, 1]:  # Second fit: Keras' batch index restarts, the step does not.
        run_batch(callback, fake_time, batch, 0.0)
    assert fake_time.slept == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_callback_in_keras_fit(tmp_path, fake_time):
    path = write_trace(tmp_path, "0.1\n0.2\n0.3\n0.4\n0.5\n0.6\n0.7\n")
    callback = stragglers.StragglerCallback(stragglers.parse(f"trace:{path}"), worker=0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((12, 2), np.float32), np.ones((12, 1), np.float32)
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[callback], verbose=0)  # 3 batches
    model.fit(x, y, batch_size=6, epochs=2, callbacks=[callback], verbose=0)  # 4 batches
    assert callback.step == 7
    assert fake_time.slept == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def test_callback_argument_errors():
    model = stragglers.parse("none")
    with pytest.raises(TypeError, match="StragglerModel"):
        stragglers.StragglerCallback("exp:1", worker=0)
    with pytest.raises(ValueError, match="worker=-1"):
        stragglers.StragglerCallback(model, worker=-1)
    with pytest.raises(ValueError, match="max_delay=-1"):
        stragglers.StragglerCallback(model, worker=0, max_delay=-1.0)
    with pytest.raises(ValueError, match="max_delay"):
        stragglers.StragglerCallback(model, worker=0, max_delay=float("inf"))
