"""Smoke test of `python -m benchmarks.run`: the quick mode's smallest case, numbers checked.

Not a timed test: it asserts that the tables are complete and the figures are sane numbers,
never how fast anything ran.
"""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_csv(path):
    with open(path) as f:
        lines = [l for l in f if not l.startswith("#")]
    return list(csv.DictReader(lines))


def test_simulated_protocol_matches_order_statistic_without_backups_and_never_beats_it():
    from benchmarks import tradeoff  # pylint: disable=g-import-not-at-top
    from tf_backup.sim import stragglers  # pylint: disable=g-import-not-at-top

    model = stragglers.parse("pareto:1.5:0.05", seed=3)
    for b in (0, 1, 2):
        pub = tradeoff.simulate_protocol(model.delay, 4, 4 + b, 0.1, 5, 60)
        replay = np.array([pub[s] - pub[s - 1] for s in range(6, 65)])
        ideal = stragglers.ideal_step_times(0.1 + model.delays(4 + b, 65)[6:65], 4)
        if b == 0:  # everyone waits for everyone: the replay is the order statistic
            np.testing.assert_allclose(replay, ideal, rtol=1e-12)
        else:  # stragglers that are not cancelled can only make steps later
            assert replay.mean() >= ideal.mean() - 1e-12


def test_mlp_sizes():
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top
    for target in (1e4, 1e5, 1e6):
        assert abs(mlp_task.mlp_params(mlp_task.hidden_for_params(target)) / target - 1) < 0.02


def test_the_bandwidth_grid_takes_a_slice_in_place_of_its_own_axes():
    from benchmarks import bandwidth  # pylint: disable=g-import-not-at-top
    quick = bandwidth.settings(quick=True)
    assert (quick["params"], quick["workers"], quick["ps"], quick["networks"]) == ([1e7], [4], [1, 2], [None, 1e9])
    s = bandwidth.settings(quick=True, num_ps=["4"], params=["2.5e7"], workers=["4", "8"], networks=["0", "1e9"])
    assert (s["params"], s["workers"], s["ps"], s["networks"]) == ([2.5e7], [4, 8], [4], [None, 1e9])
    assert {k: s[k] for k in ("reps", "steps", "warmup", "mwms")} == {k: quick[k] for k in ("reps", "steps", "warmup", "mwms")}
    assert bandwidth.settings(quick=False)["params"] == [1e6, 1e7, 2.5e7]


