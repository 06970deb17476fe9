"""The legacy-facing SMTP listener, spoken to over real loopback sockets."""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import shutil
import smtplib
import socket
import time
from pathlib import Path

import structlog.testing
from hypothesis import given
from hypothesis import strategies as st

from relay.dotstuffing import DataUnstuffer, DotStuffer
from relay.inbound import read_data_block
from relay.sandbox.exchange import SandboxExchange
from tests.conftest import (
    INBOUND_PASSWORD,
    RelayFactory,
    basic_settings,
    open_data,
    send_mail_async,
    strip_received,
    wait_for,
)


def _dialogue(
    port: int, lines: list[bytes], *, read_greeting: bool = True
) -> list[bytes]:
    """Send raw command lines one by one; return each raw reply."""
    replies: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        if read_greeting:
            replies.append(_read_reply(stream))
        for line in lines:
            sock.sendall(line)
            replies.append(_read_reply(stream))
    return replies


def _read_reply(stream: object) -> bytes:
    reply = b""
    while True:
        line: bytes = stream.readline()  # type: ignore[attr-defined]
        reply += line
        if len(line) < 4 or line[3:4] != b"-":
            return reply


async def test_inbound_greeting_reveals_no_software_version(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    replies = await asyncio.to_thread(_dialogue, relay.port, [b"QUIT\r\n"])
    assert (
        replies[0].startswith(b"220 ")
        and b"Python" not in replies[0]
        and b"aiosmtpd" not in replies[0].lower()
        and b"1." not in replies[0]
    )


async def test_inbound_ehlo_advertises_size_8bitmime_smtputf8_enhancedstatuscodes(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    replies = await asyncio.to_thread(_dialogue, relay.port, [b"EHLO legacy\r\n"])
    advertised = {line[4:].split(b" ")[0] for line in replies[1].split(b"\r\n") if line}
    assert {
        b"SIZE",
        b"8BITMIME",
        b"SMTPUTF8",
        b"ENHANCEDSTATUSCODES",
        b"PIPELINING",
    } <= advertised


async def test_inbound_multi_line_ehlo_reply_leaves_in_one_write(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    await reader.readline()  # the greeting
    (server,) = relay.app.inbound.connections
    stream_writer = server._writer
    writes: list[bytes] = []
    write = stream_writer.write

    def counted(data: bytes) -> None:
        writes.append(data)
        write(data)

    stream_writer.write = counted  # type: ignore[method-assign]
    writer.write(b"EHLO legacy\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    writer.close()
    await writer.wait_closed()
    assert len(writes) == 1 and writes[0].count(b"\r\n250-") >= 4


async def test_inbound_every_reply_carries_an_enhanced_status_code(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    replies = await asyncio.to_thread(
        _dialogue,
        relay.port,
        [
            b"EHLO legacy\r\n",
            b"RCPT TO:<a@b.test>\r\n",
            b"MAIL FROM:<a@b.test>\r\n",
            b"MAIL FROM:<a@b.test>\r\n",
            b"RCPT TO:<ops@contoso.test>\r\n",
            b"BOGUS\r\n",
            b"RSET\r\n",
            b"NOOP\r\n",
            b"QUIT\r\n",
        ],
    )
    import re

    pattern = re.compile(rb"^\d{3} [245]\.\d{1,3}\.\d{1,3} ")
    assert all(pattern.match(reply) for reply in replies[2:]), replies


async def test_inbound_declared_size_too_big_is_refused_at_mail(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"listen": {"max_message_size": 100_000}},
    )
    replies = await asyncio.to_thread(
        _dialogue,
        relay.port,
        [b"EHLO legacy\r\n", b"MAIL FROM:<a@b.test> SIZE=200000\r\n"],
    )
    assert replies[2].startswith(b"552 5.3.4 ")


async def test_inbound_oversize_data_is_refused_with_552(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"listen": {"max_message_size": 10_000}},
    )
    body = (
        b"Subject: big\r\n\r\n" + b"x" * 100 + b"\r\n" * 200 + b"y" * 20_000 + b"\r\n"
    )
    code, _ = await send_mail_async(
        relay.port, body=body.replace(b"y" * 20_000, b"yy\r\n" * 5000)
    )
    assert code == 552


async def test_inbound_bare_lf_cannot_smuggle_a_second_message(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    smuggle = (
        b"Subject: first\r\n\r\nbody\n.\r\nMAIL FROM:<evil@x.test>\r\n"
        b"RCPT TO:<victim@contoso.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
    )
    replies = await asyncio.to_thread(
        _dialogue,
        relay.port,
        [
            b"EHLO legacy\r\n",
            b"MAIL FROM:<relay@contoso.test>\r\n",
            b"RCPT TO:<ops@contoso.test>\r\n",
            b"DATA\r\n",
            smuggle,
        ],
    )
    assert replies[-1].startswith(b"250 ")
    await exchange.wait_for_messages(1, timeout=15)
    await asyncio.sleep(0.5)
    assert [m.rcpt_tos for m in exchange.messages] == [["ops@contoso.test"]]


async def test_inbound_bare_line_endings_are_normalised_to_crlf(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    await send_mail_async(relay.port, body=b"Subject: x\r\n\r\none\ntwo\rthree\r\n")
    await exchange.wait_for_messages(1, timeout=15)
    assert (
        strip_received(exchange.messages[0].data)
        == b"Subject: x\r\n\r\none\r\ntwo\r\nthree\r\n"
    )


async def test_inbound_peer_outside_allowed_networks_is_refused_at_connect(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"listen": {"allowed_networks": ["192.0.2.0/24"]}},
    )
    replies = await asyncio.to_thread(_dialogue, relay.port, [])
    assert replies[0].startswith(b"554 5.7.1 ")


async def test_inbound_spool_failure_is_answered_451_not_500(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    await relay.app.spool.close()
    code, reply = await send_mail_async(relay.port)
    assert (code, reply[:5]) == (451, b"4.3.0")


async def test_inbound_full_spool_is_answered_452_431_already_at_mail(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    relay.app.spool._min_free_bytes = 1 << 62  # a floor no file system can meet
    replies = await asyncio.to_thread(
        _dialogue,
        relay.port,
        [b"EHLO legacy\r\n", b"MAIL FROM:<relay@contoso.test> SIZE=2000\r\n"],
    )
    assert replies[-1].startswith(b"452 4.3.1 ")


async def test_inbound_declared_size_beyond_the_free_space_is_put_off_at_mail(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    free = shutil.disk_usage(relay.app.spool.directory).free
    relay.app.spool._min_free_bytes = max(0, free - 10_000_000)
    replies = await asyncio.to_thread(
        _dialogue,
        relay.port,
        [
            b"EHLO legacy\r\n",
            b"MAIL FROM:<relay@contoso.test> SIZE=1000\r\n",
            b"RSET\r\n",
            b"MAIL FROM:<relay@contoso.test> SIZE=30000000\r\n",
        ],
    )
    assert (replies[2][:3], replies[4][:9]) == (b"250", b"452 4.3.1")


async def test_inbound_too_many_recipients_get_452_453(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"listen": {"max_recipients": 2}}
    )
    replies = await asyncio.to_thread(
        _dialogue,
        relay.port,
        [
            b"EHLO legacy\r\n",
            b"MAIL FROM:<a@b.test>\r\n",
            b"RCPT TO:<one@contoso.test>\r\n",
            b"RCPT TO:<two@contoso.test>\r\n",
            b"RCPT TO:<three@contoso.test>\r\n",
        ],
    )
    assert replies[-1].startswith(b"452 4.5.3 ")


def _credentials_file(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "inbound-users"
    path.write_text(f"printer:{INBOUND_PASSWORD}\n")
    path.chmod(0o600)
    return path


async def test_inbound_auth_login_prompts_username_and_password(
    exchange: SandboxExchange, start_relay: RelayFactory, tmp_path: Path
) -> None:
    credentials = _credentials_file(tmp_path / "auth")
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"listen": {"auth_credentials_file": str(credentials)}},
    )
    replies = await asyncio.to_thread(
        _dialogue,
        relay.port,
        [
            b"EHLO legacy\r\n",
            b"AUTH LOGIN\r\n",
            base64.b64encode(b"printer") + b"\r\n",
            base64.b64encode(INBOUND_PASSWORD.encode()) + b"\r\n",
        ],
    )
    prompts = [base64.b64decode(reply[4:].strip()) for reply in replies[2:4]]
    assert (prompts, replies[4][:9]) == ([b"Username:", b"Password:"], b"235 2.7.0")


async def test_inbound_auth_failure_is_535_578(
    exchange: SandboxExchange, start_relay: RelayFactory, tmp_path: Path
) -> None:
    credentials = _credentials_file(tmp_path / "auth")
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"listen": {"auth_credentials_file": str(credentials)}},
    )
    wrong = base64.b64encode(b"\0printer\0not-the-password")
    replies = await asyncio.to_thread(
        _dialogue, relay.port, [b"EHLO legacy\r\n", b"AUTH PLAIN " + wrong + b"\r\n"]
    )
    assert replies[-1].startswith(b"535 5.7.8 ")


async def test_inbound_without_credentials_offers_no_auth(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    replies = await asyncio.to_thread(_dialogue, relay.port, [b"EHLO legacy\r\n"])
    assert b"AUTH" not in replies[1]


async def test_inbound_without_credentials_knows_no_auth_command(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    replies = await asyncio.to_thread(
        _dialogue, relay.port, [b"EHLO legacy\r\n", b"HELP\r\n", b"AUTH PLAIN\r\n"]
    )
    assert (b"AUTH" in replies[2], replies[3][:3]) == (False, b"500"), replies


# --- the block DATA path ----------------------------------------------------------

_DATA_ALPHABET = st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"\x80", b"\r\n."])


def _reference_unstuff(stream: bytes) -> tuple[bytes, int] | None:
    """The line-by-line reading of RFC 5321 section 4.5.2: the parser's oracle."""
    lines: list[bytes] = []
    position = 0
    while True:
        end = stream.find(b"\r\n", position)
        if end < 0:
            return None
        line = stream[position : end + 2]
        position = end + 2
        if line == b".\r\n":
            break
        lines.append(line[1:] if line.startswith(b".") else line)
    return re.sub(rb"\r\n|\r|\n", b"\r\n", b"".join(lines)), position


def _feed_in_chunks(stream: bytes, cuts: list[int]) -> tuple[bytes, int]:
    unstuffer = DataUnstuffer()
    output = bytearray()
    used_total = 0
    bounds = [0, *sorted({cut % (len(stream) + 1) for cut in cuts}), len(stream)]
    for start, end in itertools.pairwise(bounds):
        message_bytes, used = unstuffer.feed(stream[start:end])
        output += message_bytes
        used_total += used
        if unstuffer.done:
            break
    return bytes(output), used_total


@given(
    pieces=st.lists(_DATA_ALPHABET, max_size=60),
    after=st.binary(max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_inbound_block_parser_matches_the_line_by_line_reference(
    pieces: list[bytes], after: bytes, cuts: list[int]
) -> None:
    stream = b"".join(pieces) + b"\r\n.\r\n" + after
    expected = _reference_unstuff(stream)
    assert expected is not None
    assert _feed_in_chunks(stream, cuts) == expected


@given(
    pieces=st.lists(_DATA_ALPHABET, max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_inbound_block_parser_never_ends_without_a_crlf_dot_crlf(
    pieces: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(pieces).replace(b"\r\n.\r\n", b"\r\n..\r\n")
    if stream.startswith(b".\r\n"):
        stream = b"." + stream
    unstuffer = DataUnstuffer()
    for piece in (stream[:3], stream[3:]):
        unstuffer.feed(piece)
    assert unstuffer.done is (_reference_unstuff(stream) is not None)


@given(
    lines=st.lists(
        st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        max_size=30,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_inbound_dot_stuffer_round_trips_through_the_unstuffer(
    lines: list[bytes], cuts: list[int]
) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    stuffer = DotStuffer()
    bounds = [0, *sorted({cut % (len(body) + 1) for cut in cuts}), len(body)]
    wire = b"".join(
        stuffer.stuff(body[start:end]) for start, end in itertools.pairwise(bounds)
    )
    wire += stuffer.finish()
    assert _feed_in_chunks(wire, [7, 100]) == (body, len(wire))


def test_inbound_block_parser_keeps_dots_after_bare_line_feeds() -> None:
    stream = b"a\n.\r\nb\r.\rc\r\n..d\r\n.\r\n"
    assert _feed_in_chunks(stream, [1, 2, 3, 4, 5, 6]) == (
        b"a\r\n.\r\nb\r\n.\r\nc\r\n.d\r\n",
        len(stream),
    )


async def test_inbound_pipelined_commands_after_the_terminator_are_answered(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))

    def converse() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            stream = sock.makefile("rb")
            _read_reply(stream)
            sock.sendall(
                b"EHLO legacy\r\nMAIL FROM:<relay@contoso.test>\r\n"
                b"RCPT TO:<ops@contoso.test>\r\nDATA\r\n"
            )
            for _ in range(4):
                _read_reply(stream)
            # The body, its end and two more commands arrive in one segment.
            sock.sendall(b"Subject: p\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
            return [_read_reply(stream) for _ in range(3)]

    replies = await asyncio.to_thread(converse)
    assert [reply[:3] for reply in replies] == [b"250", b"250", b"221"]


async def test_inbound_oversize_data_keeps_the_session_in_step(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"listen": {"max_message_size": 10_000}},
    )
    replies = await asyncio.to_thread(
        _dialogue,
        relay.port,
        [
            b"EHLO legacy\r\n",
            b"MAIL FROM:<relay@contoso.test>\r\n",
            b"RCPT TO:<ops@contoso.test>\r\n",
            b"DATA\r\n",
            b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 400 + b".\r\n",
            b"NOOP\r\n",
        ],
    )
    assert (replies[-2][:9], replies[-1][:3]) == (b"552 5.3.4", b"250")


async def test_inbound_big_body_is_streamed_to_the_spool_not_held(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    streamed: list[Path] = []
    spool = relay.app.spool
    original = spool.new_temp_file

    def recording_new_temp_file() -> Path:
        path = original()
        streamed.append(path)
        return path

    spool.new_temp_file = recording_new_temp_file  # type: ignore[method-assign]
    body = (
        b"Subject: big\r\n\r\n" + (b".dotted line\r\n" + b"y" * 70 + b"\r\n") * 20_000
    )
    await send_mail_async(relay.port, body=body)
    await exchange.wait_for_messages(1, timeout=20)
    assert (len(streamed), strip_received(exchange.messages[0].data)) == (1, body)


async def test_inbound_small_body_stays_in_memory(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    streamed: list[Path] = []
    spool = relay.app.spool
    spool.new_temp_file = lambda: streamed.append(Path()) or Path()  # type: ignore[method-assign]
    await send_mail_async(relay.port)
    await exchange.wait_for_messages(1, timeout=15)
    assert streamed == []


async def test_inbound_protocol_finds_every_command_and_auth_method(
    exchange: SandboxExchange, start_relay: RelayFactory, tmp_path: Path
) -> None:
    credentials = _credentials_file(tmp_path / "auth")
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"listen": {"auth_credentials_file": str(credentials)}},
    )
    protocol = relay.app.inbound._protocol()
    everything = object.__dir__(protocol)
    hooks = object.__dir__(protocol.event_handler)
    assert (
        set(protocol._smtp_methods),
        set(protocol._auth_methods),
        set(protocol._handle_hooks),
    ) == (
        {name.removeprefix("smtp_") for name in everything if name.startswith("smtp_")},
        {
            name.removeprefix("auth_").replace("__", "-")
            for name in everything
            if name.startswith("auth_")
        },
        {name.removeprefix("handle_") for name in hooks if name.startswith("handle_")},
    )


@given(
    pieces=st.lists(_DATA_ALPHABET, max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_inbound_data_reader_never_takes_the_next_command(
    pieces: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(pieces) + b"\r\n.\r\n"
    expected = _reference_unstuff(stream + b"QUIT\r\n")
    assert expected is not None

    async def read() -> tuple[bytes, int, bytes]:
        # A tiny limit makes the reader hand over data in many small blocks.
        reader = asyncio.StreamReader(limit=8)
        whole = stream + b"QUIT\r\n"
        bounds = [0, *sorted({cut % (len(whole) + 1) for cut in cuts}), len(whole)]

        async def feed() -> None:
            for start, end in itertools.pairwise(bounds):
                reader.feed_data(whole[start:end])
                await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.create_task(feed())
        unstuffer = DataUnstuffer()
        output = bytearray()
        tail = b"\r\n"
        taken = 0
        while not unstuffer.done:
            block = await read_data_block(reader, tail)
            taken += len(block)
            tail = (tail + block)[-4:]
            output += unstuffer.feed(block)[0]
        await feeder
        return bytes(output), taken, await reader.read()

    message, taken, rest = asyncio.run(read())
    after = (stream + b"QUIT\r\n")[expected[1] :]
    assert (message, taken, rest) == (expected[0], expected[1], after)


def _trickle_data(port: int, *, lines: int, pause: float) -> bytes:
    """A slow legacy client: one short DATA line every `pause` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        stream = sock.makefile("rb")
        _read_reply(stream)
        for command in (
            b"EHLO slow\r\n",
            b"MAIL FROM:<relay@contoso.test>\r\n",
            b"RCPT TO:<ops@contoso.test>\r\n",
            b"DATA\r\n",
        ):
            sock.sendall(command)
            _read_reply(stream)
        sock.sendall(b"Subject: slow\r\n\r\n")
        for number in range(lines):
            time.sleep(pause)
            sock.sendall(f"line {number:<94}\r\n".encode())
        sock.sendall(b".\r\n")
        return _read_reply(stream)


async def test_inbound_slow_sender_in_data_is_not_cut_off_as_idle(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"listen": {"idle_timeout": 1.0}}
    )
    # 100 bytes every 0.3 s: slow, but above the minimum DATA rate (256 B/s).
    reply = await asyncio.to_thread(_trickle_data, relay.port, lines=10, pause=0.3)
    assert reply.startswith(b"250 ")


def _pause_between_commands(port: int, pauses: list[float]) -> list[bytes]:
    """NOOP after each pause; the replies, ending with what the relay said last."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        stream = sock.makefile("rb")
        _read_reply(stream)
        for pause in pauses:
            time.sleep(pause)
            try:
                sock.sendall(b"NOOP\r\n")
            except OSError:
                replies.append(b"<closed>")
                break
            replies.append(_read_reply(stream) or b"<closed>")
    return replies


async def test_inbound_idle_timeout_counts_from_the_last_command(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"listen": {"idle_timeout": 1.0}}
    )
    # Three gaps of 0.6 s (1.8 s in all, each under the timeout), then 1.6 s idle.
    replies = await asyncio.to_thread(
        _pause_between_commands, relay.port, [0.6, 0.6, 0.6, 1.6]
    )

    assert [reply[:3] == b"250" for reply in replies] == [True, True, True, False]


async def test_inbound_full_spool_refusals_are_logged_once_a_minute(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port),
        # A floor no disk reaches: every message is refused for want of room.
        overrides={"paths": {"spool_min_free_bytes": 2**62}},
    )

    def mail_reply() -> int:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as client:
            client.ehlo("legacy.local")
            return client.mail("alerts@appliance.test")[0]

    with structlog.testing.capture_logs() as logged:
        codes = [await asyncio.to_thread(mail_reply) for _ in range(3)]

    assert (
        codes,
        [(e["event"], e["refused"]) for e in logged if e["event"] == "spool_full"],
    ) == ([452, 452, 452], [("spool_full", 1)])


async def test_inbound_counts_messages_arriving_until_their_reply_or_hang_up(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    arriving = relay.app.inbound.arriving
    _, writer = await open_data(relay.port)
    during = arriving.count
    writer.write(b"Subject: cut off\r\n\r\nhalf a line")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: not relay.app.inbound.connections, timeout=5)
    await send_mail_async(relay.port)
    assert (during, arriving.count) == (1, 0)
