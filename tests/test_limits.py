"""Exchange Online's per-mailbox limits, against a sandbox that enforces them.

The sandbox answers a fourth session with 432 4.3.2, a message over its rate with
451 4.7.500, too many recipients with 452 4.5.3 and a foreign sender with 550
5.7.60; these tests prove the relay never provokes the first two and works its way
around the others. Rates are scaled down (a "minute" of a second) to run quickly.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from relay.limits import PaceKeeper
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.exchange import SandboxExchange
from relay.sendas import rewrite_from_header
from relay.spool import MessageState
from tests.conftest import (
    MAILBOX,
    PASSWORD,
    RelayFactory,
    RunningRelay,
    basic_settings,
    send_mail_async,
    wait_for,
)

FOREIGN_SENDER = "noreply@appliance.local"


async def _limited_exchange(pki: SandboxPKI, **limits: Any) -> SandboxExchange:
    server = SandboxExchange(pki=pki, users={MAILBOX: PASSWORD}, **limits)
    await server.start()
    return server


async def _send_many(port: int, count: int) -> None:
    # Clients run in threads of the default executor, which the spool shares:
    # a few at a time, or they would take every thread the spool needs.
    clients = asyncio.Semaphore(3)

    async def send(number: int) -> None:
        async with clients:
            await send_mail_async(
                port, body=f"Subject: n{number}\r\n\r\nx\r\n".encode()
            )

    await asyncio.gather(*(send(number) for number in range(count)))


async def _states(relay: RunningRelay) -> dict[str, int]:
    counts = await relay.app.spool.counts_by_state()
    return {str(state): count for state, count in counts.items() if count}


# --- sessions -------------------------------------------------------------------


async def test_limits_a_fourth_session_never_happens(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    exchange = await _limited_exchange(pki)
    # Slow replies keep every session busy, so the relay is tempted to open more.
    exchange.delay("data", 0.2)
    try:
        relay = await start_relay(
            basic_settings(exchange.port),
            overrides={"delivery": {"concurrency": 8}},
        )
        await _send_many(relay.port, 24)
        await exchange.wait_for_messages(24, timeout=60)
        assert (
            exchange.max_concurrent_sessions_seen[MAILBOX.casefold()],
            exchange.sender_limit_rejections,
            exchange.replies_sent[432],
        ) == (3, 0, 0)
    finally:
        await exchange.stop()


async def test_limits_max_sessions_setting_caps_upstream_sessions(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    exchange = await _limited_exchange(pki)
    exchange.delay("data", 0.2)
    try:
        relay = await start_relay(
            basic_settings(exchange.port), overrides={"limits": {"max_sessions": 2}}
        )
        await _send_many(relay.port, 12)
        await exchange.wait_for_messages(12, timeout=60)
        assert exchange.max_concurrent_sessions_seen[MAILBOX.casefold()] == 2
    finally:
        await exchange.stop()


# --- pacing ---------------------------------------------------------------------


async def test_limits_pacing_spaces_messages_and_avoids_throttling(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    # Exchange's 30 a minute, scaled: 5 per second.
    exchange = await _limited_exchange(pki, messages_per_minute=5, rate_window=1.0)
    try:
        relay = await start_relay(
            basic_settings(exchange.port),
            overrides={"limits": {"messages_per_minute": 5, "rate_period": 1.0}},
        )
        await _send_many(relay.port, 15)
        await exchange.wait_for_messages(15, timeout=60)
        times = sorted(m.received_at.timestamp() for m in exchange.messages)
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        # An even pace: no two messages closer than most of the 0.2 s interval.
        assert (exchange.throttled_count, min(gaps) > 0.15) == (0, True)
    finally:
        await exchange.stop()


async def test_limits_pace_keeper_never_exceeds_the_rate_in_any_window() -> None:
    keeper = PaceKeeper(rate=4, period=0.4)
    starts: list[float] = []

    async def transaction() -> None:
        await keeper.acquire()
        starts.append(time.monotonic())
        await asyncio.sleep(0.05)
        keeper.release()

    await asyncio.gather(*(transaction() for _ in range(12)))
    crowded = [
        start
        for start in starts
        if sum(start <= other < start + 0.4 for other in starts) > 4
    ]
    assert crowded == []


# --- throttling -----------------------------------------------------------------


async def test_limits_throttling_reply_defers_without_counting_an_attempt(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.inject(
        "mail",
        "451 4.7.500 Server busy. Please try again later from [127.0.0.1]. (S77714)",
        times=1,
    )
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"limits": {"throttle_backoff": 1.0}}
    )
    await send_mail_async(relay.port)
    await wait_for(lambda: bool(relay.rows()))
    (message,) = await relay.app.spool.list_messages()
    await exchange.wait_for_messages(1, timeout=15)
    assert (message.state, message.attempts, message.paused_seconds > 0.5) == (
        MessageState.DEFERRED,
        0,
        True,
    )


async def test_limits_432_at_auth_pauses_then_delivers(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.inject(
        "auth", "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", times=1
    )
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"limits": {"throttle_backoff": 0.3}}
    )
    await send_mail_async(relay.port)
    await exchange.wait_for_messages(1, timeout=15)
    assert [row["code"] for row in relay.rows()] == ["432 4.3.2"]


async def test_limits_throttling_does_not_bring_give_up_closer(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    busy = "451 4.7.500 Server busy. Please try again later from [127.0.0.1]."
    exchange.inject("mail", busy, times=2)
    # After 1.5 s of throttle pauses, an ordinary temporary failure: a relay that
    # counted the pauses against the message would give up on it here.
    exchange.inject("mail", "451 4.3.0 Temporary server error", times=1)
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={
            "limits": {"throttle_backoff": 0.5},
            "retry": {"give_up_after": 1.0, "initial_delay": 0.2},
        },
    )
    await send_mail_async(relay.port)
    await exchange.wait_for_messages(1, timeout=20)
    assert not any("Gave up" in row["log_message"] for row in relay.rows())


# --- recipients -----------------------------------------------------------------


async def test_limits_452_too_many_recipients_splits_into_transactions(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    exchange = await _limited_exchange(pki, max_recipients_per_message=3)
    recipients = [f"user{number}@contoso.test" for number in range(8)]
    try:
        relay = await start_relay(basic_settings(exchange.port))
        await send_mail_async(relay.port, recipients=recipients)
        await exchange.wait_for_messages(3, timeout=20)
        await wait_for(lambda: relay.app.delivery.delivered_count == 8)
        assert [m.rcpt_tos for m in exchange.messages] == [
            recipients[0:3],
            recipients[3:6],
            recipients[6:8],
        ]
    finally:
        await exchange.stop()


async def test_limits_split_transactions_follow_each_other_on_one_session(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    exchange = await _limited_exchange(pki, max_recipients_per_message=2)
    try:
        relay = await start_relay(
            basic_settings(exchange.port),
            # Without the split every retry would wait at least this long.
            overrides={"retry": {"initial_delay": 30.0}},
        )
        recipients = [f"user{number}@contoso.test" for number in range(5)]
        started = time.monotonic()
        await send_mail_async(relay.port, recipients=recipients)
        await exchange.wait_for_messages(3, timeout=20)
        elapsed = time.monotonic() - started
        assert ({m.session_id for m in exchange.messages}, elapsed < 10) == (
            {exchange.messages[0].session_id},
            True,
        )
    finally:
        await exchange.stop()


async def test_limits_configured_maximum_splits_before_the_server_refuses(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"limits": {"max_recipients_per_message": 2}},
    )
    recipients = [f"user{number}@contoso.test" for number in range(5)]
    await send_mail_async(relay.port, recipients=recipients)
    await exchange.wait_for_messages(3, timeout=20)
    assert (
        [len(m.rcpt_tos) for m in exchange.messages],
        exchange.replies_sent[452],
    ) == ([2, 2, 1], 0)


async def test_limits_recipient_budget_holds_mail_with_one_row(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"limits": {"daily_recipients": 3}}
    )
    for _ in range(5):
        await send_mail_async(relay.port)
    await exchange.wait_for_messages(3, timeout=15)
    await wait_for(lambda: any(row["category"] == "limit" for row in relay.rows()))
    await asyncio.sleep(1.0)
    states = await _states(relay)
    assert (
        len(exchange.messages),
        [row["category"] for row in relay.rows()],
        sum(states.values()),
        "failed" in states,
    ) == (3, ["limit"], 2, False)


async def test_limits_recipient_budget_survives_a_restart(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    overrides = {"limits": {"daily_recipients": 2}}
    relay = await start_relay(basic_settings(exchange.port), overrides=overrides)
    await send_mail_async(relay.port, recipients=["a@contoso.test", "b@contoso.test"])
    await exchange.wait_for_messages(1, timeout=15)
    await wait_for(lambda: relay.app.delivery.delivered_count == 2)
    await relay.app.stop()

    restarted = await start_relay(
        basic_settings(exchange.port), overrides=overrides, directory=relay.directory
    )
    await send_mail_async(restarted.port)
    await wait_for(lambda: any(row["category"] == "limit" for row in restarted.rows()))
    assert (len(exchange.messages), sum((await _states(restarted)).values())) == (1, 1)


# --- Send As --------------------------------------------------------------------


async def test_limits_foreign_sender_without_send_as_is_refused_5_7_60(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    exchange = await _limited_exchange(pki, enforce_send_as=True)
    try:
        relay = await start_relay(basic_settings(exchange.port))
        await send_mail_async(relay.port, mail_from=FOREIGN_SENDER)
        await wait_for(lambda: bool(relay.rows()))
        assert relay.rows()[0]["code"] == "550 5.7.60"
    finally:
        await exchange.stop()


async def test_limits_send_as_rewrite_avoids_550_5_7_60(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    exchange = await _limited_exchange(pki, enforce_send_as=True)
    try:
        relay = await start_relay(
            basic_settings(exchange.port),
            overrides={"send_as": {"rewrite_sender": True}},
        )
        await send_mail_async(relay.port, mail_from=FOREIGN_SENDER)
        await exchange.wait_for_messages(1, timeout=15)
        assert (exchange.messages[0].mail_from, relay.rows()) == (MAILBOX, [])
    finally:
        await exchange.stop()


async def test_limits_send_as_from_header_keeps_the_original_in_reply_to(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"send_as": {"rewrite_sender": True, "rewrite_from_header": True}},
    )
    body = (
        f"From: Appliance <{FOREIGN_SENDER}>\r\nTo: ops@contoso.test\r\n"
        "Subject: s\r\n\r\nbody\r\n"
    ).encode()
    await send_mail_async(relay.port, mail_from=FOREIGN_SENDER, body=body)
    await exchange.wait_for_messages(1, timeout=15)
    data = exchange.messages[0].data
    assert (
        f"\r\nFrom: Appliance <{MAILBOX}>\r\n".encode() in data,
        f"\r\nReply-To: Appliance <{FOREIGN_SENDER}>\r\n".encode() in data,
    ) == (True, True)


async def test_limits_send_as_keeps_the_null_sender_of_a_bounce(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"send_as": {"rewrite_sender": True}}
    )
    await send_mail_async(relay.port, mail_from="")
    await exchange.wait_for_messages(1, timeout=15)
    assert exchange.messages[0].mail_from == ""


def test_limits_send_as_keeps_a_reply_to_the_service_chose() -> None:
    head = (
        b"From: root@host\r\nReply-To: ops@contoso.test\r\nSender: root@host\r\n"
        b"\r\nbody\r\n"
    )
    assert rewrite_from_header(head, mailbox=MAILBOX) == (
        f"From: {MAILBOX}\r\nReply-To: ops@contoso.test\r\n\r\nbody\r\n".encode()
    )


def test_limits_send_as_leaves_the_mailbox_own_from_alone() -> None:
    head = f"From: Relay\r\n <{MAILBOX.upper()}>\r\n\r\nbody\r\n".encode()
    assert rewrite_from_header(head, mailbox=MAILBOX) == head


async def test_limits_pass_through_splits_recipients_too(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    exchange = await _limited_exchange(pki, max_recipients_per_message=2)
    try:
        relay = await start_relay(basic_settings(exchange.port, email_type="native"))
        recipients = [f"user{number}@contoso.test" for number in range(5)]
        code, _ = await send_mail_async(relay.port, recipients=recipients)
        assert (code, [m.rcpt_tos for m in exchange.messages]) == (
            250,
            [recipients[0:2], recipients[2:4], recipients[4:5]],
        )
    finally:
        await exchange.stop()
