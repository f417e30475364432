"""etcd's /metrics for the benchmark: the module is ``etcd_agent.testing.metrics`` (the tests use it too); this name
stays for tools/bench/scale.py and for tests/test_protocol_counts.py until it imports that module itself.
"""

from etcd_agent.testing.metrics import GAUGES, QUANTITIES, diff, parse, read, scrape, total  # noqa: F401
