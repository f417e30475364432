"""The checks of ``doctor`` on etcd, one ``Check`` each: every endpoint reached with the launch's TLS and auth (its
version judged), this node's clock against etcd's, and whether the run id is held by a live job; for a job on an
embedded or served etcd, the etcd binary.

Guarantees: reads only. An endpoint is reached with a TCP connection, then the launch's own client (``Etcd``: the
same TLS and auth handshake and the same error text, ``etcd/diagnose.py``) asks for etcd's status and counts the
run's keys; the clock is read from the ``Date`` header of ``/version``; the run's state from a few gets (never
``status``'s reader, which ends an abandoned job). Each call has ``ETCD_CHECK_S`` seconds, never the launch's
``--etcd-timeout``. Imports the base modules, ``schema/``, ``etcd/`` (client, server), ``coord.runs``,
``coord.txns`` (its pointer reader), ``cli.job_etcd`` and ``cli.preflight`` (the ``Check`` record); never torch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import http.client
import re
import socket
import ssl
import subprocess
import time

from ..config import AgentConfig, EtcdConfig
from ..coord.runs import check_spec, command, names, newcomer_end, refuse_nested
from ..coord.txns import pointer_generation
from ..errors import AgentError, ConfigError, EtcdAuthError, EtcdError, EtcdUnavailable
from ..etcd.client import Etcd, op_get, op_get_prefix, prefix_end
from ..etcd.server import find_etcd_binary
from ..schema.keys import RunKeys, decode
from ..schema.values import Result, RoundInfo
from .job_etcd import listen_address
from .preflight import Check, Level, fail, ok, skip, warn

ETCD_CHECK_S = 2.0  # each etcd call and connection of a check
CLOCK_WARN_S = 2.0  # a skew above this is worth a warning (the Date header has a resolution of 1 s)
OLDEST = (3, 4)  # etcd-agent needs etcd 3.4's v3 API
FIXED = {(3, 4): 28, (3, 5): 11}  # the first patch releases without etcd issue 15247 (docs/development.md)


@dataclasses.dataclass
class Reached:
    """One endpoint's check, and a client on it when it answered (the caller closes it)."""

    host: str
    port: int
    check: Check
    etcd: Etcd | None = None


def label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(host: str, port: int, flag: str) -> str:
    """'' when a TCP connection to ``host:port`` opens within ``ETCD_CHECK_S``, else why not and the fix."""
    try:
        socket.create_connection((host, port), timeout=ETCD_CHECK_S).close()
    except socket.gaierror as exc:
        return f"cannot resolve {host} ({exc.strerror}): fix the host in {flag}"
    except ConnectionRefusedError:
        return (f"connection refused: nothing listens at {label(host, port)}; start etcd there, or fix {flag} "
                "(etcd's client port is 2379)")
    except TimeoutError:
        return (f"no answer within {ETCD_CHECK_S:g} s: {host} is down, or a firewall drops port {port}/tcp "
                "from this node")
    except OSError as exc:
        return f"cannot connect to {label(host, port)} ({exc.strerror or exc}): check the network to it"
    return ""


def version_verdict(version: str) -> tuple[Level, str]:
    """FAIL below etcd 3.4; a warning before 3.4.28 and 3.5.11 (etcd issue 15247)."""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if not found:
        return Level.WARN, f" (cannot read the version {version!r}; etcd-agent needs 3.4 or later)"
    major, minor, patch = map(int, found.groups())
    if (major, minor) < OLDEST:
        return Level.FAIL, ": etcd-agent needs etcd 3.4 or later; upgrade etcd"
    fixed = FIXED.get((major, minor))
    if fixed is not None and patch < fixed:
        return Level.WARN, (f": before {major}.{minor}.{fixed} a leader frozen for longer than a lease TTL revokes "
                            "live leases when it resumes (etcd issue 15247: the nodes fence and the job restarts); "
                            "upgrade to 3.4.28, 3.5.11 or later")
    return Level.OK, ""


def _failure(exc: EtcdError, cfg: EtcdConfig, run: RunKeys, flag: str) -> str:
    """The client's own error text, plus the fix where it names none."""
    text, (host, port) = str(exc), cfg.endpoints[0]
    if "UNIMPLEMENTED" in text:
        return (f"{text}: something answers at {label(host, port)}, but not etcd's gRPC API (another service, or a "
                f"proxy): fix {flag}")
    if isinstance(exc, EtcdAuthError) and "authentication failed" in text:
        return f"{text}: check --etcd-user {cfg.user} and its password (--etcd-password-file or the environment)"
    if isinstance(exc, EtcdAuthError) and "permission denied" in text:
        return (f"{text}: etcd user {cfg.user} may not read {run.prefix}; grant it the run's prefix "
                "(deploy/etcd-job-user.sh) or give another --etcd-user")
    if type(exc) is EtcdUnavailable:
        return f"{text}: the port answers but etcd does not (starting, or a member without quorum)"
    return text


