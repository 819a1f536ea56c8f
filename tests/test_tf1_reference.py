"""TF1's `SyncReplicasOptimizer` (graph mode) and tf_backup compute the same b = 0 job.

The reference check of `benchmarks.tf1_reference`, small: 1 ps + 2 workers in each, the same
initial weights and batches, SGD; both must end at the float64 numpy large-batch SGD's weights.
It is in the compatibility subset (`.ci/versions.py`) because it exercises TF1's graph-mode
runtime, the reference tf_backup is measured against, on each TensorFlow release.
"""

import numpy as np
import pytest

import tf_backup
from benchmarks import launcher
from benchmarks import tf1_workload

CFG = dict(workers=2, steps=8, hidden=32, lr=0.1, reps=1)


@pytest.mark.cluster
@pytest.mark.compat
def test_tf1_sync_replicas_and_tf_backup_reach_the_same_weights():
    want = tf1_workload.reference_weights(CFG)
    (tf1,) = launcher.launch(tf1_workload.tf1_task, {"ps": 1, "worker": 2}, args=(CFG,), run_in=("worker-0",),
                             timeout=240)
    (ours,) = tf_backup.launch_local(tf1_workload.tf_backup_worker, 2, args=(CFG,), timeout=240)[0]
    assert len(tf1["ends"]) == CFG["steps"] and len(ours["ends"]) == CFG["steps"]
    for a, b, w in zip(tf1["weights"], ours["weights"], want):
        np.testing.assert_allclose(a, w, atol=1e-5)
        np.testing.assert_allclose(b, w, atol=1e-5)
    # The job moved the weights: a run that applied nothing would fail the comparisons above,
    # unless the reference did not move either.
    assert max(np.abs(w - i).max() for w, i in zip(want, tf1_workload.initial_weights(CFG["hidden"]))) > 1e-3
