"""Compiled steps: step time with XLA on and off, and the overhead against MWMS with XLA on for both.

1. The default job's model (the MNIST-1D CNN, filters 25-25-25, Adam, batch 32 per worker) on a
   localhost cluster of 2 workers (b = 0) + 1 ps, `jit_compile=True` against `False`, interleaved
   run by run so drifting load hits both alike.
2. `benchmarks.overhead`'s MLP (10^4 parameters, no simulated compute) with `jit_compile=True` for
   tf_backup and for MultiWorkerMirroredStrategy, 2 and 4 workers; where XLA cannot compile MWMS's
   step (on CPU: its collectives), MWMS without XLA, and the failure is listed.

This machine has no GPU: XLA compiles for its CPU. The ratios say what the split step costs or
saves here, not what XLA gains on a GPU (`benchmarks/device_check.py` measures that on a GPU).

  python -m benchmarks.run --quick --only=xla
"""

import statistics
from typing import Any, Dict, List, Optional

import numpy as np

from benchmarks import common

NAME = "xla"
TITLE = "Compiled steps: XLA on and off, and against MWMS with XLA"


def settings(quick: bool, smoke: bool = False) -> Dict:
    if smoke:
        return dict(runs=1, steps=15, reps=1, overhead_workers=[2])
    if quick:
        return dict(runs=3, steps=30, reps=2, overhead_workers=[2, 4])
    return dict(runs=5, steps=60, reps=3, overhead_workers=[2, 4, 8])


def cnn_worker(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """One worker: the MNIST-1D CNN; worker 0 returns its step times per timed fit."""
    from benchmarks import pacing  # pylint: disable=g-import-not-at-top
    from benchmarks import step_timing  # pylint: disable=g-import-not-at-top
    pacing.keep_garbage()
    import keras  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top
    from trainers import data  # pylint: disable=g-import-not-at-top
    from trainers import models  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=0, step_timeout=300.0)
    w = strategy.worker_index
    train, info = data.load("mnist1d", split="train", batch_size=32, num_shards=strategy.num_workers,
                            shard_index=w, shuffle_seed=w, repeat=True)
    with strategy.scope():
        model = models.build("cnn", info.input_shape, info.num_classes, filters=(25, 25, 25), seed=0)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.Adam(0.003)),
                      loss="sparse_categorical_crossentropy", jit_compile=cfg["jit_compile"])
    reps = step_timing.timed_fits(keras, model, train, cfg)
    if w != 0:
        return None
    return {"reps": reps, "jit_compile": bool(model.jit_compile), "step": strategy.stats()["global_step"],
            "weights": [v.numpy() for v in model.trainable_variables] if cfg.get("weights") else None}


def keras_alone(jit_compile: bool, cfg: Dict[str, Any]) -> List[List[float]]:
    """The same CNN fit by Keras alone in this process (no strategy): XLA's own cost on this machine."""
    import keras  # pylint: disable=g-import-not-at-top
    from benchmarks import step_timing  # pylint: disable=g-import-not-at-top
    from trainers import data  # pylint: disable=g-import-not-at-top
    from trainers import models  # pylint: disable=g-import-not-at-top

    train, info = data.load("mnist1d", split="train", batch_size=32, shuffle_seed=0, repeat=True)
    model = models.build("cnn", info.input_shape, info.num_classes, filters=(25, 25, 25), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss="sparse_categorical_crossentropy",
                  jit_compile=jit_compile)
    return step_timing.timed_fits(keras, model, train, cfg)


