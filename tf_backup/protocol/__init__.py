"""The protocol, pure: no TensorFlow and no I/O, tested without a cluster.

`config`: the settings (`ProtocolConfig`). `slots`: the slot maps of `control`
and `tf_backup/job` (`Control`, `Job`) and the typed view `ControlView`.
`rounds`: fit rounds. `pushes`: what a push holds, a take, a worker's counts.
`staleness`: the seqlock and late gradients. `wakeups`: wake-up tokens.
`membership`: too few workers left. `adaptive`: the rule that chooses N each
step. `restart`: the moves after a ps task or the chief restarted (what the
chief writes again, where a waiting worker goes).
"""
