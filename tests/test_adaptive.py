"""The adaptive-N rule (tf_backup.protocol.adaptive) on generated traces, against its closed form (no cluster)."""

import collections
import math
import statistics

import numpy as np
import pytest

from tf_backup.protocol import adaptive
from tf_backup.protocol import pushes


def harmonic(k: int) -> float:
    return sum(1.0 / i for i in range(1, k + 1))


COMPUTE = 0.1  # seconds every worker computes; the delays come on top


def expected_nth(workers: int, n: int, mean: float) -> float:
    """E[T_(n)] for arrivals COMPUTE + Exp(mean), i.i.d.: COMPUTE + (H_W - H_{W-n}) * mean."""
    return COMPUTE + (harmonic(workers) - harmonic(workers - n)) * mean


def closed_form_best(workers: int, mean: float, b_simple: float, batch: int, n_min: int, n_max: int) -> int:
    """argmax_n progress(n) / E[T_(n)] with the closed-form order statistics."""
    def value(n):
        return adaptive.progress(n, b_simple, batch) / expected_nth(workers, n, mean)
    return max(range(n_min, n_max + 1), key=lambda n: (value(n), n))


def exponential_trace(workers, steps, mean, seed=0):
    return COMPUTE + np.random.default_rng(seed).exponential(mean, size=(steps, workers))


@pytest.mark.parametrize("b_simple,best", [(1.0, 1), (64.0, 4), (1024.0, 6)])
def test_the_rule_picks_the_closed_form_n_for_exponential_delays(b_simple, best):
    workers, batch, mean = 8, 32, 0.05
    rule = adaptive.AdaptiveN(workers, batch, window=20000, warmup=1, recent=0)  # a stationary trace
    for row in exponential_trace(workers, 20000, mean):
        rule.arrivals.add(row)
    times = [rule.arrivals.expected_order_statistic(n) for n in range(1, workers + 1)]
    for n, t in enumerate(times, start=1):  # the window's order statistics are the closed form's
        assert t == pytest.approx(expected_nth(workers, n, mean), rel=0.01)
    choice = adaptive.choose(times, b_simple, batch, 1)
    assert closed_form_best(workers, mean, b_simple, batch, 1, workers) == best  # the case is what it says
    assert choice.n == best
    assert len(choice.rates) == workers and choice.rates[choice.n - 1] == max(choice.rates)


def test_more_noise_waits_for_more_gradients():
    workers, batch, mean = 8, 32, 0.05
    window = adaptive.ArrivalWindow(workers, 20000)
    for row in exponential_trace(workers, 20000, mean, seed=1):
        window.add(row)
    times = [window.expected_order_statistic(n) for n in range(1, workers + 1)]
    chosen = [adaptive.choose(times, b, batch, 1).n for b in (1.0, 16.0, 256.0, 4096.0, math.inf)]
    assert chosen == sorted(chosen) and chosen[0] < chosen[-1]
    assert chosen[0] == 1 and chosen[-1] >= 7  # no noise: one gradient is as good as eight


def test_a_worker_that_is_always_10x_slow_is_not_waited_for():
    workers, batch = 6, 32
    rule = adaptive.AdaptiveN(workers, batch, window=200, warmup=5)
    rng = np.random.default_rng(2)
    for _ in range(200):
        arrivals = 0.1 + 0.005 * rng.random(workers)
        arrivals[5] = 1.0  # 10x slow
        rule.observe(arrivals, sum_sq_norms=500.0, sq_norm_of_sum=525.0, n=5)  # B_simple ~ 2,500
    assert rule.noise.b_simple == pytest.approx(2528, rel=0.01)
    assert rule.choose().n == workers - 1


def test_no_stragglers_and_a_high_noise_scale_wait_for_every_worker():
    workers, batch = 6, 32
    rule = adaptive.AdaptiveN(workers, batch, window=200, warmup=5)
    rng = np.random.default_rng(3)
    for _ in range(200):
        rule.observe(0.1 + 0.002 * rng.random(workers), sum_sq_norms=600.0, sq_norm_of_sum=612.0, n=6)
    assert rule.noise.b_simple > 100 * batch
    assert rule.choose().n == workers