def overhead_with_xla(workers: int, hidden: int, steps: int, reps: int, failures: List[str],
                      also_plain: bool = False, timeout: float = 600):
    """`benchmarks.overhead`'s workload, tf_backup with XLA (and without, `also_plain`) and MWMS.

    MWMS with XLA first; where XLA cannot compile its step (on CPU its collectives are not
    implemented), MWMS without XLA, and the failure goes to `failures`.

    Returns:
      ({(system, jit_compile): [mean step seconds per timed fit]}, the jit_compile MWMS ran with
      (None: it failed both ways)).
    """
    from benchmarks import overhead_workload  # pylint: disable=g-import-not-at-top

    runs = [("tf_backup", True)] + ([("tf_backup", False)] if also_plain else []) + [("mwms", True), ("mwms", False)]
    out, mwms_jit = {}, None
    for system, jit in runs:
        if system == "mwms" and mwms_jit is not None:
            continue
        cfg = dict(system=system, hiddens=[hidden], steps=steps, reps=reps, jit_compile=jit)
        try:
            got = overhead_workload.launch_overhead(system, workers, cfg, timeout=timeout)
        except Exception as e:  # pylint: disable=broad-except
            failures.append(f"overhead, {system}, jit_compile={jit}, {workers} workers: {common.failure_reason(e)}")
            continue
        if system == "mwms":
            mwms_jit = jit
        out[(system, jit)] = [float(np.mean(times)) for times in got[0][hidden]]
        print(f"{NAME}: overhead {system} jit_compile={jit} {workers} workers: "
              f"{[round(x * 1e3, 1) for x in out[(system, jit)]]} ms", flush=True)
    return out, mwms_jit


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False) -> Dict:
    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top

    s = settings(quick, smoke)
    failures, csv_rows = [], []
    cnn = {True: [], False: []}
    for r in range(s["runs"]):
        for jit in (True, False):
            cfg = dict(jit_compile=jit, steps=s["steps"], reps=s["reps"], warmup=5)
            try:
                out = tf_backup.launch_local(cnn_worker, 2, args=(cfg,), timeout=600)
            except Exception as e:  # pylint: disable=broad-except
                failures.append(f"CNN, jit_compile={jit}, run {r + 1}: {str(e).splitlines()[0]}")
                continue
            assert out[0]["jit_compile"] is jit
            for rep, steps in enumerate(out[0]["reps"]):
                cnn[jit].append(float(np.mean(steps)))
                csv_rows.append(["cnn", "tf_backup", 2, jit, r + 1, rep + 1, float(np.mean(steps))])
            print(f"{NAME}: CNN jit_compile={jit}: {[round(x * 1e3, 1) for x in cnn[jit]]} ms", flush=True)
    alone = {True: [], False: []}
    for _ in range(s["runs"]):
        for jit in (True, False):
            reps = keras_alone(jit, dict(steps=s["steps"], reps=s["reps"], warmup=5))
            alone[jit] += [float(np.mean(steps)) for steps in reps]
            csv_rows += [["cnn", "keras alone", 1, jit, 1, rep + 1, float(np.mean(steps))]
                         for rep, steps in enumerate(reps)]
    hidden = mlp_task.hidden_for_params(1e4)
    over, mwms_jit = {}, {}
    for w in s["overhead_workers"]:
        got, mwms_jit[w] = overhead_with_xla(w, hidden, s["steps"], s["reps"], failures, also_plain=True)
        for (system, jit), means in got.items():
            over[(system, w) if system == "mwms" else (system, w, jit)] = means
            csv_rows += [["mlp", system, w, jit, 1, rep + 1, mean] for rep, mean in enumerate(means)]
    ms = lambda v: common.median_range([x * 1e3 for x in v], "{:.1f}") if v else "failed"  # noqa: E731
    ratio = lambda a, b: f"{statistics.median(a) / statistics.median(b):.2f}" if a and b else "failed"  # noqa: E731
    rows = [["MNIST-1D CNN (25-25-25), Adam, batch 32", "tf_backup, 2 workers b = 0", ms(cnn[True]),
             ms(cnn[False]), ratio(cnn[True], cnn[False])],
            ["MNIST-1D CNN (25-25-25), Adam, batch 32", "Keras alone, 1 process, no strategy", ms(alone[True]),
             ms(alone[False]), ratio(alone[True], alone[False])]]
    for w in s["overhead_workers"]:
        ours, plain = over.get(("tf_backup", w, True), []), over.get(("tf_backup", w, False), [])
        ref = over.get(("mwms", w), [])
        which = {True: "XLA", False: "XLA off (XLA failed)"}.get(mwms_jit.get(w), "-")
        mlp = f"MLP {mlp_task.mlp_params(hidden):,} params, SGD, batch 32"
        rows.append([mlp, f"tf_backup, {w} workers", f"XLA: {ms(ours)}", f"no XLA: {ms(plain)}", ratio(ours, plain)])
        rows.append([mlp, f"{w} workers", f"ours, XLA: {ms(ours)}", f"MWMS, {which}: {ms(ref)}", ratio(ours, ref)])
    notes = [
        "Row 1: tf_backup with `jit_compile=True` against `jit_compile=False`, the same cluster shape, runs "
        f"interleaved ({s['runs']} clusters each, {s['reps']} timed fits of {s['steps']} steps per cluster after "
        "5 warm-up steps); step time = mean time between worker 0's batch ends; median (min–max) over the fits. "
        "Ratio = XLA / no XLA. Row 2 is the control: the same model and batch fit by Keras alone in one "
        "process, XLA on and off: what XLA itself costs or saves on this CPU.",
        "Other rows: `benchmarks.overhead`'s workload (no stragglers, no simulated compute), tf_backup with "
        "`jit_compile=True` against MWMS with `jit_compile=True`, or, where XLA cannot compile MWMS's step "
        "(its all-reduce is inside the compiled function; XLA has no CPU collectives), MWMS without XLA; "
        "ratio = ours / MWMS. Compare with `overhead.md` (XLA off for both).",
        "This machine has no GPU: XLA compiles for 2 shared CPU cores. With XLA on, the exchange of a batch "
        "runs when Keras fetches the next batch (docs/design.md, \"Compiled steps\").",
    ]
    columns = ["workload", "cluster", "XLA on / ours ms/step", "XLA off / MWMS ms/step", "ratio"]
    csv_columns = ["workload", "system", "workers", "jit_compile", "cluster", "rep", "mean_step_s"]
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows, csv_columns, csv_rows, failures, argv)
    return {"lines": lines, "cnn": cnn, "overhead": over, "failures": failures}
