"""The command line: torchrun's flags plus the agent's (``flags``), their rules (``launch``), the etcd a line that
names none starts (``job_etcd``) and the ``etcd-agent`` entry point (``main``).

Imports anything in the product but ``torch/`` and ``testing/``. Importing this package imports nothing.
"""
