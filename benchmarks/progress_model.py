"""Issue 33: what one more gradient is worth to the inner optimizer (SGD, momentum, Adam), in one process.

No cluster and no timing: the default job's model and data (MNIST-1D CNN, batch 32 per worker) and
`scale_sim.Trainer`, whose step averages the gradients of N workers' batches. For each optimizer and
N = 1 .. 6 a fresh model (the same initial weights) takes `steps` steps; the loss on a fixed 2,048-row
training subset is read every `every` steps. The steps a run needs to bring that loss to a target
(the loss N = 1 reaches at its last step) give the progress of a step averaging N gradients
relative to one: r(N) = steps(1) / steps(N). Every 10 steps of the N = 1 run the 6 workers'
gradients at its weights feed `adaptive.NoiseScale` (in worker batches, as the chief measures). The adaptive rule models it as

    r(N) = progress(N) / progress(1),   progress(N) = 1 / (1 + B / N)   (B in worker batches),

and the B that fits r best (least squares over N, a grid) is the optimizer's effective noise scale.
Its ratio to the measured B_simple is the optimizer's correction (`adaptive.OPTIMIZER_NOISE`). The learning
rate is kept whatever N is, as the chief does.

  python -m benchmarks.progress_model [--steps=300] [--seeds=0,1]
"""

import json
import sys
from typing import Dict, List, Sequence

import numpy as np

from tf_backup.protocol import adaptive

OPTIMIZERS = [("sgd", 0.1), ("momentum", 0.01), ("adam", 0.003)]  # momentum 0.9: the same effective step as sgd
WORKERS = 6
NOISE = None  # the optimizer's run's `adaptive.NoiseScale`, in worker batches (set in `main`)


def steps_to(curve: Sequence[float], every: int, target: float) -> float:
    """The first step (interpolated between reads) at which `curve` (a read every `every` steps) is <= target."""
    for k in range(1, len(curve)):
        if curve[k] <= target:
            a, b = curve[k - 1], curve[k]
            frac = 1.0 if a == b else (a - target) / (a - b)
            return (k - 1 + min(max(frac, 0.0), 1.0)) * every
    return float("inf")


def fit_noise(ratios: Dict[int, float], grid=np.geomspace(0.01, 1000, 2001)) -> float:
    """The B (worker batches) whose (1 + B) / (1 + B / N) is nearest `ratios` (least squares in log)."""
    ns = np.array(sorted(ratios))
    r = np.log(np.array([ratios[n] for n in ns]))
    errors = [float(((np.log((1 + b) / (1 + b / ns)) - r) ** 2).sum()) for b in grid]
    return float(grid[int(np.argmin(errors))])


def measure(optimizer: str, lr: float, seed: int, steps: int, every: int) -> Dict[int, List[float]]:
    import keras  # pylint: disable=g-import-not-at-top
    from benchmarks import scale_sim  # pylint: disable=g-import-not-at-top

    config = {"dataset": "mnist1d", "model": {"kind": "cnn", "filters": [25, 25, 25]}, "optimizer": optimizer,
              "learning_rate": lr, "batch_size": 32}
    curves = {}
    for n in range(1, WORKERS + 1):
        trainer = scale_sim.Trainer(WORKERS, seed, config)
        rows = np.random.default_rng(seed).choice(len(trainer.x), 2048, replace=False)
        x, y = trainer.x[rows], trainer.y[rows]
        loss_fn = keras.losses.SparseCategoricalCrossentropy()

        def loss():
            return float(loss_fn(y, trainer.model(x, training=False)))
        curve = [loss()]
        for s in range(steps):
            if n == 1 and s % 10 == 0:
                noise_at(trainer, s)
            trainer.sync_step([(w, s) for w in range(n)])
            if (s + 1) % every == 0:
                curve.append(loss())
        curves[n] = curve
    return curves


def noise_at(trainer, s: int) -> None:
    """Feeds `trainer.noise` step s's 6 per-worker gradients at the current weights (what the chief sees)."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    grads = []
    for w in range(WORKERS):
        rows = trainer.rows(w, s)
        with tf.GradientTape() as tape:
            loss = loss_fn(trainer.y[rows], trainer.model(trainer.x[rows], training=True))
        g = tape.gradient(loss, trainer.model.trainable_variables)
        grads.append(np.concatenate([np.ravel(v.numpy()) for v in g]))
    grads = np.array(grads)
    NOISE.add(float((grads ** 2).sum()), float((grads.sum(axis=0) ** 2).sum()), WORKERS)


def main(argv: List[str]) -> None:
    args = dict(a.lstrip("-").split("=", 1) for a in argv[1:])
    steps, every = int(args.get("steps", 300)), int(args.get("every", 5))
    seeds = [int(s) for s in args.get("seeds", "0,1").split(",")]
    out = {}
    for name, lr in OPTIMIZERS:
        per_seed = []
        for seed in seeds:
            global NOISE
            NOISE = adaptive.NoiseScale(batch=1, window=10 ** 6)
            curves = measure(name, lr, seed, steps, every)
            target = curves[1][-1]
            need = {n: steps_to(c, every, target) for n, c in curves.items()}
            ratios = {n: need[1] / need[n] for n in need if np.isfinite(need[n]) and need[n] > 0}
            per_seed.append(dict(target=target, steps=need, ratios=ratios, noise=fit_noise(ratios),
                                 b_simple=NOISE.b_simple))
            print(f"{name} lr {lr} seed {seed}: target loss {target:.3f}; steps "
                  + ", ".join(f"N={n}: {v:.0f}" for n, v in need.items())
                  + "; r(N) " + ", ".join(f"{v:.2f}" for v in ratios.values())
                  + f"; fitted B {per_seed[-1]['noise']:.2f}, B_simple {NOISE.b_simple:.2f}", flush=True)
        out[name] = per_seed
    noise = {k: float(np.median([r["noise"] for r in v])) for k, v in out.items()}
    factor = {k: float(np.median([r["noise"] / r["b_simple"] for r in v])) for k, v in out.items()}
    print("fitted B / B_simple (median over seeds): " + ", ".join(f"{k} {v:.3f}" for k, v in factor.items()))
    print("fitted B (median over seeds): " + ", ".join(f"{k} {v:.2f}" for k, v in noise.items()))
    print("relative to sgd: " + ", ".join(f"{k} {v / noise['sgd']:.2f}" for k, v in noise.items()))
    if "json" in args:
        with open(args["json"], "w") as f:
            json.dump({"runs": out, "noise": noise}, f, default=float)


if __name__ == "__main__":
    main(sys.argv)
