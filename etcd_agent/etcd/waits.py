"""gRPC's idle waits in the agent's own process: sleep until something happens, not poll (``quiet_grpc_waits``).

Called by the agent's command line (``cli.main.run_agent``) and the simulations (``testing/sim.py``),
never at import: torchrun's backend and workers import ``etcd/`` too, and these are process-wide settings of gRPC.
Imports grpc and ``logs``; nothing above ``etcd/``.
"""

from __future__ import annotations

import grpc
import grpc._common

from .. import logs

log = logs.get("etcd_agent.etcd.waits")

GRPC_WAIT_SLICE = 5.0  # seconds: how often an idle gRPC wait wakes in a process that called quiet_grpc_waits


def quiet_grpc_waits() -> None:
    """Make this process's idle gRPC waits sleep ``GRPC_WAIT_SLICE`` s between looks, not 0.1 and 0.2 s; for the
    agent's own process only (``cli.main.run_agent``, the simulations), never at the import of a module
    that torchrun's backend or a worker also imports: these are process-wide settings of gRPC.

    Why: gRPC polls where it could sleep. (1) Its blocking waits on a call (a stream's next answer, a request
    iterator's send) wait on a condition in slices of ``grpc._common.MAXIMUM_WAIT_TIMEOUT`` = 0.1 s (grpc issue
    19464: so that a main thread's signal handlers run); it is read at each wait. (2) The thread that serves a
    channel's calls (the "channel spin" thread, one per blocking channel while a call is live; the agent's streams
    run on the aio channel of ``streams_loop.py``, which has no spin thread) and every unary call wait on gRPC's
    completion queue in slices of 200 ms (``g_interrupt_check_period_ms`` in cygrpc, read at each wait) to run
    signal handlers, a no-op on any thread
    but the main one. Measured: an idle agent's threads woke 26 times a second while it sent etcd 0.7 requests a
    second, and 1000 simulated agents on 2 cores spent most of their CPU on it. Both waits are ended at once by
    what they wait for (an answer, a completion), so a longer slice delays nothing. What a slice bounds is how late
    a signal handler of the MAIN thread runs while that thread is blocked in gRPC: the agent's main thread blocks
    only in unary calls, each bounded by its request timeout (at most ``MAX_REQUEST_TIMEOUT`` = 3 s, under the
    slice), so the agent's handlers (``Agent.leave``) still run when the call returns. cygrpc has no
    setter for the period: it is the C int that cygrpc exports for its gevent mode (which sets it to 2 s); when a
    gRPC release no longer exports it, only the 200 ms waits stay (logged at DEBUG)."""
    if getattr(grpc._common, "MAXIMUM_WAIT_TIMEOUT", 0) < GRPC_WAIT_SLICE:
        grpc._common.MAXIMUM_WAIT_TIMEOUT = GRPC_WAIT_SLICE
    try:
        import ctypes

        from grpc._cython import cygrpc
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        period = ctypes.c_int.from_address(get(cygrpc.__pyx_capi__["g_interrupt_check_period_ms"], b"int"))
    except (ImportError, AttributeError, KeyError, TypeError, ValueError) as exc:
        log.debug("gRPC's completion-queue waits keep their 200 ms slices: %s", exc)
        return
    period.value = max(period.value, int(GRPC_WAIT_SLICE * 1000))