@pytest.mark.cluster
def test_smoke_quick_mode_smallest_case(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", f"--out_dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_csv(out / "tradeoff.csv")
    # 3 runs of N = 4, b = 1 per straggler policy, in turn on one cluster
    assert [(r["b"], r["workers"], r["policy"]) for r in rows] == [("1", "5", "finish"), ("1", "5", "restart")] * 3
    for r in rows:
        ratio, replay_ratio = float(r["ratio_mean"]), float(r["ratio_reference_mean"])
        assert math.isfinite(ratio) and ratio > 0
        assert math.isfinite(replay_ratio) and replay_ratio > 0
        # The replay and the ideal are computed from the same delays (no clock): the ideal ignores
        # all overhead and includes the 0.1 s of compute. The measured step is not asserted.
        assert float(r["ideal_mean_s"]) <= float(r["replay_mean_s"]) + 1e-9
        assert 0.1 <= float(r["ideal_mean_s"])
        assert math.isfinite(float(r["mean_s"])) and float(r["mean_s"]) > 0
        # 10 batches less the first and last step, less any step begun before every worker's first batch.
        assert 1 <= int(r["steps"]) <= 8
    rows = read_csv(out / "overhead.csv")
    assert sorted((r["system"], r["workers"], r["parameters"], r["rep"]) for r in rows) == sorted(
        (system, "2", "9943", str(rep)) for system in ("mwms", "tf_backup") for rep in (1, 2, 3))
    for r in rows:
        assert math.isfinite(float(r["mean_step_s"])) and float(r["mean_step_s"]) > 0
        assert int(r["steps"]) == 12  # 15 batches: 14 gaps less the first and last
        # Every process of the cluster, from /proc: at least worker 0's own step, at most all cores all the time.
        assert 0 < float(r["cpu_ms_per_step"]) <= 1e3 * float(r["mean_step_s"]) * (os.cpu_count() or 1) * 1.5
    md = (out / "overhead.md").read_text()
    assert "| 2 | 9,943 |" in md and "3/3, 3/3" in md and "Failed runs: none." in md
    cells = [c.strip() for c in md.split("| 2 | 9,943 |")[1].split("\n")[0].split("|")]
    ratio, (cpu_ours, cpu_mwms), derived = float(cells[2]), map(float, cells[3].split(" / ")), float(cells[4])
    assert math.isfinite(ratio) and ratio > 0 and cpu_ours > 0 and cpu_mwms > 0
    assert min(1.0, ratio) <= derived <= max(1.0, ratio)  # 100 ms of compute brings the ratio towards 1
    md = (out / "tradeoff.md").read_text()
    assert "- command: `python -m benchmarks.run --smoke" in md and "- machine: " in md and "- date: " in md
    assert "| 1 | 5 |" in md and "3/3" in md and "Failed runs: none." in md
    check_bandwidth_smoke(out)


def check_bandwidth_smoke(out):
    """bandwidth's smallest cell: ours, 1 ps, 2 workers, 1e6 parameters, every host on an emulated 1 Gbit/s link."""
    from benchmarks import netem  # pylint: disable=g-import-not-at-top
    md = (out / "bandwidth.md").read_text()
    reason = netem.unavailable_reason()
    if reason is not None:  # said in the table, not skipped in silence
        assert "1 Gbit/s: not emulated here" in md
        return
    assert "Failed runs: none." in md and "| 1 Gbit/s | 999,321 | 2 | ours (default), 1 ps |" in md
    assert "Gbit/s on the wire" in md  # the self-check's measured figure (not asserted: no speed in tests)
    (r,) = read_csv(out / "bandwidth.csv")
    assert (r["rate_bit"], r["parameters"], r["workers"], r["system"], r["num_ps"], r["steps"]) == (
        "1e+09", "999321", "2", "ours", "1", "5")
    assert float(r["compute_s"]) <= float(r["mean_step_s"]) and math.isfinite(float(r["mean_step_s"]))
    m = int(r["model_bytes"])
    assert m == 4 * 999321
    # Bytes per step on each task's link (counts, not speeds): the default variant applies its SGD on
    # the ps (apply_on_ps="auto"), so each worker, the chief's too, pushes and pulls M; the ps receives 2
    # pushes and sends 2 pulls. Headers and control runs add a little.
    expected = {"chief_tx": m, "chief_rx": m, "worker_tx": m, "worker_rx": m, "ps_tx": 2 * m, "ps_rx": 2 * m}
    for key, value in expected.items():
        assert 0.85 * value <= float(r[key + "_per_step"]) <= 1.15 * value, (key, r)


@pytest.mark.cluster
def test_mwms_and_tf_backup_train_the_same_task_alike():
    """The time-to-accuracy comparison with MWMS is fair: same data, model and optimizer step for step.

    With b = 0 and no stragglers, tf_backup's step averages the same 2 x 32 examples' gradients as
    MWMS's all-reduce, so after the same number of steps the weights agree to float rounding.
    """
    import json  # pylint: disable=g-import-not-at-top

    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import launcher  # pylint: disable=g-import-not-at-top
    from benchmarks import accuracy_workload  # pylint: disable=g-import-not-at-top

    with open(os.path.join(ROOT, "configs", "mnist1d.json")) as f:
        base = json.load(f)
    cfg = dict(base, mode="sync", num_backup_workers=0, steps=100000, stop_step=6, reps=1, every_seconds=100.0,
               straggler="none", seed=0)
    mwms = launcher.launch(accuracy_workload.accuracy_worker, {"worker": 2}, args=(dict(cfg, system="mwms"),),
                           timeout=300)
    ours = tf_backup.launch_local(accuracy_workload.accuracy_worker, 2, args=(dict(cfg, seconds=math.inf),),
                                  timeout=300)
    (mwms_run,), (our_run,) = mwms[0]["runs"], ours[0]["runs"]
    assert mwms_run[-1][1] == our_run[-1][1] == 6  # global steps
    assert mwms_run[0][2] == our_run[0][2]  # the same fresh model: the same test accuracy
    # The chief's step record per step: a fixed N expects nothing; each period is a publish apart.
    assert ours[0]["expected_seconds"] == [[[]] * 6] and mwms[0]["periods"] == [[]]
    assert len(ours[0]["periods"][0]) == 6 and all(p > 0 for p in ours[0]["periods"][0])
    (mwms_weights,), (our_weights,) = mwms[0]["weights"], ours[0]["weights"]
    for a, b in zip(mwms_weights, our_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    from trainers import models  # pylint: disable=g-import-not-at-top
    fresh = models.build("cnn", (40,), 10, seed=0, filters=base["model"]["filters"]).get_weights()
    # Six Adam steps of lr 0.003 moved them: the agreement is not that of two untrained models.
    assert min(float(np.abs(a - b).max()) for a, b in zip(our_weights, fresh)) > 3e-3


def test_overlap_parts_cuts_every_shard_into_even_parts_that_cover_it():
    from benchmarks import overlap_parts  # pylint: disable=g-import-not-at-top
    sizes = overlap_parts._part_sizes(10_000_003, 4, 3)  # pylint: disable=protected-access
    assert [sum(s) for s in sizes] == [2_500_001, 2_500_001, 2_500_001, 2_500_000]
    assert all(max(s) - min(s) <= 1 for s in sizes)


@pytest.mark.slow
def test_overlap_parts_on_localhost_applies_every_step_exactly_and_times_each_mode():
    # Worker 0 checks every part's values against -lr x steps x the workers' mean gradient (else exit 1).
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.overlap_parts", "--rate=0", "--params=1e4",
                           "--parts=1,2", "--steps=2", "--rounds=1", "--ps=2", "--workers=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [l.split("|") for l in proc.stdout.splitlines() if l.startswith("| 1 |") or l.startswith("| 2 |")]
    assert [int(r[1]) for r in rows] == [1, 2]
    for r in rows:
        assert float(r[3]) >= 100  # a step holds 100 ms of simulated compute


def test_the_adaptive_benchmarks_full_run_is_issue_33s_patterns_every_b_and_three_seeds():
    from benchmarks import adaptive  # pylint: disable=g-import-not-at-top
    from tf_backup.sim import stragglers  # pylint: disable=g-import-not-at-top
    s = adaptive.settings(quick=False)
    assert adaptive.starts(s["phases"]) == [0, 250, 500, 750, 1000] and s["seeds"] == [0, 1, 2]
    assert [b for _, b in s["modes"]] == ["auto", 0, 1, 2, 3, 4, 5]
    model = stragglers.parse(adaptive.straggler(s), seed=1)
    delays = model.delays(adaptive.WORKERS, 1000, s["compute"])
    background = stragglers.parse(adaptive.BACKGROUND, seed=1).delays(adaptive.WORKERS, 1000, s["compute"])
    extra = delays - background
    np.testing.assert_allclose(extra[:250], 0, atol=1e-12)
    np.testing.assert_allclose(extra[250:500, 5], s["compute"], atol=1e-12)  # 2x slow: one more compute
    np.testing.assert_allclose(extra[250:500, :5], 0, atol=1e-12)
    np.testing.assert_allclose(extra[500:580, 3], 19 * s["compute"], atol=1e-12)  # stalled: 20x
    np.testing.assert_allclose(np.delete(extra[500:580], 3, axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(extra[580:750], 0, atol=1e-12)  # back
    assert np.all(delays[750:] == 0)  # calm


def test_the_adaptive_benchmarks_targets_are_fractions_of_the_lowest_final_and_auto_first_only_if_below_all():
    from benchmarks import adaptive  # pylint: disable=g-import-not-at-top
    curves = {  # per mode, per run: (seconds, global step, test accuracy)
        "auto": [[(0, 0, 0.1), (5, 50, 0.85), (9, 90, 0.9)], [(0, 0, 0.1), (6, 50, 0.9), (9, 90, 0.95)]],
        "b = 1": [[(0, 0, 0.1), (4, 50, 0.81), (8, 90, 0.8)], [(0, 0, 0.1), (4, 50, 0.85), (8, 90, 0.8)]],
    }
    lines = adaptive.reach_table(curves, fractions=(0.9, 1.0))
    assert lines[2] == "| 0.72 (0.9 x 0.800) | 5.5 (5.0–6.0) | 4.0 (4.0–4.0) | no |"
    assert lines[3] == "| 0.80 (1 x 0.800) | 5.5 (5.0–6.0) | 4.0 (4.0–4.0) | no |"
    assert adaptive.reach_table(curves, fractions=(1.1,))[2] == (
        "| 0.88 (1.1 x 0.800) | 7.5 (6.0–9.0) | never | yes |")
    assert adaptive.reach_table(curves, targets=[0.85])[2:] == ["| 0.85 | 5.5 (5.0–6.0) | 4.0 (4.0–4.0), 1 never | yes |"]  # b = 1: median(4, never)


def test_the_adaptive_benchmarks_progress_table_weighs_each_step_by_the_rules_progress_model():
    from benchmarks import adaptive  # pylint: disable=g-import-not-at-top
    # 2 phases of 10 steps; B = 6 worker batches in both: progress(6) = 1/2, progress(3) = 1/3.
    chosen = {"auto": [[6] * 20], "b = 3": [[3] * 20]}
    noise = {"auto": [[6.0] * 20], "b = 3": [[None] * 20]}
    marks = {"auto": [[None, 10.0, 30.0]], "b = 3": [[None, 10.0, 20.0]]}  # seconds at step 10, 20
    lines = adaptive.progress_table([0, 10, 20], ["one", "two"], chosen, noise, marks)
    # auto: 10 units a phase (10 s, then 20 s); b = 3: 10 x (1/3) / (1/2) = 6.67 units (10 s, 10 s).
    assert lines[2] == "| auto | 100.00 (0.67x) | 200.00 (1.33x) |"
    assert lines[3] == "| b = 3 | 150.00 (1.00x) | 150.00 (1.00x) |"
    assert adaptive.progress_table([0, 10, 20], ["one", "two"], {"b = 3": chosen["b = 3"]}, {}, marks) == []


def test_the_adaptive_benchmarks_change_table_counts_auto_s_change_points_per_phase():
    from benchmarks import adaptive  # pylint: disable=g-import-not-at-top
    # 3 runs, 2 phases of 5 steps; per step the workers with a change point.
    runs = [[[], [2], [], [], [], [], [], [1, 3], [], []],  # one in "one" at step 1; two in "two" at step 7
            [[], [], [], [], [], [], [], [], [], [4]],  # none in "one"; one in "two" at step 9
            [[0], [], [], [], [], [], [], [], [], []]]  # one in "one" at step 0; none in "two"
    lines = adaptive.change_table([0, 5, 10], ["one", "two"], runs)
    assert lines[2] == "| one | 1 | 0.5 | 2/3 |"  # counts 1, 0, 1; first at 1 and 0 steps in
    assert lines[3] == "| two | 1 | 3 | 2/3 |"  # counts 2, 1, 0; first at 2 and 4 steps in
    assert adaptive.change_table([0, 5, 10], ["one", "two"], [[[]] * 10]) == []  # none at all: no table
    assert adaptive.change_table([0, 5, 10], ["one", "two"], []) == []


def test_the_adaptive_benchmarks_verdict_gives_raw_seconds_against_the_best_fixed_b_per_phase():
    from benchmarks import adaptive  # pylint: disable=g-import-not-at-top
    medians = {"auto": dict(phases=[12.0, 9.0], settled=10.0, total=21.0),
               "b = 1": dict(phases=[10.0, 12.0], settled=8.0, total=22.0),
               "b = 2": dict(phases=[15.0, 6.0], settled=12.0, total=21.0)}
    assert adaptive._verdict(medians, ["one", "two"]) == [  # pylint: disable=protected-access
        "one, raw seconds: auto 12.0 s, best fixed b = 1 10.0 s: 1.20x.",
        f"one after step {adaptive.SETTLED}, raw seconds: auto 10.0 s, best fixed b = 1 8.0 s: 1.25x.",
        "two, raw seconds: auto 9.0 s, best fixed b = 2 6.0 s: 1.50x."]
    assert adaptive._verdict({"auto": medians["auto"]}, ["one", "two"]) == []  # pylint: disable=protected-access


def test_the_adaptive_benchmarks_expectation_table_sets_each_steps_period_against_what_its_choice_expected():
    from benchmarks import adaptive  # pylint: disable=g-import-not-at-top
    # 1 run, 2 phases of 3 steps, N in [1, 2]; step i's N was chosen from the record of step i - 1.
    replicas = [[2, 2, 1, 2, 2, 2]]
    expected = [[[], [0.1, 0.4], [0.2, 0.3], [0.1, 0.5], [0.1, 0.2], [0.1, 0.2]]]
    periods = [[9.0, 0.5, 0.15, 0.6, 0.4, 0.3]]
    lines = adaptive.expectation_table([0, 3, 6], ["one", "two"], replicas, expected, periods)
    # "one": step 0 has no choice, step 1 none made before it (the warmup); step 2, N 1 from [0.1, 0.4]:
    # expected 0.1 (0.4 for N + 1), measured 0.15.
    assert lines[2:] == ["| one | 1 | 1 | 0.100 | 0.400 | 0.150 | 1.50 |",
                         # "two": steps 3-5 at N 2, expected 0.3, 0.5, 0.2 and measured 0.6, 0.4, 0.3: medians
                         "| two | 2 | 3 | 0.300 | - | 0.400 | 1.33 |"]
    assert adaptive.expectation_table([0, 3, 6], ["one", "two"], replicas, [[[]] * 6], periods) == []


def test_pull_unpack_times_both_unpacks_after_checking_both_leave_the_pulled_values():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pull_unpack", "--width=64", "--shards=3", "--rounds=1",
                           "--reps=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "values check ok" in proc.stdout and "19,914 parameters, 3 shards" in proc.stdout
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith(("| graph", "| numpy"))]
    assert [r[1].strip() for r in rows] == ["graph", "numpy"] and all(float(r[2]) > 0 for r in rows)


def test_the_adaptive_benchmarks_step_record_rounds_its_times_to_10_us():
    from benchmarks import adaptive  # pylint: disable=g-import-not-at-top
    got = adaptive.rounded({"auto": [[[0.1234567, math.inf], []], [0.000004]], "n": 3})
    assert got == {"auto": [[[0.12346, math.inf], []], [0.0]], "n": 3}


@pytest.mark.cluster
def test_fit_end_stall_runs_both_modes_and_only_the_reaper_mode_drops_iterators_on_its_thread():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fit_end_stall", "--params=1e4", "--workers=2",
                           "--fits=2", "--steps=3", "--rounds=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reaped = {}
    for line in proc.stdout.splitlines():
        if line.startswith("round 0 "):
            mode = line.split()[2].rstrip(":")
            reaped[mode] = [int(x) for x in line.split("per worker [")[1].rstrip("]").split(",")]
    assert reaped["in_place"] == [0, 0]
    assert len(reaped["reaper"]) == 2 and min(reaped["reaper"]) >= 3  # at least the warm-up's and each fit's
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith(("| reaper", "| in_place"))]
    assert [r[1].strip() for r in rows] == ["reaper", "in_place"]
    assert all(len(r[2].split(",")) == 2 for r in rows)  # one gap per fit


@pytest.mark.cluster
def test_malloc_arenas_starts_each_cluster_with_its_arena_cap_and_times_every_fit():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.malloc_arenas", "--params=1e4", "--arenas=3",
                           "--rounds=1", "--fits=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [line] = [l for l in proc.stdout.splitlines() if l.startswith("round 0 arenas 3:")]
    assert line.endswith("MALLOC_ARENA_MAX ['3']")  # every task started with the run's value
    fits = line.split("ms/step per fit [")[1].split("]")[0].split(",")
    assert len(fits) == 2 and all(float(x) >= 100 for x in fits)  # a step holds 100 ms of simulated compute
    [row] = [l.split("|") for l in proc.stdout.splitlines() if l.startswith("| 3 |")]
    assert float(row[-2]) > 0  # the cluster's peak resident memory


def test_the_proc_readers_read_this_process_and_none_for_a_process_that_ended():
    from benchmarks import cluster_counters  # pylint: disable=g-import-not-at-top
    from benchmarks import malloc_arenas  # pylint: disable=g-import-not-at-top
    fields = cluster_counters.stat_fields(os.getpid())
    assert int(fields[1]) == os.getppid() and 0 < int(fields[19]) <= malloc_arenas.ticks_since_boot() + 1
    assert cluster_counters.rss_kib(os.getpid()) > 1000  # this process has imported numpy and pytest
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in malloc_arenas.descendants(os.getpid())
        assert child.pid not in malloc_arenas.descendants(os.getpid(), since=malloc_arenas.ticks_since_boot() + 100)
    finally:
        child.kill()
        child.wait(timeout=10)
    assert cluster_counters.stat_fields(child.pid) is None and cluster_counters.rss_kib(child.pid) is None