def test_the_noise_scale_estimate_is_unbiased():
    rng = np.random.default_rng(4)
    d, batch, n, sigma = 50, 16, 4, 2.0
    g = rng.normal(size=d)
    truth = d * sigma ** 2 / float(g @ g)  # tr(Sigma) / |G|^2, per-example covariance sigma^2 I
    noise = adaptive.NoiseScale(batch, window=5000)
    for _ in range(5000):
        grads = g + rng.normal(scale=sigma / math.sqrt(batch), size=(n, d))  # means over `batch` examples
        noise.add(float((grads ** 2).sum()), float((grads.sum(axis=0) ** 2).sum()), n)
    assert noise.b_simple == pytest.approx(truth, rel=0.1)


def test_bounds_are_honoured_and_checked():
    times = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    assert adaptive.choose(times[2:5], 1.0, 32, 3).n == 3  # the fastest allowed
    rule = adaptive.AdaptiveN(6, 32, n_min=2, n_max=4, warmup=0)
    assert rule.choose().n == 4  # nothing observed yet: n_max
    for _ in range(10):
        rule.observe([0.01, 0.01, 0.01, 0.01, 0.01, 5.0], 1.0, 4.0, 2)
    # The 4 fastest take equally long, so N ties to the largest allowed: n_max (5 if it were ignored).
    assert rule.choose().n == 4
    for args, error, words in [
        ((6, 0, None), ValueError, "min_replicas_to_aggregate"), ((6, None, 7), ValueError, "at most the number"),
        ((6, 4, 3), ValueError, "must not exceed"), ((6, 1.5, None), TypeError, "min_replicas_to_aggregate"),
        ((6, None, "3"), TypeError, "max_replicas_to_aggregate")]:
        with pytest.raises(error, match=words):
            adaptive.check_bounds(*args)


def test_steps_where_the_nth_gradient_never_came_make_that_n_unknown():
    window = adaptive.ArrivalWindow(3, 10)
    for _ in range(10):
        window.add([0.1, 0.2, math.inf])
    assert window.expected_order_statistic(2) == pytest.approx(0.2)
    assert window.expected_order_statistic(3) == math.inf
    choice = adaptive.choose([window.expected_order_statistic(n) for n in (1, 2, 3)], 8.0, 32, 1)
    assert choice.rates[2] == 0.0 and choice.n in (1, 2)
    with pytest.raises(ValueError, match="one time per worker"):
        window.add([0.1])


def majority(values):
    """The value more than half of `values` hold, or None."""
    (value, count), = collections.Counter(values).most_common(1)
    return value if 2 * count > len(values) else None


