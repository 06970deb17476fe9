"""Downgrades and untrusted servers upstream: credentials never leave without TLS.

Each test points the relay at a sandbox Exchange that misbehaves the way a
stripping attacker or a broken server would. The sandbox records every byte it
received before TLS (`plaintext_received`); no password, nor its base64 forms,
may be among them. Each case leaves one tls row, and the message waits in the
queue (deferred, never failed, never sent).
"""

from __future__ import annotations

import base64
import ssl
from typing import Any

import pytest

from relay.sandbox.certs import SandboxPKI
from relay.sandbox.exchange import SandboxExchange
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


def _password_forms() -> list[bytes]:
    """The password as any AUTH mechanism would put it on the wire."""
    return [
        PASSWORD.encode(),
        base64.b64encode(PASSWORD.encode()),
        base64.b64encode(f"\0{MAILBOX}\0{PASSWORD}".encode()),
        base64.b64encode(f"{MAILBOX}\0{MAILBOX}\0{PASSWORD}".encode()),
        # What any base64 holding the password contains, at each alignment.
        *(
            base64.b64encode(b"\0" * offset + PASSWORD.encode())[
                -(-offset * 8 // 6) : (offset + len(PASSWORD)) * 8 // 6
            ]
            for offset in range(3)
        ),
    ]


async def _attempt(
    relay: RunningRelay, server: SandboxExchange
) -> tuple[dict[str, Any], list[bytes], list[str]]:
    """Send one message; return the tls row, the leaked forms and the states."""
    code, _ = await send_mail_async(relay.port)
    assert code == 250
    await wait_for(
        lambda: any(r["category"] == "tls" for r in relay.rows()), timeout=20
    )
    # A second attempt, so that a fallback on retry would show too.
    await wait_for(
        lambda: (
            next(r for r in relay.rows() if r["category"] == "tls")["repeat_count"] >= 2
        ),
        timeout=20,
    )
    row = next(r for r in relay.rows() if r["category"] == "tls")
    plaintext = server.plaintext_received
    leaked = [form for form in _password_forms() if form in plaintext]
    states = [str(m.state) for m in await relay.app.spool.list_messages()]
    return row, leaked, states


_DEFERRED = [str(MessageState.DEFERRED)]


@pytest.mark.parametrize(
    ("server_options", "expected"),
    [
        (
            {"offer_starttls": False},
            "STARTTLS is not offered by localhost:{port}; credentials are never "
            "sent without TLS",
        ),
        (
            # A server inviting AUTH in the clear.
            {"offer_starttls": False, "allow_auth_before_tls": True},
            "STARTTLS is not offered by localhost:{port}; credentials are never "
            "sent without TLS",
        ),
        (
            {"certificate": "expired"},
            "TLS handshake failed - peer certificate validation error: expired",
        ),
        (
            {"certificate": "untrusted"},
            "TLS handshake failed - peer certificate validation error",
        ),
        (
            {"certificate": "wrong_host"},
            "TLS handshake failed - peer certificate validation error: "
            "the certificate is not valid for localhost",
        ),
    ],
    ids=["no-starttls", "auth-before-tls", "expired", "untrusted", "wrong-host"],
)
async def test_downgrade_server_gets_no_password_and_leaves_a_tls_row(
    pki: SandboxPKI,
    start_relay: RelayFactory,
    server_options: dict[str, Any],
    expected: str,
) -> None:
    async with SandboxExchange(
        pki=pki, users={MAILBOX: PASSWORD}, **server_options
    ) as server:
        relay = await start_relay(basic_settings(server.port))
        row, leaked, states = await _attempt(relay, server)
        auth_commands = [
            line.text
            for line in server.transcript
            if line.direction == "client" and line.text.upper().startswith("AUTH")
        ]
    assert (
        row["log_message"],
        leaked,
        auth_commands,
        states,
        server.messages,
    ) == (expected.format(port=server.port), [], [], _DEFERRED, [])


async def test_downgrade_server_limited_to_tls_1_1_gets_no_password(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    async with SandboxExchange(
        pki=pki,
        users={MAILBOX: PASSWORD},
        tls_maximum_version=ssl.TLSVersion.TLSv1_1,
    ) as server:
        relay = await start_relay(basic_settings(server.port))
        row, leaked, states = await _attempt(relay, server)
        negotiated = {record.tls_version for record in server.sessions}
    assert (
        row["log_message"].startswith("TLS handshake failed - "),
        leaked,
        negotiated,
        states,
    ) == (True, [], {None}, _DEFERRED), row["log_message"]


async def test_downgrade_relay_floor_of_tls_1_3_refuses_a_tls_1_2_server(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    async with SandboxExchange(
        pki=pki,
        users={MAILBOX: PASSWORD},
        tls_maximum_version=ssl.TLSVersion.TLSv1_2,
    ) as server:
        relay = await start_relay(
            basic_settings(server.port),
            overrides={"tls": {"minimum_version": "1.3"}},
        )
        row, leaked, states = await _attempt(relay, server)
    assert (
        row["log_message"].startswith("TLS handshake failed - "),
        leaked,
        states,
    ) == (True, [], _DEFERRED), row["log_message"]


@pytest.mark.parametrize(
    "reply",
    [
        "454 4.7.0 TLS not available due to temporary reason",
        "554 5.7.3 Unable to initialize security subsystem",
    ],
)
async def test_downgrade_refused_starttls_is_a_deferred_tls_failure(
    pki: SandboxPKI, start_relay: RelayFactory, reply: str
) -> None:
    # STARTTLS offered, then refused: what a stripping attacker in the path does.
    async with SandboxExchange(pki=pki, users={MAILBOX: PASSWORD}) as server:
        server.inject("starttls", reply)
        relay = await start_relay(basic_settings(server.port))
        row, leaked, states = await _attempt(relay, server)
    assert (
        row["log_message"],
        leaked,
        states,
        relay.app.delivery.held,
    ) == (
        f"TLS handshake failed - the server refused STARTTLS: {reply}",
        [],
        _DEFERRED,
        False,
    )


async def test_downgrade_implicit_tls_with_untrusted_certificate_is_a_tls_error(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    async with SandboxExchange(
        pki=pki, users={MAILBOX: PASSWORD}, mode="implicit", certificate="untrusted"
    ) as server:
        relay = await start_relay(basic_settings(server.port, encryption="ssl"))
        row, _, states = await _attempt(relay, server)
        authenticated = server.sessions_authenticated
    assert (row["log_message"], authenticated, states) == (
        "TLS handshake failed - peer certificate validation error",
        0,
        _DEFERRED,
    )
