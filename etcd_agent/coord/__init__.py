"""The coordination layer: the job's state mirrored from etcd (``mirror``), the pure round decisions (``decide``,
``blame``), the guarded transactions (``txns``, ``abandon``, ``strays``) and the object that owns them with the
etcd session and watches (``coordinator``).

Guarantees: every write is one txn guarded by a revision compare; decisions do no I/O. Imports the base modules,
``schema/`` and ``etcd/``; never ``node/`` (worker processes, health, GPUs), the agent, ``ops/``, ``cli/`` or
``torch/``.
"""
