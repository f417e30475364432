"""The coordination layer: the job's state mirrored from etcd (``mirror``, fed by ``watches``), the pure round
decisions (``decide``, ``ranks``, ``blame``, ``observe``), the guarded transactions (``txns``, ``abandon``,
``janitor``, ``strays``), this node's records in etcd (``registry``, ``quarantine_record``, ``quarantine``) and the
object that owns them with the etcd session and watches (``coordinator``, ``roles``).

Guarantees: every write is one txn guarded by a revision compare; decisions do no I/O. Imports the base modules,
``schema/`` and ``etcd/``; never ``node/`` (worker processes, health, GPUs), the agent, ``ops/``, ``cli/`` or
``torch/``.
"""
