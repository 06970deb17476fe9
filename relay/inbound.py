"""The SMTP listener for legacy services: loopback only, strict, never silent.

Built on aiosmtpd. The relay's rules on top of it: peers outside the allowed
networks are refused at connect; every reply carries an RFC 3463 enhanced status
code; the greeting names no software; a message is answered 250 only once the
spool has it on disk; an internal fault is answered 451, never a 500 with an
exception inside.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import inspect
import ipaddress
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, cast

import structlog
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.config import IpNetwork, ListenConfig
from relay.dotstuffing import CRLF, TERMINATOR, DataUnstuffer
from relay.errors import SpoolFullError

log = structlog.get_logger(__name__)
# aiosmtpd's own logger writes several INFO lines for every connection and
# command, which cost more CPU than relaying a small message; the relay logs one
# summary per message itself.
AIOSMTPD_LOGGER = "mail.log"

# The default enhanced status code for each reply code, for replies that aiosmtpd
# writes without one (RFC 3463; RFC 2034 section 3 exempts greeting and EHLO).
_ENHANCED_BY_REPLY = {
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "251": "2.1.5",
    "252": "2.5.0",
    "421": "4.3.0",
    "451": "4.3.0",
    "452": "4.3.1",
    # aiosmtpd answers STARTTLS with a bare 454: the listener has no TLS.
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "538": "5.7.11",
    "550": "5.1.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
_ENHANCED_CODE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(\s|$)")
# Characters that would let an address inject commands or headers upstream.
_FORBIDDEN_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>\s]")
# "<local@domain> params" with a dot-atom local part (RFC 5321 section 4.1.2):
# nearly every address a legacy service sends, read without the email package's
# full RFC 5322 parser.
_PLAIN_PATH = re.compile(
    r"\s*<((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\.)*[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(.*)",
    re.DOTALL,
)

INTERNAL_ERROR_REPLY = (
    "451 4.3.0 Local error in processing; the message was not accepted, try again later"
)
NULL_SENDER = "<>"
STORAGE_FULL_REPLY = "452 4.3.1 Insufficient system storage; try again later"
MESSAGE_TOO_BIG_REPLY = "552 5.3.4 Message size exceeds fixed maximum message size"
START_DATA_REPLY = "354 End data with <CR><LF>.<CR><LF>"
# Bodies up to this size stay in memory; bigger ones are written to the spool as
# they arrive. 256 KiB covers nearly all alerts and reports.
BODY_MEMORY_LIMIT = 256 * 1024
# A full spool is logged at most this often, with the count of refusals.
SPOOL_FULL_LOG_SECONDS = 60.0
# The most DATA bytes read in one block (the reader pauses the socket at twice
# that): large enough that a 100 KB message takes one or two trips, small enough
# for hundreds of concurrent clients.
DATA_BLOCK_LIMIT = 128 * 1024


class MessageSink:
    """What the listener hands accepted messages to (the spool or pass-through)."""

    def new_body_file(self) -> Path | None:
        """A private file to stream a large body into, or None to keep it in memory.

        The listener writes the body into it and passes the path to `accept`,
        which then owns the file.
        """
        return None

    def has_room_for(self, size: int) -> bool:
        """Whether a message of `size` bytes can be taken now (RFC 1870 SIZE)."""
        return True

    async def accept(
        self,
        *,
        mail_from: str,
        recipients: list[str],
        body: bytes | Path,
        smtputf8: bool,
        body_8bit: bool,
        client_address: str,
    ) -> str:
        """Take the message; return the final reply to give the client.

        `body` is the message itself, or a file from `new_body_file` holding it.
        """
        raise NotImplementedError


class IncomingBody:
    """A message body being received: in memory while small, then in a file.

    Big messages go to disk as they arrive, so that ten clients sending 30 MB
    each do not hold 300 MB in memory.
    """

    def __init__(
        self, *, sink: MessageSink, memory_limit: int = BODY_MEMORY_LIMIT
    ) -> None:
        self._sink = sink
        self._memory_limit = memory_limit
        self._memory = bytearray()
        self._path: Path | None = None
        self._descriptor: int | None = None
        self._discarded = False
        self.size = 0
        self.body_8bit = False

    def write(self, data: bytes) -> None:
        """Append message bytes; raises OSError if the file cannot take them."""
        if not data or self._discarded:
            return
        self.size += len(data)
        if not self.body_8bit and not data.isascii():
            self.body_8bit = True
        if self._descriptor is not None:
            _write_all(self._descriptor, data)
            return
        self._memory += data
        if len(self._memory) > self._memory_limit:
            self._move_to_file()

    def _move_to_file(self) -> None:
        path = self._sink.new_body_file()
        if path is None:
            # The sink keeps bodies in memory (pass-through): stop asking.
            self._memory_limit = sys.maxsize
            return
        self._path = path
        # Written from the event loop: the page cache takes a block in
        # microseconds; the fsync that makes it durable runs in the spool's thread.
        self._descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        _write_all(self._descriptor, self._memory)
        self._memory = bytearray()

    def finish(self) -> bytes | Path:
        """The whole body: its bytes, or the closed file that holds them."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        if self._path is not None:
            return self._path
        return bytes(self._memory)

    def discard(self) -> None:
        """Drop whatever was received; later writes are ignored."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
        self._memory = bytearray()
        self._discarded = True


def _write_all(descriptor: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


def received_header(
    *, helo: str | None, client_address: str, hostname: str, queue_hint: str
) -> bytes:
    """The RFC 5321 section 4.4 trace header this relay adds."""
    stamp = _date_stamp(int(time.time()))
    helo_text = _header_safe(helo or "unknown")
    return (
        f"Received: from {helo_text} ([{client_address}])\r\n"
        f"\tby {hostname} (epp-mail-relay) with ESMTP id {queue_hint};\r\n"
        f"\t{stamp}\r\n"
    ).encode()


@functools.lru_cache(maxsize=2)
def _date_stamp(second: int) -> str:
    # One RFC 5322 date per second, however many messages arrive in it.
    return format_datetime(datetime.fromtimestamp(second, UTC))


def _header_safe(text: str) -> str:
    return re.sub(r"[^\x21-\x7e]", "?", text)[:200]


class RelayHandler:
    """aiosmtpd handler: validates the envelope and hands the message on."""

    def __init__(self, *, config: ListenConfig, sink: MessageSink) -> None:
        self._config = config
        self._sink = sink
        # Refusals for a full spool since the last "spool_full" log line.
        self._spool_full_refusals = 0
        self._spool_full_logged_at = -SPOOL_FULL_LOG_SECONDS

    def __dir__(self) -> list[str]:
        """The hook and AUTH method names aiosmtpd looks for, as on RelaySMTP."""
        return _protocol_method_names(type(self))

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        kept = [
            r for r in responses if not r.startswith("250-AUTH") or _auth_on(server)
        ]
        # The last line is "250 HELP"; the extension goes before it.
        kept.insert(len(kept) - 1, "250-ENHANCEDSTATUSCODES")
        kept.insert(len(kept) - 1, "250-PIPELINING")
        return kept

    # aiosmtpd reads this hook's signature at every new connection; computed
    # here once, inspect finds it instead of working it out again.
    handle_EHLO.__signature__ = inspect.signature(handle_EHLO)  # type: ignore[attr-defined]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # aiosmtpd hands the null reverse-path of a bounce (RFC 5321 section
        # 4.5.5) over as "<>" and takes an empty sender for "no MAIL yet", so the
        # marker is kept until the message is stored.
        if address in ("", NULL_SENDER):
            envelope.mail_from = NULL_SENDER
        elif _FORBIDDEN_IN_ADDRESS.search(address):
            return "553 5.1.7 The sender address has characters that are not allowed"
        elif not _valid_address(address, utf8=envelope.smtp_utf8):
            return "553 5.1.7 The sender address is not valid"
        else:
            envelope.mail_from = address
        # Say "no room" before the client sends the body, not after (RFC 1870
        # section 6.1: 452 when the size is acceptable but space is short now).
        if not self._sink.has_room_for(_declared_size(mail_options)):
            envelope.mail_from = None
            self._note_spool_full(_peer_host(session.peer))
            return STORAGE_FULL_REPLY
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self._config.max_recipients:
            return "452 4.5.3 Too many recipients"
        if _FORBIDDEN_IN_ADDRESS.search(address) or not _valid_address(
            address, utf8=envelope.smtp_utf8
        ):
            return "553 5.1.3 The recipient address is not valid"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    def open_body(self, session: Session) -> IncomingBody:
        """Start a body with the relay's trace header (RFC 5321 section 4.4)."""
        body = IncomingBody(sink=self._sink)
        body.write(
            received_header(
                helo=session.host_name,
                client_address=_peer_host(session.peer),
                hostname=self._config.hostname,
                queue_hint=f"{int(time.time() * 1000):x}",
            )
        )
        return body

    async def accept_body(
        self, session: Session, envelope: Envelope, body: IncomingBody
    ) -> str:
        """Hand a complete message to the sink; return the reply for the client."""
        client_address = _peer_host(session.peer)
        body_8bit = body.body_8bit
        try:
            return await self._sink.accept(
                mail_from=""
                if envelope.mail_from == NULL_SENDER
                else envelope.mail_from or "",
                recipients=list(envelope.rcpt_tos),
                body=body.finish(),
                smtputf8=bool(envelope.smtp_utf8),
                body_8bit=body_8bit,
                client_address=client_address,
            )
        except SpoolFullError:
            self._note_spool_full(client_address)
            return STORAGE_FULL_REPLY

    def _note_spool_full(self, client_address: str) -> None:
        """Say why clients get 452, once a minute at most however many there are."""
        self._spool_full_refusals += 1
        now = time.monotonic()
        if now - self._spool_full_logged_at < SPOOL_FULL_LOG_SECONDS:
            return
        log.warning(
            "spool_full",
            client=client_address,
            refused=self._spool_full_refusals,
        )
        self._spool_full_logged_at = now
        self._spool_full_refusals = 0

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would otherwise answer "500 Error: (Type) text", which tells the
        # client to give up and shows internals; a fault of ours is temporary.
        log.error(
            "inbound_internal_error", error_type=type(error).__name__, error=str(error)
        )
        return INTERNAL_ERROR_REPLY


