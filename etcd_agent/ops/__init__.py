"""Operator commands over a job in etcd: ``status`` and ``stop`` (``status``), ``events`` (``events``).

Guarantees: they read a job, and ``stop`` writes only through ``coord.txns``. Imports the base modules, ``schema/``,
``etcd/`` and ``coord/``; never ``node/``, the agent, ``cli/`` or ``torch/``.
"""
