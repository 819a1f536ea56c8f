"""The protocol, pure: no TensorFlow and no I/O, tested without a cluster.

`protocol`: the configuration, the slot maps of `control` and `tf_backup/job`
(`Control`, `Job`, `ControlView`), rounds, counts and transitions. `adaptive`:
the rule that chooses N each step. `restart`: the moves after a ps task or the
chief restarted (what the chief writes again, where a waiting worker goes).
"""