def endpoint(cfg: EtcdConfig, host: str, port: int, run: RunKeys, flag: str, judge: bool = True) -> Reached:
    """Reach one endpoint as a launch would (its TLS and auth), read its version and count the run's keys (the
    credentials may read them). ``judge``: hold the version against ``version_verdict``."""
    name = f"etcd {label(host, port)}"
    problem = connect(host, port, flag)
    if problem:
        return Reached(host, port, fail(name, problem))
    one = dataclasses.replace(cfg, endpoints=((host, port),), connect_timeout=ETCD_CHECK_S,
                              request_timeout=ETCD_CHECK_S)
    etcd, started = Etcd(one), time.monotonic()
    try:
        version = etcd.status(deadline=ETCD_CHECK_S)
        etcd.count_range(run.prefix, prefix_end(run.prefix), deadline=ETCD_CHECK_S)
    except EtcdError as exc:
        etcd.close()
        return Reached(host, port, fail(name, _failure(exc, one, run, flag)))
    took = (time.monotonic() - started) * 1000
    level, advice = version_verdict(version) if judge else (Level.OK, "")
    return Reached(host, port, Check(level, name, f"etcd {version} over {cfg.describe()}, {run.prefix} readable, "
                                                  f"in {took:.0f} ms{advice}"), etcd)


def _skew(cfg: EtcdConfig, host: str, port: int) -> float:
    """etcd's wall clock minus this node's, in seconds, from the ``Date`` header of ``/version`` (truncated to the
    second: its middle is taken) against the middle of the request."""
    if cfg.secure:
        context = ssl.create_default_context(cafile=cfg.ca_cert)
        if cfg.cert:
            context.load_cert_chain(cfg.cert, cfg.key)
        conn = http.client.HTTPSConnection(host, port, timeout=ETCD_CHECK_S, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=ETCD_CHECK_S)
    try:
        conn.connect()  # the handshake is not part of the timed request
        before = time.time()
        conn.request("GET", "/version")
        resp = conn.getresponse()
        after = time.time()
        date = resp.getheader("Date")
        resp.read()
    finally:
        conn.close()
    if not date:
        raise ValueError("its answer has no Date header")
    return email.utils.parsedate_to_datetime(date).timestamp() + 0.5 - (before + after) / 2


def clock(cfg: EtcdConfig, members: list[tuple[str, int]]) -> Check:
    """This node's clock against each member that answered: a warning above ``CLOCK_WARN_S``."""
    name, skews, problems = "clock", [], []
    for host, port in members:
        try:
            skews.append((_skew(cfg, host, port), label(host, port)))
        except (OSError, ValueError, http.client.HTTPException) as exc:
            problems.append(f"{label(host, port)}: {exc}")
    if not skews:
        return warn(name, f"not measured: /version gave no time ({'; '.join(problems)})")
    skew, where = max(skews, key=lambda s: abs(s[0]))
    if abs(skew) > CLOCK_WARN_S:
        return warn(name, f"this node's clock is {abs(skew):.0f} s {'behind' if skew > 0 else 'ahead of'} etcd at "
                          f"{where}: the agents' records carry wall times (failure times decide blame, quarantine "
                          "windows and cooldowns count in them), so nodes whose clocks disagree can blame the "
                          "wrong node; synchronise this node's clock (chrony or another NTP client)")
    return ok(name, f"within {max(1, round(abs(skew)))} s of etcd at {where} (its HTTP Date, 1 s resolution)")


def run_state(etcd: Etcd, cfg: AgentConfig, where: str) -> Check:
    """Whether a live job holds the run id (a warning: a launch would join it, or end as it did), or the running
    job's spec differs from the launch's, or a live agent has this ``--node-id`` (FAIL: a launch is refused)."""
    run, name = RunKeys(cfg.root, cfg.run_id), f"run id {cfg.run_id}"
    stop = command("stop", run, where)
    try:
        refuse_nested(etcd, run)
        pointer, _rev = etcd.get(run.job(), deadline=ETCD_CHECK_S)
        if pointer is None:
            return ok(name, f"no job of this run in etcd: a launch starts job 1 under {run.prefix}")
        keys = run.generation(pointer_generation(pointer))
        spec, result, rnd, registry = etcd.txn([], [op_get(keys.spec()), op_get(keys.result()), op_get(keys.round()),
                                                    op_get_prefix(keys.nodes())], where=f"read job {keys.gen}",
                                               deadline=ETCD_CHECK_S).ranges
        live = sorted(kv.key[len(keys.nodes()):] for kv in registry if kv.lease)
        if result:
            done = Result.from_kv(result[0])
            ended = newcomer_end(keys, done, registry, where)
            if ended is None:
                return ok(name, f"job {keys.gen} of this run ended ({done.outcome.value}): a launch starts job "
                                f"{keys.gen + 1}")
            return warn(name, f"job {keys.gen} of this run ended ({done.outcome.value}) but {names(live)} "
                              f"{'is' if len(live) == 1 else 'are'} still registered: a launch now ends as that "
                              f"job did (exit {ended.exit_code}); wait until they leave, or give another --run-id")
        if spec:
            check_spec(keys, cfg.spec, decode(keys.spec(), spec[0].value), where)
        phase = RoundInfo.from_kv(rnd[0]) if rnd else None
    except (ConfigError, EtcdError) as exc:
        return fail(name, str(exc))
    except AgentError as exc:  # BadKeyData: the run's keys are not what the schema says
        return fail(name, f"{exc}: `etcd-agent status --run-id {cfg.run_id}` shows the job; {stop} ends it")
    if cfg.node_id in live:
        return fail(name, f"--node-id {cfg.node_id} is registered by a live agent of job {keys.gen}: give each "
                          "agent its own node id")
    state = f"round {phase.number} {phase.phase.value}" if phase else "no round"
    if live:
        return warn(name, f"job {keys.gen} of this run is running ({state}) with {len(live)} registered node(s), "
                          f"{names(live)}: a launch here joins it; for a new job, stop that one first ({stop}) or "
                          "give another --run-id")
    return ok(name, f"job {keys.gen} of this run has no result and no live node (abandoned): a launch ends it and "
                    f"starts job {keys.gen + 1}")