@pytest.mark.cluster
def test_auto_drops_a_10x_slow_worker_then_waits_for_all_once_it_is_fast():
    # 4 workers, pure-noise regression (a high noise scale), every worker sleeps 50 ms a batch;
    # worker 3 sleeps 10x as long until global step 60. Window 20, warmup 5.
    import tf_backup  # pylint: disable=g-import-not-at-top
    import programs.adaptive  # pylint: disable=g-import-not-at-top

    out = tf_backup.launch_local(programs.adaptive.train_adaptive, num_workers=4,
                                 kwargs=dict(slow_steps=60, fast_steps=50), timeout=300)
    chief = out[0]
    replicas, taken = chief["replicas"], chief["taken"]
    assert len(replicas) == 110
    assert replicas[:5] == [4] * 5  # warmup: n_max
    # Each step's N follows from sleeps of 50 ms and 500 ms on a shared machine: a stall of a
    # fast worker can tip one step's choice, so each phase is judged by its window's majority.
    assert majority(replicas[30:60]) == 3  # settled: the slow worker is not waited for
    assert majority(replicas[-20:]) == 4  # no straggler, high noise: every gradient is worth its wait
    assert all(t >= n for t, n in zip(taken, replicas))  # a step averages at least its N
    assert min(chief["noise_scale"][30:]) > 4  # in worker batches: 4 gradients make ~4x the progress of 1
    # The slow worker is named in the step record while it is slow (issue 33): ~10x the others,
    # reported once slow for PERSIST steps of the first 60, and no longer once it is fast.
    from tf_backup.protocol import slow_workers  # pylint: disable=g-import-not-at-top
    spans = slow_workers.spans(chief["slow_workers"])
    assert [s.worker for s in spans] == [3], spans
    assert spans[0].since_step + slow_workers.PERSIST <= 60 and spans[0].factor > 5
    assert spans[0].last_step >= 59 and chief["slow_workers"][-1][1] == () == chief["slow_now"]
    # Its turn fast at step 60 is a change point in its compute times (its slow samples are dropped),
    # in the record of a step soon after: 2 pushes 2.5x faster than its median (`adaptive.FAST`).
    changed_at = [s for s, workers in chief["change_points"] if 3 in workers]
    assert any(60 <= s < 80 for s in changed_at), chief["change_points"]
    assert all(0 <= w < 4 for _, workers in chief["change_points"] for w in workers)
    # Each record holds what the rule's next choice was made from: E[T_(n)] for n = 1 .. 4 (none in
    # the warmup), from which `choose` gives the next step's N again; while worker 3 is slow, waiting
    # for it is expected to cost 3x the 3rd arrival at least (500 ms against 50 ms sleeps).
    expected = chief["expected_seconds"]
    assert expected[:4] == [()] * 4 and all(len(e) == 4 for e in expected[4:])
    factor = out[0]["adaptive"].noise_factor
    for i in range(4, len(expected) - 1):  # the 5th take ends the warmup
        e = expected[i]
        assert list(e) == sorted(e), (i, e)
        current = replicas[i] if i > 4 else None  # the rule's first choice keeps nothing
        again = adaptive.choose(e, chief["noise_scale"][i] * factor, 1, 1, current, adaptive.MARGIN)
        assert again.n == replicas[i + 1], (i, e, replicas[i:i + 2])
    assert statistics.median(e[3] / e[2] for e in expected[30:60]) > 3
    for worker in out:
        assert worker["num_backup_workers"] == "auto"
        assert (worker["adaptive"].n_min, worker["adaptive"].n_max, worker["adaptive"].window) == (1, 4, 20)
        stats = worker["stats"]
        assert stats["global_step"] == 110
        assert [t + d for t, d in zip(stats["taken"], stats["dropped"])] == stats["pushed"]
    # Keras's logs carry the chief's choice: at the ends of epochs 4-6 (steps 31-60) mostly 3,
    # of the last three (steps 81-110) mostly 4; each value one the chief chose.
    for worker in out[:3]:
        n = worker["history"]["replicas_to_aggregate"]
        assert len(n) == 11 and set(n) <= {float(r) for r in replicas}
        assert majority(n[3:6]) == 3.0 and majority(n[-3:]) == 4.0
    # Every worker's History names the slow worker, its factor and first step, as the chief's record
    # has them at that epoch's end (the control vector's SLOW slots), and nobody once it is fast.
    slow_at = dict(chief["slow_workers"])  # global step s + 1 -> the slow workers published with it
    for worker in out:
        h = worker["history"]
        named = 0
        for k, g in enumerate(h["global_step"]):
            around = [slow_at.get(int(g) - 1 + d) for d in (-2, -1, 0, 1)]
            if all(a is not None and [s.worker for s in a] == [3] for a in around):
                named += 1
                assert (h["slow_workers"][k], h["slow_worker"][k]) == (1.0, 3.0), (worker["worker"], k, h)
                assert h["slow_worker_since_step"][k] == spans[0].since_step
                assert min(a[0].factor for a in around) - 0.01 <= h["slow_worker_factor"][k] <= max(
                    a[0].factor for a in around) + 0.01
        # The slow worker's own epochs span ~30 global steps while it is slow: one ends in its stretch.
        assert named >= (1 if worker["worker"] == 3 else 2), (worker["worker"], h["global_step"], spans)
        assert (h["slow_workers"][-1], h["slow_worker"][-1], h["slow_worker_factor"][-1],
                h["slow_worker_since_step"][-1]) == (0.0, -1.0, 0.0, -1.0)


