"""What the pull's unpack costs a worker: in the graph after the step's py_function, or in numpy inside it.

    python -m benchmarks.pull_unpack [--width=1574] [--shards=4] [--rounds=5] [--reps=10]

One process, no cluster: the bandwidth benchmark's MLP (40-h-h-h-h-h-10, h = `--width`: 9,996,484
parameters at 1574) cut over `--shards` flat shards (`tf_backup.ps.layout.Layout`). Each step's
py_function returns freshly made shards, as a pull does, and the model's variables are assigned:

- **graph** (what a step did before `Layout.unpack_arrays`): the py_function returns the flat shards,
  and the graph cuts them into the variables' pieces (`Layout.unpack`: a slice copies) before the
  assignments;
- **numpy** (what `tf_backup.frontend.binding` does now): the py_function returns one array per
  variable, views of the shards (`Layout.unpack_arrays`: a copy only where a variable spans two
  shards), which the graph assigns.

Prints the CPU and wall milliseconds per step, the median over `--rounds` rounds of `--reps` steps, the
two ways alternating within each round, and checks that both leave the variables equal to the shards.
Both run with the malloc settings of tf_backup's tasks (`tf_backup.memory.tune_malloc`).
"""

import argparse
import resource
import statistics
import time
from typing import List

import numpy as np


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1574)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tf_backup import memory  # pylint: disable=g-import-not-at-top
    from tf_backup.ps.layout import Layout  # pylint: disable=g-import-not-at-top

    memory.tune_malloc()
    h = args.width
    shapes = [(40, h), (h,)] + [(h, h), (h,)] * 4 + [(h, 10), (10,)]
    variables = [tf.Variable(tf.zeros(s)) for s in shapes]
    layout = Layout(variables, args.shards)
    rng = np.random.default_rng(0)
    shards = [rng.standard_normal(n).astype(np.float32) for n in layout.shard_sizes]

    def pulled():  # a pull's result: new arrays every step
        return [np.array(s, copy=True) for s in shards]

    @tf.function
    def graph_step():
        outs = tf.py_function(pulled, [], Tout=[tf.float32] * len(shards))
        outs = [tf.ensure_shape(o, [n]) for o, n in zip(outs, layout.shard_sizes)]
        return [v.assign(x) for v, x in zip(variables, layout.unpack(outs))][-1]

    @tf.function
    def numpy_step():
        outs = tf.py_function(lambda: layout.unpack_arrays(pulled()), [], Tout=[tf.float32] * len(variables))
        outs = [tf.ensure_shape(o, s) for o, s in zip(outs, layout.shapes)]
        return [v.assign(x) for v, x in zip(variables, outs)][-1]

    steps = {"graph": graph_step, "numpy": numpy_step}
    want = np.concatenate(shards)
    for name, step in steps.items():
        step()  # traces
        got = np.concatenate([v.numpy().ravel() for v in variables])
        if not np.array_equal(got, want):
            raise SystemExit(f"{name}: the variables differ from the pulled shards")
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            cpu, wall = _cpu(), time.perf_counter()
            for _ in range(args.reps):
                step()
            times[name].append((1e3 * (_cpu() - cpu) / args.reps, 1e3 * (time.perf_counter() - wall) / args.reps))
    print(f"{sum(layout.sizes):,} parameters, {args.shards} shards, median of {args.rounds} rounds of {args.reps} steps")
    print("| unpack | CPU ms/step | wall ms/step |\n|---|---|---|")
    for name, got in times.items():
        print(f"| {name} | {statistics.median(c for c, _ in got):.1f} | {statistics.median(w for _, w in got):.1f} |")
    print("values check ok")


if __name__ == "__main__":
    main()
