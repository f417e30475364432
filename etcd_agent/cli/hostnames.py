"""The etcd endpoints' host names, looked up once before the first connection: a name that can never resolve is a
usage error at once, instead of ``--etcd-timeout`` seconds of retries that cannot succeed.

Guarantees:

- A name fails for good when the resolver says it does not exist (``EAI_NONAME``, "Name or service not known";
  ``EAI_NODATA``, no address for it) or is no valid name, and for a name under the reserved top-level domain
  ``.invalid``, which never resolves (RFC 6761), without asking. Any other answer (``EAI_AGAIN``: no DNS server
  answered in time; ``EAI_FAIL``) may pass, and so may a lookup still unanswered after ``LOOKUP_WAIT_S``: those
  are left to the etcd client, which keeps retrying until ``--etcd-timeout``.
- When every endpoint's name fails for good: a ConfigError naming the flag and each host (exit 2). When only some
  do: a note naming them, and the client uses the others (a member whose DNS name is gone while it is down, as a
  Kubernetes headless service does, must not stop a job that the other members can serve).
- IP addresses are never looked up; lookups run in daemon threads, so a resolver that hangs holds no exit.

Imports only ``errors``; never ``etcd/``.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
import time
from typing import Iterable

from ..errors import ConfigError

LOOKUP_WAIT_S = 3.0  # at most this long (and never longer than --etcd-timeout) for the resolver's answers
PERMANENT = frozenset({socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)})


def _reserved_invalid(host: str) -> bool:
    name = host.lower().rstrip(".")
    return name == "invalid" or name.endswith(".invalid")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%")[0])  # an IPv6 zone (%eth0) is no part of the address
    except ValueError:
        return False
    return True


def _lookup(host: str, answers: queue.SimpleQueue) -> None:
    """Put ``(host, why it can never resolve)`` on ``answers``; why is "" when it resolved or may yet."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        answers.put((host, exc.strerror if exc.errno in PERMANENT else ""))
    except UnicodeError as exc:  # an empty label, or one over 63 characters: no name at all
        answers.put((host, f"not a valid host name: {exc}"))
    except OSError:
        answers.put((host, ""))
    else:
        answers.put((host, ""))


def failures(hosts: Iterable[str], wait: float = LOOKUP_WAIT_S) -> dict[str, str]:
    """host -> why it can never resolve, for each of ``hosts`` the resolver says so about within ``wait`` seconds."""
    out: dict[str, str] = {}
    answers: queue.SimpleQueue = queue.SimpleQueue()
    pending = set()
    for host in dict.fromkeys(hosts):
        if _is_address(host):
            continue
        if _reserved_invalid(host):
            out[host] = "the .invalid domain never resolves"
            continue
        pending.add(host)
        threading.Thread(target=_lookup, args=(host, answers), name=f"lookup {host}", daemon=True).start()
    deadline = time.monotonic() + wait
    while pending and (left := deadline - time.monotonic()) > 0:
        try:
            host, why = answers.get(timeout=left)
        except queue.Empty:
            break
        pending.discard(host)
        if why:
            out[host] = why
    return out


def _label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check(endpoints: Iterable[tuple[str, int]], flag: str, timeout: float = LOOKUP_WAIT_S) -> list[str]:
    """Refuse ``endpoints`` (``flag`` names where they came from) when no host name of them can ever resolve;
    return a note naming those that cannot while others can."""
    endpoints = list(endpoints)
    failed = failures((host for host, _ in endpoints), min(LOOKUP_WAIT_S, timeout))
    if not failed:
        return []
    where = ",".join(_label(h, p) for h, p in endpoints)
    said = ", ".join(f"{host} ({why})" for host, why in failed.items())
    if all(host in failed for host, _ in endpoints):
        if len(failed) == 1:
            host, why = next(iter(failed.items()))
            raise ConfigError(f"{flag} {where}: the host name {host} does not resolve ({why}): fix the name, or "
                              "give the etcd's address")
        raise ConfigError(f"{flag} {where}: no host name resolves: {said}: fix the names, or give the etcd "
                          "members' addresses")
    return [f"{flag} {where}: {'this host name does' if len(failed) == 1 else 'these host names do'} not resolve: "
            f"{said}; etcd-agent uses the other endpoints (fix or drop {'it' if len(failed) == 1 else 'them'})"]
