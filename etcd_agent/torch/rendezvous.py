"""torchrun's ``etcd-v3`` rendezvous backend: torch's ``RendezvousHandler`` on etcd-agent's own protocol.

``torchrun --rdzv-backend etcd-v3 --rdzv-endpoint HOST:2379 --rdzv-id JOB --nnodes 2:4 ...`` finds this through
the ``torchrun.handlers`` entry point (``etcd_agent/torch/__init__.py``). There is no second copy of the protocol: the
handler runs an ``agent.Agent`` on a thread of its own, whose "worker group" is torch's agent (``group.py``). What
torch calls maps onto that agent so:

- ``next_rendezvous`` asks the agent for a round and blocks until it starts one with this node: it returns the
  node's group rank, the number of nodes, the round's c10d store (``EtcdStore`` under ``P/store/<round>/``) and
  the master address and port chosen by group rank 0 (``use_agent_store`` is False: rank 0's worker hosts the
  workers' own TCPStore, as with torch's c10d backend). Called again while its round still runs, it means torch's
  agent restarted its workers after a failure: the agent records that failure and restarts the round job-wide.
- ``num_nodes_waiting`` turns positive the moment the agent stops "its workers": a round began elsewhere (a
  failure, a lost node seen by a watch within the lease TTL, a node that scaled the job up), the job ended, or
  this node's session was lost. torch's agent polls it and restarts its workers (not counted as a restart), and
  its next ``next_rendezvous`` joins the new round. Nothing here polls etcd: the value is set by the watch.
- Fencing: when the session is lost and torch's agent does not stop its workers within the fencing grace, the
  handler kills them itself (the processes of this run that torch's agent started), before the lease can expire.
- ``shutdown`` closes the rendezvous, as torch's own handlers do: the job ends (``failed`` when torch's agent gave
  up on failed workers, with their first failure as the root cause; ``stopped`` otherwise) and every other node's
  ``next_rendezvous`` raises ``RendezvousClosedError``. After this node's workers succeeded (torch's agent
  entered its exit barrier on the store) it records the node's exit instead, and the job ends ``succeeded`` once
  every member has. A node that was not a member of the running round just leaves. The lease is revoked.
  torchrun stopped by a signal does not call ``shutdown`` (torch keeps the rendezvous open for the others): the
  node leaves as the process exits (``atexit``), revoking its lease, and the others re-form without it.
- ``set_closed`` ends the job ``stopped`` and keeps this node's registry entry, on a lease of the handler's own,
  until ``shutdown`` (or the process exits): closed stays closed. A handler that comes to the run meanwhile (a
  newcomer) sees ``is_closed`` True and gets ``RendezvousClosedError`` from ``next_rendezvous``, as while any node
  of an ended job is still registered (``txns.init_job``); once none is, the run id starts a new job.
  ``is_closed`` says whether the job has ended, or, before this handler joined, whether a newcomer gets an end.

``--rdzv-conf`` takes torch's usual keys and the agent's options (``cli/rdzv_conf.py``); an unknown key is
an error.
Imports torch, the agent, ``coord/``, ``etcd/``, ``node.api`` and the base modules; the agent never imports this
module.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import signal
import socket
import sys
import threading
import time

import psutil
from torch.distributed.elastic.rendezvous import (RendezvousClosedError, RendezvousConnectionError,
                                                  RendezvousError, RendezvousHandler, RendezvousInfo,
                                                  RendezvousParameters, RendezvousStateError,
                                                  RendezvousStoreInfo, RendezvousTimeoutError)
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from .. import __version__, logs, proctree
from ..coord import txns
from ..agent import Agent, Leave
from ..errors import (AgentError, BadKeyData, ConfigError, EtcdUnavailable, JobEnded, JobFailed, JobStopped,
                      RendezvousTimeout, SpecMismatch)
from ..etcd.client import Etcd
from ..etcd.session import Session
from ..schema.values import Failure, NodeInfo
from ..node.api import Assignment
from .group import TorchrunWorkers, first_failure
from .settings import BACKEND, BackendSettings, settings
from .store import EtcdStore

log = logs.get("etcd_agent.torchrun")


try:  # the key torch's agent adds to when its workers succeeded (its exit barrier on the rendezvous store)
    from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
    from torch.distributed.elastic.utils.store import _NUM_MEMBERS
    EXIT_BARRIER_KEY = _TERMINAL_STATE_SYNC_ID + _NUM_MEMBERS
except ImportError:  # pragma: no cover - torch renamed them
    EXIT_BARRIER_KEY = "torchelastic/agent/terminal_state/num_members"


class EtcdV3RendezvousHandler(RendezvousHandler):
    """torch's rendezvous contract on etcd-agent's protocol (see the module doc)."""

    def __init__(self, s: BackendSettings):
        self.cfg = s.cfg
        self._store_timeout = s.store_timeout
        self._close_timeout = s.close_timeout
        self._cond = threading.Condition()
        self._request: concurrent.futures.Future | None = None  # a next_rendezvous waiting for its round
        self._ready: RendezvousInfo | None = None  # a round that started while no next_rendezvous waited
        self._group: TorchrunWorkers | None = None  # the round torch's agent runs (or ran) here
        self._came = 0  # how many times torch's agent called next_rendezvous or shutdown: a stop waits for it
        self._waiting = 0
        self._ended: RendezvousError | None = None  # the job is over for this node: what next_rendezvous raises
        self._shut = False
        self._stores: list[EtcdStore] = []
        self._etcd = Etcd(self.cfg.etcd)  # the stores' and closing's own connection: it outlives the agent's
        self._closed_here = False  # set_closed or shutdown ended the job from this node
        self._holder: Session | None = None  # set_closed's lease: this node's registry entry keeps the job closed
        self.agent = Agent(self.cfg, __version__, group_factory=self._make_group)
        self._thread: threading.Thread | None = None

    # --- torch's contract --------------------------------------------------------------------------------------
    def get_backend(self) -> str:
        return BACKEND

    def get_run_id(self) -> str:
        return self.cfg.run_id

    @property
    def use_agent_store(self) -> bool:
        """False: worker rank 0 hosts the workers' TCPStore at MASTER_ADDR:MASTER_PORT, as with torch's c10d."""
        return False

    def next_rendezvous(self) -> RendezvousInfo:
        with self._cond:
            if self._ended is not None:
                raise type(self._ended)(str(self._ended))
            if self._shut:
                raise RendezvousClosedError(f"the {BACKEND} rendezvous of {self.cfg.run_id} was shut down")
            request = self._request = concurrent.futures.Future()
            self._came += 1
            self._waiting = 0
            group = self._group
            self._cond.notify_all()
            if self._ready is not None:  # a round started while torch's agent was away: take it now
                request.set_result(self._ready)
                self._ready, group.taken, group = None, True, None
            if self._thread is None:
                self._thread = threading.Thread(target=self._run_agent, name=f"etcd-v3-{self.cfg.node_id}",
                                                daemon=True)
                self._thread.start()
                atexit.register(self._at_exit)
        if group is not None and group.taken and not group.stopping:
            # torch's agent came back while its round still runs: it restarted its workers after a failure
            group.report(ok=False)
        started = time.monotonic()
        info = request.result()
        log.debug("rendezvous of %s: group rank %d of %d in %.3f s, master %s:%d", self.cfg.node_id, info.rank,
                  info.world_size, time.monotonic() - started, info.bootstrap_store_info.master_addr,
                  info.bootstrap_store_info.master_port)
        return info

    def num_nodes_waiting(self) -> int:
        return self._waiting

    def is_closed(self) -> bool:
        if self._ended is not None or self._closed_here:
            return True
        coord = self.agent.coord
        if coord.mirror is not None:
            return coord.mirror.get(coord.keys.result()) is not None
        try:  # not in the job yet: closed if joining now would get the end of the run's job
            return txns.run_end(self._etcd, coord.run_keys) is not None
        except EtcdUnavailable as exc:
            raise RendezvousConnectionError(f"--rdzv-endpoint {self._etcd.endpoints_text}: {exc}") from exc
        except BadKeyData as exc:
            raise RendezvousStateError(str(exc)) from exc

    def set_closed(self) -> None:
        self._close_job("stopped", f"the {BACKEND} rendezvous was closed by {self.cfg.node_id} (set_closed)",
                        hold=True)

    def shutdown(self) -> bool:
        exc = sys.exc_info()[1]  # called from torch's launcher's ``finally``: what ended torch's agent, if anything
        with self._cond:
            if self._shut:
                return True
            self._shut = True
            self._came += 1
            self._cond.notify_all()
            group, thread = self._group, self._thread
        try:
            if thread is not None and thread.is_alive() and group is not None and not group.stopping:
                if not group.ended:  # this node's round still runs and its workers did not succeed: close it
                    outcome, reason, root = self._why_shut(exc)
                    self._close_job(outcome, reason, root)
                thread.join(self._close_timeout)  # the job's end (or this node's exit) is recorded meanwhile
            if thread is not None and thread.is_alive():
                self.agent.events.put(Leave(f"{self.cfg.node_id}: torchrun's agent shut the rendezvous down"))
                thread.join(self.cfg.timings.lease_ttl + 5.0)
            return True
        finally:
            for store in self._stores:
                store.close()
            self._release()
            self._etcd.close()

    def _at_exit(self) -> None:
        """torchrun exits without ``shutdown`` when its agent got a signal (torch keeps the rendezvous open so that
        the job can go on without this node): leave, revoking the lease, so that the others see it at once."""
        with self._cond:
            if self._shut:
                return
            self._shut = True
            self._came += 1
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread.is_alive():
            self.agent.events.put(Leave(f"{self.cfg.node_id}: torchrun is exiting"))
            thread.join(self.cfg.timings.lease_ttl)

    # --- the agent's thread ------------------------------------------------------------------------------------
    def _make_group(self, _workers_cfg, post, *, node_id: str = "", logger=None, worker_timeout: float = 0.0,
                    spares=None) -> TorchrunWorkers:
        """``node.api.GroupFactory``: torch's agent runs the workers (its own hang and restart rules apply)."""
        return TorchrunWorkers(self, post, node_id or self.cfg.node_id)

    def _run_agent(self) -> None:
        try:
            self.agent.run()
            err: RendezvousError = RendezvousClosedError(f"job {self.cfg.run_id} succeeded; its rendezvous is closed")
        except JobEnded as exc:  # this node came to the run after its job ended, while a node of it was registered
            err = RendezvousClosedError(str(exc))
        except RendezvousTimeout as exc:  # a round never formed
            err = RendezvousTimeoutError(str(exc))
        except JobFailed as exc:
            err = RendezvousClosedError(str(exc))
        except JobStopped as exc:
            err = RendezvousClosedError(str(exc))
        except SpecMismatch as exc:
            err = RendezvousStateError(str(exc))
        except ConfigError as exc:
            if isinstance(exc.__cause__, EtcdUnavailable):  # the first contact failed: say which flag to check
                err = RendezvousConnectionError(f"--rdzv-endpoint {self.agent.coord.etcd.endpoints_text}: "
                                                f"{exc.__cause__}")
            else:
                err = RendezvousError(str(exc))
        except AgentError as exc:
            err = RendezvousError(str(exc))
        except BaseException as exc:  # noqa: BLE001 - torch's agent must hear of it, not hang
            log.exception("the %s rendezvous agent of %s failed", BACKEND, self.cfg.node_id)
            err = RendezvousError(f"the {BACKEND} rendezvous agent failed: {exc!r}")
        if self._closed_here and not isinstance(err, RendezvousClosedError):  # a node id refused for our own hold
            err = RendezvousClosedError(f"the {BACKEND} rendezvous of {self.cfg.run_id} was closed by this node")
        with self._cond:
            self._ended = err
            if self._group is not None and not self._shut:  # torch's agent still runs a round: make it come back
                self._waiting = max(self._waiting, 1)
            request, self._request = self._request, None
            self._cond.notify_all()
        if request is not None and not request.done():
            request.set_exception(type(err)(str(err)))
        if not isinstance(err, RendezvousClosedError) or "succeeded" not in str(err):
            for store in self._stores:  # nobody is coming: waits of torch's agent (its exit barrier) end now
                store.close(f"job {self.cfg.run_id} ended: {err}")

    def _deliver(self, group: TorchrunWorkers, a: Assignment) -> None:
        """The agent started round ``a.round`` with this node: hand it to ``next_rendezvous``."""
        keys = self.agent.keys
        mirror = self.agent.coord.mirror  # its revision: this round started, none of its store keys written yet
        store = EtcdStore(self._etcd, keys.store(a.round), self._store_timeout,
                          on_add=lambda key, _value: self._on_store_add(group, key),
                          since=mirror.revision if mirror is not None else 0)
        info = RendezvousInfo(store, a.group_rank, a.group_world_size,
                              RendezvousStoreInfo(a.master_addr, a.master_port))
        with self._cond:
            old, self._stores = self._stores, [store]
            self._group = group
            request, self._request = self._request, None
            if request is None or request.done():
                self._ready = info  # torch's agent takes it when it comes
            else:
                group.taken = True
            self._cond.notify_all()
        for s in old:
            s.close()
        if request is not None and not request.done():
            request.set_result(info)
        if a.group_rank == 0 and a.round > 1:  # earlier rounds' stores: their agents have all moved on
            self._etcd.delete_range(keys.stores(), keys.store(a.round).encode())

    def _on_store_add(self, group: TorchrunWorkers, key: str) -> None:
        if key == EXIT_BARRIER_KEY:  # torch's agent: every worker of this node succeeded; it waits for the others
            group.report(ok=True)

    def _stop_torch(self, group: TorchrunWorkers, reason: str, timeout: float) -> None:
        """Make torch's agent stop its workers (``num_nodes_waiting``) and wait until it came back (its workers are
        then gone); past ``timeout``, kill them here."""
        with self._cond:
            first = not group.stopping
            group.stopping = True
            came = self._came
            back = self._request is not None or self._shut or self._ready is not None
            if not back:
                self._waiting = max(self._waiting, 1)
        if back or not self._worker_processes():
            return
        if first:
            log.info("%s: asking torchrun's agent to stop its workers (%s)", self.cfg.node_id, reason)
        with self._cond:
            self._cond.wait_for(lambda: self._came != came, timeout)
            if self._came != came:
                return
        victims = self._worker_processes()
        if victims:
            log.warning("%s: torchrun's agent did not stop its workers within %.1f s (%s); killing pid(s) %s",
                        self.cfg.node_id, timeout, reason, ", ".join(str(p.pid) for p in victims))
        for p in victims:
            proctree.kill_group(p.pid, signal.SIGKILL)  # torch starts each worker in a session of its own
            try:
                p.kill()
            except psutil.Error:
                pass

    def _worker_processes(self) -> list[psutil.Process]:
        """The live processes torch's agent started for this run: children of this process with its run id."""
        found = []
        try:
            children = psutil.Process().children()
        except psutil.Error:
            return found
        for p in children:
            try:
                if p.environ().get("TORCHELASTIC_RUN_ID") == self.cfg.run_id and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    # --- ending the job ----------------------------------------------------------------------------------------
    def _why_shut(self, exc: BaseException | None) -> tuple[str, str, Failure | None]:
        who = f"torchrun's agent on {self.cfg.node_id}"
        if isinstance(exc, ChildFailedError):
            root = first_failure(exc, self._group.round if self._group else None, self.cfg.node_id)
            return "failed", f"{who} gave up: its workers failed and its restarts (--max-restarts) are spent", root
        if exc is not None:
            return "failed", f"{who} closed the rendezvous after {type(exc).__name__}: {exc}", None
        return "stopped", f"{who} closed the rendezvous (shutdown) before its workers finished", None

    def _close_job(self, outcome: str, reason: str, root: Failure | None = None, hold: bool = False) -> None:
        """End the job (``txns.close_job``); with ``hold``, keep this node registered in it until ``shutdown``."""
        try:
            keys = self.agent.keys or (self._job_to_close() if hold else None)
            if keys is None:
                return  # never reached etcd: nothing to close
            holding = self._hold(keys) if hold else None
            if txns.close_job(self._etcd, keys, outcome, reason, time.time(), root, self.cfg.node_id, holding):
                log.warning("%s: job %s %s: %s", self.cfg.node_id, self.cfg.run_id, outcome, reason)
            elif holding is not None:
                txns.hold_ended(self._etcd, keys, holding)
            self._closed_here = True  # by this call or before it: the job has its result either way
        except AgentError as exc:
            log.error("%s could not close job %s: %s", self.cfg.node_id, self.cfg.run_id, exc)

    def _job_to_close(self):
        """The run's job, for ``set_closed`` before this handler joined: the running one, an ended one that is
        still closed, or a new one (closed at once: a run closed before anyone joined stays closed)."""
        run = self.agent.coord.run_keys
        try:
            return txns.init_job(self._etcd, run, self.cfg.spec, time.time(), join_timeout=self.cfg.join_timeout)
        except JobEnded:
            return txns.current_job(self._etcd, run)

    def _hold(self, keys) -> txns.Hold:
        """This node's registry entry on the handler's own lease (granted once, kept alive until ``shutdown``),
        replacing the agent's entry, whose lease ends when the agent exits."""
        if self._holder is None:
            self._holder = Session(self._etcd, self.cfg.timings, lambda why: log.warning(
                "%s: the closed rendezvous of %s is no longer held by this node: %s", self.cfg.node_id,
                self.cfg.run_id, why)).start(deadline=self.cfg.timings.join_timeout)
            atexit.register(self._release)
        lease, session = self._holder.lease_id, self.agent.coord.session
        info = NodeInfo(self.cfg.node_id, socket.gethostname(), self.cfg.address, os.getpid(), __version__,
                        self.cfg.workers.nproc, f"{lease:x}", time.time())
        return txns.Hold(keys.node(self.cfg.node_id), info.encode(), lease, session.lease_id if session else 0)

    def _release(self) -> None:
        """Revoke ``set_closed``'s lease: this node's entry goes, and with the last one the run can start anew."""
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.close(revoke=True)


