"""The Keras and `tf.distribute` front end: `BackupWorkerStrategy` and its extended classes,
`SyncReplicasOptimizer`, an optimizer bound to the shared state (`binding`), the exchange of
compiled steps, Embedding tables by rows (`sparse`), multi-device workers (`local_devices`), and
every private TensorFlow and Keras import (`_tf_internal`).
"""
