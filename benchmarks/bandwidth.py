"""Issue 31: step time and bytes per step on emulated networks, tf_backup (b = 0) vs MWMS and the bounds.

Every task of a cluster (each ps, each worker) sits behind its own link of B bit/s each way
(`benchmarks.netem`: a network namespace per task, HTB on both ends of its veth), or all on
loopback, unshaped (then the 2 shared cores are the limit). The model is a dense MLP whose
variables have the full size, so every gradient, push, take, publish, pull and all-reduce moves
full-size dense tensors; its real compute is kept cheap (a batch of `BATCH` rows per worker) and
`COMPUTE` seconds of sleep per batch stand for the accelerator's compute (`overhead_workload.overhead_worker`
with `compute`). The MLP has `DEPTH` hidden layers of equal width: its four h x h kernels hold
almost all parameters, so the largest-first packing (`tf_backup.ps.layout`) splits the model evenly
over 1, 2 or 4 ps tasks. (With the two-hidden-layer MLP of the other benchmarks one kernel holds
98% of the parameters and one ps task would carry it whatever P is.)

Variants of ours are rows with extra `BackupWorkerStrategy` keyword arguments (name -> kwargs; a
kwargs' "optimizer_kwargs" entry goes to `SyncReplicasOptimizer` instead): `DEFAULT_VARIANTS`, plus
`python -m benchmarks.run --only=bandwidth --bandwidth_variants='{"bf16": {"wire_dtype": "bfloat16"}}'`.
"""

import json
import statistics
from typing import Dict, List, Optional, Sequence

from benchmarks import common

NAME = "bandwidth"
TITLE = "Bandwidth: tf_backup (b = 0) vs MultiWorkerMirroredStrategy on emulated per-host links (issue 31)"
COMPUTE = 0.1  # seconds of simulated compute (a sleep) per batch on every worker
BATCH = 4  # rows per worker per step: the real forward/backward stays cheap
DEPTH = 5  # hidden layers: four equal h x h kernels
DEFAULT_VARIANTS: Dict[str, dict] = {"default": {}}
GBIT = 1e9


def settings(quick: bool, smoke: bool = False, num_ps: Optional[Sequence[int]] = None,
             params: Optional[Sequence[float]] = None, workers: Optional[Sequence[int]] = None,
             networks: Optional[Sequence[float]] = None) -> Dict:
    """The grid of the mode, with `num_ps`, `params`, `workers` and `networks` (bit/s, 0: loopback) in place
    of its own where given (a slice of the full grid run with the quick mode's fits)."""
    if smoke:
        s = dict(params=[1e6], workers=[2], ps=[1], mwms=False, networks=[GBIT], reps=1, steps=8, warmup=1)
    elif quick:
        s = dict(params=[1e7], workers=[4], ps=[1, 2], mwms=True, networks=[None, GBIT], reps=3, steps=8, warmup=2)
    else:
        s = dict(params=[1e6, 1e7, 2.5e7], workers=[4, 8], ps=[1, 2, 4], mwms=True,
                 networks=[None, GBIT, 10 * GBIT], reps=3, steps=10, warmup=2)
    for key, given, kind in (("ps", num_ps, int), ("params", params, float), ("workers", workers, int)):
        if given:
            s[key] = [kind(x) for x in given]
    if networks:
        s["networks"] = [float(r) or None for r in networks]
    return s


# -- models of a step: seconds and bytes (M: model bytes, B: bit/s per link and direction) -----------

def ps_bound(m: float, rate_bit: float) -> float:
    """Any parameter-server step: each worker sends its gradient and receives the parameters, M each
    way over its own link, the two overlapped: M/B (ps tasks enough not to be the limit)."""
    return 8 * m / rate_bit


def ps_link_bound(m: float, rate_bit: float, workers: int, num_ps: int) -> float:
    """The same with `num_ps` ps links: they receive every worker's M, (N+b) M / (P B), if that is more."""
    return 8 * m / rate_bit * max(1.0, workers / num_ps)


