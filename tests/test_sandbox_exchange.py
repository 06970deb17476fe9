"""Tests for the sandbox Exchange, driven by the standard library's smtplib.

The client is deliberately not aiosmtplib: the relay uses that library, and the
sandbox must be proven against an independent SMTP implementation. smtplib blocks,
so every conversation runs in a worker thread through asyncio.to_thread while the
sandbox serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.sandbox.certs import CertificateKind, SandboxPKI
from relay.sandbox.exchange import SandboxExchange

USER = "alice@contoso.test"
PASSWORD = "Sandbox-Password-1"
GOOD_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.sandbox-token"
BOB = "bob@fabrikam.test"
CAROL = "carol@fabrikam.test"
MESSAGE = b"Subject: sandbox\r\n\r\nHello from the test.\r\n"

T = TypeVar("T")


def validate_token(username: str, token: str) -> str | None:
    """Accept GOOD_TOKEN for USER, the way the Entra sandbox will."""
    if username == USER and token == GOOD_TOKEN:
        return None
    return "535 5.7.3 Authentication unsuccessful [SANDBOX]"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPKI:
    return SandboxPKI.create(Path(tmp_path_factory.mktemp("pki")))


@contextlib.asynccontextmanager
async def running_exchange(
    pki: SandboxPKI, **options: Any
) -> AsyncIterator[SandboxExchange]:
    """Run a sandbox with the test account; fail if the sandbox itself broke."""
    options.setdefault("users", {USER: PASSWORD})
    options.setdefault("token_validator", validate_token)
    async with SandboxExchange(pki=pki, **options) as exchange:
        yield exchange
    assert exchange.internal_errors == []


@pytest.fixture
async def exchange(pki: SandboxPKI) -> AsyncIterator[SandboxExchange]:
    async with running_exchange(pki) as running:
        yield running


async def in_thread(scenario: Callable[[], T]) -> T:
    """Run a blocking smtplib conversation without blocking the sandbox."""
    return await asyncio.to_thread(scenario)


def connect(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    *,
    tls: bool = True,
    timeout: float = 5.0,
) -> smtplib.SMTP:
    """Open a session, say EHLO and, by default, upgrade with STARTTLS."""
    host, port = exchange.address
    client = smtplib.SMTP(host, port, local_hostname="client.test", timeout=timeout)
    client.ehlo()
    if tls:
        client.starttls(context=pki.client_trust_context())
        client.ehlo()
    return client


def connect_and_login(exchange: SandboxExchange, pki: SandboxPKI) -> smtplib.SMTP:
    client = connect(exchange, pki)
    client.login(USER, PASSWORD)
    return client


def keywords(client: smtplib.SMTP) -> list[str]:
    """The extension lines of the client's last EHLO reply."""
    assert client.ehlo_resp is not None
    return client.ehlo_resp.decode().splitlines()[1:]


def xoauth2(username: str, token: str) -> str:
    return base64.b64encode(
        f"user={username}\x01auth=Bearer {token}\x01\x01".encode()
    ).decode()


# Certificates.


@pytest.mark.parametrize(
    "kind",
    [CertificateKind.WRONG_HOST, CertificateKind.UNTRUSTED, CertificateKind.EXPIRED],
)
async def test_exchange_bad_certificate_fails_client_verification(
    pki: SandboxPKI, kind: CertificateKind
) -> None:
    async with running_exchange(pki, certificate=kind) as exchange:
        with pytest.raises(ssl.SSLCertVerificationError):
            await in_thread(lambda: connect(exchange, pki))


