"""The node layer: what an agent does on its own host. The worker-group contract and its events (``api``); this
node's workers across rounds (``supervisor``); the worker group with processes (``workers``), their environment
(``env``), failure reports (``reports``), output and log trees (``worker_logs``, ``logtree``); warm spares
(``warm``, ``handoff``, and ``spare``, the spare's own side, run as a script), scheduling priority (``priority``),
the health gate and GPU facts (``health``, ``gpu``, ``checks``).

Guarantees: nothing here talks to etcd. Imports the base modules and ``schema.values``; never ``etcd/``, ``coord/``,
the agent, ``ops/``, ``cli/`` or ``torch/``.
"""
