"""What keeps etcd-agent's connection and secrets safe, apart from the configuration that uses it: the TLS files
read and checked the way the handshake will read them (so a bad one is a clear error at start naming the flag and
the file), and the secrets (the etcd password) that must never reach a worker's report, a result, a log or etcd.
Imports only ``errors`` and the standard library.
"""

from __future__ import annotations

from .errors import ConfigError

_SECRETS: set[str] = set()  # values that must never reach a worker's report, a result, a log or etcd
REDACTED = "[redacted]"


def keep_secret(value: str | None) -> None:
    """Remember ``value`` (a password) so that ``redact`` hides it wherever a worker might have printed it."""
    if value:
        _SECRETS.add(value)


def redact(value):
    """``value`` with every kept secret replaced by ``[redacted]``: a string, or the strings in a dict or list."""
    if isinstance(value, str):
        for secret in _SECRETS:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def check_tls_files(ca: str | None, cert: str | None, key: str | None, now: float | None = None) -> None:
    """Read the TLS files the way the handshake will, so that a bad one is a clear error at start naming the flag
    and the file, not a connection that keeps failing: the CA bundle and the client certificate must be PEM
    certificates in their validity period, the key a PEM private key that matches the certificate."""
    import ssl
    import time

    now = time.time() if now is None else now
    if ca is not None:
        try:
            ssl.create_default_context(cafile=ca)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"--etcd-cacert {ca}: not a PEM certificate bundle ({_ssl_reason(exc)})") from None
        _check_dates("--etcd-cacert", ca, now)
    if cert is not None and key is not None:
        try:
            ssl._ssl._test_decode_cert(cert)  # CPython's own PEM reader: no third-party dependency
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"--etcd-cert {cert}: not a PEM certificate ({_ssl_reason(exc)})") from None
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
        except (ssl.SSLError, ValueError) as exc:
            reason = _ssl_reason(exc)
            if "KEY_VALUES_MISMATCH" in reason or "key values mismatch" in reason:
                raise ConfigError(f"--etcd-key {key} is not the key of --etcd-cert {cert}") from None
            raise ConfigError(f"--etcd-key {key}: not a PEM private key ({reason})") from None
        _check_dates("--etcd-cert", cert, now)


def _ssl_reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", None) or exc)


def _check_dates(flag: str, path: str, now: float) -> None:
    """The first certificate of ``path`` must be valid now (a CA bundle's first certificate stands for it)."""
    import ssl

    try:
        decoded = ssl._ssl._test_decode_cert(path)
    except (ssl.SSLError, AttributeError, ValueError):
        return  # unreadable here: the handshake reports it
    try:
        before, after = (ssl.cert_time_to_seconds(decoded[k]) for k in ("notBefore", "notAfter"))
    except (KeyError, ValueError):
        return
    if now > after:
        raise ConfigError(f"{flag} {path}: the certificate expired on {decoded['notAfter']}")
    if now < before:
        raise ConfigError(f"{flag} {path}: the certificate is not valid before {decoded['notBefore']}")