def test_a_slow_worker_with_fewer_samples_counts_as_much_as_a_fast_one():
    # Worker 2 pushes once every 10 steps (it is 10x slow); the others every step.
    window = adaptive.ArrivalWindow(3, 50)
    for step in range(50):
        window.add_sample(0, step, 0.1)
        window.add_sample(1, step, 0.2)
        if step % 10 == 0:
            window.add_sample(2, step, 1.0)
    times = window.expected_order_statistics(step=50)
    np.testing.assert_allclose(times, [0.1, 0.2, 1.0])  # every step's draw has worker 2 at 1.0
    np.testing.assert_allclose(window.expected_order_statistics(step=50, unavailable={2}), [0.1, 0.2, np.inf])
    assert window.sample_for(2, 40) == 1.0 and window.sample_for(2, 41) is None


def test_samples_older_than_the_window_are_forgotten_but_the_newest_is_kept():
    window = adaptive.ArrivalWindow(2, 10)
    window.add_sample(0, 0, 5.0)  # worker 0 was slow at step 0 and has not pushed since
    for step in range(10, 20):
        window.add_sample(1, step, 0.1)
        if step >= 15:
            window.add_sample(0, step, 0.3)
    assert window.recent(0, step=20) == [0.3] * 5  # step 0's sample is out of the window
    assert window.recent(1, step=100) == [0.1]  # nothing recent: the newest is all there is
    np.testing.assert_allclose(window.expected_order_statistics(step=20), [0.1, 0.3])


def test_the_step_overhead_is_the_period_minus_the_last_taken_compute_time():
    rule = adaptive.AdaptiveN(3, n_min=1, n_max=3, window=10, warmup=0)
    for step in range(10):
        for w, seconds in enumerate([0.1, 0.2, 0.9]):
            rule.observe_push(pushes.PushSample(w, step, seconds))
        # Steps taken with workers 0 and 1: the period is 0.25 s, of which 0.2 s the second's compute.
        rule.observe_take(step, [0, 1], period=0.25, sum_sq_norms=2.0, sq_norm_of_sum=3.9, n=2)
    assert rule.overhead == pytest.approx(0.05)
    choice = rule.choose(step=10)
    np.testing.assert_allclose(choice.expected_times, [0.15, 0.25, 0.95])
    assert rule.choose(step=10, unavailable={1, 2}).n == 1  # one worker left: N = 1 whatever the rates



def test_the_current_n_stays_unless_another_is_more_than_the_margin_better():
    times = [0.10, 0.104, 0.30]  # N = 1, 2, 3; with no noise N = 1 is best by 4%
    assert adaptive.choose(times, 0.0, 1, 1).n == 1
    assert adaptive.choose(times, 0.0, 1, 1, current=2, margin=0.05).n == 2  # 4% < 5%: kept
    assert adaptive.choose(times, 0.0, 1, 1, current=3, margin=0.05).n == 1  # 3x better: changed
    assert adaptive.choose(times, 0.0, 1, 1, current=2, margin=0.0).n == 1


# -- issue 33: settling in a few steps, censored workers, the optimizer's progress ---------------

NOISE_ONLY = dict(sum_sq_norms=6.0, sq_norm_of_sum=6.0)  # |G|^2 estimate 0: B_simple = inf, progress(n) = n


def feed_step(rule, step, seconds, n=None):
    """Every worker pushes for `step` after `seconds[w]`; the take averages the first n (default: all)."""
    order = sorted(range(len(seconds)), key=lambda w: seconds[w])[:n or len(seconds)]
    for w, t in enumerate(seconds):
        rule.observe_push(pushes.PushSample(w, step, t))
    rule.observe_take(step, order, period=max(seconds[w] for w in order), n=len(order), **NOISE_ONLY)


def test_constant_compute_times_give_the_closed_form_n_after_warmup_steps():
    # 5 workers take 0.1 s, one 0.3 s; noise only: rate(n) = n / T(n) = 50 for n <= 5, 20 for n = 6.
    rule = adaptive.AdaptiveN(6, warmup=2)  # skip 1: each worker's first sample (tracing) is dropped
    seconds = [0.1] * 5 + [0.3]
    feed_step(rule, 0, [5.0] * 6)  # the first push of a fit traced: slow, and not used
    assert rule.choose(1).n == 6  # warmup
    assert all(rule.arrivals.recent(w, 1) == [] for w in range(6))
    feed_step(rule, 1, seconds)
    choice = rule.choose(2)
    assert choice.n == 5  # two steps in: N is the closed form's
    np.testing.assert_allclose(choice.expected_times, [0.1] * 5 + [0.3])
    assert choice.rates == pytest.approx((10.0, 20.0, 30.0, 40.0, 50.0, 20.0))


