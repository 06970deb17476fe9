"""Prometheus metrics: counters that match the traffic, scraped over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.errors import SmtpReplyError, Stage
from relay.metrics import PREFIX, RelayMetrics
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.entra import SandboxEntra
from relay.sandbox.exchange import SandboxExchange
from tests.conftest import (
    MAILBOX,
    RelayFactory,
    RunningRelay,
    basic_settings,
    send_mail_async,
)
from tests.test_oauth_relay import (
    CLIENT_SECRET,
    REDIRECT_URI,
    oauth_overrides,
    oauth_settings,
    sign_in,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(relay: RunningRelay) -> Samples:
    """GET /metrics from the relay's admin server, parsed the way Prometheus would."""
    assert relay.app.admin is not None
    url = f"http://127.0.0.1:{relay.app.admin.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        text = await response.text()
    return parse(text)


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((f"{PREFIX}_{name}", tuple(sorted(labels.items()))), 0.0)


async def scrape_until(
    relay: RunningRelay, name: str, expected: float, **labels: str
) -> Samples:
    """Scrape until `name` reaches `expected`: counters move just after the reply."""
    deadline = time.monotonic() + 15
    samples = await scrape(relay)
    while value(samples, name, **labels) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        samples = await scrape(relay)
    return samples


async def test_metrics_count_accepted_and_delivered_messages(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    for _ in range(3):
        await send_mail_async(relay.port)
    await exchange.wait_for_messages(3, timeout=15)

    samples = await scrape_until(relay, "messages_delivered_total", 3)
    assert (
        value(samples, "messages_accepted_total"),
        value(samples, "messages_delivered_total"),
        value(samples, "messages_deferred_total"),
        value(samples, "messages_failed_total"),
        value(samples, "upstream_duration_seconds_count", step="send"),
    ) == (3.0, 3.0, 0.0, 0.0, 3.0)


async def test_metrics_count_deferrals_failures_and_errors_by_category(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    exchange.inject(
        "rcpt", "550 5.1.1 User unknown", match="nobody@contoso.test", times=1
    )
    exchange.inject("data", "451 4.3.0 Try again later", times=1)
    await send_mail_async(relay.port, recipients=["nobody@contoso.test"])
    await send_mail_async(relay.port)
    await exchange.wait_for_messages(1, timeout=15)

    samples = await scrape_until(relay, "messages_delivered_total", 1)
    assert (
        value(samples, "messages_accepted_total"),
        value(samples, "messages_delivered_total"),
        value(samples, "messages_deferred_total"),
        value(samples, "messages_failed_total"),
        value(samples, "errors_total", category="smtp"),
        value(samples, "errors_total", category="dns"),
    ) == (2.0, 1.0, 1.0, 1.0, 2.0, 0.0)


async def test_metrics_queue_depth_by_state(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    await exchange.stop()  # nothing can leave: the messages wait
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"retry": {"initial_delay": 60.0, "max_delay": 60.0}},
    )
    await send_mail_async(relay.port)
    samples = await scrape_until(relay, "queue_messages", 1, state="deferred")
    # The first failure pauses the queue: the second message waits, queued,
    # instead of knocking on a server that is known to be down.
    await send_mail_async(relay.port)

    samples = await scrape_until(relay, "queue_messages", 1, state="queued")
    assert (
        value(samples, "queue_messages", state="deferred"),
        value(samples, "queue_messages", state="queued"),
        value(samples, "queue_held"),
        value(samples, "errors_total", category="connection"),
    ) == (1.0, 1.0, 0.0, 1.0)


async def test_metrics_upstream_latency_is_a_histogram(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.delay("data", 0.3)
    relay = await start_relay(basic_settings(exchange.port))
    await send_mail_async(relay.port)

    samples = await scrape_until(
        relay, "upstream_duration_seconds_count", 1, step="send"
    )
    assert (
        value(samples, "upstream_duration_seconds_bucket", step="send", le="0.25"),
        value(samples, "upstream_duration_seconds_bucket", step="send", le="0.5"),
    ) == (0.0, 1.0)


@pytest.fixture
async def sandbox_entra(pki: SandboxPKI) -> AsyncIterator[SandboxEntra]:
    server = SandboxEntra(
        server_ssl_context=pki.server_context(),
        client_secret=CLIENT_SECRET,
        redirect_uris=(REDIRECT_URI,),
        mailbox=MAILBOX,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_metrics_token_expiry_after_an_oauth_sign_in(
    sandbox_entra: SandboxEntra, pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    validator = sandbox_entra.validate_access_token
    async with SandboxExchange(pki=pki, token_validator=validator) as exchange:
        relay = await start_relay(
            oauth_settings(exchange, sandbox_entra),
            overrides=oauth_overrides(sandbox_entra, pki),
        )
        await sign_in(relay, pki)
        await send_mail_async(relay.port)
        await exchange.wait_for_messages(1, timeout=15)
        remaining = value(await scrape(relay), "oauth_token_expires_in_seconds")

    lifetime = sandbox_entra.access_token_lifetime
    assert lifetime - 60 < remaining <= lifetime


async def test_metrics_token_expiry_is_absent_with_basic_auth(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    samples = await scrape(relay)
    assert ("epp_mail_relay_oauth_token_expires_in_seconds", ()) not in samples


def test_metrics_token_expiry_gauge_follows_the_hook() -> None:
    metrics = RelayMetrics()
    metrics.watch_token_expiry(lambda: time.time() + 3600)
    samples = parse(generate_latest(metrics.registry).decode())
    remaining = value(samples, "oauth_token_expires_in_seconds")
    assert 3590 < remaining <= 3600


def test_metrics_token_expiry_gauge_is_absent_without_a_token() -> None:
    metrics = RelayMetrics()
    metrics.watch_token_expiry(lambda: None)
    text = generate_latest(metrics.registry).decode()
    assert f"{PREFIX}_oauth_token_expires_in_seconds " not in text


def test_metrics_registries_are_separate_per_relay() -> None:
    first, second = RelayMetrics(), RelayMetrics()
    first.messages_accepted.inc()
    assert second.messages_accepted._value.get() == 0.0


def test_metrics_counting_recorder_counts_then_records() -> None:
    recorded: list[str] = []

    class Recorder:
        def record_error(self, error: object, **context: object) -> bool:
            recorded.append(str(error))
            return True

    metrics = RelayMetrics()
    recorder = metrics.counting_errors(Recorder())
    error = SmtpReplyError(535, "5.7.3 Authentication unsuccessful", stage=Stage.AUTH)
    recorder.record_error(error, settings=basic_settings(587))
    counted = metrics.errors.labels(category="smtp")._value.get()
    assert (counted, len(recorded)) == (1.0, 1)
