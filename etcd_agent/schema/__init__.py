"""The schema layer: every etcd key (``keys``) and every value stored under one (``values``, read and written by the
record codec, ``codec``).

Guarantees: keys are formatted nowhere else; a value read back is a typed record or a ``BadKeyData`` naming the key
and field. Imports only the base modules (``errors``); never ``etcd/``, ``coord/``, ``node/`` or anything above.
"""
