"""One cell of the bandwidth benchmark, for a quick before/after: ms/step and MB/step of every task.

    sudo python -m benchmarks.bandwidth_cell --ps=1 [--variant='{"wire_dtype": "bfloat16"}'] [--rate=1e9]
    sudo python -m benchmarks.bandwidth_cell --system=mwms [--workers=8]
    python -m benchmarks.bandwidth_cell --rate=0 ...   # every task on loopback, unshaped (no root)

1e7 parameters, 4 workers (or --workers), b = 0, the bandwidth benchmark's model, compute and emulated network
(`benchmarks/netem.py`, so root), 2 timed fits of 8 steps after a warm-up fit of 2. Prints each
fit's ms/step, and each task's MB sent / received per step (the model's: `benchmarks.bandwidth`).
"""

import argparse
import json
import statistics

from benchmarks import bandwidth
from benchmarks import mlp_task
from benchmarks import netem
from benchmarks import overhead_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--system", choices=("tf_backup", "mwms"), default="tf_backup",
                        help="ours, or MultiWorkerMirroredStrategy (the same cell; --ps and --variant unused)")
    parser.add_argument("--ps", type=int, default=1, help="ps tasks")
    parser.add_argument("--variant", default="{}", help="BackupWorkerStrategy kwargs, JSON")
    parser.add_argument("--rate", type=float, default=bandwidth.GBIT, help="bit/s per link and direction (0: every task on loopback, unshaped)")
    parser.add_argument("--workers", type=int, default=4, help="workers (b = 0)")
    parser.add_argument("--fits", type=int, default=2, help="timed fits (a profile wants more)")
    args = parser.parse_args()
    tasks = [f"ps-{i}" for i in range(args.ps)] + [f"worker-{i}" for i in range(args.workers)]
    hidden = mlp_task.hidden_for_params(1e7, bandwidth.DEPTH)
    cfg = dict(system=args.system, hiddens=[hidden], depth=bandwidth.DEPTH, batch=bandwidth.BATCH,
               compute=bandwidth.COMPUTE, steps=8, reps=args.fits, warmup=2, net_counters=True)
    if args.system == "tf_backup":
        cfg.update(bandwidth.variant_cfg(json.loads(args.variant)))
    cfg["net_counters"] = args.rate > 0  # loopback has no per-task links to count
    net = netem.emulated(tasks, args.rate) if args.rate > 0 else None
    if net is not None and not net.shaped:
        raise SystemExit(f"bandwidth_cell: no emulated network here ({net.reason})")
    try:
        out = overhead_workload.launch_overhead(args.system, args.workers, cfg, timeout=900, num_ps=args.ps, network=net)
    finally:
        if net is not None:
            net.close()
    reps = out[0][hidden]
    print("ms/step per fit:", [round(1e3 * statistics.mean(r)) for r in reps])
    for n in bandwidth.merge_links(out, hidden, len(reps)):
        print("MB/step sent, received:", {k: (round(a / 1e6, 1), round(b / 1e6, 1)) for k, (a, b) in sorted((n or {}).items())})


if __name__ == "__main__":
    main()
