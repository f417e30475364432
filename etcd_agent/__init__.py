"""etcd-agent: an elastic, fault-tolerant launcher for multi-node PyTorch jobs, coordinated through etcd v3.

The agent never imports torch; workers do.
"""

__version__ = "0.1.0"
