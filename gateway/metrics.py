"""Prometheus metrics shared by the listeners, the worker and the admin endpoint.

Spool depth is not a counter kept in memory (several processes and nodes share one store): the admin
endpoint reads it from the store at scrape time (`SpoolDepthCollector`).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: Metrics only the serve process keeps, of kinds prometheus_client's multiprocess mode cannot share (an Enum):
#: `/metrics` shows them beside the summed ones (gateway.admin.exposition).
SERVE_ONLY = CollectorRegistry()

ACCEPTED = Counter("mailgate_accepted_total", "Messages accepted (250) after a durable spool write", ["listener"])
REFUSED = Counter("mailgate_refused_total", "SMTP/LMTP refusals by reply code", ["listener", "code"])
PROCESSED = Counter("mailgate_processed_total", "Messages finished by workers, by final state and action",
                    ["state", "action"])
RETRIES = Counter("mailgate_retries_total", "Transient failures that scheduled a retry", ["kind"])
PROCESSING_SECONDS = Histogram(
    "mailgate_processing_seconds", "Time from spool to a final state, per message",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
HELPER_STARTS = Counter(
    "mailgate_helper_process_starts_total",
    "Commit helper processes started (spool writer, outbound store); more than one each means one died",
    ["helper"])
ROUTE_SECONDS = Histogram("mailgate_route_seconds", "Parse + route time per message",
                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1))
#: One per webhook POST: `sent` (2xx), `failed` (retried later), `dead` (dead-lettered: replay sends it again).
WEBHOOK_DELIVERIES = Counter("mailgate_webhook_deliveries_total", "Webhook POSTs by subscriber and result",
                             ["subscriber", "result"])
#: Valid tracking requests: `who` is human, machine (a proxy or scanner by its looks) or probe (HEAD: not
#: counted on the recipient row).
TRACKING_HITS = Counter("mailgate_tracking_hits_total", "Tracking pixel fetches and link clicks with a valid token",
                        ["kind", "who"])


class FreeSpaceCollector(Collector):
    """`mailgate_spool_free_bytes`, measured at scrape time (a collector, not a Gauge with `set_function`:
    in prometheus_client's multiprocess mode a function gauge is not shared, and would vanish)."""

    def __init__(self, free: Any):
        self.free = free

    def collect(self):  # type: ignore[no-untyped-def]
        family = GaugeMetricFamily("mailgate_spool_free_bytes", "Free bytes on the SQLite spool's filesystem "
                                   "(below [storage] min_free_mb: 452 at MAIL FROM)")
        try:
            family.add_metric([], float(self.free()))
        except OSError:
            return
        yield family


class SpoolDepthCollector(Collector):
    """`mailgate_spool_messages{state=...}` read from the store at scrape time."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self):  # type: ignore[no-untyped-def]
        from gateway.spool import counts_by_state

        family = GaugeMetricFamily("mailgate_spool_messages", "Messages in the spool by state", labels=["state"])
        try:
            for state, n in counts_by_state(self.engine).items():
                family.add_metric([state], n)
        except Exception:  # a scrape must not fail because the store is briefly unavailable
            pass
        yield family


class WebhookBacklogCollector(Collector):
    """`mailgate_webhook_backlog{subscriber, state}`: each configured subscriber's events still to send
    (`pending`) and given up (`dead`, waiting for `mailgate events replay`), read at scrape time. A subscriber
    that has been failing for hours showed only as log lines and a counter of failures; the size of what it
    has not got is the figure to alert on. One indexed count per subscriber and state."""

    def __init__(self, engine: Any, subscribers: Any):
        self.engine = engine
        self.subscribers = tuple(subscribers)

    def collect(self):  # type: ignore[no-untyped-def]
        from sqlalchemy import func, select

        from gateway.schema import webhook_deliveries as wd
        from gateway.store import reading

        family = GaugeMetricFamily("mailgate_webhook_backlog", "Webhook deliveries not sent: pending (to be "
                                   "tried) and dead (given up, see `mailgate events replay`)",
                                   labels=["subscriber", "state"])
        try:
            with reading(self.engine) as conn:
                for name in self.subscribers:
                    for state in ("pending", "dead"):
                        n = conn.execute(select(func.count()).select_from(wd).where(
                            wd.c.subscriber == name, wd.c.state == state)).scalar() or 0
                        family.add_metric([name, state], n)
        except Exception:  # a scrape must not fail because the store is briefly unavailable
            return
        yield family