def test_a_change_point_resettles_n_within_recent_steps():
    # Worker 5 computes 0.1 s like the others for 30 steps, then 0.14 s (1.4x). Noise only, so with
    # its new times N = 5 is best (5 / 0.1 > 6 / 0.14), with the 30 old ones averaged in N = 6 is.
    def run(recent):
        rule = adaptive.AdaptiveN(6, warmup=1, skip=0, recent=recent, change=1.2)
        picks = []
        for step in range(40):
            feed_step(rule, step, [0.1] * 5 + [0.1 if step < 30 else 0.14])
            picks.append(rule.choose(step + 1).n)
        return rule, picks
    rule, picks = run(recent=4)
    assert picks[:30] == [6] * 30
    assert picks[30:] == [6, 6, 6, 5, 5, 5, 5, 5, 5, 5]  # the 4th slow sample is the change point
    assert rule.arrivals.changes == [(5, 33)] and rule.arrivals.recent(5) == [0.14] * 10  # 0.1 s: dropped
    _, without = run(recent=0)
    assert without[30:] == [6] * 10  # the old rule: 30 old samples outweigh the new ones for tens of steps


def test_change_points_need_every_recent_sample_beyond_the_ratio():
    before = [0.1] * 8
    assert adaptive.changed(before + [0.13, 0.13, 0.13, 0.13], 4, 1.2)  # slower
    assert adaptive.changed(before + [0.08, 0.08, 0.08, 0.08], 4, 1.2)  # faster (0.08 * 1.2 < 0.1)
    assert not adaptive.changed(before + [0.13, 0.13, 0.13, 0.11], 4, 1.2)  # one within: a stall, no change
    assert not adaptive.changed(before[:3] + [0.2] * 4, 4, 1.2)  # fewer than 4 before: nothing to compare
    assert not adaptive.changed(before + [0.2] * 4, 0, 1.2)


def test_a_small_shift_beyond_the_older_spread_is_a_change_point_after_recent_samples():
    # The calm phase after Pareto stalls: older samples 0.1 s + a delay (median 1.18x of 0.1 s: under
    # the ratio 1.2), then a constant 0.1 s, below every older sample: the 4th is the change point.
    older = [0.1 + 0.004 * (1 + k % 5) for k in range(adaptive.SPREAD)]  # 0.104 .. 0.12, median 0.112
    assert not adaptive.changed(older + [0.1] * 4, 4, 1.2)  # 0.1 * 1.2 > the older median
    assert [adaptive.change_point(older + [0.1] * k, 4, 1.2) for k in range(1, 5)] == [0, 0, 0, 4]
    assert adaptive.outside(older + [0.1] * 4, 4, adaptive.SPREAD)
    assert adaptive.outside(older + [0.2] * 4, 4, adaptive.SPREAD)  # above every older one
    assert not adaptive.outside(older + [0.1, 0.1, 0.1, 0.11], 4, adaptive.SPREAD)  # one within the spread
    assert not adaptive.outside(older[1:] + [0.1] * 4, 4, adaptive.SPREAD)  # fewer than SPREAD older
    assert not adaptive.outside([0.1] * 16 + [0.1 - 1e-12] * 4, 4, adaptive.SPREAD)  # equal up to rounding
    assert adaptive.change_point(older + [0.1] * 4, 4, 1.2, spread=0) == 0  # the test turned off
    assert adaptive.change_point(older + [0.1] * 4, 0, 1.2) == 0  # recent 0: no change points at all


