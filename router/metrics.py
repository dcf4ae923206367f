"""Prometheus metrics with fixed label sets (dashboards and alerts depend on these names).

Labels are bounded: route templates (never raw paths), channel names from config, status and
outcome enums. Nothing derived from request data ever becomes a label.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_CHILDREN_MAX = 4096  # labelled children cached (label sets are bounded; this is a safety cap)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "payroute_http_requests", "HTTP requests by route template and status", ["method", "route", "status"], registry=r
        )
        self.http_latency = Histogram(
            "payroute_http_request_duration_seconds", "HTTP request duration", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.payments = Counter(
            "payroute_payments", "Payments by final status and channel (channel 'none' when no channel took it)",
            ["channel", "status"], registry=r,
        )
        self.attempts = Counter("payroute_attempts", "Channel attempts by outcome", ["channel", "outcome"], registry=r)
        self.attempt_latency = Histogram(
            "payroute_attempt_duration_seconds", "Channel attempt latency (retries included)", ["channel"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.breaker_state = Gauge(
            "payroute_breaker_state", "Breaker state by channel: 0 closed, 1 half-open, 2 open", ["channel"], registry=r
        )
        self.retries = Counter("payroute_retries", "Retries of requests that never reached the channel", ["channel"], registry=r)
        self.failovers = Counter("payroute_failovers", "Fail-overs away from a channel", ["channel", "reason"], registry=r)
        self.operations = Counter(
            "payroute_operations", "Captures, voids and refunds by result", ["channel", "kind", "result"], registry=r
        )
        self.integration_errors = Counter(
            "payroute_integration_errors", "Impossible answers from a channel (alert on any)", ["channel"], registry=r
        )
        self.compliance_blocks = Counter("payroute_compliance_blocks", "Payments refused by a compliance rule", ["rule"], registry=r)
        self.callbacks = Counter("payroute_callbacks", "Inbound channel callbacks by result", ["channel", "result"], registry=r)
        self.recoveries = Counter(
            "payroute_recoveries", "Payments the janitor settled, by from/to status", ["from_status", "to_status"], registry=r
        )
        self.manual_reviews = Counter("payroute_manual_reviews", "Payments moved to manual review (alert on any)", registry=r)
        from router.webhooks import WebhookMetrics

        self.webhooks = WebhookMetrics(r)
        self.idempotent_replays = Counter("payroute_idempotent_replays", "Responses replayed for a reused Idempotency-Key", registry=r)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: the hot path skips prometheus_client's per-call validation,
        lock and tuple building. The client itself returns the same child for the same labels (we
        never remove label sets), so the cache changes nothing but the cost."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = metric.labels(*labels)
            if len(self._children) < _CHILDREN_MAX:
                self._children[key] = c
        return c
