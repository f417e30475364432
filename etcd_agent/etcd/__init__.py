"""The etcd layer: the client (``client``), its retry policy (``retry``), what its errors mean (``diagnose``), lease
keepalive (``keepalive``), the agent's session (``session``), multiplexed watches (``watch``), gRPC's idle waits
(``waits``) and private etcd processes (``server``: ``--standalone`` and a c10d line's own etcd).

Guarantees: the only code that imports ``etcd3`` or ``grpc``; every etcd or gRPC error leaves it as one of the
package's own errors (``diagnose``). Importing the package sets gRPC's environment for the agent's own process
(``config.set_agent_env``: workers do not inherit it) before any of its modules imports grpc. Imports the base
modules and ``schema.keys``; never ``coord/``, ``node/`` or anything above.
"""

from ..config import set_agent_env

# Before anything in this package imports grpc (its C core reads these once):
# The agent forks workers while gRPC threads run; gRPC's fork handlers only log noise then.
set_agent_env("GRPC_ENABLE_FORK_SUPPORT", "false")  # workers do not inherit it
# gRPC's C core logs every failed handshake and reconnect to stderr (dozens of lines for one bad certificate); the
# wrapper reports each problem once, in its own words. GRPC_VERBOSITY=ERROR in the environment brings them back.
set_agent_env("GRPC_VERBOSITY", "NONE")
