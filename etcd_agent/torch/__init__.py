"""The ``torchrun.handlers`` entry point ``etcd-v3``: what torch's rendezvous registry loads.

torch imports every entry point of that group whenever its rendezvous registry is imported (by every torchrun,
whatever its backend), so this module imports nothing: the backend (``rendezvous.py`` beside it, which imports torch,
etcd3 and gRPC) is loaded when a handler is actually made.
"""

from __future__ import annotations


def create_handler(params):
    """Build the ``etcd-v3`` rendezvous handler from torch's ``RendezvousParameters``."""
    from .rendezvous import create_handler as create

    return create(params)


def entry_point():
    """torch calls the entry point with no arguments and registers what it returns as the handler's creator."""
    return create_handler
