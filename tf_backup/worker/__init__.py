"""A worker's step against the shared state (`client.WorkerClient`): push, wait, pull, a superseded
batch cancelled or restarted, the end of a fit round; its waits (`wait`), its recovery after a failed
run (`recovery`), its link to the chief (`chief_link`), the step metrics (`metrics`).
"""
