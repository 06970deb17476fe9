"""Retry, hold and partial delivery, against the sandbox Exchange on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.delivery import retry_delay
from relay.sandbox.exchange import SandboxExchange
from tests.conftest import (
    RelayFactory,
    basic_settings,
    open_data,
    send_mail_async,
    wait_for,
)


def test_delivery_retry_delay_doubles_up_to_the_cap() -> None:
    delays = [
        retry_delay(attempt, initial=60, multiplier=2, maximum=3600, jitter=0)
        for attempt in range(1, 9)
    ]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600]


def test_delivery_retry_delay_jitter_stays_within_its_fraction() -> None:
    delays = [
        retry_delay(3, initial=60, multiplier=2, maximum=3600, jitter=0.2)
        for _ in range(200)
    ]
    assert min(delays) >= 240 * 0.8 and max(delays) <= 240 * 1.2


async def test_delivery_partial_refusal_delivers_the_others_and_names_the_refused(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.inject(
        "rcpt", "550 5.1.1 User unknown; RecipientNotFound", match="gone@contoso.test"
    )
    relay = await start_relay(basic_settings(exchange.port))
    await send_mail_async(
        relay.port,
        recipients=["ops@contoso.test", "gone@contoso.test", "dev@contoso.test"],
    )
    await exchange.wait_for_messages(1, timeout=15)
    await wait_for(lambda: len(relay.rows()) == 1)
    row = relay.rows()[0]
    assert (exchange.messages[0].rcpt_tos, row["recipient"], row["code"]) == (
        ["ops@contoso.test", "dev@contoso.test"],
        "gone@contoso.test",
        "550 5.1.1",
    )


async def test_delivery_auth_error_holds_the_queue_with_bounded_rows(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    relay = await start_relay(basic_settings(exchange.port))
    for _ in range(5):
        await send_mail_async(relay.port)
    await wait_for(lambda: relay.app.delivery.held)
    await asyncio.sleep(2.0)  # many retry periods of this configuration
    counts = await relay.app.spool.counts_by_state()
    assert (
        len(relay.rows()),
        exchange.messages,
        exchange.auth_failures <= 3,
        sum(counts.values()),
        counts.get("failed", 0),
    ) == (1, [], True, 5, 0)


async def test_delivery_resumes_after_the_settings_are_fixed(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port, password="wrong-password"))
    for _ in range(3):
        await send_mail_async(relay.port)
    await wait_for(lambda: relay.app.delivery.held)
    relay.app.settings.save(basic_settings(exchange.port))
    await exchange.wait_for_messages(3, timeout=20)
    assert len(exchange.messages) == 3


async def test_delivery_outage_then_recovery_delivers_everything(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    await exchange.stop()
    for number in range(6):
        await send_mail_async(
            relay.port, body=f"Subject: n{number}\r\n\r\nx\r\n".encode()
        )
    await wait_for(lambda: any(r["category"] == "connection" for r in relay.rows()))
    await exchange.start()
    await exchange.wait_for_messages(6, timeout=30)
    subjects = sorted(m.data.split(b"Subject: ")[1][:2] for m in exchange.messages)
    assert subjects == [f"n{n}".encode() for n in range(6)]


async def test_delivery_421_defers_and_then_delivers(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.inject(
        "mail", "421 4.3.2 Service not available, closing transmission channel", times=2
    )
    relay = await start_relay(basic_settings(exchange.port))
    await send_mail_async(relay.port)
    await exchange.wait_for_messages(1, timeout=20)
    assert [r["code"] for r in relay.rows()] == ["421 4.3.2"]


async def test_delivery_reuses_one_connection_for_many_messages(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"delivery": {"concurrency": 1}}
    )
    for _ in range(5):
        await send_mail_async(relay.port)
    await exchange.wait_for_messages(5, timeout=20)
    assert exchange.sessions_authenticated == 1


async def test_delivery_native_mode_passes_the_upstream_refusal_through_once(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.inject("rcpt", "550 5.1.1 User unknown; RecipientNotFound")
    relay = await start_relay(basic_settings(exchange.port, email_type="native"))
    code, reply = await send_mail_async(relay.port)
    assert (code, reply) == (550, b"5.1.1 User unknown; RecipientNotFound")


async def test_delivery_native_mode_answers_451_while_the_upstream_is_down(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port, email_type="native"))
    await exchange.stop()
    code, reply = await send_mail_async(relay.port)
    assert (code, reply[:5]) == (451, b"4.4.0")


async def test_delivery_unreachable_server_is_tried_by_few_not_by_every_message(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.drop_at("greeting")
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"retry": {"initial_delay": 0.5, "max_delay": 0.5, "jitter": 0.0}},
    )
    for number in range(20):
        await send_mail_async(
            relay.port, body=f"Subject: o{number}\r\n\r\nx\r\n".encode()
        )
    await asyncio.sleep(2.0)
    attempts_while_down = exchange.connections_accepted
    exchange.clear_faults()
    await exchange.wait_for_messages(20, timeout=30)
    assert attempts_while_down < 30


async def test_delivery_failure_notice_goes_to_the_administrator_when_configured(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.inject("rcpt", "550 5.1.1 User unknown", match="gone@contoso.test")
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"delivery": {"failure_notice": True}}
    )
    await send_mail_async(
        relay.port,
        recipients=["ops@contoso.test", "gone@contoso.test"],
        body=b"Subject: secret report\r\n\r\nbody text stays private\r\n",
    )
    received = await exchange.wait_for_messages(2, timeout=15)
    notice = next(m for m in received if m.rcpt_tos == ["admin@contoso.test"])
    assert (
        b"gone@contoso.test: 550 5.1.1 User unknown" in notice.data,
        b"body text stays private" in notice.data,
        notice.mail_from,
    ) == (True, False, "relay@contoso.test")


async def test_delivery_failure_notice_is_never_sent_about_a_notice(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.inject("rcpt", "550 5.1.1 User unknown", match="gone@contoso.test")
    exchange.inject("rcpt", "550 5.1.1 User unknown", match="admin@contoso.test")
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"delivery": {"failure_notice": True}}
    )
    await send_mail_async(relay.port, recipients=["gone@contoso.test"])
    await wait_for(lambda: len(relay.rows()) == 2)
    await asyncio.sleep(1.0)
    counts = await relay.app.spool.counts_by_state()
    assert (
        sorted(r["recipient"] for r in relay.rows()),
        counts.get("failed", 0),
        sum(counts.values()),
    ) == (["admin@contoso.test", "gone@contoso.test"], 2, 2)


async def test_delivery_stop_waits_for_outcomes_still_being_committed(
    exchange: SandboxExchange, start_relay: RelayFactory, tmp_path: Path
) -> None:
    # A delivery to every recipient is committed while its worker goes on. Here
    # the test holds the spool's writer, as a slow disk would, from before the
    # upstream's 250 until after the relay was told to stop.
    exchange.delay("data", 0.5, times=1)
    directory = tmp_path / "relay"
    relay = await start_relay(basic_settings(exchange.port), directory=directory)
    await send_mail_async(relay.port)
    await wait_for(lambda: exchange.faults[0].fired == 1, timeout=10)
    writer = relay.app.spool._writer_lock
    await writer.acquire()
    await exchange.wait_for_messages(1, timeout=10)
    stopping = asyncio.create_task(relay.stop())
    await asyncio.sleep(0.3)
    writer.release()
    await stopping
    restarted = await start_relay(basic_settings(exchange.port), directory=directory)
    counts = await restarted.app.spool.counts_by_state()
    assert sum(counts.values()) == 0


async def _delivered_while_clients_send(
    exchange: SandboxExchange, start_relay: RelayFactory, *, give_way: bool
) -> tuple[bool, bool]:
    """Two clients stall in DATA (more than the one worker); a third sends a
    message. Whether it reached the upstream within 0.4 s, and within 5 s."""
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"delivery": {"concurrency": 1, "give_way_to_clients": give_way}},
    )
    stalled = [(await open_data(relay.port))[1] for _ in range(2)]
    await wait_for(lambda: relay.app.inbound.arriving.count == 2, timeout=5)
    await send_mail_async(relay.port)
    await asyncio.sleep(0.4)
    soon = len(exchange.messages) == 1
    await exchange.wait_for_messages(1, timeout=5)
    for writer in stalled:
        writer.close()
    return soon, len(exchange.messages) == 1


async def test_delivery_gives_way_to_clients_sending_but_never_stops(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    outcome = await _delivered_while_clients_send(exchange, start_relay, give_way=True)
    assert outcome == (False, True)


async def test_delivery_without_give_way_delivers_while_clients_send(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    outcome = await _delivered_while_clients_send(exchange, start_relay, give_way=False)
    assert outcome == (True, True)
