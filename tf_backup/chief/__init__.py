"""What only the chief runs: the aggregator thread (take, apply, publish, close rounds, adaptive N),
its checkpoints, and its side of the update applied on the ps (`update_on_ps`).
"""
