"""The etcd layer: the client and its retries (``client``), lease keepalive (``keepalive``), the agent's session
(``session``), multiplexed watches (``watch``) and private etcd processes (``server``: ``--standalone`` and a c10d
line's own etcd).

Guarantees: the only code that imports ``etcd3`` or ``grpc``; every etcd or gRPC error leaves it as one of the
package's own errors. Imports the base modules and ``schema.keys``; never ``coord/``, ``node/`` or anything above.
"""
