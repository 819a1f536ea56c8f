"""A local cluster on one machine: `launch_local`, `LocalCluster` and the task entry point
(`python -m tf_backup.local._task`). Optional: the core never imports it (`tf_backup` re-exports
`launch_local`, `LocalCluster` and `LocalClusterError`).
"""
