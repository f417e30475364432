"""torchrun compatibility suite: a catalog of real torchrun command lines (``catalog``) and a runner that runs one
line under real torchrun and under etcd-agent and compares what the workers got (``runner``).

Used by ``tests/test_torchrun_compat.py`` and ``tools/compat_table.py``.
"""