async def test_exchange_good_certificate_passes_client_verification(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> str | None:
        with connect(exchange, pki) as client:
            client.noop()
        return exchange.sessions[0].tls_version

    assert await in_thread(scenario) in {"TLSv1.2", "TLSv1.3"}


async def test_exchange_tls_1_1_server_fails_default_client(pki: SandboxPKI) -> None:
    async with running_exchange(
        pki, tls_maximum_version=ssl.TLSVersion.TLSv1_1
    ) as exchange:
        with pytest.raises(ssl.SSLError):
            await in_thread(lambda: connect(exchange, pki))


async def test_exchange_tls_1_1_session_gets_421_4_7_66(pki: SandboxPKI) -> None:
    legacy = pki.client_trust_context()
    legacy.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy.minimum_version = ssl.TLSVersion.TLSv1_1

    async with running_exchange(
        pki, tls_maximum_version=ssl.TLSVersion.TLSv1_1
    ) as exchange:

        def scenario() -> int:
            with connect(exchange, pki, tls=False) as client:
                try:
                    client.starttls(context=legacy)
                except ssl.SSLError:
                    pytest.skip("this OpenSSL build refuses TLS 1.1 at every level")
                code, _ = client.ehlo()
            return code

        assert await in_thread(scenario) == 421


# Construction.


# S104: binding to every interface is exactly what these hosts must be refused for.
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "localhost"])  # noqa: S104
def test_exchange_refuses_non_loopback_host(pki: SandboxPKI, host: str) -> None:
    with pytest.raises(ValueError):
        SandboxExchange(pki=pki, host=host)


async def test_exchange_binds_ipv6_loopback(pki: SandboxPKI) -> None:
    async with running_exchange(pki, host="::1") as exchange:
        code, _ = await in_thread(lambda: connect(exchange, pki).quit())
    assert code == 221


# Greeting and EHLO.


async def test_exchange_greeting_announces_microsoft_esmtp(
    exchange: SandboxExchange,
) -> None:
    def scenario() -> bytes:
        with smtplib.SMTP(timeout=5) as client:
            _, banner = client.connect(*exchange.address)
        return banner

    assert b"Microsoft ESMTP MAIL Service ready at" in await in_thread(scenario)


