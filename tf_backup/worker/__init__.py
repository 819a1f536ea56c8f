"""A worker's step against the shared state (`client.WorkerClient`): push, wait, pull, a superseded
batch cancelled or restarted, its recovery after a failed run, the end of a fit round.
"""
