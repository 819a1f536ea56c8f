r"""The checks that need a GPU, in one script of at most 5 minutes (issue 18).

On a machine with one GPU:
  1. weights with and without XLA: the MNIST-1D CNN trained the same steps on a 2-worker localhost
     cluster (both workers on the GPU), `jit_compile=True` and `False`; the largest difference;
  2. step time of that CNN with and without XLA (same runs);
  3. tf_backup against MultiWorkerMirroredStrategy, 2 worker processes sharing the GPU, XLA on for
     both (MWMS without XLA where XLA cannot compile its step; the failure is listed).
Writes `<out_dir>/device_check.md` and `.csv`:

  python -m benchmarks.device_check --out_dir=benchmarks/results

Every process lets TensorFlow grow its GPU memory (TF_FORCE_GPU_ALLOW_GROWTH), so the workers and
the ps share the one GPU. Without a GPU it runs on the CPU and says so in the table.
"""

import os
import sys

from absl import app
from absl import flags

_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "Where device_check.md goes.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per fit.", lower_bound=5)


def main(argv):
    del argv
    os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"  # inherited by every task process
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import common  # pylint: disable=g-import-not-at-top
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top
    from benchmarks import xla  # pylint: disable=g-import-not-at-top

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    failures, csv_rows, rows = [], [], []
    runs = {}
    for jit in (True, False):
        cfg = dict(jit_compile=jit, steps=_STEPS.value, reps=2, warmup=5, weights=True)
        try:
            runs[jit] = tf_backup.launch_local(xla.cnn_worker, 2, args=(cfg,), timeout=240)[0]
        except Exception as e:  # pylint: disable=broad-except
            failures.append(f"CNN jit_compile={jit}: {common.failure_reason(e)}")
            continue
        for rep, steps in enumerate(runs[jit]["reps"]):
            csv_rows.append(["cnn", "tf_backup", jit, rep + 1, float(np.mean(steps))])
    ms = lambda reps: common.median_range([1e3 * float(np.mean(s)) for s in reps], "{:.2f}")  # noqa: E731
    med = lambda reps: common.med([float(np.mean(s)) for s in reps])  # noqa: E731
    if True in runs and False in runs:
        a, b = runs[True], runs[False]
        diff = max(float(np.abs(x - y).max()) for x, y in zip(a["weights"], b["weights"]))
        scale = max(float(np.abs(y).max()) for y in b["weights"])
        rows.append(["MNIST-1D CNN, 2 workers b = 0, Adam", f"XLA {ms(a['reps'])}", f"no XLA {ms(b['reps'])}",
                     f"{med(a['reps']) / med(b['reps']):.2f}",
                     f"steps {a['step']} / {b['step']}; largest weight difference {diff:.2e} (largest weight {scale:.2f})"])
    hidden = mlp_task.hidden_for_params(1e5)
    over, mwms_jit = xla.overhead_with_xla(2, hidden, _STEPS.value, 2, failures, timeout=240)
    for (system, jit), means in over.items():
        csv_rows += [["mlp", system, jit, rep + 1, mean] for rep, mean in enumerate(means)]
    ours, ref = over.get(("tf_backup", True)), over.get(("mwms", mwms_jit))
    if ours and ref:
        rows.append([f"MLP {mlp_task.mlp_params(hidden):,} params, 2 workers, SGD",
                     f"ours, XLA {common.median_range([1e3 * x for x in ours], '{:.2f}')}",
                     f"MWMS, {'XLA' if mwms_jit else 'no XLA'} {common.median_range([1e3 * x for x in ref], '{:.2f}')}",
                     f"{common.med(ours) / common.med(ref):.2f}", ""])
    notes = [f"Devices: {', '.join(gpus) if gpus else 'no GPU: everything ran on the CPU'}. Both workers "
             "(and the ps) share the device. ms/step: mean time between worker 0's batch ends over "
             f"{_STEPS.value}-step fits after 5 warm-up steps, median (min–max) of 2 fits."]
    common.write_results(_OUT_DIR.value, "device_check", "Device check: XLA and MWMS on one GPU", notes,
                         ["workload", "A ms/step", "B ms/step", "A / B", "notes"], rows,
                         ["workload", "system", "jit_compile", "rep", "mean_step_s"], csv_rows, failures,
                         list(sys.argv))
    print("\n".join(open(os.path.join(_OUT_DIR.value, "device_check.md")).read().splitlines()[-12:]))


if __name__ == "__main__":
    app.run(main)
