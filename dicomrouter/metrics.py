"""Prometheus metrics (prometheus-client), in one registry of the router process.

Counters and histograms are moved where things happen (receive, routing, delivery, sources);
queue depth, dead jobs, spool bytes and free disk are read from the state database and the file
system when ``/metrics`` is scraped (``StateCollector``), so they are right even for what other
processes (``status``, ``retry``, extra receiver processes) changed. Extra receiver processes
(``receivers: N``) count their own receptions, which this registry does not see: with N > 1 the
``dicomrouter_instances_received_total`` of the main process is a part of the total (the state
database's counts, ``/api/studies``, are complete).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

INSTANCES = Counter("dicomrouter_instances_received", "Instances acknowledged (durable) by "
                    "calling AE title", ["calling_ae"], registry=REGISTRY)
BYTES = Counter("dicomrouter_bytes_received", "Bytes of acknowledged instances by calling AE "
                "title", ["calling_ae"], registry=REGISTRY)
REFUSED = Counter("dicomrouter_instances_refused", "Instances answered with a failure status",
                  ["status"], registry=REGISTRY)
ASSOCIATIONS = Counter("dicomrouter_associations", "Associations by outcome (accepted, or "
                       "rejected with the reason)", ["outcome"], registry=REGISTRY)
STUDIES = Counter("dicomrouter_studies_completed", "Studies completed and routed (or unrouted)",
                  ["outcome"], registry=REGISTRY)
DELIVERIES = Counter("dicomrouter_deliveries", "Delivery attempts by destination and outcome "
                     "(delivered, failed, dead)", ["destination", "outcome"], registry=REGISTRY)
HELD_BACK = Counter("dicomrouter_instances_held_back", "Instances not sent in a delivery run "
                    "because an instance they reference was not delivered there (route key "
                    "order: references), by destination", ["destination"], registry=REGISTRY)
COERCIONS = Counter("dicomrouter_coercions", "coerce lookups (once per study identity and "
                    "delivery run) by destination and outcome: changed, unchanged, no_match, "
                    "ambiguous, unavailable", ["destination", "outcome"], registry=REGISTRY)
RETRIES = Counter("dicomrouter_delivery_retries", "Attempts after a failed one, by destination",
                  ["destination"], registry=REGISTRY)
STORE_LATENCY = Histogram("dicomrouter_c_store_seconds", "From a C-STORE's last fragment to its "
                          "response (durability included)", registry=REGISTRY,
                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                   0.5, 1.0, 2.5))
DELIVERY_TIME = Histogram("dicomrouter_delivery_seconds", "Duration of one delivery attempt",
                          ["destination"], registry=REGISTRY,
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
BREAKER_OPEN = Gauge("dicomrouter_breaker_open", "Circuit breaker of each destination on this "
                     "node: 1 open (its jobs wait, probed every probe_every), 0 closed",
                     ["destination"], registry=REGISTRY)
GROUP_STUDIES = Counter("dicomrouter_group_studies", "Studies a destination group gave to each "
                        "member (a study moved from a member whose circuit opened counts "
                        "again, for its new member)", ["group", "member"], registry=REGISTRY)
GROUP_MOVES = Counter("dicomrouter_group_moves", "Studies of a destination group moved away "
                      "from a member whose circuit breaker opened", ["group", "member"],
                      registry=REGISTRY)
POLLS = Counter("dicomrouter_source_polls", "Polls of each pull source by outcome",
                ["source", "outcome"], registry=REGISTRY)
PREFETCH_RUNS = Counter("dicomrouter_prefetch_runs", "Prefetch triggers by rule and outcome "
                        "(done, failed: retried, dead: given up, suppressed)",
                        ["rule", "outcome"], registry=REGISTRY)
PREFETCH_INSTANCES = Counter("dicomrouter_prefetch_instances", "Instances of priors a prefetch "
                             "retrieved, by rule", ["rule"], registry=REGISTRY)
MPPS = Counter("dicomrouter_mpps_messages", "MPPS N-CREATE / N-SET answered, by operation and "
               "outcome (accepted, refused)", ["operation", "outcome"], registry=REGISTRY)
INCOMPLETE = Counter("dicomrouter_studies_incomplete", "Studies flagged incomplete: a COMPLETED "
                     "MPPS listed instances that did not arrive within mpps_timeout",
                     registry=REGISTRY)
NOTIFICATIONS_SENT = Counter("dicomrouter_notifications_sent", "Notifications the receiver "
                             "accepted, by notification and event", ["notification", "event"],
                             registry=REGISTRY)
NOTIFICATIONS_FAILED = Counter("dicomrouter_notifications_failed", "Notifications given up "
                               "after their last attempt (or refused for good), by notification "
                               "and event", ["notification", "event"], registry=REGISTRY)
NOTIFICATIONS_DROPPED = Counter("dicomrouter_notifications_dropped", "Notifications dropped "
                                "unsent because their queue was full (or at stop), by "
                                "notification", ["notification"], registry=REGISTRY)
NOTIFICATIONS_QUEUED = Gauge("dicomrouter_notifications_queued", "Notifications waiting, "
                             "retrying or being sent, by notification", ["notification"],
                             registry=REGISTRY)
HL7_MESSAGES = Counter("dicomrouter_hl7_messages", "HL7 v2 messages received, by message type "
                       "(MSH-9; 'unreadable' when there is none) and the ACK code answered",
                       ["message_type", "ack"], registry=REGISTRY)


class StateCollector(Collector):
    """Gauges read at scrape time: queue depth per destination and state, spool bytes, free
    disk, sources' last success."""

    def __init__(self, state: Any, spool_root: Path) -> None:
        self.state = state
        self.spool_root = spool_root

    def collect(self) -> Iterator[GaugeMetricFamily]:
        summary = self.state.gauges()
        jobs = GaugeMetricFamily("dicomrouter_jobs", "Delivery jobs by destination and state "
                                 "(pending and failed: the queue; dead: dead letters)",
                                 labels=["destination", "state"])
        for dest, counts in summary["queues"].items():
            for state, n in counts.items():
                jobs.add_metric([dest, state], n)
        yield jobs
        queued = GaugeMetricFamily("dicomrouter_jobs_queued_by_priority", "Delivery jobs "
                                   "waiting or running (pending, failed, running) by "
                                   "destination and priority", labels=["destination", "priority"])
        for dest, by in summary.get("by_priority", {}).items():
            for priority, n in by.items():
                queued.add_metric([dest, priority], n)
        yield queued
        partial = GaugeMetricFamily("dicomrouter_jobs_partial", "Delivery jobs whose destination "
                                    "misses instances deleted from the spool before a late "
                                    "arrival routed the study there", labels=["destination"])
        missing = GaugeMetricFamily("dicomrouter_instances_missing", "Instances those partial "
                                    "jobs' destinations never got", labels=["destination"])
        for dest, counts in summary.get("partial", {}).items():
            partial.add_metric([dest], counts["jobs"])
            missing.add_metric([dest], counts["missing"])
        yield partial
        yield missing
        yield GaugeMetricFamily("dicomrouter_spool_bytes", "Bytes of instances in the spool",
                                value=summary["spool_bytes"])
        try:
            free = shutil.disk_usage(self.spool_root).free
        except OSError:
            free = 0
        yield GaugeMetricFamily("dicomrouter_spool_free_bytes", "Free bytes on the spool's "
                                "file system", value=free)
        last = GaugeMetricFamily("dicomrouter_source_last_success_timestamp", "Unix time of "
                                 "each source's last successful poll", labels=["source"])
        for src in summary.get("sources", []):
            last.add_metric([src["name"]], src["last_success"] or 0)
        yield last
        outbox = GaugeMetricFamily("dicomrouter_dimse_outbox", "MPPS forwarded (forward_mpps) "
                                   "and IAN (ian) messages by peer and state (pending, sent, "
                                   "refused)", labels=["destination", "state"])
        for dest, counts in self.state.outbox_counts().items():
            for state, n in counts.items():
                outbox.add_metric([dest, state], n)
        yield outbox


def exposition() -> bytes:
    return generate_latest(REGISTRY)


def watch_state(state: Any, spool_root: Path) -> StateCollector:
    """Register the scrape-time gauges of this router (once per process)."""
    collector = StateCollector(state, spool_root)
    REGISTRY.register(collector)
    return collector
