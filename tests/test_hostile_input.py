"""Hostile clients on the inbound side: smuggling, injection, floods and slowness.

Every test talks raw SMTP bytes to a real relay on loopback and then looks at what
reached the sandbox Exchange, because the harm of a hostile input is what it makes
the relay send upstream. The idle-connection flood runs the daemon as a process to
measure its memory; the parsers and the classifier get property tests.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import re
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.smtp import Envelope, Session
from hypothesis import given
from hypothesis import strategies as st

from relay.app import RelayApp
from relay.config import ListenConfig, parse_daemon_config, write_mail_settings
from relay.errors import (
    ConfigError,
    Disposition,
    SmtpReplyError,
    Stage,
    classify_reply,
    parse_enhanced_code,
)
from relay.inbound import (
    _ENHANCED_BY_REPLY,
    MessageSink,
    RelayHandler,
    _with_enhanced_code,
    received_header,
)
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.exchange import SandboxExchange
from tests.conftest import (
    INBOUND_PASSWORD,
    RelayFactory,
    basic_settings,
    relay_config_dict,
    send_mail_async,
    wait_for,
)
from tests.daemon_harness import (
    Conversation,
    DaemonProcess,
    conversation,
    idle_flood,
    relaxed_limits,
    write_daemon_files,
)

_T = TypeVar("_T")

# A reply line as the relay writes it: code, separator, enhanced code, text.
_REPLY_WITH_ENHANCED_CODE = re.compile(rb"^(\d{3}) ([245])\.\d{1,3}\.\d{1,3} ")
# A line break that is not CRLF: what a lenient upstream could misread.
_BARE_LINE_BREAK = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def _open_transaction(
    talk: Conversation, *, recipient: bytes = b"ops@contoso.test"
) -> None:
    for line in (
        b"EHLO legacy.local\r\n",
        b"MAIL FROM:<relay@contoso.test>\r\n",
        b"RCPT TO:<" + recipient + b">\r\n",
    ):
        reply = talk.command(line)
        assert reply.startswith(b"250"), reply
    assert talk.command(b"DATA\r\n").startswith(b"354")


async def _nothing_more_arrives(exchange: SandboxExchange, count: int) -> bool:
    """Wait for `count` messages, then a moment more for any extra one."""
    await exchange.wait_for_messages(count, timeout=15)
    await asyncio.sleep(0.5)
    return len(exchange.messages) == count


# --- SMTP smuggling ----------------------------------------------------------------

_SMUGGLED = (
    b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@contoso.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nx\r\n.\r\n"
)


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\r\n", b"\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\n.\r"],
    ids=["LF.CRLF", "LF.LF", "CR.CR", "CR.CRLF", "CRLF.LF", "CRLF.CR", "LF.CR"],
)
async def test_hostile_input_smuggling_variant_stays_inside_one_message(
    exchange: SandboxExchange, start_relay: RelayFactory, fake_end: bytes
) -> None:
    relay = await start_relay(basic_settings(exchange.port))

    def smuggle() -> list[bytes]:
        with conversation(relay.port) as talk:
            _open_transaction(talk)
            talk.send(b"Subject: first\r\n\r\nbody" + fake_end + _SMUGGLED)
            replies = [talk.reply()]
            replies.append(talk.command(b"QUIT\r\n"))
        return replies

    replies = await asyncio.to_thread(smuggle)
    alone = await _nothing_more_arrives(exchange, 1)
    message = exchange.messages[0]
    upstream_commands = [
        line.text for line in exchange.transcript if line.direction == "client"
    ]
    assert (
        [reply[:3] for reply in replies],
        alone,
        message.rcpt_tos,
        _BARE_LINE_BREAK.search(message.data),
        any("victim" in command for command in upstream_commands),
    ) == ([b"250", b"221"], True, ["ops@contoso.test"], None, False)


async def test_hostile_input_client_vanishing_mid_data_forwards_nothing_partial(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))

    def vanish(number: int) -> None:
        with conversation(relay.port) as talk:
            _open_transaction(talk)
            # Small bodies stay in memory; big ones are already streaming to disk.
            size = 1_000 if number % 2 else 600_000
            talk.send(b"Subject: cut\r\n\r\n" + b"partial line\r\n" * (size // 14))
            if number % 3:
                talk.abort()

    for number in range(30):
        await asyncio.to_thread(vanish, number)
    await wait_for(lambda: not relay.app.inbound.connections, timeout=10)
    # After the cut sessions, the relay still works, for exactly one message.
    code, _ = await send_mail_async(relay.port)
    alone = await _nothing_more_arrives(exchange, 1)
    counts = await relay.app.spool.counts_by_state()
    leftovers = list((relay.directory / "spool" / "tmp").iterdir())
    assert (code, alone, sum(counts.values()), leftovers) == (250, True, 0, [])


async def test_hostile_input_client_vanishing_mid_second_transaction_sends_one(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))

    def pipeline_then_vanish() -> None:
        with conversation(relay.port) as talk:
            _open_transaction(talk)
            # A whole first message, then a second transaction cut mid-DATA.
            talk.send(
                b"Subject: first\r\n\r\nfirst\r\n.\r\n"
                b"MAIL FROM:<relay@contoso.test>\r\nRCPT TO:<ops@contoso.test>\r\n"
                b"DATA\r\nSubject: second\r\n\r\nhalf of the sec"
            )
            time.sleep(0.5)
            talk.abort()

    await asyncio.to_thread(pipeline_then_vanish)
    alone = await _nothing_more_arrives(exchange, 1)
    assert (alone, b"Subject: first" in exchange.messages[0].data) == (True, True)


# --- STARTTLS, long lines, many recipients ----------------------------------------


async def test_hostile_input_starttls_with_buffered_commands_is_refused_in_step(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))

    def starttls_injection() -> list[bytes]:
        with conversation(relay.port, timeout=3) as talk:
            talk.command(b"EHLO legacy.local\r\n")
            # The classic STARTTLS injection: commands ride in the same segment.
            talk.send(
                b"STARTTLS\r\nMAIL FROM:<relay@contoso.test>\r\n"
                b"RCPT TO:<ops@contoso.test>\r\n"
            )
            replies = [talk.reply() for _ in range(3)]
            replies.append(talk.command(b"QUIT\r\n"))
        return replies

    replies = await asyncio.to_thread(starttls_injection)
    # No TLS inbound: STARTTLS is refused, and each buffered command is answered
    # once, in order, as plain-text commands of the same session.
    assert (
        [bytes(reply[:3]) for reply in replies],
        all(_REPLY_WITH_ENHANCED_CODE.match(reply) for reply in replies),
    ) == ([b"454", b"250", b"250", b"221"], True), replies


async def test_hostile_input_command_line_over_512_bytes_is_refused_in_step(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))

    def long_lines() -> list[bytes]:
        with conversation(relay.port) as talk:
            talk.command(b"EHLO legacy.local\r\n")
            replies = [
                talk.command(b"MAIL FROM:<" + b"a" * 600 + b"@contoso.test>\r\n"),
                # A megabyte without a line end: read and dropped, not buffered.
                talk.command(b"NOOP " + b"x" * 1_000_000 + b"\r\n"),
                talk.command(b"NOOP\r\n"),
            ]
        return replies

    replies = await asyncio.to_thread(long_lines)
    assert [reply[:9] for reply in replies] == [
        b"500 5.5.2",
        b"500 5.5.2",
        b"250 2.0.0",
    ]


async def test_hostile_input_10000_rcpt_commands_keep_the_limit_and_deliver(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port), overrides=relaxed_limits())

    def many_recipients() -> tuple[list[bytes], bytes]:
        codes: list[bytes] = []
        with conversation(relay.port, timeout=30) as talk:
            talk.command(b"EHLO legacy.local\r\n")
            talk.command(b"MAIL FROM:<relay@contoso.test>\r\n")
            for batch in range(100):
                talk.send(
                    b"".join(
                        b"RCPT TO:<user%05d@contoso.test>\r\n" % (batch * 100 + n)
                        for n in range(100)
                    )
                )
                codes += [talk.reply()[:9] for _ in range(100)]
            talk.command(b"DATA\r\n")
            final = talk.command(b"Subject: many\r\n\r\nhello\r\n.\r\n")
        return codes, final

    codes, final = await asyncio.to_thread(many_recipients)
    await wait_for(
        lambda: sum(len(m.rcpt_tos) for m in exchange.messages) >= 1000, timeout=60
    )
    delivered = [r for m in exchange.messages for r in m.rcpt_tos]
    assert (
        codes.count(b"250 2.1.5"),
        codes.count(b"452 4.5.3"),
        final[:3],
        len(set(delivered)),
        len(delivered),
    ) == (1000, 9000, b"250", 1000, 1000)


# --- NUL, invalid UTF-8, line breaks in addresses ---------------------------------


async def test_hostile_input_nul_bytes_never_reach_the_envelope_or_headers(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))

    def with_nuls() -> list[bytes]:
        with conversation(relay.port) as talk:
            replies = [
                talk.command(b"EHLO legacy\x00X-Injected: 1\r\n"),
                talk.command(b"MAIL FROM:<relay\x00@contoso.test>\r\n"),
                talk.command(b"MAIL FROM:<relay@contoso.test>\r\n"),
                talk.command(b"RCPT TO:<ops@contoso.test\x00>\r\n"),
                talk.command(b"RCPT TO:<ops@contoso.test>\r\n"),
                talk.command(b"DATA\r\n"),
                talk.command(b"Subject: nul\r\n\r\nbefore\x00after\r\n.\r\n"),
            ]
        return replies

    replies = await asyncio.to_thread(with_nuls)
    await exchange.wait_for_messages(1, timeout=15)
    message = exchange.messages[0]
    headers = message.data.split(b"\r\n\r\n", 1)[0]
    assert (
        [reply[:3] for reply in replies],
        b"\x00" in headers,
        message.rcpt_tos,
        b"before\x00after" in message.data,
    ) == (
        [b"250", b"553", b"250", b"553", b"250", b"354", b"250"],
        False,
        ["ops@contoso.test"],
        True,
    )


async def test_hostile_input_invalid_utf8_in_smtputf8_addresses_is_refused(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))

    def invalid_utf8() -> list[bytes]:
        with conversation(relay.port) as talk:
            talk.command(b"EHLO legacy.local\r\n")
            replies = [
                talk.command(b"MAIL FROM:<\xff\xfe@contoso.test> SMTPUTF8\r\n"),
                talk.command(b"MAIL FROM:<relay@contoso.test> SMTPUTF8\r\n"),
                talk.command(b"RCPT TO:<\xc3\x28@contoso.test>\r\n"),
                talk.command(b"RCPT TO:<ops@\xed\xa0\x80.test>\r\n"),
                talk.command(b"DATA\r\n"),
            ]
        return replies

    replies = await asyncio.to_thread(invalid_utf8)
    await asyncio.sleep(0.3)
    assert ([reply[:9] for reply in replies], exchange.messages) == (
        [b"553 5.1.7", b"250 2.1.0", b"553 5.1.3", b"553 5.1.3", b"503 5.5.1"],
        [],
    )


async def test_hostile_input_line_breaks_in_addresses_and_helo_inject_nothing(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))

    def injections() -> list[bytes]:
        with conversation(relay.port) as talk:
            replies = [
                talk.command(b"EHLO evil\rX-Injected: helo\r\n"),
                talk.command(
                    b"MAIL FROM:<relay@contoso.test\rRCPT TO:<victim@evil.test>>\r\n"
                ),
                talk.command(b"MAIL FROM:<relay@contoso.test>\r\n"),
                talk.command(
                    b'RCPT TO:<"ops\rRCPT TO:<victim@evil.test>"@contoso.test>\r\n'
                ),
                talk.command(b"RCPT TO:<ops@contoso.test\r>\r\n"),
                talk.command(b"RCPT TO:<ops@contoso.test>\rX-Injected: rcpt\r\n"),
                talk.command(b"DATA\r\n"),
                talk.command(b"Subject: clean\r\n\r\nbody\r\n.\r\n"),
            ]
        return replies

    replies = await asyncio.to_thread(injections)
    await exchange.wait_for_messages(1, timeout=15)
    message = exchange.messages[0]
    header_lines = message.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    upstream_commands = [
        line.text for line in exchange.transcript if line.direction == "client"
    ]
    assert (
        all(r[:3] in (b"250", b"354", b"501", b"553") for r in replies),
        replies[-1][:3],
        message.rcpt_tos,
        [line for line in header_lines if line.startswith(b"X-Injected")],
        any("victim" in command or "\r" in command for command in upstream_commands),
    ) == (True, b"250", ["ops@contoso.test"], [], False), replies


# --- slowness and floods ------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    # During DATA a trickle is held to listen.min_data_rate (256 B/s by default).
    ["command", "data"],
)
async def test_hostile_input_one_byte_at_a_time_is_hung_up_on(
    exchange: SandboxExchange, start_relay: RelayFactory, where: str
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"listen": {"idle_timeout": 1.0}}
    )

    def slowloris() -> tuple[float, bytes]:
        with conversation(relay.port) as talk:
            if where == "data":
                _open_transaction(talk)
            else:
                talk.command(b"EHLO legacy.local\r\n")
            started = time.monotonic()
            # Scaled down: one byte every 0.25 s against a 1 s idle timeout, at
            # most 20 bytes (5 s) before the test gives up on the relay.
            for byte in (b"NOOP x" * 10)[:20]:
                try:
                    talk.send(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.25)
                talk.sock.settimeout(0.01)
                try:
                    if talk.sock.recv(1024, socket.MSG_PEEK) == b"":
                        break
                except (TimeoutError, BlockingIOError):
                    pass
                except OSError:
                    break
            talk.sock.settimeout(5)
            try:
                rest = talk.sock.recv(4096)
            except OSError:
                rest = b""
            return time.monotonic() - started, rest

    seconds, rest = await asyncio.to_thread(slowloris)
    await asyncio.sleep(0.3)
    assert (seconds < 3.0, b"250" in rest, exchange.messages) == (True, False, [])


async def test_hostile_input_connection_limit_answers_421_then_recovers(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"listen": {"max_connections": 50}}
    )

    def flood() -> bytes:
        held = [Conversation(relay.port) for _ in range(50)]
        try:
            with conversation(relay.port) as extra:
                return extra.greeting
        finally:
            for talk in held:
                talk.close()

    refused = await asyncio.to_thread(flood)
    await wait_for(lambda: not relay.app.inbound.connections, timeout=10)
    code, _ = await send_mail_async(relay.port)
    assert (refused[:9], code) == (b"421 4.7.0", 250)


@pytest.mark.timeout(120)
async def test_hostile_input_1000_idle_connections_keep_memory_bounded(
    exchange: SandboxExchange, pki: SandboxPKI, tmp_path: Path
) -> None:
    config_path, port = write_daemon_files(
        tmp_path / "relay",
        pki=pki,
        exchange_port=exchange.port,
        overrides={"listen": {"max_connections": 1000, "idle_timeout": 60.0}},
    )
    daemon = DaemonProcess(config_path, port, tmp_path / "relay" / "output.txt")
    await daemon.start()
    try:
        figures = await asyncio.to_thread(idle_flood, daemon, 1000)
        code, _ = await send_mail_async(port)
        await exchange.wait_for_messages(1, timeout=15)
    finally:
        await daemon.kill(signal.SIGTERM)
        daemon.ensure_stopped()
    print(figures.summary())
    # Under 64 KiB a connection, and a peak well under what a small VM spares.
    assert (
        figures.greeted,
        figures.refused[:9],
        figures.per_connection_kib < 64,
        figures.peak_kib < 200 * 1024,
        code,
    ) == (1000, b"421 4.7.0", True, True, 250), figures


# --- the same listener on both event loops the daemon may run on -------------------

_EVENT_LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
        ),
    ),
]


def _on_event_loop(name: str, scenario: Coroutine[Any, Any, _T]) -> _T:
    """Run `scenario` on the named loop, as `epp-mail-relay serve` would."""
    if name == "uvloop":
        import uvloop

        return uvloop.run(scenario)
    return asyncio.run(scenario)


async def _with_relay(
    directory: Path,
    pki: SandboxPKI,
    listen: dict[str, Any],
    client: Callable[[int], _T],
) -> _T:
    """Start a relay, run the blocking `client(port)`, stop the relay."""
    raw = relay_config_dict(
        directory, ca_file=pki.ca_file, overrides={"listen": listen}
    )
    config = parse_daemon_config(raw, base_dir=directory)
    write_mail_settings(config.paths.settings_file, basic_settings(25))
    app = RelayApp(config)
    await app.start()
    assert app.inbound.port is not None
    try:
        return await asyncio.to_thread(client, app.inbound.port)
    finally:
        await app.stop()


@pytest.mark.parametrize("event_loop_name", _EVENT_LOOPS)
def test_hostile_input_refused_connection_hears_why_on_every_event_loop(
    pki: SandboxPKI, tmp_path: Path, event_loop_name: str
) -> None:
    # uvloop's transports are no asyncio.WriteTransport: the refusals used to be
    # a silent hang-up there.
    def refused(port: int) -> tuple[bytes, bytes]:
        with conversation(port):
            over_limit = _greeting_from("127.0.0.1", port)
        outsider = _greeting_from("127.0.0.3", port)
        return over_limit, outsider

    over_limit, outsider = _on_event_loop(
        event_loop_name,
        _with_relay(
            tmp_path,
            pki,
            {"max_connections": 1, "allowed_networks": ["127.0.0.1/32"]},
            refused,
        ),
    )
    assert (over_limit[:9], outsider[:9]) == (b"421 4.7.0", b"554 5.7.1")


@pytest.mark.parametrize("event_loop_name", _EVENT_LOOPS)
def test_hostile_input_connect_and_close_frees_its_slot_on_every_event_loop(
    pki: SandboxPKI, tmp_path: Path, event_loop_name: str
) -> None:
    # Port probes (nc -z) used to hold a connection slot until the idle timeout
    # on uvloop: 20 of them locked out every client of a 5-connection relay.
    def probes(port: int) -> None:
        for _ in range(20):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

    def clients(port: int) -> list[bytes]:
        time.sleep(0.5)
        held = [Conversation(port) for _ in range(5)]
        try:
            return [talk.greeting[:4] for talk in held]
        finally:
            for talk in held:
                talk.close()

    async def scenario() -> list[bytes]:
        raw = relay_config_dict(
            tmp_path, ca_file=pki.ca_file, overrides={"listen": {"max_connections": 5}}
        )
        config = parse_daemon_config(raw, base_dir=tmp_path)
        write_mail_settings(config.paths.settings_file, basic_settings(25))
        app = RelayApp(config)
        await app.start()
        assert app.inbound.port is not None
        try:
            # Blocking on purpose: the loop meets each connect and its close at once.
            probes(app.inbound.port)
            return await asyncio.to_thread(clients, app.inbound.port)
        finally:
            await app.stop()

    greetings = _on_event_loop(event_loop_name, scenario())
    assert greetings == [b"220 "] * 5


# --- access: loopback peers only, no open relay, AUTH when required ----------------


def _greeting_from(source: str, port: int) -> bytes:
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        return sock.makefile("rb").readline()


async def test_hostile_input_only_the_allowed_source_address_is_served(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"listen": {"allowed_networks": ["127.0.0.2/32"]}},
    )
    allowed = await asyncio.to_thread(_greeting_from, "127.0.0.2", relay.port)
    refused = await asyncio.to_thread(_greeting_from, "127.0.0.3", relay.port)
    assert (allowed[:4], refused[:9]) == (b"220 ", b"554 5.7.1")


async def test_hostile_input_mail_for_any_domain_goes_only_to_the_upstream(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    # Domains that never resolve, an address literal, the percent hack and a
    # source route: had the relay looked up any MX, none of these would arrive.
    recipients = [
        "victim@example.invalid",
        "victim@[192.0.2.1]",
        "victim%example.invalid@contoso.test",
    ]

    def send() -> list[bytes]:
        with conversation(relay.port) as talk:
            talk.command(b"EHLO legacy.local\r\n")
            talk.command(b"MAIL FROM:<relay@contoso.test>\r\n")
            replies = [
                talk.command(b"RCPT TO:<" + r.encode() + b">\r\n") for r in recipients
            ]
            replies.append(
                talk.command(
                    b"RCPT TO:<@mx.example.invalid:routed@example.invalid>\r\n"
                )
            )
            talk.command(b"DATA\r\n")
            replies.append(talk.command(b"Subject: anywhere\r\n\r\nx\r\n.\r\n"))
        return replies

    replies = await asyncio.to_thread(send)
    await exchange.wait_for_messages(1, timeout=15)
    assert (
        [reply[:3] for reply in replies],
        exchange.messages[0].rcpt_tos,
        {session.peer for session in exchange.sessions},
    ) == (
        [b"250"] * 5,
        [*recipients, "routed@example.invalid"],
        {"127.0.0.1"},
    )


async def test_hostile_input_auth_required_refuses_every_unauthenticated_step(
    exchange: SandboxExchange, start_relay: RelayFactory, tmp_path: Path
) -> None:
    credentials = tmp_path / "inbound-users"
    credentials.write_text(f"printer:{INBOUND_PASSWORD}\n")
    credentials.chmod(0o600)
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={
            "listen": {
                "auth_credentials_file": str(credentials),
                "auth_required": True,
            }
        },
    )
    wrong = base64.b64encode(b"\0printer\0not-the-password")
    right = base64.b64encode(f"\0printer\0{INBOUND_PASSWORD}".encode())

    def steps() -> list[bytes]:
        with conversation(relay.port) as talk:
            talk.command(b"EHLO legacy.local\r\n")
            return [
                talk.command(b"MAIL FROM:<relay@contoso.test>\r\n"),
                talk.command(b"RCPT TO:<ops@contoso.test>\r\n"),
                talk.command(b"DATA\r\n"),
                talk.command(b"AUTH PLAIN " + wrong + b"\r\n"),
                talk.command(b"MAIL FROM:<relay@contoso.test>\r\n"),
                talk.command(b"AUTH PLAIN " + right + b"\r\n"),
                talk.command(b"MAIL FROM:<relay@contoso.test>\r\n"),
            ]

    replies = await asyncio.to_thread(steps)
    assert ([reply[:3] for reply in replies], exchange.messages) == (
        [b"530", b"530", b"530", b"535", b"530", b"235", b"250"],
        [],
    )


def test_hostile_input_auth_required_without_credentials_does_not_start(
    tmp_path: Path,
) -> None:
    # Nobody could authenticate: every legacy client would get a permanent 530.
    with pytest.raises(ConfigError) as raised:
        parse_daemon_config({"listen": {"auth_required": True}}, base_dir=tmp_path)
    assert raised.value.key == "listen.auth_required"


# --- the admin API from a hostile caller -------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        b"Bearer",
        b"Bearer ",
        b"Bearer {token}x",
        b"Bearer {short}",
        b"Basic {basic}",
        b"Token {token}",
        b"{token}",
        b"Bearer {token}\x00",
        b"Bearer " + b"A" * 7000,
    ],
)
async def test_hostile_input_admin_api_refuses_forged_tokens(
    exchange: SandboxExchange, start_relay: RelayFactory, authorization: bytes | None
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    token = (relay.directory / "admin-token").read_text().strip()
    request = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if authorization is not None:
        forged = (
            authorization.replace(b"{token}", token.encode())
            .replace(b"{short}", token[:-1].encode())
            .replace(b"{basic}", base64.b64encode(f"admin:{token}".encode()))
        )
        request += b"Authorization: " + forged + b"\r\n"
    assert relay.app.admin is not None and relay.app.admin.port is not None
    status = await asyncio.to_thread(
        _http_status, relay.app.admin.port, request + b"\r\n"
    )
    # 400 when the HTTP layer already refuses the header; never 200.
    assert status in (400, 401)


def _http_status(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        status_line = sock.makefile("rb").readline()
    return int(status_line.split()[1])


# --- property tests: replies, the classifier, addresses, trace header ------------

_REPLY_CODES = sorted(_ENHANCED_BY_REPLY)
_LINE_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"),
    max_size=80,
)


@given(code=st.sampled_from(_REPLY_CODES), text=_LINE_TEXT)
def test_hostile_input_every_relay_reply_gains_a_matching_enhanced_code(
    code: str, text: str
) -> None:
    once = _with_enhanced_code(f"{code} {text}")
    enhanced = parse_enhanced_code(once[4:])
    assert (
        once[:4],
        (enhanced is not None and enhanced[0] == code[0])
        or bool(parse_enhanced_code(text)),
        _with_enhanced_code(once),
    ) == (f"{code} ", True, once)


@given(
    code=st.integers(min_value=0, max_value=999),
    text=st.text(max_size=200),
    stage=st.sampled_from(list(Stage)),
)
def test_hostile_input_classifier_takes_any_reply_and_never_defers_a_5xx(
    code: int, text: str, stage: Stage
) -> None:
    disposition = classify_reply(code, text, stage=stage)
    assert (500 <= code < 600 and disposition is Disposition.DEFER) is False


@given(code=st.integers(min_value=400, max_value=599), text=st.text(max_size=200))
def test_hostile_input_reply_error_message_is_one_line(code: int, text: str) -> None:
    error = SmtpReplyError(code, text, stage=Stage.DATA)
    assert ("\r" in error.message, "\n" in error.message) == (False, False)


class _DiscardSink(MessageSink):
    pass


@given(
    address=st.text(max_size=40)
    | st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),
    utf8=st.booleans(),
)
def test_hostile_input_an_accepted_recipient_can_inject_nothing(
    address: str, utf8: bool
) -> None:
    handler = RelayHandler(config=ListenConfig(), sink=_DiscardSink())
    envelope = Envelope()
    envelope.smtp_utf8 = utf8
    reply = asyncio.run(
        handler.handle_RCPT(None, Session(None), envelope, address, [])  # type: ignore[arg-type]
    )
    if reply.startswith("250"):
        address.encode("utf-8")  # raises for lone surrogates: never accepted
        assert re.search(r"[\x00-\x20\x7f<>]", address) is None and "@" in address
    else:
        assert envelope.rcpt_tos == []


@given(helo=st.text(max_size=300))
def test_hostile_input_trace_header_stays_three_lines_for_any_helo(helo: str) -> None:
    header = received_header(
        helo=helo, client_address="127.0.0.1", hostname="localhost", queue_hint="1"
    )
    lines = header.split(b"\r\n")
    assert (
        len(lines),
        lines[-1],
        _BARE_LINE_BREAK.search(header),
        all(line[:1] == b"\t" for line in lines[1:3]),
    ) == (4, b"", None, True)
