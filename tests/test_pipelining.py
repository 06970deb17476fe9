"""Upstream PIPELINING (RFC 2920): MAIL, RCPT and DATA go out as one group.

Every test talks to the sandbox Exchange over STARTTLS with real AUTH; the
sandbox counts the commands that were already waiting when the command before
them was read, which a client that waits for each reply can never cause.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiosmtplib
import pytest

from relay.config import TimeoutsConfig, TlsConfig
from relay.errors import SmtpReplyError, Stage
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.exchange import SandboxExchange
from relay.upstream import (
    DeliveryResult,
    UpstreamSession,
    _complete_replies,
    build_tls_context,
)
from tests.conftest import MAILBOX, PASSWORD, basic_settings

TIMEOUTS = TimeoutsConfig(connect=5.0, command=5.0, data=30.0)
SessionFactory = Callable[..., Awaitable[tuple[UpstreamSession, SandboxExchange]]]
BODY = b"Subject: pipelined\r\n\r\n.a leading dot\r\nend\r\n"


async def _exchange(pki: SandboxPKI, **options: Any) -> SandboxExchange:
    server = SandboxExchange(pki=pki, users={MAILBOX: PASSWORD}, **options)
    await server.start()
    return server


@pytest.fixture
async def session_for(pki: SandboxPKI) -> AsyncIterator[SessionFactory]:
    opened: list[tuple[UpstreamSession, SandboxExchange]] = []

    async def open_session(
        **options: Any,
    ) -> tuple[UpstreamSession, SandboxExchange]:
        server = await _exchange(pki, **options)
        session = UpstreamSession(
            settings=basic_settings(server.port),
            timeouts=TIMEOUTS,
            tls_context=build_tls_context(TlsConfig(ca_file=pki.ca_file)),
            local_hostname="relay.test",
        )
        opened.append((session, server))
        await session.open()
        return session, server

    yield open_session
    for session, server in opened:
        await session.close()
        await server.stop()


async def _send(session: UpstreamSession, recipients: list[str]) -> DeliveryResult:
    return await session.send(
        mail_from="alerts@contoso.test",
        recipients=recipients,
        body=BODY,
        smtputf8=False,
        body_8bit=False,
    )


async def test_pipelining_sends_mail_rcpt_and_data_as_one_group(
    session_for: SessionFactory,
) -> None:
    session, server = await session_for()
    recipients = ["a@contoso.test", "b@contoso.test", "c@contoso.test"]

    result = await _send(session, recipients)

    assert (
        session.pipelining,
        result.accepted,
        server.messages[0].data,
        # RCPT x 3 and DATA each waited behind MAIL.
        server.sessions[0].pipelined_commands,
    ) == (True, tuple(recipients), BODY, 4)


async def test_pipelining_is_not_used_when_the_server_does_not_offer_it(
    session_for: SessionFactory,
) -> None:
    session, server = await session_for(offer_pipelining=False)

    result = await _send(session, ["a@contoso.test", "b@contoso.test"])

    assert (
        session.pipelining,
        result.accepted,
        server.messages[0].data,
        server.sessions[0].pipelined_commands,
    ) == (False, ("a@contoso.test", "b@contoso.test"), BODY, 0)


async def test_pipelining_refused_recipient_is_sorted_out_of_its_group(
    session_for: SessionFactory,
) -> None:
    session, server = await session_for()
    server.inject("rcpt", "550 5.1.1 User unknown", match="gone@contoso.test")

    result = await _send(session, ["a@contoso.test", "gone@contoso.test"])
    again = await _send(session, ["b@contoso.test"])

    assert (
        result.accepted,
        list(result.refused),
        again.accepted,
        [message.rcpt_tos for message in server.messages],
        len(server.sessions),
    ) == (
        ("a@contoso.test",),
        ["gone@contoso.test"],
        ("b@contoso.test",),
        [["a@contoso.test"], ["b@contoso.test"]],
        1,
    )


async def test_pipelining_refused_sender_drains_the_group_and_keeps_the_session(
    session_for: SessionFactory,
) -> None:
    session, server = await session_for()
    server.inject("mail", "550 5.7.60 SMTP; Client does not have permissions", times=1)

    with pytest.raises(SmtpReplyError) as refused:
        await _send(session, ["a@contoso.test"])
    usable_after = session.usable
    again = await _send(session, ["a@contoso.test"])

    assert (
        refused.value.stage,
        refused.value.reply_code,
        usable_after,
        again.accepted,
        len(server.messages),
        len(server.sessions),
    ) == (Stage.MAIL, 550, True, ("a@contoso.test",), 1, 1)


async def test_pipelining_data_taken_without_recipients_ends_with_an_empty_message(
    session_for: SessionFactory,
) -> None:
    # RFC 2920 section 3.1: a server may answer the group's DATA with 354 even
    # though it refused every RCPT; the client must then end it with "." alone.
    session, server = await session_for(accept_data_without_recipients=True)
    server.inject("rcpt", "550 5.1.1 User unknown", times=1)

    result = await _send(session, ["gone@contoso.test"])
    usable_after = session.usable
    again = await _send(session, ["a@contoso.test"])

    assert (
        result.accepted,
        list(result.refused),
        usable_after,
        again.accepted,
        [message.data for message in server.messages],
    ) == ((), ["gone@contoso.test"], True, ("a@contoso.test",), [BODY])


async def test_pipelining_too_many_recipients_go_in_the_next_transaction(
    session_for: SessionFactory,
) -> None:
    session, server = await session_for(max_recipients_per_message=2)
    recipients = [f"user{n}@contoso.test" for n in range(5)]

    first = await _send(session, recipients)

    assert (
        first.accepted,
        first.unsent,
        server.messages[0].rcpt_tos,
    ) == (tuple(recipients[:2]), tuple(recipients[2:]), recipients[:2])


def test_pipelining_reply_parser_takes_complete_replies_only() -> None:
    buffer = bytearray(
        b"250 2.1.0 Sender OK\r\n"
        b"250-first line\r\n250 2.1.5 second line\r\n"
        b"354 Start mail input\r\n"
        b"250-partial"
    )

    replies = _complete_replies(buffer)

    assert (replies, bytes(buffer)) == (
        [
            aiosmtplib.SMTPResponse(250, "2.1.0 Sender OK"),
            aiosmtplib.SMTPResponse(250, "first line\n2.1.5 second line"),
            aiosmtplib.SMTPResponse(354, "Start mail input"),
        ],
        b"250-partial",
    )


@pytest.mark.parametrize("line", [b"hello there\r\n", b"25\r\n", b"250x nope\r\n"])
def test_pipelining_reply_parser_refuses_a_malformed_line(line: bytes) -> None:
    with pytest.raises(aiosmtplib.SMTPResponseException, match="Malformed"):
        _complete_replies(bytearray(line))


async def test_pipelining_abandoned_group_after_354_delivers_no_empty_message(
    session_for: SessionFactory,
) -> None:
    # a@ is taken, b@ is throttled: the server still answers DATA 354 for a@,
    # and ending that with a lone "." would deliver an empty message to a@.
    session, server = await session_for()
    server.inject(
        "rcpt",
        "451 4.7.500 Server busy. Please try again later",
        match="b@contoso.test",
        times=1,
    )

    with pytest.raises(SmtpReplyError) as throttled:
        await _send(session, ["a@contoso.test", "b@contoso.test"])
    usable_after = session.usable

    assert (
        throttled.value.stage,
        throttled.value.reply_code,
        usable_after,
        server.messages,
    ) == (Stage.RCPT, 451, False, [])


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_pipelining_421_at_rcpt_is_the_servers_reply_not_a_lost_connection(
    session_for: SessionFactory, pipelining: bool
) -> None:
    session, server = await session_for(offer_pipelining=pipelining)
    server.inject("rcpt", "421 4.3.2 Service not available")

    with pytest.raises(SmtpReplyError) as closing:
        await _send(session, ["a@contoso.test"])

    assert (closing.value.stage, closing.value.reply_code, server.messages) == (
        Stage.RCPT,
        421,
        [],
    )
