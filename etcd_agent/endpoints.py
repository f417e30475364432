"""etcd endpoints as the command line gives them (``--etcd-endpoints``, ``--rdzv-endpoint``): a base module.

Guarantees: ``host:port[,host:port...]``, each optionally with ``http://`` (plaintext) or ``https://`` (TLS), becomes
a tuple of (host, port), port 2379 when none is given; anything else is a ConfigError naming the flag. No I/O: a
name is not resolved here.

Imports only ``errors``; never anything above the base modules.
"""

from __future__ import annotations

import re

from .errors import ConfigError

DEFAULT_PORT = 2379
_NUMBER_RE = re.compile(r"[0-9]+")


def endpoint_scheme(text: str, flag: str = "--etcd-endpoints") -> str | None:
    """The endpoints' scheme: ``"https"`` (TLS), ``"http"`` (plaintext) or None (bare HOST:PORT, plaintext unless
    a CA is given). Any other scheme, or endpoints that disagree, is a ConfigError naming the flag."""
    schemes = {scheme for scheme, _ in _endpoint_items(text, flag)}
    if "https" in schemes and len(schemes) > 1:
        raise ConfigError(f"{flag}: {text!r} mixes https:// with plaintext endpoints; give every endpoint the same "
                          "scheme")
    return "https" if "https" in schemes else ("http" if "http" in schemes else None)


def parse_endpoints(text: str, flag: str = "--etcd-endpoints") -> tuple[tuple[str, int], ...]:
    """``host:port[,host:port...]``, each optionally with http:// or https:// (see ``endpoint_scheme``, which says
    what the scheme means); port defaults to 2379."""
    endpoint_scheme(text, flag)
    out = []
    for _, item in _endpoint_items(text, flag):
        host, port = item, DEFAULT_PORT
        if item.startswith("["):  # [v6]:port
            host, bracket, rest = item[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ConfigError(f"{flag}: {item!r}: write an IPv6 endpoint as [ADDRESS]:PORT")
            if rest:
                port = _port(rest[1:], flag, item)
        elif item.count(":") == 1:
            host, p = item.split(":")
            port = _port(p, flag, item)
        elif ":" in item and not _is_ipv6(item):
            raise ConfigError(f"{flag}: {item!r} is not HOST:PORT")
        if not host:
            raise ConfigError(f"{flag}: {item!r} has no host")
        out.append((host, port))
    if not out:
        raise ConfigError(f"{flag}: at least one HOST:PORT is required")
    return tuple(out)


def _endpoint_items(text: str, flag: str) -> list[tuple[str | None, str]]:
    """``(scheme or None, the endpoint without it)`` for each endpoint; a scheme etcd does not speak is an error."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        m = re.match(r"^([a-z][a-z0-9+.-]*)://", item, flags=re.IGNORECASE)
        scheme = m.group(1).lower() if m else None
        if scheme not in (None, "http", "https"):
            raise ConfigError(f"{flag}: {item!r}: the scheme {scheme}:// is not one etcd speaks; use https:// (TLS), "
                              "http:// or a bare HOST:PORT (plaintext)")
        out.append((scheme, item[m.end() if m else 0:].rstrip("/")))
    return out


def _is_ipv6(text: str) -> bool:
    import ipaddress

    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _port(text: str, flag: str, item: str) -> int:
    if not _NUMBER_RE.fullmatch(text) or not 0 < int(text) < 65536:
        raise ConfigError(f"{flag}: {item!r} has a bad port {text!r}")
    return int(text)
