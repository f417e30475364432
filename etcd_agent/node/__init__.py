"""The node layer: what an agent does on its own host. The worker group and its environment (``workers``), worker
output and log trees (``worker_logs``, ``logtree``), warm spares (``warm``, and ``spare``, the spare's own side,
run as a script), scheduling priority (``priority``), the health gate and GPU facts (``health``, ``gpu``, ``checks``).

Guarantees: nothing here talks to etcd. Imports the base modules and ``schema.values``; never ``etcd/``, ``coord/``,
the agent, ``ops/``, ``cli/`` or ``torch/``.
"""
