"""The retry policy of every unary etcd call (``Etcd.call``): what is retried, for how long, and what is said.

Guarantees: only ``EtcdUnavailable`` is retried (never ``EtcdNoSpace``: etcd answered, and no retry empties it),
with short exponential backoff (0.05 s doubling to 0.5 s), until the caller's deadline, the shutdown event or the
caller's ``interrupt()`` (its session was lost). Every retry is logged at DEBUG naming the call and the error, and
the first retry of a call that has already tried for more than ``SLOW`` seconds once at INFO (etcd slow or away,
not a blip of failover), so a stuck call is visible without one line per try. ``retrying`` runs a call under it. Imports
tenacity, ``errors`` and ``logs``; nothing above ``etcd/``.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

import tenacity

from .. import logs
from ..errors import EtcdNoSpace, EtcdUnavailable

log = logs.get("etcd_agent.etcd.retry")
SLOW = 1.0  # seconds of retrying after which a call says so at INFO, once
T = TypeVar("T")


def retrying(tried: Callable[[], T], end: float, stop_event: threading.Event | None,
             interrupt: Callable[[], bool] | None = None, where: str = "call") -> T:
    """``tried()`` under ``retry_policy`` until the monotonic time ``end``. The first try runs without tenacity,
    which costs about 80 us a call and most calls succeed at once; when it fails, the policy goes on as if it had
    made that try itself (its first try re-raises that error), so its backoff, logging and stop rules hold."""
    try:
        return tried()
    except EtcdNoSpace:
        raise
    except EtcdUnavailable as exc:
        first = [exc]

    def again() -> T:
        if first:
            raise first.pop()
        return tried()
    return retry_policy(max(0.0, end - time.monotonic()), stop_event, interrupt, where)(again)


def retry_policy(deadline: float, stop_event: threading.Event | None,
                 interrupt: Callable[[], bool] | None = None, where: str = "call") -> tenacity.Retrying:
    """Retry EtcdUnavailable with short exponential backoff until ``deadline`` seconds pass, shutdown, or
    ``interrupt()`` says the caller has better things to do (its session was lost); ``where`` names the call."""
    stop = tenacity.stop_after_delay(deadline)
    if stop_event is not None:
        stop = stop | (lambda state: stop_event.is_set())
    if interrupt is not None:
        stop = stop | (lambda state: interrupt())
    return tenacity.Retrying(
        stop=stop,
        wait=tenacity.wait_exponential(multiplier=0.05, min=0.05, max=0.5),
        retry=tenacity.retry_if_exception_type(EtcdUnavailable) & tenacity.retry_if_not_exception_type(EtcdNoSpace),
        sleep=(stop_event.wait if stop_event is not None else tenacity.nap.sleep),
        before_sleep=_say_retry(where, deadline),
        reraise=True,
    )


def _say_retry(where: str, deadline: float) -> Callable[[tenacity.RetryCallState], None]:
    """tenacity's ``before_sleep`` for one call: DEBUG for each retry, INFO once when it is past ``SLOW``."""
    said = False

    def before_sleep(state: tenacity.RetryCallState) -> None:
        nonlocal said
        exc = state.outcome.exception() if state.outcome is not None else None
        text = str(exc) if where in str(exc) else f"etcd {where}: {exc}"  # the call's errors name it already
        pause = state.next_action.sleep if state.next_action is not None else 0.0
        took = state.seconds_since_start or 0.0
        if not said and took > SLOW:
            said = True
            log.info("%s; still retrying after %.1f s (try %d; it gives up after %.1f s)", text, took,
                     state.attempt_number, deadline)
        else:
            log.debug("%s; retrying in %.2f s (try %d, %.2f s in)", text, pause, state.attempt_number, took)

    return before_sleep
