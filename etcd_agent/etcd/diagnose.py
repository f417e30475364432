"""What etcd's and gRPC's errors mean, in the operator's words: a gRPC error as one of the package's own errors
(``map_grpc_error``), and a failed TLS handshake or a plaintext client meeting a TLS etcd diagnosed from the error's
text (``tls_problem``, ``plaintext_to_tls``), naming the flag and the file to check.

Guarantees: every error leaves as an ``EtcdError`` whose message names the operation and etcd's own words; a
problem no retry can fix (a certificate, etcd's NOSPACE alarm) says so and what to do. Reads no state but a TLS probe
of a member (``speaks_tls``). Imports grpc (its environment is prepared by ``etcd/__init__.py``), ``config`` and
``errors``; nothing above ``etcd/``.
"""

from __future__ import annotations

import socket
import ssl

import grpc

from ..config import EtcdConfig
from ..errors import EtcdAuthError, EtcdError, EtcdNoSpace, EtcdRequestError, EtcdUnavailable, SessionLost

RETRYABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                   grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
ENDPOINT_FAILED_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}  # the member, not the call


def tls_problem(cfg: EtcdConfig, detail: str | None) -> str:
    """What a gRPC error's details say went wrong in a TLS handshake, in words that name the flag and file to check;
    '' when they describe no permanent TLS problem (a refused or reset connection may be an etcd restarting)."""
    detail = detail or ""
    if not cfg.secure:
        return ""
    ca = f"--etcd-cacert {cfg.ca_cert}" if cfg.ca_cert else "the system's CA bundle (no --etcd-cacert)"
    if "certificate has expired" in detail:
        return "etcd's certificate has expired (renew the server's certificate)"
    if "certificate is not yet valid" in detail:
        return "etcd's certificate is not valid yet (check the server's certificate and the clocks)"
    if "CERTIFICATE_VERIFY_FAILED" in detail:
        return f"etcd's certificate is not signed by a CA in {ca} (unknown CA)"
    if "Hostname Verification Check failed" in detail or "Peer name" in detail:
        hosts = ", ".join(h for h, _ in cfg.endpoints)
        return f"etcd's certificate is not valid for {hosts} (the host in the endpoints; wrong host name)"
    if "TSI_DATA_CORRUPTED" in detail or "CERTIFICATE_REQUIRED" in detail or "BAD_CERTIFICATE" in detail:
        if cfg.cert:
            return (f"etcd refused the client certificate --etcd-cert {cfg.cert} (not signed by a CA etcd trusts, "
                    "or expired)")
        return "etcd requires a client certificate (--etcd-cert and --etcd-key), or refused the connection"
    return ""


def speaks_tls(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when the server at ``host:port`` answers a TLS handshake (it completes, or the server sends a TLS alert):
    what a plaintext client's "Socket closed" means when it meets a TLS etcd."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except ssl.SSLError as exc:
        return "ALERT" in (exc.reason or "")
    except OSError:
        return False


def plaintext_to_tls(cfg: EtcdConfig, label: str | None, detail: str | None) -> str:
    """The one-line error for a plaintext endpoint whose etcd speaks TLS; '' when that is not what happened."""
    if cfg.secure or "Socket closed" not in (detail or ""):
        return ""
    for host, port in cfg.endpoints:
        if f"{host}:{port}" == label and speaks_tls(host, port):
            return (f"--etcd-endpoints {label}: etcd at {label} speaks TLS, and a bare HOST:PORT means plaintext: "
                    f"give https://{label} (with --etcd-cacert and the CA that signed etcd's certificate, unless the "
                    "system's CA bundle has it)")
    return ""


def map_grpc_error(exc: grpc.RpcError, where: str) -> EtcdError:
    """Our error type for a raw gRPC error; the message names the operation and etcd's own words."""
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    text = f"etcd {where} failed: {code.name if code else 'error'}: {detail}"
    if code in RETRYABLE_CODES:
        return EtcdUnavailable(text)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return EtcdAuthError(text)
    if code == grpc.StatusCode.INVALID_ARGUMENT and detail and "authentication failed" in detail:
        return EtcdAuthError(text)
    if detail and "user name is empty" in detail:  # etcd has auth enabled and we sent no credentials
        return EtcdAuthError(f"etcd {where} failed: etcd has authentication enabled: give --etcd-user (with "
                             "--etcd-password-file or $ETCD_AGENT_ETCD_PASSWORD) or a client certificate etcd maps to "
                             "a user (--etcd-cert, --etcd-key)")
    if code == grpc.StatusCode.NOT_FOUND and detail and "lease not found" in detail:
        return SessionLost(text)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and detail and "database space exceeded" in detail:
        return EtcdNoSpace(f"{text}. {NOSPACE_FIX}")
    return EtcdRequestError(text)


# What an operator does about etcd's NOSPACE alarm (etcd's "space quota" maintenance guide, in one sentence).
NOSPACE_FIX = ("etcd's database reached its --quota-backend-bytes and etcd refuses every write until an operator "
               "frees space: compact its history (etcdctl compact <revision>, the revision `etcdctl endpoint status "
               "-w json` shows), defragment every member (etcdctl defrag --cluster), then clear the alarm (etcdctl "
               "alarm disarm); or restart etcd with a larger --quota-backend-bytes and disarm")
