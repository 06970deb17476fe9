"""Forwarding over verified TLS with AUTH, and every failure induced for real.

Each error category here comes from a real fault of the sandbox Exchange, and
lands in both the log file and the Mail Server Logs table.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import Any

import aiosmtplib
import pytest

from relay.config import TimeoutsConfig
from relay.errors import RelayError, Stage, UpstreamConnectionError
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.exchange import SandboxExchange
from relay.upstream import translate_exception
from tests.conftest import (
    MAILBOX,
    PASSWORD,
    RelayFactory,
    RunningRelay,
    basic_settings,
    send_mail_async,
    strip_received,
    wait_for,
)


async def test_upstream_smtplib_message_arrives_byte_for_byte(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    body = (
        b"From: relay@contoso.test\r\nTo: ops@contoso.test\r\nSubject: disk\r\n"
        b"Message-ID: <m1@legacy.local>\r\n\r\nline one\r\n.leading dot\r\n\r\nend\r\n"
    )
    await send_mail_async(relay.port, body=body)
    await exchange.wait_for_messages(1, timeout=15)
    assert strip_received(exchange.messages[0].data) == body


async def test_upstream_uses_starttls_and_auth(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    await send_mail_async(relay.port)
    await exchange.wait_for_messages(1, timeout=15)
    received = exchange.messages[0]
    assert (received.auth_user, received.tls_version in ("TLSv1.2", "TLSv1.3")) == (
        MAILBOX,
        True,
    )


@pytest.mark.skipif(
    shutil.which("swaks") is None and not os.environ.get("EPP_REQUIRE_SWAKS"),
    reason="swaks is not installed (CI installs it)",
)
async def test_upstream_swaks_message_arrives_intact(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    # swaks ends what --data gives it with its own CRLF.
    body = "Subject: from swaks\r\nX-Probe: 1\r\n\r\nswaks body line"
    completed = await asyncio.to_thread(
        subprocess.run,
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(relay.port),
            "--from",
            MAILBOX,
            "--to",
            "ops@contoso.test",
            "--data",
            body,
            "--silent",
            "2",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    await exchange.wait_for_messages(1, timeout=15)
    assert strip_received(exchange.messages[0].data) == body.encode() + b"\r\n"


async def test_upstream_8bit_utf8_message_keeps_its_bytes(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    body = "Subject: état ✓\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÜnïcödé – 42 °C\r\n".encode()
    await send_mail_async(
        relay.port,
        recipients=["équipe@contoso.test"],
        body=body,
        mail_options=["SMTPUTF8", "BODY=8BITMIME"],
    )
    await exchange.wait_for_messages(1, timeout=15)
    received = exchange.messages[0]
    assert (
        strip_received(received.data),
        received.rcpt_tos,
        "SMTPUTF8" in received.mail_options,
    ) == (
        body,
        ["équipe@contoso.test"],
        True,
    )


async def test_upstream_null_sender_is_forwarded_as_null(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    await send_mail_async(relay.port, mail_from="")
    await exchange.wait_for_messages(1, timeout=15)
    assert exchange.messages[0].mail_from == ""


async def test_upstream_30_megabyte_message_arrives_intact(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    message = EmailMessage()
    message["From"] = MAILBOX
    message["To"] = "ops@contoso.test"
    message["Subject"] = "big attachment"
    message.set_content("see attachment")
    message.add_attachment(
        os.urandom(22 * 1024 * 1024),
        maintype="application",
        subtype="octet-stream",
        filename="dump.bin",
    )
    body = message.as_bytes(policy=SMTP_POLICY)
    assert len(body) > 30 * 1024 * 1024
    await send_mail_async(relay.port, body=body)
    await exchange.wait_for_messages(1, timeout=60)
    assert strip_received(exchange.messages[0].data) == body


# --- every failure category, induced for real ---------------------------------


async def _failure_row(relay: RunningRelay, category: str) -> dict[str, Any]:
    await wait_for(
        lambda: any(r["category"] == category for r in relay.rows()), timeout=20
    )
    return next(r for r in relay.rows() if r["category"] == category)


def _logged(relay: RunningRelay, row: dict[str, Any]) -> bool:
    return any(
        line.get("log_message") == row["log_message"]
        and line.get("category") == row["category"]
        for line in relay.log_lines()
    )


async def test_upstream_unresolvable_host_is_a_dns_error(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port, hostname="smtp.contoso.invalid")
    )
    await send_mail_async(relay.port)
    row = await _failure_row(relay, "dns")
    assert (row["log_message"], _logged(relay, row)) == (
        "Could not resolve hostname smtp.contoso.invalid",
        True,
    )


async def test_upstream_server_that_never_greets_is_a_timeout(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.silent_at("greeting")
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"timeouts": {"connect": 1.0}}
    )
    await send_mail_async(relay.port)
    row = await _failure_row(relay, "timeout")
    assert (row["log_message"], _logged(relay, row)) == (
        f"Connection timed out after 1 seconds while connecting to localhost:{exchange.port}",
        True,
    )


@pytest.mark.parametrize(
    ("certificate", "expected"),
    [
        ("untrusted", "TLS handshake failed - peer certificate validation error"),
        (
            "wrong_host",
            "TLS handshake failed - peer certificate validation error: "
            "the certificate is not valid for localhost",
        ),
    ],
)
async def test_upstream_bad_certificate_is_a_tls_error(
    pki: SandboxPKI, start_relay: RelayFactory, certificate: str, expected: str
) -> None:
    async with SandboxExchange(
        pki=pki, users={MAILBOX: PASSWORD}, certificate=certificate
    ) as server:
        relay = await start_relay(basic_settings(server.port))
        await send_mail_async(relay.port)
        row = await _failure_row(relay, "tls")
        sent_password = PASSWORD.encode() in server.plaintext_received
    assert (row["log_message"], _logged(relay, row), sent_password) == (
        expected,
        True,
        False,
    )


async def test_upstream_missing_starttls_is_a_tls_error_without_fallback(
    pki: SandboxPKI, start_relay: RelayFactory
) -> None:
    async with SandboxExchange(
        pki=pki, users={MAILBOX: PASSWORD}, offer_starttls=False
    ) as server:
        relay = await start_relay(basic_settings(server.port))
        await send_mail_async(relay.port)
        row = await _failure_row(relay, "tls")
        plaintext = server.plaintext_received
    assert (
        row["log_message"].startswith("STARTTLS is not offered"),
        b"AUTH" in plaintext,
    ) == (
        True,
        False,
    )


@pytest.mark.parametrize(
    ("stage", "reply", "code"),
    [
        ("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]", "535 5.7.3"),
        ("rcpt", "550 5.1.1 User unknown; RecipientNotFound", "550 5.1.1"),
        (
            "mail",
            "421 4.3.2 Service not available, closing transmission channel",
            "421 4.3.2",
        ),
        (
            "data",
            "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
            "554 5.2.0",
        ),
    ],
)
async def test_upstream_reply_is_an_smtp_error_with_its_codes(
    exchange: SandboxExchange,
    start_relay: RelayFactory,
    stage: str,
    reply: str,
    code: str,
) -> None:
    exchange.inject(stage, reply)
    relay = await start_relay(basic_settings(exchange.port))
    await send_mail_async(relay.port)
    row = await _failure_row(relay, "smtp")
    assert (row["code"], row["log_message"].startswith(reply), _logged(relay, row)) == (
        code,
        True,
        True,
    )


def test_upstream_translate_exception_covers_every_aiosmtplib_error() -> None:
    timeouts = TimeoutsConfig()
    settings = basic_settings(587)
    samples: list[BaseException] = []
    for name in (
        aiosmtplib.errors.__all__
        if hasattr(aiosmtplib.errors, "__all__")
        else dir(aiosmtplib.errors)
    ):
        cls = getattr(aiosmtplib.errors, name)
        if not (isinstance(cls, type) and issubclass(cls, aiosmtplib.SMTPException)):
            continue
        if issubclass(cls, aiosmtplib.SMTPRecipientsRefused):
            samples.append(cls([]))
        elif issubclass(
            cls, aiosmtplib.SMTPSenderRefused | aiosmtplib.SMTPRecipientRefused
        ):
            samples.append(cls(550, "5.0.0 no", "x@y.test"))
        elif issubclass(cls, aiosmtplib.SMTPResponseException):
            samples.append(cls(550, "5.0.0 no"))
        else:
            samples.append(cls("failure"))
    translated = [
        translate_exception(
            sample, stage=Stage.MAIL, settings=settings, timeouts=timeouts
        )
        for sample in samples
    ]
    unexpected = [
        type(sample).__name__
        for sample, error in zip(samples, translated, strict=True)
        if not isinstance(error, RelayError)
        or (
            type(error) is UpstreamConnectionError
            and error.message.startswith("Unexpected")
        )
    ]
    assert (len(samples) >= 10, unexpected) == (True, [])
