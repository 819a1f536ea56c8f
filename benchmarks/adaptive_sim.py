"""Issue 33: adaptive N against every fixed b in an event model of synchronous steps (no TensorFlow).

The timing is simulated event by event, deterministically, as `benchmarks.scale_sim.sync_steps`
(a free worker reads the latest step and pushes `compute + delay` later; a step takes the first N
gradients tagged with it and is published `comm` after the N-th; a stale gradient is dropped and its
worker reads the newest step at once), with one change: N may differ from step to step, chosen
by `tf_backup.protocol.adaptive.AdaptiveN` fed as the chief feeds it (every push's compute time,
stale ones included; each take's workers, period and gradient norms; each worker's seconds
in flight).

Progress instead of accuracy: a step averaging n gradients makes `progress(n, B) / progress(6, B)`
units of progress (the rule's model, `adaptive.progress`, 1 for a step of all 6), with B the
inner optimizer's effective noise scale in worker batches. The chief measures `B_simple`
(the norms it is fed give that estimate); B = `TRUE_FACTOR` x B_simple, as
`benchmarks.progress_model` measured for Adam on the default job (`adaptive.OPTIMIZER_NOISE`).

The stragglers are keyed by simulated time, as production slowdowns are, in four phases of
`PHASE_SECONDS` each, on 6 workers computing `COMPUTE` s a gradient:

1. `pareto`: every worker, every gradient, a Pareto delay (`BACKGROUND`);
2. `slow`: the background, and worker 5 is 1.34x slow (its compute and delay; the mean slowdown of
   fleet studies);
3. `dies`: the background, and worker 3 stops for `DEAD_SECONDS` (a sleep, no heartbeat loss)
   and comes back;
4. `calm`: no stragglers at all.

A phase's figure is seconds per 100 units of progress (the phase's seconds over the progress of
the steps published in it, x 100); the time to the target is when the progress first reaches
`target` (90% of the least progress any mode made). `settle`: per phase, steps after its start
until auto's N stays at the phase's most common N for 10 steps.

  python -m benchmarks.adaptive_sim [--seeds=0,1,2] [--phase_seconds=75]
"""

import collections
import heapq
import statistics
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from tf_backup.protocol import adaptive
from tf_backup.protocol import pushes

WORKERS = 6
COMPUTE = 0.1  # seconds of compute per gradient
COMM = 0.0072  # seconds from the N-th arrival to the publish (scale_sim.COMM_SECONDS)
PHASE_SECONDS = 75.0
PHASES = ("pareto", "slow", "dies", "calm")
BACKGROUND = (1.5, 0.03)  # Pareto shape, scale (s): mean 0.06 s, heavy-tailed
SLOW_WORKER, SLOW_FACTOR = 5, 1.34
DEAD_WORKER, DEAD_SECONDS = 3, 40.0
B_SIMPLE = 4.0  # the noise scale the chief measures, worker batches (the cluster's estimates: 3-8)
TRUE_FACTOR = adaptive.OPTIMIZER_NOISE["adam"]
# The start of a fit, as the cluster's step record shows it: a worker's first gradient traces the
# step (2 s on the default job, reported with no time), its second is still slow (0.5 s: the
# first reads and pushes of each variable); the chief's first apply traces too.
WARM = (2.0, 0.5)
CHIEF_TRACE = 1.5


