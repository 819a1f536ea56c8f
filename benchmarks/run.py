r"""All benchmarks of issue 5 with one command.

  python -m benchmarks.run --quick          # under 10 minutes on a 2-core machine
  python -m benchmarks.run                  # the full grid, for bigger machines
  python -m benchmarks.run --quick --only=tradeoff,overhead --out_dir=/tmp/bench

Each benchmark writes `<out_dir>/<name>.md` and `.csv` (command, machine, date; medians with
min–max; failed runs listed) and `<name>.png` when matplotlib is installed (`pip install -e
".[bench]"`). Benchmarks:

  tradeoff   step time against b (N = 4, Pareto stragglers), achieved / ideal
  overhead   tf_backup b = 0 against MultiWorkerMirroredStrategy, no stragglers
  accuracy   time to accuracy of async, sync and sync with backups on MNIST-1D
  tf1        TF1 SyncReplicasOptimizer (graph mode) as the reference implementation
  xla        compiled steps: the MNIST-1D CNN with XLA on and off; overhead vs MWMS with XLA on
  adaptive   num_backup_workers="auto" against every fixed b, stragglers that change mid-run
  scale_sim  a one-process simulator with real gradients: N up to 100, backups vs sync vs async
  vs_mwms_stragglers  tf_backup (b = 0, 1, 2) against MultiWorkerMirroredStrategy under stragglers
  ps_memory  the ps's resident memory over a long run, every worker alive vs one killed
  bandwidth  step time and bytes per step on emulated 1 / 10 Gbit/s links per host (issue 31):
             ours with 1, 2, 4 ps tasks vs MWMS vs the bounds; root for the emulation
             (`benchmarks/netem.py`), else those cells are skipped. Only with --only=bandwidth
             (its --quick takes up to 20 minutes, the full grid hours)

No benchmark is a timed test; `tests/test_benchmarks.py` runs `--smoke` (the quick mode's
smallest case).
"""

import importlib
import os
import sys
import time

from absl import app
from absl import flags

BENCHMARKS = {
    "tradeoff": "benchmarks.tradeoff",
    "overhead": "benchmarks.overhead",
    "accuracy": "benchmarks.time_to_accuracy",
    "tf1": "benchmarks.tf1_reference",
    "xla": "benchmarks.xla",
    "adaptive": "benchmarks.adaptive",
    "scale_sim": "benchmarks.scale_sim",
    "vs_mwms_stragglers": "benchmarks.vs_mwms_stragglers",
    "ps_memory": "benchmarks.ps_memory",
    "bandwidth": "benchmarks.bandwidth",
}

SMOKE = ["tradeoff", "overhead", "bandwidth"]  # the benchmarks whose smallest quick case the smoke test runs
OPT_IN = ["bandwidth"]  # run only when --only names them

_QUICK = flags.DEFINE_boolean("quick", False, "Reduced grid and runs: under 10 minutes on 2 cores.")
_SMOKE = flags.DEFINE_boolean("smoke", False, "Only the quick mode's smallest case (the CI smoke test).")
_ONLY = flags.DEFINE_list("only", [], f"Benchmarks to run, of {', '.join(BENCHMARKS)} (default all but {', '.join(OPT_IN)}).")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "Where tables and plots go.")
_BANDWIDTH_VARIANTS = flags.DEFINE_string(
    "bandwidth_variants", "", "bandwidth: variants of ours, rows beside the default one: JSON "
    '{"name": {BackupWorkerStrategy kwargs, optionally "optimizer_kwargs": {SyncReplicasOptimizer kwargs}}}.')
_ADAPTIVE_MODES = flags.DEFINE_list(
    "adaptive_modes", [], "adaptive: the modes to run, of auto and the fixed b's 0..5 (default: all).")
_BANDWIDTH_PS = flags.DEFINE_list("bandwidth_ps", [], "bandwidth: the numbers of ps tasks of ours (default: the grid's).")
_BANDWIDTH_PARAMS = flags.DEFINE_list("bandwidth_params", [], "bandwidth: the models' parameters, e.g. 2.5e7 (default: the grid's).")
_BANDWIDTH_WORKERS = flags.DEFINE_list("bandwidth_workers", [], "bandwidth: the numbers of workers (default: the grid's).")
_BANDWIDTH_NETWORKS = flags.DEFINE_list(
    "bandwidth_networks", [], "bandwidth: bit/s per link and direction, 0 for loopback (default: the grid's).")


def main(argv):
    del argv
    names = _ONLY.value or (SMOKE if _SMOKE.value else [n for n in BENCHMARKS if n not in OPT_IN])
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise app.UsageError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    start = time.monotonic()
    failed = []
    for name in names:
        t = time.monotonic()
        print(f"== {name} ==", flush=True)
        module = importlib.import_module(BENCHMARKS[name])
        extra = {}
        if name == "bandwidth" and _BANDWIDTH_VARIANTS.value:
            extra["variants"] = module.parse_variants(_BANDWIDTH_VARIANTS.value)
        if name == "adaptive" and _ADAPTIVE_MODES.value:
            extra["modes"] = _ADAPTIVE_MODES.value
        if name == "bandwidth":
            extra.update({k: flag.value for k, flag in (("num_ps", _BANDWIDTH_PS), ("params", _BANDWIDTH_PARAMS),
                                                        ("workers", _BANDWIDTH_WORKERS),
                                                        ("networks", _BANDWIDTH_NETWORKS)) if flag.value})
        try:
            result = module.run(_OUT_DIR.value, _QUICK.value or _SMOKE.value, list(sys.argv), smoke=_SMOKE.value,
                                **extra)
        except Exception as e:  # pylint: disable=broad-except
            # One broken benchmark does not hide the others' results; it is reported below.
            import traceback  # pylint: disable=g-import-not-at-top
            traceback.print_exc()
            failed.append(f"{name}: {type(e).__name__}: {e}")
            continue
        print("\n".join(result["lines"]), flush=True)
        print(f"== {name}: {time.monotonic() - t:.0f} s ==", flush=True)
    print(f"benchmarks.run: {', '.join(names)} in {time.monotonic() - start:.0f} s; results in {_OUT_DIR.value}",
          flush=True)
    if failed:
        print("FAILED:\n" + "\n".join(failed), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