# aiosmtpd reads handle_EHLO's signature for every new connection, to tell its
# old four-argument form from the new one; worked out once here instead.
setattr(  # noqa: B010
    RelayHandler.handle_EHLO,
    "__signature__",
    inspect.signature(RelayHandler.handle_EHLO),
)


def _auth_on(server: SMTP) -> bool:
    return bool(getattr(server, "relay_auth_enabled", False))


def _declared_size(mail_options: list[str]) -> int:
    """The SIZE= a client declared at MAIL (0 when it declared none)."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


def _valid_address(address: str, *, utf8: bool) -> bool:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(address) > 320:
        return False
    if not utf8 and not address.isascii():
        return False
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _peer_host(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with the relay's connection policy and reply style."""

    # The prompts legacy clients expect (base64 of these, RFC 4954 section 4).
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(
        self,
        handler: RelayHandler,
        *,
        config: ListenConfig,
        allowed_networks: Iterable[IpNetwork],
        authenticator: Callable[..., AuthResult] | None,
        connections: set[RelaySMTP],
        arriving: ArrivingMessages | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(
            handler,
            # Given, aiosmtpd need not look the loop up for every connection.
            loop=loop,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.hostname,
            # The greeting says what the server is for, not what software runs it.
            ident="ESMTP ready",
            timeout=config.idle_timeout,
            auth_required=config.auth_required,
            auth_require_tls=False,
            authenticator=authenticator,
            auth_exclude_mechanism=[] if authenticator else ["LOGIN", "PLAIN"],
        )
        self.relay_auth_enabled = authenticator is not None
        if not self.relay_auth_enabled:
            # Not offered at EHLO, so not a command here either: HELP leaves it
            # out and AUTH is answered as unknown.
            self._smtp_methods.pop("AUTH", None)
        self._allowed_networks = tuple(allowed_networks)
        self._connections = connections
        self._arriving = arriving if arriving is not None else ArrivingMessages()
        self._max_connections = config.max_connections
        self._refused = False
        self._receiving_data = False
        self._min_data_bytes = config.min_data_rate * config.idle_timeout
        self._bytes_received = 0
        self._bytes_at_last_timeout = 0
        self._idle_deadline = 0.0
        # Lines of a multi-line reply not yet written (see push).
        self._reply_lines: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        if self._original_transport is None and not self._peer_allowed(peer):
            # Refuse before aiosmtpd starts a session: no greeting, no parsing.
            self._refused = True
            log.warning("inbound_peer_refused", peer=_peer_host(peer))
            _refuse(transport, b"554 5.7.1 Access denied: your address is not allowed")
            return
        if (
            self._original_transport is None
            and len(self._connections) >= self._max_connections
        ):
            self._refused = True
            _refuse(transport, b"421 4.7.0 Too many connections, try again later")
            return
        self._connections.add(self)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._bytes_received += len(data)
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd replaces the idle timer at every command; here the deadline
        # moves and the timer, when it fires early, sets itself again for the rest.
        seconds = duration or self._timeout_duration
        now = self.loop.time()
        self._idle_deadline = now + seconds
        handle = self._timeout_handle
        if (
            handle is not None
            and not handle.cancelled()
            and now < handle.when() <= self._idle_deadline
        ):
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        now = self.loop.time()
        if now < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(
                self._idle_deadline, self._timeout_cb
            )
            return
        # During DATA the body is read in blocks, and a slow client may send for
        # a long while before a block is complete: it is not idle while it keeps
        # up the minimum rate, but a trickle of a byte now and then is.
        received = self._bytes_received - self._bytes_at_last_timeout
        if self._receiving_data and received > 0 and received >= self._min_data_bytes:
            self._bytes_at_last_timeout = self._bytes_received
            self._reset_timeout()
            return
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def connection_lost(self, error: Exception | None) -> None:
        self._connections.discard(self)
        if self._refused:
            return
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        super().eof_received()
        # The session ends with the client's EOF: aiosmtpd cancels the handler,
        # whose cleanup closes the connection. A handler cancelled before its
        # first step (uvloop reports EOF that early) never runs it, and the
        # connection would hold its slot until the idle timeout; so close now.
        return False

    def _peer_allowed(self, peer: Any) -> bool:
        return _host_allowed(_peer_host(peer), self._allowed_networks)

    def __dir__(self) -> list[str]:
        """The command and AUTH method names only: what aiosmtpd looks for in dir().

        aiosmtpd scans dir() of every new connection's protocol for its smtp_* and
        auth_* methods; over the hundreds of attributes of an asyncio protocol,
        that scan cost more than the rest of a small message's SMTP dialogue.
        """
        return _protocol_method_names(type(self))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parsing, with a fast path for plain addresses."""
        matched = _PLAIN_PATH.fullmatch(arg)
        if matched is None:
            parsed: tuple[str | None, str | None] = super()._getaddr(arg)
            return parsed
        address, rest = matched.groups()
        local_part = address.rpartition("@")[0]
        if self.local_part_limit and len(local_part) > self.local_part_limit:
            return None, None
        return address, rest.lstrip()

    async def smtp_DATA(self, arg: str) -> None:
        """Receive the message in large blocks, not aiosmtpd's line-by-line loop.

        The rules stay those of RFC 5321 section 4.5.2: only CRLF "." CRLF ends
        the data, leading dots are removed, and the size limit is judged after
        reading to the end (section 4.2.5), so the client hears the reply in step.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope, session = self.envelope, self.session
        if envelope is None or session is None or not envelope.rcpt_tos:
            await self.push("503 5.5.1 Need RCPT command first")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return

        self._arriving.count += 1
        try:
            await self._receive_message(envelope, session)
        finally:
            self._arriving.count -= 1

    async def _receive_message(self, envelope: Envelope, session: Session) -> None:
        """From the 354 to the reply: the body, then the handler's verdict."""
        await self.push(START_DATA_REPLY)
        body = self.relay_handler.open_body(session)
        # aiosmtpd's reader returns at most a command line's worth (1001 bytes)
        # before the terminator is found; raised for the body, the blocks are
        # as large as what has arrived. StreamReader keeps it as `_limit`.
        line_limit = getattr(self._reader, "_limit", None)
        if line_limit is not None:
            setattr(self._reader, "_limit", DATA_BLOCK_LIMIT)  # noqa: B010
        self._receiving_data = True
        self._bytes_at_last_timeout = self._bytes_received
        try:
            failure = await self._receive_data(body)
        except BaseException:
            body.discard()
            if self._writer is not None:
                self._writer.close()
            raise
        finally:
            self._receiving_data = False
            if line_limit is not None:
                setattr(self._reader, "_limit", line_limit)  # noqa: B010

        if failure is not None:
            body.discard()
            self._end_transaction()
            await self.push(failure)
            return
        status = await self.relay_handler.accept_body(session, envelope, body)
        self._end_transaction()
        await self.push(status)

    def _end_transaction(self) -> None:
        """Forget the envelope, as aiosmtpd does after DATA."""
        self._set_post_data_state()  # type: ignore[no-untyped-call]

    async def _receive_data(self, body: IncomingBody) -> str | None:
        """Read up to the terminator into `body`; return a refusal, if any."""
        unstuffer = DataUnstuffer()
        limit = self.data_size_limit
        failure: str | None = None
        tail = CRLF
        while not unstuffer.done:
            block = await self._read_data_block(tail)
            # The idle timeout is for silence, not for the time a big body takes.
            self._reset_timeout()
            tail = block[-4:] if len(block) >= 4 else (tail + block)[-4:]
            message_bytes, _ = unstuffer.feed(block)
            if failure is not None:
                continue
            if limit and unstuffer.raw_size > limit:
                failure = MESSAGE_TOO_BIG_REPLY
                body.discard()
                continue
            try:
                body.write(message_bytes)
            except OSError as exc:
                log.error("inbound_body_write_failed", error=str(exc))
                failure = (
                    STORAGE_FULL_REPLY
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                    else INTERNAL_ERROR_REPLY
                )
                body.discard()
        return failure

    async def _read_data_block(self, tail: bytes) -> bytes:
        return await read_data_block(self._reader, tail)

    @property
    def relay_handler(self) -> RelayHandler:
        """The handler, typed: aiosmtpd keeps it as `event_handler`."""
        handler = self.event_handler
        if not isinstance(handler, RelayHandler):
            raise TypeError("RelaySMTP needs a RelayHandler")
        return handler

    async def push(self, status: str | bytes) -> None:
        """Send one reply line; a multi-line reply leaves in a single write.

        aiosmtpd writes and drains each line on its own, so its EHLO answer
        cost seven socket writes, each waking the client, where one will do.
        Continuation lines ("250-...") wait for the line that ends the reply.
        """
        if isinstance(status, str):
            status = _with_enhanced_code(status).encode(
                "utf-8" if self.enable_SMTPUTF8 else "ascii"
            )
        self._reply_lines.append(status + CRLF)
        if status[3:4] == b"-":
            return
        reply = b"".join(self._reply_lines)
        self._reply_lines.clear()
        self._writer.write(reply)
        await self._writer.drain()


_METHOD_NAMES: dict[str, list[str]] = {}


def _protocol_method_names(cls: type) -> list[str]:
    key = f"{cls.__module__}.{cls.__qualname__}"
    names = _METHOD_NAMES.get(key)
    if names is None:
        names = [
            name for name in dir(cls) if name.startswith(("smtp_", "auth_", "handle_"))
        ]
        _METHOD_NAMES[key] = names
    return names


async def read_data_block(reader: asyncio.StreamReader, tail: bytes) -> bytes:
    """The next bytes of DATA from `reader`, never reaching past the terminator.

    `tail` is the last bytes read before (CRLF at the start of DATA). Bytes after
    the terminator are the client's next (pipelined) command and must stay in the
    reader for aiosmtpd's command loop. When the bytes read so far end with the
    start of a terminator, only what could complete it is read; otherwise
    everything up to the next whole terminator, or as much as the reader's limit.
    """
    started = _terminator_started(tail)
    if started:
        return await reader.readexactly(len(TERMINATOR) - started)
    try:
        return await reader.readuntil(TERMINATOR)
    except asyncio.LimitOverrunError as exc:
        # No whole terminator within the limit: what comes before it is safe.
        return await reader.read(exc.consumed)


def _terminator_started(tail: bytes) -> int:
    """How many bytes of a terminator `tail` ends with (0 to 4)."""
    for length in range(len(TERMINATOR) - 1, 0, -1):
        if tail.endswith(TERMINATOR[:length]):
            return length
    return 0


@functools.lru_cache(maxsize=256)
def _host_allowed(host: str, allowed_networks: tuple[IpNetwork, ...]) -> bool:
    """Whether a client address is inside the allowed networks (judged once)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in allowed_networks)


def _refuse(transport: asyncio.BaseTransport, reply: bytes) -> None:
    """Answer a connection that gets no session, and hang up."""
    # uvloop's transports write like asyncio's but do not subclass its
    # WriteTransport, so an isinstance() check would silently drop the reply.
    cast(asyncio.WriteTransport, transport).write(reply + b"\r\n")
    transport.close()


def _with_enhanced_code(status: str) -> str:
    code, separator, text = status[:3], status[3:4], status[4:]
    if separator not in (" ", "-") or code not in _ENHANCED_BY_REPLY:
        return status
    # EHLO lines (RFC 2034 section 3) and replies that already have a code stay.
    if (
        separator == "-"
        or _ENHANCED_CODE.match(text)
        or (code == "250" and text == "HELP")
    ):
        return status
    text = text.removeprefix("Error: ").removeprefix("Error ")
    return f"{code}{separator}{_ENHANCED_BY_REPLY[code]} {text}"


def load_inbound_credentials(path: Path) -> dict[str, str]:
    """Read `username:password` lines for legacy clients that insist on AUTH."""
    credentials: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        username, colon, password = line.partition(":")
        if not colon or not username:
            raise ValueError(f"{path}:{number}: expected username:password")
        credentials[username] = password
    return credentials


def make_authenticator(credentials: Mapping[str, str]) -> Callable[..., AuthResult]:
    """An aiosmtpd authenticator checking local credentials in constant time."""

    def authenticate(
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        username = auth_data.login.decode("utf-8", "replace")
        expected = credentials.get(username)
        supplied = auth_data.password
        ok = expected is not None and hmac.compare_digest(expected.encode(), supplied)
        if not ok:
            log.warning("inbound_auth_failed", username=username, mechanism=mechanism)
        return AuthResult(success=ok, handled=False)

    return authenticate


@dataclass
class ArrivingMessages:
    """How many sessions are between their DATA and its reply: clients waiting."""

    count: int = 0


class InboundServer:
    """The listening sockets on every configured loopback address."""

    def __init__(
        self,
        *,
        config: ListenConfig,
        sink: MessageSink,
        authenticator: Callable[..., AuthResult] | None = None,
    ) -> None:
        self._config = config
        self._handler = RelayHandler(config=config, sink=sink)
        self._authenticator = authenticator
        logging.getLogger(AIOSMTPD_LOGGER).setLevel(logging.WARNING)
        self._servers: list[asyncio.AbstractServer] = []
        self.connections: set[RelaySMTP] = set()
        self.arriving = ArrivingMessages()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _protocol(self) -> RelaySMTP:
        return RelaySMTP(
            self._handler,
            config=self._config,
            allowed_networks=self._config.allowed_networks,
            authenticator=self._authenticator,
            connections=self.connections,
            arriving=self.arriving,
            loop=self._loop,
        )

    async def start(self) -> None:
        """Bind every address; port 0 picks one free port shared by all of them."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        port = self._config.port
        for address in self._config.addresses:
            server = await loop.create_server(
                self._protocol, host=address, port=port, reuse_address=True
            )
            self._servers.append(server)
            if port == 0:
                port = server.sockets[0].getsockname()[1]
        self.port = port
        log.info("inbound_listening", addresses=list(self._config.addresses), port=port)

    async def stop(self, *, grace: float = 5.0) -> None:
        """Stop accepting, give open sessions a moment, then close them."""
        for server in self._servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + grace
        # Sessions end on their clients' schedule; the grace bounds the polling.
        while self.connections and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
