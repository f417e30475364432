"""The exception tree of etcd-agent.

Every error an operator can see is one of these, carrying what they need (which key, which node, which flag).
Errors from libraries are translated at the boundary with ``raise ... from exc``. This module imports nothing
from the package.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2


class AgentError(Exception):
    """Base of every error etcd-agent raises on purpose."""

    exit_code = EXIT_JOB_FAILED


class ConfigError(AgentError):
    """A flag, file or environment value is invalid; the message names it."""

    exit_code = EXIT_USAGE


class SpecMismatch(ConfigError):
    """This agent's job spec differs from the one the running job recorded under ``P/spec``."""


class DuplicateNode(ConfigError):
    """Another live agent already registered the same node id."""


class NodeRankTaken(ConfigError):
    """Another live agent holds the same ``--node-rank`` in this job."""


class EtcdError(AgentError):
    """Base of errors talking to etcd."""


class EtcdUnavailable(EtcdError):
    """No etcd endpoint answered within the deadline."""


class EtcdNoSpace(EtcdUnavailable):
    """etcd raised its NOSPACE alarm: its database reached ``--quota-backend-bytes``. It still answers reads,
    deletes and lease keepalives, but refuses every write (and lease grant) until an operator frees space and
    disarms the alarm; the message says how. No retry helps sooner: running agents hold their workers and try
    again at a slow pace (``agent.py``), everything else reports it as it does an unreachable etcd."""


class EtcdAuthError(EtcdError):
    """etcd refused our credentials or permissions."""

    exit_code = EXIT_USAGE


class EtcdTlsError(EtcdError):
    """The TLS handshake with etcd failed for a reason no retry can fix (unknown CA, expired certificate, wrong
    host name, client certificate refused); the message says which, naming the flag and file to check."""

    exit_code = EXIT_USAGE


class EtcdRequestError(EtcdError):
    """etcd rejected a request (too large, bad argument, ...)."""


class WatchBroken(EtcdError):
    """A watch stream ended or fell silent; the watch resumes from the last event's revision + 1."""


class SessionLost(EtcdError):
    """The agent's lease expired or could not be refreshed in time."""


class BadKeyData(AgentError):
    """A value under the job prefix is not what the schema says; the message names the key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"bad data in etcd key {key}: {problem}")
        self.key = key
        self.problem = problem


class JobFailed(AgentError):
    """The job ended with a non-success result written by some agent."""


class RendezvousTimeout(JobFailed):
    """The job failed because a round did not form within ``--join-timeout`` (too few nodes, or ranks missing)."""


class RestartBudgetSpent(JobFailed):
    """The job failed because a failure or a loss needed a restart and its restarts (``--max-restarts``) were spent."""


class JobStopped(AgentError):
    """The job was stopped by an operator (``etcd-agent stop``) or this agent received a signal."""


class JobEnded(AgentError):
    """The run's current job has ended and some of its nodes are still registered: an agent arriving now gets that
    job's end (its message, and its exit code: 0 when the job succeeded) instead of starting a new job of the run.
    ``outcome`` is the job's (``succeeded``, ``failed`` or ``stopped``); ``registered`` names the nodes found."""

    def __init__(self, message: str, outcome: str, registered: list[str]):
        super().__init__(message)
        self.outcome = outcome
        self.registered = registered
        self.exit_code = EXIT_OK if outcome == "succeeded" else EXIT_JOB_FAILED
