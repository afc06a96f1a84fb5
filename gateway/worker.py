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
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Engine

from gateway.config import Config
from gateway.errors import PermanentError, TransientError
from gateway.logs import mail_context
from gateway.metrics import PROCESSED, PROCESSING_SECONDS, RETRIES, ROUTE_SECONDS
from gateway.outbox import EventDraft, record_events
from gateway.spool import (
    CRASH_NOTE, Claimed, LeaseLost, SpooledMessage, claim, crashes, lease_fence, renew_lease, transition,
)
from gateway.store import utcnow
from routing.model import Action, Decision

log = logging.getLogger(__name__)

#: How many unexpected exceptions (bugs, not TransientError) a message may cause before it is parked dead.
CRASH_LIMIT = 5
#: the retries metric's `kind` for a crash in each step
_CRASH_KINDS = {"routing": "route", "delivery": "crash"}

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
    message mid-delivery, and Odoo got the lead, the post and the attachments twice.

    Renewal can fail too (the store unreachable, the process paused), so the keeper also knows until when
    the lease is confirmed, and `fence()` (called before each Odoo call) refuses to go on past that: the
    message may be another worker's by then. Each `holding` is a turn of its own, so a renewal answered
    late for the previous message says nothing about the next one."""

    def __init__(self, engine: Engine, owner: str, lease_seconds: float):
        self.engine, self.owner, self.lease = engine, owner, lease_seconds
        self.lost = False
        self._current: int | None = None
        self._turn = 0
        #: time.monotonic() at which the lease may have run out: claimed or last renewed, plus the lease
        self._deadline = 0.0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def holding(self, ident: int, claimed_at: float) -> Iterator["LeaseKeeper"]:
        """Keep `ident`'s lease, claimed at `claimed_at` (time.monotonic(), taken before the claim)."""
        with self._wake:
            self._current, self.lost = ident, False
            self._turn += 1
            self._deadline = claimed_at + self.lease
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"lease-{self.owner}", daemon=True)
                self._thread.start()
        try:
            yield self
        finally:
            with self._wake:
                self._current = None

    def fence(self) -> None:
        """Raise LeaseLost unless the lease on the current message is confirmed for now."""
        with self._wake:
            ident, lost = self._current, self.lost or time.monotonic() >= self._deadline
        if lost:
            raise LeaseLost(f"lease on message {ident} lost or expired (renewals failed): abandoning it, the "
                            "worker that claims it next resumes it from the write ledger")

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait(self.lease / 3)
                ident, turn = self._current, self._turn
            if ident is not None:
                self._renew(ident, turn)

    def _renew(self, ident: int, turn: int) -> None:
        asked = time.monotonic()  # before the UPDATE computes its lease_until: the deadline errs early
        try:
            renewed = renew_lease(self.engine, ident, self.owner, self.lease)
        except Exception as exc:  # the store is briefly unavailable: the lease may have two thirds left
            log.warning("lease renewal for message %s failed: %s", ident, exc)
            return
        with self._wake:
            if turn != self._turn:  # answered after the worker moved on: not about the message it holds now
                return
            if renewed:
                self._deadline = asked + self.lease
                return
            self.lost = True
        log.warning("lease on message %s lost while processing it", ident)


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
        # The random part: containers of one image can share the host name and, each in its own pid namespace,
        # the pid; two such workers had the same owner and took each other's leases for their own.
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:w{next(_WORKER_SEQ)}:{uuid.uuid4().hex[:8]}"
        wc = config.worker
        self.lease = wc.lease_seconds
        self.keeper = LeaseKeeper(engine, self.owner, self.lease)
        self.backoff_base = wc.backoff_base
        self.backoff_max = wc.backoff_max
        self.horizon = dt.timedelta(hours=wc.retry_horizon_hours)
        # Without Odoo the worker only routes: routed mail waits for delivery to be configured.
        self.states = ("received", "routed", "retrying") if deliver is not None else ("received", "retrying")

    def run_once(self, batch: int = 1) -> int:
        """Claim and finish up to `batch` messages, one claim each: the keeper renews one lease, so a message
        claimed ahead sat under a lease nobody renewed, holding off other workers, and expired (another
        worker took it) while the ones before it were delivered. Returns how many were processed."""
        done = 0
        while done < batch:
            claimed_at = time.monotonic()
            items = claim(self.engine, self.owner, limit=1, lease_seconds=self.lease, states=self.states)
            if not items:
                break
            with self.keeper.holding(items[0].message.id, claimed_at):
                self.process(items[0])
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
            self._crashed(msg, exc, step="routing")
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
        fence = lease_fence.set(self.keeper.fence)
        try:
            outcome = self.delivery.deliver(msg, item.raw, decision)
        except LeaseLost as exc:  # another worker may hold it now: whatever we record would be a second answer
            log.warning("%s", exc, extra=ctx)
            return
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
            self._crashed(msg, exc, step="delivery")
            return
        finally:
            lease_fence.reset(fence)
        self._finish(msg, outcome.state, note=outcome.note, events=tuple(getattr(outcome, "events", ()) or ()))

    def _decision(self, msg: SpooledMessage, raw: bytes) -> Decision | None:
        """The stored decision, or a new one recorded under our lease; None when the lease was lost (the
        message is another worker's now: delivering it here too would deliver it twice)."""
        if msg.decision and msg.state in ("routed", "retrying") and msg.action:
            return Decision.from_json(msg.decision)
        started = time.perf_counter()
        decision = self.route(raw, msg)
        ROUTE_SECONDS.observe(time.perf_counter() - started)
        # Kept while this worker goes on with the message. A routing-only worker stops at `routed`: a lease
        # kept there made a delivery worker elsewhere wait up to lease_seconds for mail nobody was working on.
        keep = self.delivery is not None or decision.action in LOCAL_ACTIONS
        if not transition(self.engine, msg.id, "routed", owner=self.owner, keep_lease=keep,
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

    def _crashed(self, msg: SpooledMessage, exc: Exception, *, step: str) -> None:
        """An unexpected exception in `step` (a bug): retried a few times, in case it came from a passing state
        of Odoo or the store, then parked dead with the exception. Routing is pure, so a routing bug is
        deterministic: retried to the 72 h horizon it held every later mail of its thread back all that time.
        Only crashes count (since the last release), not the transient faults that raise `attempts` too."""
        if crashes(self.engine, msg.id, msg.retry_start) + 1 >= CRASH_LIMIT:
            self._finish(msg, "dead", note=f"{step} crashed {CRASH_LIMIT} times",
                         error="".join(traceback.format_exception_only(exc)).strip())
        else:
            self._retry_or_dead(msg, f"{step}: unexpected {exc.__class__.__name__}: {exc}", kind=_CRASH_KINDS[step],
                                note_prefix=CRASH_NOTE)

    def _retry_or_dead(self, msg: SpooledMessage, error: str, *, kind: str, note_prefix: str = "") -> None:
        now = utcnow()
        if now - msg.retry_start > self.horizon:  # from the receipt, or from the operator's last release
            self._finish(msg, "dead", note=f"gave up after {self.horizon}", error=error)
            return
        delay = backoff_delay(msg.attempts, self.backoff_base, self.backoff_max)
        RETRIES.labels(kind).inc()
        transition(self.engine, msg.id, "retrying", owner=self.owner, error=error, attempts_inc=1,
                   next_attempt_at=now + dt.timedelta(seconds=delay),
                   note=f"{note_prefix}retry in {delay:.0f}s: {error}"[:2000])


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
