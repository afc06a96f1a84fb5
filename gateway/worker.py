"""Workers: claim spooled mail under a lease, route it, deliver it, record the outcome.

A message moves `received → routed → delivered | quarantined | dropped | dead`, with `retrying` in between on
transient faults (exponential backoff with jitter, up to a horizon). A worker that dies leaves its lease to
expire; the next claim takes the message over. Routing is pure and stored with the message (`decision`), so
a message that is retried is not routed again: delivery resumes with the same decision and Odoo writes are
keyed per step (see gateway.delivery), which is what makes a retry after a crash exactly-once.

Threads, not coroutines: routing is CPU (parse) and delivery is blocking RPC; several worker processes
(`mailgate worker`, or `[worker] processes`) use both cores and several nodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import logging
import os
import random
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Engine

from gateway.config import Config
from gateway.errors import PermanentError, TransientError
from gateway.logs import mail_context
from gateway.metrics import PROCESSED, PROCESSING_SECONDS, RETRIES, ROUTE_SECONDS
from gateway.outbox import EventDraft, record_events
from gateway.spool import Claimed, SpooledMessage, claim, renew_lease, transition
from gateway.store import utcnow
from routing.model import Action, Decision

log = logging.getLogger(__name__)

#: Actions that are finished without Odoo.
LOCAL_ACTIONS = {Action.DUPLICATE: "dropped", Action.LOOP: "dropped", Action.QUARANTINE: "quarantined"}


class RouteStep(Protocol):
    def __call__(self, raw: bytes, message: SpooledMessage) -> Decision: ...


@dataclass(frozen=True)
class Outcome:
    """What a delivery step reports back (gateway.delivery.DeliveryOutcome has the same shape)."""

    state: str
    note: str
    events: tuple[EventDraft, ...] = ()


class DeliverStep(Protocol):
    def deliver(self, message: SpooledMessage, raw: bytes, decision: Decision) -> Any: ...


#: past this many doublings every sane base is above any cap; 2.0 ** 1024 overflows a float
_MAX_DOUBLINGS = 60


def backoff_delay(attempts: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with ±25 % jitter, so retries of a burst do not hit Odoo in lockstep.

    The exponent is bounded: a short `backoff_max` under a long horizon reaches a thousand attempts, and
    `base * 2 ** 1024` raised OverflowError out of the worker's retry bookkeeping on every later try."""
    delay = min(cap, base * (2.0 ** min(max(0, attempts), _MAX_DOUBLINGS)))
    jitter = (rng or random).uniform(0.75, 1.25)
    return min(cap, delay * jitter)


_WORKER_SEQ = itertools.count(1)


class LeaseKeeper:
    """Renews the lease of the message a worker is processing, every third of the lease, from a thread of
    its own: explicit delivery is several Odoo calls (each allowed `[odoo] timeout`), plus one per
    attachment, and can outlast the lease while Odoo is slow. An expired lease let another worker claim the
    message mid-delivery, and Odoo got the lead, the post and the attachments twice."""

    def __init__(self, engine: Engine, owner: str, lease_seconds: float):
        self.engine, self.owner, self.lease = engine, owner, lease_seconds
        self.lost = False
        self._current: int | None = None
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def holding(self, ident: int) -> Iterator["LeaseKeeper"]:
        with self._wake:
            self._current, self.lost = ident, False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"lease-{self.owner}", daemon=True)
                self._thread.start()
        try:
            yield self
        finally:
            with self._wake:
                self._current = None

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait(self.lease / 3)
                ident = self._current
            if ident is None:
                continue
            try:
                if not renew_lease(self.engine, ident, self.owner, self.lease):
                    self.lost = True
                    log.warning("lease on message %s lost while processing it", ident)
            except Exception as exc:  # the store is briefly unavailable: the lease still has two thirds left
                log.warning("lease renewal for message %s failed: %s", ident, exc)


