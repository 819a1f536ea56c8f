"""What runs against the ps tasks, and on them (`serve()`): no Keras.

`endpoint`: a session on one ps task; `accumulators`: the resources by
`shared_name`; `layout`: variables packed into one flat shard per ps task; `signature`:
what a task must share with the chief (model, wire dtype);
`shared_state`: one optimizer's resources and the runs on them; `ps_update`: the
update's kernels in a ps task's graph (`apply_on_ps`); `waker`: ends a blocked
run past its deadline; `job`: the job vector (start, join, leave, beats,
liveness); `recovery`: waiting for ps tasks that restarted empty; `server`:
`serve()`, a ps task's process.
"""