def test_a_large_change_is_a_change_point_after_two_samples():
    # 8 pushes of 0.1 s, then 0.3 s (3x, beyond FAST's 2.5x): the 2nd slow push fires, keeping those 2;
    # 0.2 s (2x) waits for the 4th (the ratio test).
    before = [0.1] * 8
    assert adaptive.FAST == (2, 2.5)
    assert [adaptive.change_point(before + [0.3] * k, 4, 1.2) for k in (1, 2)] == [0, 2]
    assert [adaptive.change_point(before + [0.2] * k, 4, 1.2) for k in (1, 2, 3, 4)] == [0, 0, 0, 4]
    assert adaptive.change_point(before + [0.3] * 2, 4, 1.2, fast=None) == 0
    window = adaptive.ArrivalWindow(2, 50, recent=4)
    for step in range(10):
        window.add([0.1, 0.1 if step < 8 else 0.3])
    assert window.changes == [(1, 9)] and window.recent(1) == [0.3, 0.3]
    assert window.drain_changes() == [(1, 9)] and window.changes == [] and window.drain_changes() == []


def test_a_worker_in_flight_longer_than_its_samples_counts_as_that_slow():
    rule = adaptive.AdaptiveN(6, warmup=1, skip=0)
    for step in range(10):
        feed_step(rule, step, [0.1] * 6)
    assert rule.choose(10).n == 6
    pending = [0.0, 0.0, 0.15, 0.0, 0.0, 0.0]  # in flight for less than twice its slowest sample: a stall
    assert rule.choose(10, pending=pending).n == 6
    pending[2] = 0.5  # asleep (or dead) since 0.5 s: its next arrival is at least that late
    choice = rule.choose(10, pending=pending)
    assert choice.n == 5 and choice.expected_times[5] == pytest.approx(0.5)


def test_the_noise_factor_scales_the_noise_scale_the_progress_model_uses():
    times = [0.10, 0.12, 0.14, 0.16, 0.18, 0.20]
    for factor in (1.0, 0.1):
        rule = adaptive.AdaptiveN(6, warmup=1, skip=0, noise_factor=factor)
        for step in range(20):
            rule.observe(times, sum_sq_norms=6 * 5.0, sq_norm_of_sum=36 + 6 * 4.0, n=6)  # B_simple 4
        choice = rule.choose()
        assert rule.noise.b_simple == pytest.approx(4.0)
        assert choice.b_simple == pytest.approx(4.0 * factor)
        assert choice.n == adaptive.choose(times, 4.0 * factor, 1, 1).n
    assert adaptive.choose(times, 4.0, 1, 1).n == 4 and adaptive.choose(times, 0.4, 1, 1).n == 1  # it matters
    for table_factor in adaptive.OPTIMIZER_NOISE.values():
        assert 0 < table_factor <= 1
    with pytest.raises(ValueError, match="noise_factor"):
        adaptive.AdaptiveN(6, noise_factor=0.0)


def test_the_overhead_is_a_median_so_the_first_steps_tracing_does_not_count():
    rule = adaptive.AdaptiveN(2, window=10, warmup=0, skip=0)
    for step in range(5):
        for w in range(2):
            rule.observe_push(pushes.PushSample(w, step, 0.1))
        period = 3.1 if step == 0 else 0.12  # the chief's first apply traced
        rule.observe_take(step, [0, 1], period=period, sum_sq_norms=2.0, sq_norm_of_sum=3.0, n=2)
    assert rule.overhead == pytest.approx(0.02)


def test_learning_rate_is_kept_when_n_changes():
    # The chief averages the N gradients it takes: a step of N = 2 and one of N = 6 over the same
    # gradient are the same step (the inner optimizer's learning rate is not scaled with N).
    g = np.arange(4.0)
    for n in (2, 6):
        take = pushes.split_take(sum(pushes.push_vector(g, w, 6) for w in range(n)), 6)
        np.testing.assert_allclose(take.mean, g)


def test_seconds_in_flight_from_the_tags_the_pushes_seen_and_the_publishes():
    # After the take of step 10 at t = 100: worker 0 pushed for 10 (waits); worker 1's last push
    # (for 8) was seen at 95, step 9 published at 96: computing since 96; worker 2's push for 9 was
    # seen at 99 after step 10's publish (98): since 99; worker 3 never pushed: since the start (50).
    pending = adaptive.in_flight(100.0, 10, tags=[10, 8, 9, 0], pushed=[5, 4, 4, 0],
                                 pushed_at={0: 99.5, 1: 95.0, 2: 99.0}, published_at={9: 96.0, 10: 98.0},
                                 started_at=50.0)
    assert pending == pytest.approx([0.0, 4.0, 1.0, 50.0])

