"""Programs the cluster tests run in every task process (via `launch_local` or `LocalCluster`).

One module per group of test files (`core`, `launch`, `faults`, `placement`, `embedding`,
`compiled`, `adaptive`); `common` holds what several of them share. Every program is a
module-level function, so task processes can import it: it is pickled by its module path
(`programs.core.train_regression`, with tests/ on sys.path as pytest puts it), and returns plain
values the test asserts on.
"""