class Worker:
    """One worker: `run_once()` claims and finishes at most `batch` messages; `run()` loops until stopped."""

    def __init__(self, config: Config, engine: Engine, *, route: RouteStep,
                 deliver: DeliverStep | None, owner: str | None = None):
        self.config = config
        self.engine = engine
        self.route = route
        self.delivery = deliver
        # One owner per worker, not per thread that built it: `run_workers` builds them all in one thread, and
        # a shared owner could not tell whose lease a message is under.
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:w{next(_WORKER_SEQ)}"
        wc = config.worker
        self.lease = wc.lease_seconds
        self.keeper = LeaseKeeper(engine, self.owner, self.lease)
        self.backoff_base = wc.backoff_base
        self.backoff_max = wc.backoff_max
        self.horizon = dt.timedelta(hours=wc.retry_horizon_hours)
        # Without Odoo the worker only routes: routed mail waits for delivery to be configured.
        self.states = ("received", "routed", "retrying") if deliver is not None else ("received", "retrying")

    def run_once(self, batch: int = 1) -> int:
        done = 0
        for item in claim(self.engine, self.owner, limit=batch, lease_seconds=self.lease, states=self.states):
            with self.keeper.holding(item.message.id):
                self.process(item)
            done += 1
        return done

    def run(self, stop: threading.Event, wake: threading.Event | None = None, poll: float = 0.5) -> None:
        while not stop.is_set():
            try:
                n = self.run_once()
            except Exception:  # the store is briefly unavailable: keep the worker alive
                log.exception("worker %s: claim failed; retrying", self.owner)
                n = 0
                stop.wait(min(5.0, poll * 4))
            if n == 0:
                if wake is not None:
                    wake.wait(poll)
                    wake.clear()
                else:
                    stop.wait(poll)

    # ----------------------------------------------------------------------------------------------
    def process(self, item: Claimed) -> None:
        msg = item.message
        ctx = mail_context(msg.id, msg.message_id)
        if item.raw is None:
            why = item.raw_error or "raw body missing (purged by retention?)"
            self._finish(msg, "dead", note=why, error=item.raw_error or "raw body missing")
            return
        try:
            decision = self._decision(msg, item.raw)
        except TransientError as exc:  # the route step waits for something (Odoo's alias list): not a bug
            log.warning("routing deferred: %s", exc, extra=ctx)
            self._retry_or_dead(msg, str(exc), kind="transient")
            return
        except Exception as exc:  # routing is pure and must not raise; if it does, keep the mail and say so
            log.exception("routing failed", extra=ctx)
            self._retry_or_dead(msg, f"routing error: {exc.__class__.__name__}: {exc}", kind="route")
            return
        if decision is None:
            log.warning("lease lost while routing; another worker owns the message now", extra=ctx)
            return
        msg = dataclasses.replace(msg, action=decision.action.value)  # claimed before routing: it had none
        if decision.action in LOCAL_ACTIONS:
            self._finish(msg, LOCAL_ACTIONS[decision.action], note=decision.reason or decision.action.value)
            return
        if self.delivery is None:
            return  # stays `routed` until an Odoo is configured
        try:
            outcome = self.delivery.deliver(msg, item.raw, decision)
        except TransientError as exc:
            log.warning("delivery deferred: %s", exc, extra=ctx)
            self._retry_or_dead(msg, str(exc), kind="transient")
            return
        except PermanentError as exc:
            log.error("delivery failed permanently: %s", exc, extra=ctx)
            self._finish(msg, "dead", note="permanent delivery error", error=str(exc))
            return
        except Exception as exc:  # an unexpected bug: retry a few times, then park it with the traceback
            log.exception("delivery crashed", extra=ctx)
            if msg.attempts + 1 >= 5:
                self._finish(msg, "dead", note="delivery crashed 5 times",
                             error="".join(traceback.format_exception_only(exc)).strip())
            else:
                self._retry_or_dead(msg, f"unexpected {exc.__class__.__name__}: {exc}", kind="crash")
            return
        self._finish(msg, outcome.state, note=outcome.note, events=tuple(getattr(outcome, "events", ()) or ()))

    def _decision(self, msg: SpooledMessage, raw: bytes) -> Decision | None:
        """The stored decision, or a new one recorded under our lease; None when the lease was lost (the
        message is another worker's now: delivering it here too would deliver it twice)."""
        if msg.decision and msg.state in ("routed", "retrying") and msg.action:
            return Decision.from_json(msg.decision)
        started = time.perf_counter()
        decision = self.route(raw, msg)
        ROUTE_SECONDS.observe(time.perf_counter() - started)
        if not transition(self.engine, msg.id, "routed", owner=self.owner, keep_lease=True,
                          decision=decision.to_json(),
                          note=f"{decision.action.value}: {'; '.join(decision.explanation[-2:])}"[:2000]):
            return None
        return decision

    def _finish(self, msg: SpooledMessage, state: str, *, note: str, error: str | None = None,
                events: tuple[EventDraft, ...] = ()) -> None:
        ok = transition(self.engine, msg.id, state, owner=self.owner, note=note, error=error,
                        also=(lambda conn: record_events(conn, list(events))) if events else None)
        if not ok:
            log.warning("lease lost before finishing; another worker owns the message now",
                        extra=mail_context(msg.id, msg.message_id))
            return
        PROCESSED.labels(state, (msg.action or "")).inc()
        PROCESSING_SECONDS.observe((utcnow() - msg.received_at).total_seconds())

    def _retry_or_dead(self, msg: SpooledMessage, error: str, *, kind: str) -> None:
        now = utcnow()
        if now - msg.retry_start > self.horizon:  # from the receipt, or from the operator's last release
            self._finish(msg, "dead", note=f"gave up after {self.horizon}", error=error)
            return
        delay = backoff_delay(msg.attempts, self.backoff_base, self.backoff_max)
        RETRIES.labels(kind).inc()
        transition(self.engine, msg.id, "retrying", owner=self.owner, error=error, attempts_inc=1,
                   next_attempt_at=now + dt.timedelta(seconds=delay),
                   note=f"retry in {delay:.0f}s: {error}"[:2000])


def run_workers(make_worker: Callable[[int], Worker], count: int, stop: threading.Event,
                wake: threading.Event | None = None, poll: float = 0.5) -> list[threading.Thread]:
    """Start `count` worker threads; they exit when `stop` is set."""
    threads = []
    for i in range(count):
        w = make_worker(i)
        t = threading.Thread(target=w.run, args=(stop, wake, poll), name=f"worker-{i}", daemon=True)
        t.start()
        threads.append(t)
    return threads