class Pattern:
    """The delay of a gradient that worker w starts at simulated time t (its k-th), deterministic by seed."""

    def __init__(self, seed: int, phase_seconds: float = PHASE_SECONDS, draws: int = 50000):
        rng = np.random.default_rng(seed)
        shape, scale = BACKGROUND
        self.pareto = scale * rng.pareto(shape, size=(WORKERS, draws))
        self.phase_seconds = phase_seconds

    def phase(self, t: float) -> int:
        return min(int(t // self.phase_seconds), len(PHASES) - 1)

    def seconds(self, w: int, t: float, k: int) -> float:
        """Compute and delay of worker w's k-th gradient, started at t."""
        if k < len(WARM):
            return WARM[k] * (1 + 0.1 * w) + self.seconds(w, t, len(WARM))  # tracing, cold caches
        name = PHASES[self.phase(t)]
        if name == "calm":
            return COMPUTE
        base = COMPUTE + self.pareto[w, k % self.pareto.shape[1]]
        if name == "slow" and w == SLOW_WORKER:
            return base * SLOW_FACTOR
        if name == "dies" and w == DEAD_WORKER:
            start = 2 * self.phase_seconds
            if start <= t < start + DEAD_SECONDS:
                return start + DEAD_SECONDS - t + base  # asleep until it comes back
        return base


class Step(NamedTuple):
    published: float
    n: int


def simulate(pattern: Pattern, choose: Callable, observe_push: Callable, observe_take: Callable,
             end: float, comm: float = COMM, n_first: int = WORKERS) -> List[Step]:
    """Synchronous steps until simulated time `end`; N from `choose(step, pending)` after each take."""
    events: list = []  # (finish, worker, tag, k)
    started = [0.0] * WORKERS
    count = [0] * WORKERS
    busy = [False] * WORKERS

    def start(w: int, t: float, tag: int) -> None:
        started[w], busy[w] = t, True
        heapq.heappush(events, (t + pattern.seconds(w, t, count[w]), w, tag, count[w]))
        count[w] += 1

    for w in range(WORKERS):
        start(w, 0.0, 0)
    step, n, out, last = 0, n_first, [], 0.0
    while last < end:
        fresh = []
        while len(fresh) < n:
            finish, w, tag, k = heapq.heappop(events)
            busy[w] = False
            if k > 0:  # a worker's first push traced its step: no time measured (the aggregator's rule)
                observe_push(pushes.PushSample(w, tag, finish - started[w]))
            if tag == step:
                fresh.append((finish, w))
            else:  # stale: dropped; the worker reads the newest step at once
                start(w, finish, step)
        published = fresh[-1][0] + comm + (CHIEF_TRACE if step == 0 else 0.0)
        observe_take(step, [w for _, w in fresh], published - last, n)
        out.append(Step(published, n))
        pending = [published - started[w] if busy[w] else 0.0 for w in range(WORKERS)]
        n = choose(step + 1, pending)
        last, step = published, step + 1
        for _, w in fresh:
            start(w, published, step)
    return out


def norms(n: int, b_simple: float, rng) -> tuple:
    """`sum_i |g_i|^2` and `|sum_i g_i|^2` of n gradients with |G|^2 = 1 and tr(Sigma) = b_simple (worker batches),
    with 10% noise: what the chief reads off a take."""
    if n < 2:
        return 1.0 + b_simple, 1.0 + b_simple
    jitter = 1.0 + 0.1 * rng.standard_normal(2)
    return n * (1.0 + b_simple) * jitter[0], (n * n + n * b_simple) * jitter[1]


def run_mode(mode, seed: int, phase_seconds: float, rule_args: Optional[Dict] = None) -> List[Step]:
    """mode: an int b (fixed N = 6 - b) or "auto" (the rule with `rule_args`)."""
    pattern = Pattern(seed, phase_seconds)
    end = len(PHASES) * phase_seconds
    if mode != "auto":
        n = WORKERS - mode
        return simulate(pattern, lambda step, pending: n, lambda sample: None, lambda *a: None, end, n_first=n)
    rule_args = dict(rule_args or {})
    censor = rule_args.pop("pending", True)
    rule = adaptive.AdaptiveN(WORKERS, **rule_args)
    rng = np.random.default_rng([seed, 1])

    def observe_take(step, workers, period, n):
        sum_sq, sq_sum = norms(n, B_SIMPLE, rng)
        rule.observe_take(step, workers, period, sum_sq, sq_sum, n)

    def choose(step, pending):
        return rule.choose(step, pending=pending if censor else None).n

    return simulate(pattern, choose, rule.observe_push, observe_take, end)


def progress_of(n: int, factor: float = TRUE_FACTOR) -> float:
    b = factor * B_SIMPLE
    return adaptive.progress(n, b, 1) / adaptive.progress(WORKERS, b, 1)


class Figures(NamedTuple):
    per_phase: List[float]  # seconds per 100 units of progress
    progress: List[float]  # cumulative progress after each step
    times: List[float]
    ns: List[int]
    phase_of_step: List[int]


def figures(steps: Sequence[Step], phase_seconds: float) -> Figures:
    made = [0.0] * len(PHASES)
    total, progress, times, phases = 0.0, [], [], []
    for s in steps:
        k = min(int(s.published // phase_seconds), len(PHASES) - 1)
        p = progress_of(s.n)
        made[k] += p
        total += p
        progress.append(total)
        times.append(s.published)
        phases.append(k)
    return Figures([100 * phase_seconds / m if m else float("inf") for m in made], progress, times,
                   [s.n for s in steps], phases)


def time_to(fig: Figures, target: float) -> float:
    for t, p in zip(fig.times, fig.progress):
        if p >= target:
            return t
    return float("inf")


def settle(fig: Figures, run: int = 10) -> List[Optional[int]]:
    """Per phase: steps from its first until N stays at the phase's most common N for `run` steps."""
    out = []
    for k in range(len(PHASES)):
        ns = [n for n, p in zip(fig.ns, fig.phase_of_step) if p == k]
        if not ns:
            out.append(None)
            continue
        mode = collections.Counter(ns).most_common(1)[0][0]
        found = None
        for i in range(len(ns) - run + 1):
            if all(n == mode for n in ns[i:i + run]):
                found = i
                break
        out.append(found)
    return out


BEFORE = dict(window=50, warmup=5, noise_factor=1.0, skip=0, recent=0, pending=False)  # the rule before issue 33
PREVIOUS = dict(fast=None, spread=0)  # 74e915f: change points by the ratio test alone
MODES = [("auto", "auto", None), ("auto (74e915f)", "auto", PREVIOUS), ("auto (before issue 33)", "auto", BEFORE)] + [
    (f"b = {b}", b, None) for b in range(WORKERS)]


def evaluate(seeds: Sequence[int], phase_seconds: float = PHASE_SECONDS, modes=MODES) -> Dict:
    figs = {label: [figures(run_mode(mode, seed, phase_seconds, args), phase_seconds) for seed in seeds]
            for label, mode, args in modes}
    target = 0.9 * min(statistics.median(f.progress[-1] for f in fs) for fs in figs.values())
    return {"figs": figs, "target": target}


def table(result: Dict, phase_seconds: float = PHASE_SECONDS) -> List[str]:
    figs, target = result["figs"], result["target"]
    head = ["mode"] + [f"{p} s/100" for p in PHASES] + [f"s to {target:.0f}", "steps", "median N by phase"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fixed_best = {}
    for k in range(len(PHASES)):
        fixed_best[k] = min(statistics.median(f.per_phase[k] for f in fs) for label, fs in figs.items()
                            if label.startswith("b ="))
    for label, fs in figs.items():
        cells = []
        for k in range(len(PHASES)):
            m = statistics.median(f.per_phase[k] for f in fs)
            cells.append(f"{m:.2f} ({m / fixed_best[k]:.2f}x)")
        reach = statistics.median(time_to(f, target) for f in fs)
        ns = " / ".join(f"{statistics.median([n for f in fs for n, p in zip(f.ns, f.phase_of_step) if p == k]):g}"
                        for k in range(len(PHASES)))
        steps = statistics.median(len(f.ns) for f in fs)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {reach:.1f} | {steps:g} | {ns} |")
    return lines


def main(argv: List[str]) -> None:
    args = dict(a.lstrip("-").split("=", 1) for a in argv[1:])
    seeds = [int(s) for s in args.get("seeds", "0,1,2").split(",")]
    phase_seconds = float(args.get("phase_seconds", PHASE_SECONDS))
    result = evaluate(seeds, phase_seconds)
    print("\n".join(table(result, phase_seconds)))
    for label in ("auto", "auto (74e915f)", "auto (before issue 33)"):
        print(f"{label}: steps to settle per phase, by seed: "
              + "; ".join(str(settle(f)) for f in result["figs"][label]))


if __name__ == "__main__":
    main(sys.argv)