def create_handler(params: RendezvousParameters) -> EtcdV3RendezvousHandler:
    """torch's registry calls this with ``--rdzv-*``: a bad key or value is a ValueError naming it."""
    try:
        s = settings(params)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    _log_to_stderr()
    log.info("etcd-agent %s %s rendezvous on %s: run %s, node %s, nnodes %d:%d, etcd %s under %s", __version__,
             BACKEND, time.strftime("%Y-%m-%d (UTC%z)"), s.cfg.run_id, s.cfg.node_id, params.min_nodes,
             params.max_nodes, ",".join(f"{h}:{p}" for h, p in s.cfg.etcd.endpoints), s.cfg.root, event="agent_started")
    return EtcdV3RendezvousHandler(s)


def _log_to_stderr() -> None:
    """torchrun configures only torch's loggers: give etcd-agent's a stderr handler (``ETCD_AGENT_LOG_LEVEL``,
    default INFO; ``ETCD_AGENT_LOG_FORMAT``, text or json) unless the application configured logging itself."""
    logger = logging.getLogger("etcd_agent")
    if logger.handlers or logging.getLogger().handlers:
        return
    level = logging.getLevelName(os.environ.get("ETCD_AGENT_LOG_LEVEL", "INFO").upper())
    fmt = "json" if os.environ.get("ETCD_AGENT_LOG_FORMAT", "").lower() == "json" else "text"
    logs.configure(level if isinstance(level, int) else logging.INFO, sys.stderr, fmt)