def etcd_binary(purpose: str) -> Check:
    """The binary ``etcd/server.py`` would start (``$ETCD_AGENT_ETCD_BIN`` or ``etcd`` on PATH) and its version."""
    name = "etcd binary"
    try:
        binary = find_etcd_binary()
        out = subprocess.run([binary, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=ETCD_CHECK_S).stdout
    except ConfigError as exc:
        return fail(name, str(exc))
    except (OSError, subprocess.SubprocessError) as exc:
        return fail(name, f"{binary} does not run ({exc}): reinstall etcd, or point $ETCD_AGENT_ETCD_BIN at one")
    found = re.search(r"etcd Version:\s*(\S+)", out)
    if not found:
        return fail(name, f"{binary} --version did not print etcd's version: is it etcd?")
    level, advice = version_verdict(found.group(1))
    return Check(Level.FAIL if level == Level.FAIL else Level.OK, name,
                 f"{binary}, etcd {found.group(1)} ({purpose}){advice if level == Level.FAIL else ''}")


def served(cfg: AgentConfig, host: str, port: int, flag: str) -> list[Check]:
    """A multi-node c10d line without an etcd cluster: the etcd one agent serves at ``host:port``. Already there:
    checked as an endpoint; else this node either can serve it (its binary is checked) or waits for the one that
    can."""
    run, where, name = RunKeys(cfg.root, cfg.run_id), label(host, port), f"etcd {label(host, port)}"
    if not connect(host, port, flag):
        reached = endpoint(cfg.etcd, host, port, run, flag, judge=False)
        if reached.etcd is None:
            return [reached.check]
        try:
            return [reached.check, clock(cfg.etcd, [(host, port)]), run_state(reached.etcd, cfg, where)]
        finally:
            reached.etcd.close()
    try:
        address = listen_address(host, port)
    except ConfigError as exc:
        return [fail(name, str(exc))]
    if address is None:
        return [warn(name, f"no etcd at {where} yet, and this node cannot serve it ({host} is another machine, or "
                           f"the port is taken): a launch waits up to --join-timeout {cfg.join_timeout:g} s for the "
                           f"agent on {host} to serve it; start that node's agent too")]
    return [ok(name, f"no etcd at {where} yet: this node can bind it, so a launch here may serve the job's etcd "
                     "(the first agent that binds it does)"), etcd_binary(f"to serve the job's etcd at {where}")]


def checks(cfg: AgentConfig, embedded: bool, serve: tuple[str, int] | None, flag: str) -> list[Check]:
    """Every etcd check of a launch, in report order."""
    if embedded:
        return [etcd_binary("the one-node job's embedded etcd")]
    if serve is not None:
        return served(cfg, *serve, flag)
    run, where = RunKeys(cfg.root, cfg.run_id), ",".join(label(h, p) for h, p in cfg.etcd.endpoints)
    with concurrent.futures.ThreadPoolExecutor(len(cfg.etcd.endpoints)) as pool:
        reached = list(pool.map(lambda hp: endpoint(cfg.etcd, *hp, run, flag), cfg.etcd.endpoints))
    answered = [r for r in reached if r.etcd is not None]
    try:
        out = [r.check for r in reached]
        if not answered:
            return out + [skip("clock", "no etcd endpoint answered"), skip(f"run id {cfg.run_id}",
                                                                             "no etcd endpoint answered")]
        return out + [clock(cfg.etcd, [(r.host, r.port) for r in answered]), run_state(answered[0].etcd, cfg, where)]
    finally:
        for r in answered:
            r.etcd.close()
