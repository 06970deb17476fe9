"""The relay's Prometheus metrics, kept in a registry of their own.

Each `RelayApp` owns one `RelayMetrics`, so several relays in one process (the
tests) never share a counter. The admin server renders `registry` at /metrics.

    epp_mail_relay_messages_accepted_total     stored in the spool, answered 250
    epp_mail_relay_messages_delivered_total    upstream took it for >= 1 recipient
    epp_mail_relay_messages_deferred_total     put back on the retry schedule
    epp_mail_relay_messages_failed_total       ended FAILED (refused, or gave up)
    epp_mail_relay_errors_total{category}      every recorded failure
    epp_mail_relay_queue_messages{state}       spool depth, refreshed per scrape
    epp_mail_relay_queue_held                  1 while auth/config trouble holds it
    epp_mail_relay_upstream_duration_seconds{step}
                                               open: connect, TLS and AUTH;
                                               send: MAIL FROM to the final reply
    epp_mail_relay_oauth_token_expires_in_seconds
                                               only while an OAuth token is known

The counters describe store-and-forward delivery; in pass-through mode only
errors are counted, because the client sees the upstream's verdict itself.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.config import MailSettings
from relay.errors import Category, RelayError

if TYPE_CHECKING:
    from relay.delivery import ErrorRecorder

PREFIX: Final = "epp_mail_relay"
QUEUE_STATES: Final = ("queued", "sending", "deferred", "held", "failed")
UPSTREAM_STEPS: Final = ("open", "send")
# Exchange Online answers in tens of milliseconds to tens of seconds; the top
# buckets catch a DATA reply that waits on a slow content filter.
UPSTREAM_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

TokenExpirySource = Callable[[], float | None]

# The *_created series (one per counter, its creation time) only double what a
# scrape shows; the switch is process-wide, and the daemon is this module's user.
# (prometheus-client leaves this one function without a return annotation.)
disable_created_metrics()  # type: ignore[no-untyped-call]


class RelayMetrics:
    """The metric objects of one relay, and the small helpers that update them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages_accepted = Counter(
            f"{PREFIX}_messages_accepted",
            "Messages stored in the spool and answered 250.",
            registry=self.registry,
        )
        self.messages_delivered = Counter(
            f"{PREFIX}_messages_delivered",
            "Messages the upstream server accepted for at least one recipient.",
            registry=self.registry,
        )
        self.messages_deferred = Counter(
            f"{PREFIX}_messages_deferred",
            "Delivery attempts that put a message back on the retry schedule.",
            registry=self.registry,
        )
        self.messages_failed = Counter(
            f"{PREFIX}_messages_failed",
            "Messages that ended failed: refused for good, or retried too long.",
            registry=self.registry,
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Failures recorded for the administrator, by category.",
            ["category"],
            registry=self.registry,
        )
        self.queue_messages = Gauge(
            f"{PREFIX}_queue_messages",
            "Messages in the spool, by state.",
            ["state"],
            registry=self.registry,
        )
        self.queue_held = Gauge(
            f"{PREFIX}_queue_held",
            "1 while an authentication or configuration error holds the queue.",
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            f"{PREFIX}_upstream_duration_seconds",
            "Seconds waiting on the upstream server, per step of a session.",
            ["step"],
            buckets=UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self._upstream_steps: dict[str, Histogram] = {}
        self._token_expiry = _TokenExpiryCollector()
        self.registry.register(self._token_expiry)

        # Present from the first scrape, so that rate() and alerts see a zero.
        for category in Category:
            self.errors.labels(category=str(category))
        for state in QUEUE_STATES:
            self.queue_messages.labels(state=state)
        for step in UPSTREAM_STEPS:
            self.upstream_duration.labels(step=step)

    def set_queue_depth(self, counts: Mapping[str, int], *, held: bool) -> None:
        """Replace the queue gauges with fresh counts from the spool."""
        for state in QUEUE_STATES:
            self.queue_messages.labels(state=state).set(counts.get(state, 0))
        self.queue_held.set(1 if held else 0)

    @contextlib.contextmanager
    def time_upstream(self, step: str) -> Iterator[None]:
        """Observe how long the block waited on the upstream, failures included."""
        histogram = self._upstream_steps.get(step)
        if histogram is None:
            # The labelled child, looked up once per step rather than per message.
            histogram = self._upstream_steps[step] = self.upstream_duration.labels(
                step=step
            )
        started = time.monotonic()
        try:
            yield
        finally:
            histogram.observe(time.monotonic() - started)

    def watch_token_expiry(self, expires_at: TokenExpirySource | None) -> None:
        """Report the OAuth access token's remaining life from `expires_at()`.

        `expires_at` returns the expiry as a Unix time, or None while no token is
        held; then the gauge is left out of the scrape rather than shown as zero.
        """
        self._token_expiry.source = expires_at

    def counting_errors(self, recorder: ErrorRecorder) -> ErrorRecorder:
        """Wrap an error recorder so that each recorded failure is also counted."""
        return _CountingRecorder(recorder, self.errors)


class _CountingRecorder:
    """An ErrorRecorder that counts by category, then passes the error on."""

    def __init__(self, recorder: ErrorRecorder, errors: Counter) -> None:
        self._recorder = recorder
        self._errors = errors

    def record_error(
        self,
        error: RelayError,
        *,
        settings: MailSettings,
        queue_id: str | None = None,
        recipient: str | None = None,
    ) -> bool:
        # Counted before recording: a repeat the log de-duplicates still counts.
        self._errors.labels(category=str(error.category)).inc()
        return self._recorder.record_error(
            error, settings=settings, queue_id=queue_id, recipient=recipient
        )


class _TokenExpiryCollector(Collector):
    """Seconds until the OAuth access token expires, computed at scrape time."""

    _NAME: Final = f"{PREFIX}_oauth_token_expires_in_seconds"
    _HELP: Final = "Seconds until the OAuth access token expires (negative: expired)."

    def __init__(self) -> None:
        self.source: TokenExpirySource | None = None

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self._NAME, self._HELP)]

    def collect(self) -> Iterable[Metric]:
        expires_at = self.source() if self.source is not None else None
        if expires_at is None or math.isnan(expires_at):
            return []
        return [
            GaugeMetricFamily(self._NAME, self._HELP, value=expires_at - time.time())
        ]
