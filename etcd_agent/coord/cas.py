"""One bounded compare-and-swap loop, for every read-modify-write of one etcd key (the run's job pointer, the round
when a job is closed, a node's quarantine record).

Guarantees: ``swap`` runs an attempt (read, decide, one txn guarded by what it read) until the attempt returns
anything but ``AGAIN``, which means "my compare failed: another writer won; read again". Each failed compare is
progress by someone else, so a few tries suffice; after ``tries`` (``MAX_TRIES`` by default) it gives up with
BadKeyData naming the key and what could not be done, never a silent loop. The attempt's own errors pass through.
No I/O of its own. Imports ``errors`` only; never ``node/``.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from ..errors import BadKeyData

T = TypeVar("T")
MAX_TRIES = 100  # a try is a read and a txn (a few ms): only a key that changes without pause outlasts them


class Again:
    def __repr__(self) -> str:
        return "AGAIN"


AGAIN = Again()  # an attempt's answer when its compare failed: read again and decide again


def swap(attempt: Callable[[], T | Again], key: str, what: str, hint: str = "try again",
         tries: int = MAX_TRIES) -> T:
    """``attempt()``'s first answer that is not ``AGAIN``; after ``tries`` answers that are, BadKeyData: ``key``
    kept changing while this agent tried to ``what`` (``hint``: what the operator can do)."""
    for _ in range(tries):
        out = attempt()
        if out is not AGAIN:
            return out
    raise BadKeyData(key, f"kept changing while this agent tried to {what} ({tries} tries, each overtaken by another "
                          f"writer); {hint}")