def ring_allreduce(m: float, rate_bit: float, workers: int) -> float:
    """A ring all-reduce of M over n links: 2 (n-1)/n M/B."""
    return 8 * m / rate_bit * 2 * (workers - 1) / workers


def wire_factor(kwargs: Optional[dict]) -> float:
    """Bytes on the wire per float32 byte of the model for a variant (`wire_dtype`)."""
    return 0.5 if (kwargs or {}).get("wire_dtype") in ("bfloat16", "float16") else 1.0


def applies_on_ps(kwargs: Optional[dict]) -> bool:
    """Whether a variant's update runs on the ps tasks, as the strategy resolves `apply_on_ps`.

    "auto" (the default since 2026-12-08) is on for this benchmark's SGD unless a restart in place
    (`ps_restart_timeout`, `chief_rejoins`) is asked for.
    """
    from tf_backup.frontend import arguments  # pylint: disable=g-import-not-at-top

    kwargs = kwargs or {}
    value = arguments.apply_on_ps_before_the_optimizer(
        kwargs.get("apply_on_ps", arguments.AUTO), kwargs.get("ps_restart_timeout", 0.0),
        kwargs.get("chief_rejoins", False))
    return value == arguments.AUTO or bool(value)  # "auto" left: the benchmark's SGD runs on the ps


def ours_step(m: float, rate_bit: float, workers: int, num_ps: int, largest_shard: Optional[float] = None,
              kwargs: Optional[dict] = None) -> float:
    """Our exchange, phases in sequence (S = the largest ps shard, M/P when even; M and S in wire bytes):

    pushes into the ps tasks max((N+b) S, M)/B, then with the update on the chief its take M/B and
    its publish M/B, then the pulls out of the ps tasks max(k S, M)/B, k = N+b-1 pulling workers (the
    chief's worker takes its aggregator's copy) or N+b with `apply_on_ps` (nothing through the chief).
    With S = M/P and N+b >= P: (N+b) M/(P B) + [2 M/B] + max(k M/(P B), M/B).
    """
    f = wire_factor(kwargs)
    on_ps = applies_on_ps(kwargs)
    m_w = f * m
    s = f * (m / num_ps if largest_shard is None else largest_shard)
    unit = 8 / rate_bit
    pullers = workers if on_ps else workers - 1
    return unit * (max(workers * s, m_w) + (0 if on_ps else 2 * m_w) + max(pullers * s, m_w))


def today_step(m: float, rate_bit: float, workers: int, num_ps: int, largest_shard: Optional[float] = None) -> float:
    """The design before issue 31's changes (the update on the chief, float32): the slowest exchange."""
    return ours_step(m, rate_bit, workers, num_ps, largest_shard, {"apply_on_ps": False})


def ours_bytes(m: float, workers: int, shards: Sequence[float], kwargs: Optional[dict] = None) -> Dict[str, tuple]:
    """(sent, received) per step by role. The update on the chief: the chief pushes M, takes M, publishes
    M (its worker takes the new parameters from its aggregator); every other worker pushes M and pulls M;
    ps task k (shard S_k) receives N+b pushes and the publish, sends the take and N+b-1 pulls. With
    `apply_on_ps`: every worker, the chief's too, pushes M and pulls M; ps k receives and sends (N+b) S_k.
    All in wire bytes (`wire_dtype`)."""
    f = wire_factor(kwargs)
    if applies_on_ps(kwargs):
        out = {"chief": (f * m, f * m), "worker": (f * m, f * m)}
        out.update({f"ps-{k}": (workers * f * s, workers * f * s) for k, s in enumerate(shards)})
        return out
    out = {"chief": (2 * f * m, f * m), "worker": (f * m, f * m)}
    for k, s in enumerate(shards):
        out[f"ps-{k}"] = (workers * f * s, (workers + 1) * f * s)
    return out


