"""The ideal step time of synchronous SGD with backup workers, from the workers' times.

With `total_num_replicas = N + b` workers of which the chief aggregates the
first `replicas_to_aggregate = N` gradients to arrive, a step lasts as long as
the N-th fastest worker, not the slowest: with communication left out, the
ideal step time is the N-th order statistic of the N + b workers' times (Chen
et al. 2016, "Revisiting Distributed Synchronous SGD", arXiv:1604.00981).
`ideal_step_times` computes it from a `[steps, workers]` matrix of times, so a
benchmark can set measured step times beside the ideal ones.
"""

import numpy as np


def ideal_step_times(compute_times: np.ndarray, n: int) -> np.ndarray:
    """The ideal step times of sync SGD aggregating `n` of the workers.

    Per step, the n-th smallest of the workers' times: the time at which the
    n-th gradient arrives (Chen et al. 2016). With `n` equal to the number of
    workers it is the slowest worker's time, plain synchronous SGD.

    Args:
      compute_times: `[steps, workers]` times (compute plus delay) of each
        worker at each step.
      n: `replicas_to_aggregate`, an integer in `[1, workers]`.

    Returns:
      A float64 array `[steps]`.

    Raises:
      ValueError: if `compute_times` is not 2-D with at least one column, or
        `n` is not an integer in `[1, workers]`.
    """
    times = np.asarray(compute_times, dtype=np.float64)
    if times.ndim != 2 or times.shape[1] < 1:
        raise ValueError("`compute_times` must be a 2-D [steps, workers] array with at "
                         f"least one worker. Received: shape={times.shape}")
    workers = times.shape[1]
    if (isinstance(n, bool) or not isinstance(n, (int, np.integer))
            or not 1 <= n <= workers):
        raise ValueError(f"`n` must be an integer in [1, {workers}] (at most the number of "
                         f"workers, the columns of compute_times). Received: n={n!r}")
    if times.shape[0] == 0:
        return np.zeros((0,), dtype=np.float64)
    return np.partition(times, int(n) - 1, axis=1)[:, int(n) - 1]