async def test_exchange_ehlo_before_tls_offers_starttls_without_auth(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> list[str]:
        with connect(exchange, pki, tls=False) as client:
            return keywords(client)

    assert await in_thread(scenario) == [
        "SIZE 157286400",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
        "8BITMIME",
    ]


async def test_exchange_ehlo_after_starttls_offers_auth(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> list[str]:
        with connect(exchange, pki) as client:
            return keywords(client)

    assert await in_thread(scenario) == [
        "SIZE 157286400",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "AUTH LOGIN PLAIN XOAUTH2",
        "8BITMIME",
        "SMTPUTF8",
    ]


async def test_exchange_offer_starttls_false_hides_starttls(pki: SandboxPKI) -> None:
    async with running_exchange(pki, offer_starttls=False) as exchange:

        def scenario() -> list[str]:
            with connect(exchange, pki, tls=False) as client:
                return keywords(client)

        assert "STARTTLS" not in await in_thread(scenario)


async def test_exchange_allow_auth_before_tls_advertises_auth(pki: SandboxPKI) -> None:
    async with running_exchange(pki, allow_auth_before_tls=True) as exchange:

        def scenario() -> list[str]:
            with connect(exchange, pki, tls=False) as client:
                return keywords(client)

        assert "AUTH LOGIN PLAIN XOAUTH2" in await in_thread(scenario)


# Authentication.


async def test_exchange_auth_plain_records_auth_user(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> None:
        with connect(exchange, pki) as client:
            client.user, client.password = USER, PASSWORD
            client.auth("PLAIN", client.auth_plain, initial_response_ok=False)
            client.sendmail(USER, [BOB], MESSAGE)

    await in_thread(scenario)

    message = exchange.messages[0]
    assert (message.auth_user, message.auth_mechanism) == (USER, "PLAIN")


async def test_exchange_auth_login_records_auth_user(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> None:
        with connect(exchange, pki) as client:
            client.user, client.password = USER, PASSWORD
            client.auth("LOGIN", client.auth_login, initial_response_ok=True)
            client.sendmail(USER, [BOB], MESSAGE)

    await in_thread(scenario)

    message = exchange.messages[0]
    assert (message.auth_user, message.auth_mechanism) == (USER, "LOGIN")


async def test_exchange_auth_login_prompts_in_base64(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> None:
        with connect(exchange, pki) as client:
            client.user, client.password = USER, PASSWORD
            client.auth("LOGIN", client.auth_login, initial_response_ok=False)

    await in_thread(scenario)

    replies = [line.text for line in exchange.transcript if line.direction == "server"]
    prompts = [reply for reply in replies if reply.startswith("334")]
    assert prompts == ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"]


async def test_exchange_wrong_password_gets_535_5_7_3(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> tuple[int, bytes | str]:
        with connect(exchange, pki) as client:
            try:
                client.login(USER, "wrong")
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code, exc.smtp_error
        return 235, b""

    assert await in_thread(scenario) == (
        535,
        b"5.7.3 Authentication unsuccessful [SANDBOX]",
    )


async def test_exchange_wrong_password_counts_auth_failure(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> None:
        with connect(exchange, pki) as client:
            client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0x\0y").decode())

    await in_thread(scenario)

    assert exchange.auth_failures == 1


async def test_exchange_auth_without_tls_gets_451_5_7_3(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> tuple[int, bytes]:
        with connect(exchange, pki, tls=False) as client:
            return client.docmd("AUTH", "PLAIN AGEAYg==")

    assert await in_thread(scenario) == (
        451,
        b"5.7.3 STARTTLS is required to send mail",
    )


async def test_exchange_xoauth2_accepts_token_the_validator_accepts(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> int:
        with connect(exchange, pki) as client:
            code, _ = client.docmd("AUTH", "XOAUTH2 " + xoauth2(USER, GOOD_TOKEN))
        return code

    assert await in_thread(scenario) == 235


async def test_exchange_xoauth2_sends_the_validator_refusal(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> tuple[int, bytes]:
        with connect(exchange, pki) as client:
            return client.docmd("AUTH", "XOAUTH2 " + xoauth2(USER, "graph-token"))

    assert await in_thread(scenario) == (
        535,
        b"5.7.3 Authentication unsuccessful [SANDBOX]",
    )


async def test_exchange_xoauth2_continuation_accepts_token(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> int:
        with connect(exchange, pki) as client:
            client.docmd("AUTH", "XOAUTH2")
            code, _ = client.docmd(xoauth2(USER, GOOD_TOKEN))
        return code

    assert await in_thread(scenario) == 235


async def test_exchange_fourth_session_for_a_user_gets_432(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> int:
        clients = [connect_and_login(exchange, pki) for _ in range(3)]
        fourth = connect(exchange, pki)
        try:
            fourth.user, fourth.password = USER, PASSWORD
            fourth.auth("PLAIN", fourth.auth_plain)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        finally:
            for client in [*clients, fourth]:
                client.quit()
        return 235

    assert await in_thread(scenario) == 432


async def test_exchange_records_max_concurrent_sessions_per_user(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> None:
        clients = [connect_and_login(exchange, pki) for _ in range(2)]
        for client in clients:
            client.quit()

    await in_thread(scenario)

    assert exchange.max_concurrent_sessions_seen == {USER: 2}


async def test_exchange_counts_authenticated_sessions(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> None:
        for _ in range(2):
            connect_and_login(exchange, pki).quit()

    await in_thread(scenario)

    assert exchange.sessions_authenticated == 2


async def test_exchange_frees_session_slot_when_a_session_ends(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def fill_and_leave() -> None:
        for client in [connect_and_login(exchange, pki) for _ in range(3)]:
            client.quit()

    await in_thread(fill_and_leave)
    await exchange.wait_for_idle()

    code, _ = await in_thread(lambda: connect_and_login(exchange, pki).quit())
    assert code == 221


# The mail transaction.


async def test_exchange_mail_before_auth_gets_530_5_7_57(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> tuple[int, bytes]:
        with connect(exchange, pki) as client:
            return client.mail(USER)

    assert await in_thread(scenario) == (
        530,
        b"5.7.57 Client not authenticated to send mail",
    )


async def test_exchange_mail_without_tls_gets_451_5_7_3(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> int:
        with connect(exchange, pki, tls=False) as client:
            code, _ = client.mail(USER)
        return code

    assert await in_thread(scenario) == 451


async def test_exchange_mail_after_starttls_without_new_ehlo_gets_503(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> int:
        with connect(exchange, pki, tls=False) as client:
            client.starttls(context=pki.client_trust_context())
            code, _ = client.docmd("AUTH", "PLAIN AGEAYg==")
        return code

    assert await in_thread(scenario) == 503


async def test_exchange_records_message_bytes_exactly(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    body = b"Subject: bytes\r\n\r\ncaf\xc3\xa9 \xff\x00 tab\there\r\n"

    def scenario() -> None:
        with connect_and_login(exchange, pki) as client:
            client.sendmail(USER, [BOB], body)

    await in_thread(scenario)

    assert exchange.messages[0].data == body


async def test_exchange_unstuffs_leading_dots(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    body = b"Subject: dots\r\n\r\n.hidden\r\n..two\r\n.\r\nend\r\n"

    def scenario() -> None:
        with connect_and_login(exchange, pki) as client:
            client.sendmail(USER, [BOB], body)

    await in_thread(scenario)

    assert exchange.messages[0].data == body


async def test_exchange_bare_lf_dot_does_not_end_message(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> None:
        with connect_and_login(exchange, pki) as client:
            client.mail(USER)
            client.rcpt(BOB)
            client.docmd("DATA")
            client.send(b"a\n.\nMAIL FROM:<evil@example.test>\r\n.\r\n")
            client.getreply()

    await in_thread(scenario)

    assert exchange.messages[0].data == b"a\n.\nMAIL FROM:<evil@example.test>\r\n"


async def test_exchange_answers_pipelined_commands_in_order(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> list[int]:
        with connect_and_login(exchange, pki) as client:
            client.send(
                f"MAIL FROM:<{USER}>\r\nRCPT TO:<{BOB}>\r\n"
                f"RCPT TO:<{CAROL}>\r\nDATA\r\n".encode()
            )
            codes = [client.getreply()[0] for _ in range(4)]
            client.send(MESSAGE + b".\r\n")
            codes.append(client.getreply()[0])
        return codes

    assert await in_thread(scenario) == [250, 250, 250, 354, 250]


async def test_exchange_records_envelope(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> None:
        with connect_and_login(exchange, pki) as client:
            client.sendmail(USER, [BOB, CAROL], MESSAGE)

    await in_thread(scenario)

    message = exchange.messages[0]
    assert (message.mail_from, message.rcpt_tos) == (USER, [BOB, CAROL])


async def test_exchange_records_smtputf8_and_8bitmime_options(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> None:
        with connect_and_login(exchange, pki) as client:
            client.sendmail(
                USER,
                ["dörte@fabrikam.test"],
                "Subject: ü\r\n\r\nü\r\n".encode(),
                mail_options=["SMTPUTF8", "BODY=8BITMIME"],
            )

    await in_thread(scenario)

    message = exchange.messages[0]
    assert (message.smtputf8, message.body_8bitmime) == (True, True)


async def test_exchange_non_ascii_recipient_without_smtputf8_gets_553(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> int:
        with connect_and_login(exchange, pki) as client:
            client.mail(USER)
            client.command_encoding = "utf-8"
            code, _ = client.rcpt("dörte@fabrikam.test")
        return code

    assert await in_thread(scenario) == 553


async def test_exchange_too_many_recipients_gets_452_4_5_3(pki: SandboxPKI) -> None:
    async with running_exchange(pki, max_recipients_per_message=2) as exchange:

        def scenario() -> tuple[int, bytes]:
            with connect_and_login(exchange, pki) as client:
                client.mail(USER)
                client.rcpt(BOB)
                client.rcpt(CAROL)
                return client.rcpt("dave@fabrikam.test")

        assert await in_thread(scenario) == (452, b"4.5.3 Too many recipients")


async def test_exchange_message_over_mailbox_limit_gets_552(pki: SandboxPKI) -> None:
    async with running_exchange(pki, max_message_size=1_000) as exchange:

        def scenario() -> int:
            with connect_and_login(exchange, pki) as client:
                try:
                    client.sendmail(USER, [BOB], b"x" * 2_000 + b"\r\n")
                except smtplib.SMTPDataError as exc:
                    return exc.smtp_code
            return 250

        assert await in_thread(scenario) == 552


async def test_exchange_enforced_send_as_refuses_foreign_sender(
    pki: SandboxPKI,
) -> None:
    async with running_exchange(pki, enforce_send_as=True) as exchange:

        def scenario() -> tuple[int, bytes]:
            with connect_and_login(exchange, pki) as client:
                return client.mail("boss@contoso.test")

        assert await in_thread(scenario) == (
            550,
            b"5.7.60 SMTP; Client does not have permissions to send as this sender",
        )


async def test_exchange_enforced_send_as_accepts_null_sender(pki: SandboxPKI) -> None:
    async with running_exchange(pki, enforce_send_as=True) as exchange:

        def scenario() -> int:
            with connect_and_login(exchange, pki) as client:
                code, _ = client.mail("")
            return code

        assert await in_thread(scenario) == 250


async def test_exchange_rate_limit_throttles_at_mail(pki: SandboxPKI) -> None:
    async with running_exchange(pki, messages_per_minute=1) as exchange:

        def scenario() -> int:
            with connect_and_login(exchange, pki) as client:
                client.sendmail(USER, [BOB], MESSAGE)
                code, _ = client.mail(USER)
            return code

        assert await in_thread(scenario) == 451


async def test_exchange_rate_limit_counts_throttled_attempts(pki: SandboxPKI) -> None:
    async with running_exchange(pki, messages_per_minute=1) as exchange:

        def scenario() -> None:
            with connect_and_login(exchange, pki) as client:
                client.sendmail(USER, [BOB], MESSAGE)
                client.mail(USER)
                client.mail(USER)

        await in_thread(scenario)

        assert exchange.throttled_count == 2


async def test_exchange_message_bytes_survive_dot_stuffing_round_trip(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    lines = st.lists(st.from_regex(rb"[^\r\n]*", fullmatch=True), min_size=1)

    def scenario() -> None:
        with connect_and_login(exchange, pki) as client:

            @settings(max_examples=40, deadline=None)
            @given(lines=lines)
            def round_trip(lines: list[bytes]) -> None:
                body = b"".join(line + b"\r\n" for line in lines)
                client.sendmail(USER, [BOB], body)
                assert exchange.messages[-1].data == body

            round_trip()

    await in_thread(scenario)


# Simple commands and limits.


async def test_exchange_unknown_command_gets_500_5_3_3(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> tuple[int, bytes]:
        with connect(exchange, pki) as client:
            return client.docmd("BDAT", "10 LAST")

    assert await in_thread(scenario) == (500, b"5.3.3 Unrecognized command 'BDAT'")


async def test_exchange_quit_gets_221_2_0_0(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> tuple[int, bytes]:
        return connect(exchange, pki).quit()

    assert await in_thread(scenario) == (
        221,
        b"2.0.0 Service closing transmission channel",
    )


async def test_exchange_overlong_command_line_gets_500_and_session_goes_on(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> list[int]:
        with connect(exchange, pki) as client:
            too_long, _ = client.docmd("NOOP", "x" * 20_000)
            after, _ = client.noop()
        return [too_long, after]

    assert await in_thread(scenario) == [500, 250]


async def test_exchange_plaintext_received_holds_no_credentials(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    await in_thread(lambda: connect_and_login(exchange, pki).quit())

    assert b"AUTH" not in exchange.plaintext_received


async def test_exchange_plaintext_received_holds_pre_tls_commands(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    await in_thread(lambda: connect_and_login(exchange, pki).quit())

    assert exchange.plaintext_received == b"ehlo client.test\r\nSTARTTLS\r\n"


async def test_exchange_discards_commands_pipelined_after_starttls(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    def scenario() -> None:
        with connect(exchange, pki, tls=False) as client:
            client.send(b"STARTTLS\r\nNOOP\r\n")
            client.getreply()
            host, _ = exchange.address
            assert client.sock is not None
            client.sock = pki.client_trust_context().wrap_socket(
                client.sock, server_hostname=host
            )
            client.file = None
            client.ehlo()

    await in_thread(scenario)

    assert exchange.sessions[0].discarded_after_starttls == len(b"NOOP\r\n")


# Faults.


async def test_exchange_injected_rcpt_fault_refuses_matching_recipient(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    exchange.inject("rcpt", "550 5.1.1 RecipientNotFound", match=BOB)

    def scenario() -> None:
        with connect_and_login(exchange, pki) as client:
            client.sendmail(USER, [BOB, CAROL], MESSAGE)

    await in_thread(scenario)

    assert exchange.messages[0].rcpt_tos == [CAROL]


async def test_exchange_injected_fault_stops_after_times(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    exchange.inject("mail", "451 4.3.2 Temporary server error", times=1)

    def scenario() -> list[int]:
        with connect_and_login(exchange, pki) as client:
            return [client.mail(USER)[0], client.mail(USER)[0]]

    assert await in_thread(scenario) == [451, 250]


async def test_exchange_injected_auth_fault_answers_with_its_reply(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    disabled = (
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is"
        " disabled for the Tenant."
    )
    exchange.inject("auth", disabled)

    def scenario() -> bytes:
        with connect(exchange, pki) as client:
            _, text = client.docmd("AUTH", "XOAUTH2 " + xoauth2(USER, GOOD_TOKEN))
        return text

    assert (await in_thread(scenario)).decode() == disabled[4:]


async def test_exchange_injected_421_closes_connection(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    exchange.inject(
        "mail", "421 4.3.2 Service not available, closing transmission channel"
    )

    def scenario() -> None:
        with connect_and_login(exchange, pki) as client:
            client.mail(USER)
            client.noop()

    with pytest.raises(smtplib.SMTPServerDisconnected):
        await in_thread(scenario)


async def test_exchange_injected_data_fault_refuses_message(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    exchange.inject(
        "data",
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
    )

    def scenario() -> int:
        with connect_and_login(exchange, pki) as client:
            try:
                client.sendmail(USER, [BOB], MESSAGE)
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code
        return 250

    assert await in_thread(scenario) == 554


async def test_exchange_clear_faults_restores_normal_answers(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    exchange.inject("mail", "451 4.3.2 Temporary server error")
    exchange.clear_faults()

    def scenario() -> int:
        with connect_and_login(exchange, pki) as client:
            code, _ = client.mail(USER)
        return code

    assert await in_thread(scenario) == 250


async def test_exchange_silent_greeting_times_client_out(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    exchange.silent_at("greeting")

    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        await in_thread(lambda: connect(exchange, pki, timeout=0.3))


async def test_exchange_drop_at_greeting_disconnects_client(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    exchange.drop_at("greeting")

    with pytest.raises(smtplib.SMTPServerDisconnected):
        await in_thread(lambda: connect(exchange, pki))


async def test_exchange_delay_at_ehlo_slows_the_reply(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    exchange.delay("ehlo", 0.3)

    def scenario() -> float:
        started = time.monotonic()
        connect(exchange, pki, tls=False).quit()
        return time.monotonic() - started

    assert await in_thread(scenario) >= 0.3


def test_exchange_match_on_greeting_is_refused(pki: SandboxPKI) -> None:
    exchange = SandboxExchange(pki=pki)

    with pytest.raises(ValueError):
        exchange.inject("greeting", "554 5.7.1 No", match=BOB)


# Modes and outages.


async def test_exchange_implicit_mode_offers_auth_at_once(pki: SandboxPKI) -> None:
    async with running_exchange(pki, mode="implicit") as exchange:

        def scenario() -> list[str]:
            host, port = exchange.address
            context = pki.client_trust_context()
            with smtplib.SMTP_SSL(host, port, context=context, timeout=5) as client:
                client.ehlo()
                return keywords(client)

        assert "AUTH LOGIN PLAIN XOAUTH2" in await in_thread(scenario)


async def test_exchange_implicit_mode_records_message(pki: SandboxPKI) -> None:
    async with running_exchange(pki, mode="implicit") as exchange:

        def scenario() -> None:
            host, port = exchange.address
            context = pki.client_trust_context()
            with smtplib.SMTP_SSL(host, port, context=context, timeout=5) as client:
                client.login(USER, PASSWORD)
                client.sendmail(USER, [BOB], MESSAGE)

        await in_thread(scenario)

        assert (await exchange.wait_for_messages(1))[0].data == MESSAGE


async def test_exchange_stopped_refuses_connections(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    await exchange.stop()

    with pytest.raises(ConnectionRefusedError):
        await in_thread(lambda: connect(exchange, pki))


async def test_exchange_stop_cuts_open_sessions(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    client = await in_thread(lambda: connect_and_login(exchange, pki))
    await exchange.stop()

    with pytest.raises(smtplib.SMTPServerDisconnected):
        await in_thread(client.noop)


async def test_exchange_restart_serves_on_the_same_port(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    await in_thread(lambda: connect_and_login(exchange, pki).quit())
    await exchange.stop()
    await exchange.start()

    code, _ = await in_thread(lambda: connect_and_login(exchange, pki).quit())
    assert code == 221


async def test_exchange_wait_for_messages_times_out(exchange: SandboxExchange) -> None:
    with pytest.raises(TimeoutError):
        await exchange.wait_for_messages(1, timeout=0.05)