def ring_bytes(m: float, workers: int) -> Dict[str, tuple]:
    x = 2 * (workers - 1) / workers * m
    return {"chief": (x, x), "worker": (x, x)}


def shard_sizes(hidden: int, num_ps: int, depth: int = DEPTH) -> List[int]:
    """Elements per ps shard of the benchmark MLP, as `tf_backup.ps.layout` cuts them (equal shards)."""
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top
    from tf_backup.ps import layout  # pylint: disable=g-import-not-at-top
    return layout.even_sizes(sum(mlp_task.mlp_variable_sizes(hidden, depth)), num_ps)


def parse_variants(text: str) -> Dict[str, dict]:
    """`--bandwidth_variants` JSON: {name: {BackupWorkerStrategy kwargs, "optimizer_kwargs": {...}}}."""
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items()):
        raise ValueError(f"variants must be a JSON object of name -> kwargs object. Received {text!r}")
    return value


def variant_cfg(kwargs: dict) -> dict:
    """The overhead_worker cfg entries of a variant."""
    kwargs = dict(kwargs)
    optimizer = kwargs.pop("optimizer_kwargs", {})
    out = {}
    if kwargs:
        out["strategy_kwargs"] = kwargs
    if optimizer:
        out["optimizer_kwargs"] = optimizer
    return out


def role_bytes(net: Dict[str, tuple], prefix: str) -> Optional[tuple]:
    """Mean (sent, received) per step over the tasks whose names start with `prefix`."""
    vals = [v for k, v in net.items() if k.startswith(prefix)]
    if not vals:
        return None
    return (statistics.mean(v[0] for v in vals), statistics.mean(v[1] for v in vals))


def median_net(reps: Sequence[Optional[Dict[str, tuple]]]) -> Dict[str, tuple]:
    """Per task, the median over the reps of its bytes sent and received per step."""
    reps = [r for r in reps if r]
    tasks = sorted(set().union(*reps)) if reps else []
    return {t: (statistics.median(r[t][0] for r in reps if t in r), statistics.median(r[t][1] for r in reps if t in r))
            for t in tasks}


def merge_links(out: Sequence[Optional[dict]], hidden: int, reps: int) -> List[Optional[Dict[str, tuple]]]:
    """Per rep {task: (sent, received) per step}: the ps tasks as worker 0 read them at its batch ends,
    each worker as it read its own link at its own batch ends (its push and pull whole in the span;
    at worker 0's batch end the others' pulls of the new step are under way)."""
    chief = (out[0] or {}).get(("net", hidden)) or [None] * reps
    merged = []
    for i, n in enumerate(chief):
        if n is None:
            merged.append(None)
            continue
        n = dict(n)
        for w, result in enumerate(out[1:], start=1):
            own = (result or {}).get(("net", hidden))
            if own and own[i] is not None:
                n[f"worker-{w}"] = tuple(own[i])
        merged.append(n)
    return merged


def _mb(pair: Optional[tuple], model: Optional[tuple] = None) -> str:
    if pair is None:
        return "–"
    text = f"{pair[0] / 1e6:.1f} / {pair[1] / 1e6:.1f}"
    if model is not None:
        text += f" ({model[0] / 1e6:.1f} / {model[1] / 1e6:.1f})"
    return text


def _cell_timeout(m: float, workers: int, s: Dict) -> float:
    steps = s["warmup"] + s["reps"] * s["steps"]
    slowest = COMPUTE + today_step(m, GBIT, workers, 1) + 1.0  # any cell: at most ~ ours, 1 ps, 1 Gbit/s
    return 600.0 + 4 * steps * slowest


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False,
        variants: Optional[Dict[str, dict]] = None, num_ps: Optional[Sequence[int]] = None,
        params: Optional[Sequence[float]] = None, workers: Optional[Sequence[int]] = None,
        networks: Optional[Sequence[float]] = None) -> Dict:
    """Runs the grid of `settings` (the same arguments) and writes its table."""
    from benchmarks import netem  # pylint: disable=g-import-not-at-top
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top
    from benchmarks import overhead_workload  # pylint: disable=g-import-not-at-top

    s = settings(quick, smoke, num_ps=num_ps, params=params, workers=workers, networks=networks)
    variants = dict(DEFAULT_VARIANTS, **(variants or {}))
    systems = [("ours", v, p) for v in variants for p in s["ps"]] + ([("mwms", None, 0)] if s["mwms"] else [])
    hiddens = {p: mlp_task.hidden_for_params(p, DEPTH) for p in s["params"]}
    tasks = [f"ps-{i}" for i in range(max(s["ps"]))] + [f"worker-{i}" for i in range(max(s["workers"]))]
    failures, csv_rows, checks = [], [], []
    cells = {}  # (rate, params, workers, system) -> {"times": [...], "net": {...}}
    for rate in s["networks"]:
        label = netem.format_rate(rate) if rate else "loopback"
        net = netem.emulated(tasks, rate) if rate else None
        if net is not None and not net.shaped:
            failures.append(f"{label}: not emulated here ({net.reason}); its cells were not run")
            continue
        try:
            if net is not None:
                check = net.self_check("worker-1", "ps-0")
                checks.append((label, check))
                print(f"{NAME}: self-check {label}: {check['wire_bit'] / 1e9:.3f} Gbit/s on the wire, "
                      f"{check['goodput_bit'] / 1e9:.3f} Gbit/s TCP payload", flush=True)
            for params in s["params"]:
                hidden = hiddens[params]
                m = 4.0 * mlp_task.mlp_params(hidden, DEPTH)
                for w in s["workers"]:
                    for system, variant, num_ps in systems:
                        name = f"ours ({variant}), {num_ps} ps" if system == "ours" else "MWMS"
                        cfg = dict(system="tf_backup" if system == "ours" else "mwms", hiddens=[hidden], depth=DEPTH,
                                   batch=BATCH, compute=COMPUTE, steps=s["steps"], reps=s["reps"],
                                   warmup=s["warmup"], net_counters=net is not None)
                        if system == "ours":
                            cfg.update(variant_cfg(variants[variant]))
                        what = f"{label}, {mlp_task.mlp_params(hidden, DEPTH):,} params, {w} workers, {name}"
                        out = common.attempt(NAME, what, failures, lambda: overhead_workload.launch_overhead(
                            cfg["system"], w, cfg, timeout=_cell_timeout(m, w, s), num_ps=max(num_ps, 1),
                            network=net))
                        if out is None:
                            continue
                        reps = out[0][hidden]
                        times = [statistics.mean(r) for r in reps]
                        nets = merge_links(out, hidden, len(reps))
                        cells[(rate, params, w, (system, variant, num_ps))] = {"times": times, "net": median_net(nets)}
                        for i, (r, n) in enumerate(zip(reps, nets)):
                            n = n or {}
                            chief, others, ps = n.get("worker-0"), role_bytes(
                                {k: v for k, v in n.items() if k != "worker-0"}, "worker-"), role_bytes(n, "ps-")
                            csv_rows.append([rate or 0, mlp_task.mlp_params(hidden, DEPTH), w, system, variant or "",
                                             num_ps, i + 1, len(r), statistics.mean(r), COMPUTE, int(m)]
                                            + [x for pair in (chief, others, ps) for x in (pair or (float("nan"),) * 2)]
                                            + [json.dumps({k: [round(a), round(b)] for k, (a, b) in sorted(n.items())})])
                        print(f"{NAME}: {what}: {[round(t * 1e3, 1) for t in times]} ms/step", flush=True)
        finally:
            if net is not None:
                net.close()

    rows = []
    for rate in s["networks"]:
        label = netem.format_rate(rate) if rate else "loopback"
        for params in s["params"]:
            hidden = hiddens[params]
            m = 4.0 * mlp_task.mlp_params(hidden, DEPTH)
            for w in s["workers"]:
                mwms = cells.get((rate, params, w, ("mwms", None, 0)))
                for key in systems:
                    system, variant, num_ps = key
                    cell = cells.get((rate, params, w, key))
                    times = cell["times"] if cell else []
                    med = statistics.median(times) if times else None
                    if system == "ours":
                        shards = [4.0 * x for x in shard_sizes(hidden, num_ps)]
                        model_s = ours_step(m, rate, w, num_ps, max(shards), variants[variant]) if rate else None
                        bytes_model = ours_bytes(m, w, shards, variants[variant])
                        vs_mwms = (f"{med / statistics.median(mwms['times']):.2f}" if med and mwms and mwms["times"]
                                   else "–")
                        bound_txt = (f"{(COMPUTE + ps_bound(m, rate)) * 1e3:.0f}; "
                                     f"{(COMPUTE + ps_link_bound(m, rate, w, num_ps)) * 1e3:.0f}" if rate else "–")
                    else:
                        model_s = ring_allreduce(m, rate, w) if rate else None
                        bytes_model = ring_bytes(m, w)
                        vs_mwms = "1"
                        bound_txt = f"{(COMPUTE + ps_bound(m, rate)) * 1e3:.0f}" if rate else "–"
                    vs_bound = f"{med / (COMPUTE + ps_bound(m, rate)):.2f}" if med and rate else "–"
                    model_txt = f"{(COMPUTE + model_s) * 1e3:.0f}" if model_s is not None else "–"
                    n = cell["net"] if cell else {}
                    chief = n.get("worker-0")
                    others = role_bytes({k: v for k, v in n.items() if k != "worker-0"}, "worker-")
                    ps_cols = "–"
                    if system == "ours" and n:
                        ps_cols = "; ".join(_mb(n.get(f"ps-{k}"), bytes_model[f"ps-{k}"]) for k in range(num_ps))
                    name = f"ours ({variant}), {num_ps} ps" if system == "ours" else "MWMS"
                    rows.append([label, f"{mlp_task.mlp_params(hidden, DEPTH):,}", w, name,
                                 common.median_range([t * 1e3 for t in times], "{:.0f}"), vs_mwms, vs_bound,
                                 model_txt, bound_txt,
                                 _mb(chief, bytes_model["chief"]) if n else "–",
                                 _mb(others, bytes_model["worker"]) if n else "–", ps_cols,
                                 f"{len(times)}/{s['reps']}"])

    check_lines = []
    for label, c in checks:
        check_lines.append(
            f"- {label}: {c['bytes'] / 1e6:.0f} MB from worker-1's host to ps-0's in {c['seconds']:.2f} s: "
            f"{c['wire_bit'] / 1e9:.3f} Gbit/s on the wire (receiver's interface bytes), "
            f"{c['goodput_bit'] / 1e9:.3f} Gbit/s TCP payload; {100 * c['error']:+.1f}% of the set rate, "
            + ("within 10%." if c["ok"] else "**not within 10%**."))
    model_note = (
        f"Model: a 40-h-h-h-h-h-10 MLP ({DEPTH} hidden ReLU layers of width h; h = "
        + ", ".join(f"{hiddens[p]} for {mlp_task.mlp_params(hiddens[p], DEPTH):,}" for p in s["params"])
        + f" parameters), float32, SGD(0.01), b = 0, no stragglers. Simulated compute: a batch of {BATCH} rows "
        f"per worker (the forward/backward of every full-size variable, cheap on the CPU) plus a {COMPUTE * 1e3:.0f} ms "
        "sleep before each batch (the accelerator's compute): gradients are full-size dense tensors, the model's own "
        "compute stays cheap. Moving those tensors (serialising, copying, applying) still takes the 2 shared cores: "
        "the loopback rows show that cost. The flat model is cut into equal shards over 1, 2 or 4 ps tasks "
        "(`tf_backup.ps.layout`; before issue 31's change, whole variables went to one task each, and the other "
        "benchmarks' 2-layer MLP would have put 98% on one ps).")
    notes = [
        model_note,
        "Networks: *loopback*: every task on localhost, unshaped (the 2 shared cores are the limit; no per-task "
        "counters there). *1 / 10 Gbit/s*: every task (each ps, each worker, the chief) in its own network "
        "namespace behind a veth to a bridge, shaped with HTB to B bit/s in each direction on both ends of its veth "
        "(egress of the task's end = its upload, of the hub's end = its download), client and server traffic alike "
        "(`benchmarks/netem.py`).",
        f"Step time: mean time between worker 0's consecutive batch ends in one timed fit of {s['steps']} batches "
        f"(first and last left out), after a warm-up fit of {s['warmup']}; {s['reps']} timed fits on one cluster per "
        "cell: median (min–max) in ms. ours/MWMS and ours/bound: ratios of the medians.",
        "Bytes: the kernel's counters of each task's link (eth0 of its namespace, `/proc/<pid>/net/dev`) at the "
        "end of batch 1 and of the last-but-one batch of each timed fit, divided by the batches between: MB sent / "
        "received per step (median over the fits), the model's in brackets (M = 4 x parameters bytes). Each worker "
        "reads its own link at its own batch ends (its push and pull whole inside the span); the ps tasks' links "
        "are read by worker 0 at its batch ends: a ps's received bytes are whole there (every push and the publish "
        "are in, the next pushes are a compute away), its sent bytes may be off by the part of the other workers' "
        "pulls under way at the two reads, divided by the batches. Chief = worker 0; other workers: their mean. "
        "Counters include TCP/IP headers (once per segment-offload packet) and the protocol's small control runs.",
        "Models (B = bit/s per link and direction, M = model bytes, N+b workers, P ps tasks, S = the largest ps "
        "shard, M/P here). *bound* = compute + the physical PS bound M/B (each worker sends M and receives M over "
        "its own link, overlapped); after ';' the same with only P ps links: compute + max(M/B, (N+b)M/(PB)). "
        "*model* for ours = compute + its phases in sequence, M in wire bytes (half with bfloat16): (N+b)M/(PB) "
        "pushes into the ps + (the update on the chief only) M/B its take + M/B its publish + max(k M/(PB), M/B) "
        "the pulls, k = N+b-1 (the chief's worker takes its aggregator's copy) or N+b with apply_on_ps; for MWMS = "
        "compute + the ring all-reduce 2(n-1)/n M/B. Bytes per step: ours on the chief: chief 2M / M, each other "
        "worker M / M, ps k (N+b)S_k / (N+b+1)S_k; with apply_on_ps: every worker M / M, ps k (N+b)S_k each way; "
        "MWMS (ring): 2(n-1)/n M each way per worker.",
        "Self-check of the emulation (a Python TCP transfer between two emulated hosts, before the cells):",
    ] + (check_lines or ["- none: no shaped network ran."])
    if variants.keys() != DEFAULT_VARIANTS.keys():
        notes.append("Variants of ours (BackupWorkerStrategy kwargs): " + "; ".join(
            f"{k}: {json.dumps(v)}" for k, v in variants.items()))
    columns = ["network", "parameters", "workers", "system", "ms/step", "ours/MWMS", "ours/bound", "model ms",
               "bound ms (M/B; P links)", "chief MB/step sent / recv (model)", "other workers MB/step (model)",
               "each ps MB/step (model)", "fits ok"]
    csv_columns = ["rate_bit", "parameters", "workers", "system", "variant", "num_ps", "rep", "steps", "mean_step_s",
                   "compute_s", "model_bytes", "chief_tx_per_step", "chief_rx_per_step", "worker_tx_per_step",
                   "worker_rx_per_step", "ps_tx_per_step", "ps_rx_per_step", "tasks_tx_rx_per_step"]
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows, csv_columns, csv_rows, failures, argv)
    return {"lines": lines, "cells": cells, "checks": checks, "failures": failures}

