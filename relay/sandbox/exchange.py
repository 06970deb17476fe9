"""An Exchange Online-like SMTP submission server on loopback, for tests and the demo.

`SandboxExchange` speaks ESMTP (RFC 5321) with STARTTLS (RFC 3207), SMTP AUTH
PLAIN/LOGIN/XOAUTH2 (RFC 4954), PIPELINING (RFC 2920) and enhanced status codes
(RFC 3463) the way smtp.office365.com:587 does: the same extensions before and after
TLS, the same reply texts, and the same per-mailbox limits (concurrent sessions,
recipients per message, message size, messages per minute).

It is written by hand on asyncio streams and imports nothing from the relay, from
aiosmtpd or from aiosmtplib: a misreading of the protocol shared by the product and
its test peer would hide itself.

Tests steer it at run time with faults (`inject`, `silent_at`, `delay`, `drop_at`,
`clear_faults`) and outages (`stop` then `start` on the same port), and compare what
it recorded: `messages` (envelope and exact bytes), `plaintext_received` (every byte
that arrived before TLS), `transcript`, `sessions` and the counters.

Stages where faults apply, and what a fault there replaces:

    greeting      the 220 banner
    ehlo          the reply to EHLO or HELO
    starttls      the 220 that starts the TLS handshake
    auth          the reply after the credentials arrived (match: user name)
    mail          the reply to MAIL FROM (match: sender)
    rcpt          the reply to RCPT TO (match: recipient)
    data_command  the 354 to the DATA command (match: any accepted recipient)
    data          the reply after the message's final dot (match: any recipient)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import datetime
import email.utils
import enum
import hmac
import ipaddress
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, SupportsIndex

from relay.sandbox.certs import CertificateKind, SandboxPKI

# The SIZE Exchange Online advertises (150 MiB); the mailbox limit is enforced later.
ADVERTISED_MESSAGE_SIZE = 157_286_400
# Exchange Online's default mailbox send limit, enforced after the message arrived.
DEFAULT_MAILBOX_MESSAGE_SIZE = 35 * 1024 * 1024
# RFC 4954 section 4 lets an AUTH command line grow to 12288 octets, which an
# XOAUTH2 initial response with a 1,500+ character token needs; every other command
# line is held to the same bound.
DEFAULT_MAX_LINE_LENGTH = 12_288
# How much of a message line is read at once; longer lines arrive in pieces.
_MESSAGE_PIECE_LENGTH = 65_536
# How long a closing connection may take before it is cut.
_CLOSE_GRACE_SECONDS = 1.0
# How long `stop` lets cut sessions wind down before cancelling them.
_STOP_GRACE_SECONDS = 1.0
# The sliding window of the messages_per_minute limit.
_RATE_WINDOW_SECONDS = 60.0
# The name the sandbox calls itself in the banner, EHLO and message ids.
DEFAULT_SERVER_NAME = "sandbox.outlook.test"

Mode = Literal["starttls", "implicit"]


class ReplyCode(enum.IntEnum):
    """The SMTP reply codes the sandbox sends (RFC 5321 section 4.2.3, RFC 4954)."""

    SERVICE_READY = 220
    CLOSING = 221
    AUTH_SUCCEEDED = 235
    OK = 250
    CANNOT_VERIFY = 252
    AUTH_CONTINUE = 334
    START_MAIL_INPUT = 354
    SERVICE_NOT_AVAILABLE = 421
    # RFC 4954 names 432 "password transition needed"; Exchange Online reuses it for
    # its per-mailbox concurrency limit.
    CONCURRENCY_LIMIT = 432
    LOCAL_ERROR = 451
    INSUFFICIENT_STORAGE = 452
    SYNTAX_ERROR = 500
    ARGUMENT_SYNTAX_ERROR = 501
    BAD_SEQUENCE = 503
    PARAMETER_NOT_IMPLEMENTED = 504
    AUTH_REQUIRED = 530
    AUTH_FAILED = 535
    MAILBOX_UNAVAILABLE = 550
    EXCEEDED_STORAGE = 552
    MAILBOX_NAME_NOT_ALLOWED = 553
    TRANSACTION_FAILED = 554
    PARAMETERS_NOT_RECOGNIZED = 555


_REPLY_LINE = re.compile(r"^([2-5]\d\d)(?:[ -](.*))?$", re.DOTALL)


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: a code and one or more lines of text (without the code)."""

    code: int
    lines: tuple[str, ...]

    @classmethod
    def of(cls, code: int, text: str) -> Reply:
        """Return a one-line reply."""
        return cls(code=code, lines=(text,))

    @classmethod
    def parse(cls, reply: str | Sequence[str]) -> Reply:
        """Read a reply written as "550 5.1.1 text", or a list of such lines.

        Raises ValueError for a line without a code, codes that differ between lines,
        or a line break inside a line.
        """
        raw_lines = [reply] if isinstance(reply, str) else list(reply)
        if not raw_lines:
            raise ValueError("a reply needs at least one line")

        codes: set[int] = set()
        texts: list[str] = []
        for raw in raw_lines:
            matched = _REPLY_LINE.match(raw)
            if matched is None or "\r" in raw or "\n" in raw:
                raise ValueError(f"not an SMTP reply line: {raw!r}")
            codes.add(int(matched.group(1)))
            texts.append(matched.group(2) or "")
        if len(codes) != 1:
            raise ValueError(f"reply lines carry different codes: {sorted(codes)}")

        return cls(code=codes.pop(), lines=tuple(texts))

    @property
    def closes_connection(self) -> bool:
        """Whether the server closes the connection after sending this reply."""
        return self.code == ReplyCode.SERVICE_NOT_AVAILABLE

    def encode(self) -> bytes:
        """Return the reply as it goes on the wire (RFC 5321 section 4.2.1)."""
        last = len(self.lines) - 1
        wire = "".join(
            f"{self.code}{' ' if index == last else '-'}{text}\r\n"
            for index, text in enumerate(self.lines)
        )
        return wire.encode("utf-8")

    def __str__(self) -> str:
        return " | ".join(f"{self.code} {text}" for text in self.lines)


# Reply texts as Exchange Online sends them, so the relay's classifier meets the real
# wording. A trailing "[SANDBOX]" stands where Exchange names its front-end server.
_CLOSING = Reply.of(ReplyCode.CLOSING, "2.0.0 Service closing transmission channel")
_AUTH_SUCCEEDED = Reply.of(ReplyCode.AUTH_SUCCEEDED, "2.7.0 Authentication successful")
_OK = Reply.of(ReplyCode.OK, "2.0.0 OK")
_RESETTING = Reply.of(ReplyCode.OK, "2.0.0 Resetting")
_SENDER_OK = Reply.of(ReplyCode.OK, "2.1.0 Sender OK")
_RECIPIENT_OK = Reply.of(ReplyCode.OK, "2.1.5 Recipient OK")
_CANNOT_VERIFY = Reply.of(ReplyCode.CANNOT_VERIFY, "2.1.5 Cannot VRFY user")
_START_TLS = Reply.of(ReplyCode.SERVICE_READY, "2.0.0 SMTP server ready")
_START_MAIL_INPUT = Reply.of(
    ReplyCode.START_MAIL_INPUT, "Start mail input; end with <CRLF>.<CRLF>"
)
_TOO_MANY_SESSIONS = Reply.of(
    ReplyCode.SERVICE_NOT_AVAILABLE,
    "4.3.2 The maximum number of concurrent server connections has exceeded a limit,"
    " closing transmission channel",
)
_IDLE_TIMEOUT = Reply.of(
    ReplyCode.SERVICE_NOT_AVAILABLE, "4.4.2 Connection dropped due to idle timeout"
)
_LEGACY_TLS = Reply.of(
    ReplyCode.SERVICE_NOT_AVAILABLE,
    "4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to"
    " support TLS 1.2. Visit https://aka.ms/smtp_auth_tls. [SANDBOX]",
)
_SENDER_THREAD_LIMIT = Reply.of(
    ReplyCode.CONCURRENCY_LIMIT,
    "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
)
_STARTTLS_REQUIRED = Reply.of(
    ReplyCode.LOCAL_ERROR, "5.7.3 STARTTLS is required to send mail"
)
_TOO_MANY_RECIPIENTS = Reply.of(
    ReplyCode.INSUFFICIENT_STORAGE, "4.5.3 Too many recipients"
)
_LINE_TOO_LONG = Reply.of(ReplyCode.SYNTAX_ERROR, "5.5.2 Line too long")
_INVALID_DOMAIN = Reply.of(ReplyCode.ARGUMENT_SYNTAX_ERROR, "5.5.4 Invalid domain name")
_INVALID_ARGUMENTS = Reply.of(
    ReplyCode.ARGUMENT_SYNTAX_ERROR, "5.5.4 Invalid arguments"
)
_AUTH_CANCELLED = Reply.of(
    ReplyCode.ARGUMENT_SYNTAX_ERROR, "5.7.0 Authentication cancelled"
)
_UNDECODABLE_RESPONSE = Reply.of(
    ReplyCode.ARGUMENT_SYNTAX_ERROR, "5.5.2 Cannot Base64-decode Client responses"
)
_SEND_HELLO_FIRST = Reply.of(ReplyCode.BAD_SEQUENCE, "5.5.2 Send hello first")
_ALREADY_AUTHENTICATED = Reply.of(ReplyCode.BAD_SEQUENCE, "5.5.2 Already authenticated")
_AUTH_IN_TRANSACTION = Reply.of(
    ReplyCode.BAD_SEQUENCE, "5.5.2 Not permitted during a mail transaction"
)
_SENDER_ALREADY_SPECIFIED = Reply.of(
    ReplyCode.BAD_SEQUENCE, "5.5.2 Sender already specified"
)
_NEED_MAIL = Reply.of(ReplyCode.BAD_SEQUENCE, "5.5.2 Need mail command")
_NEED_RCPT = Reply.of(ReplyCode.BAD_SEQUENCE, "5.5.2 Need rcpt command")
_NO_VALID_RECIPIENTS = Reply.of(
    ReplyCode.TRANSACTION_FAILED, "5.5.1 No valid recipients"
)
_UNRECOGNIZED_MECHANISM = Reply.of(
    ReplyCode.PARAMETER_NOT_IMPLEMENTED, "5.7.4 Unrecognized authentication type"
)
_NOT_AUTHENTICATED = Reply.of(
    ReplyCode.AUTH_REQUIRED, "5.7.57 Client not authenticated to send mail"
)
_AUTH_UNSUCCESSFUL = Reply.of(
    ReplyCode.AUTH_FAILED, "5.7.3 Authentication unsuccessful [SANDBOX]"
)
_SEND_AS_DENIED = Reply.of(
    ReplyCode.MAILBOX_UNAVAILABLE,
    "5.7.60 SMTP; Client does not have permissions to send as this sender",
)
_MESSAGE_TOO_BIG = Reply.of(
    ReplyCode.EXCEEDED_STORAGE,
    "5.3.4 Message size exceeds fixed maximum message size",
)
_NON_ASCII_ADDRESS = Reply.of(
    ReplyCode.MAILBOX_NAME_NOT_ALLOWED,
    "5.6.7 Non-ASCII addresses not permitted without SMTPUTF8",
)


class Stage(enum.StrEnum):
    """A point in the SMTP session where a fault can replace the server's answer."""

    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA_COMMAND = "data_command"
    DATA = "data"


# Stages whose command names an address or user a fault can be matched against.
_MATCHABLE_STAGES = frozenset(
    {Stage.AUTH, Stage.MAIL, Stage.RCPT, Stage.DATA_COMMAND, Stage.DATA}
)


class FaultAction(enum.StrEnum):
    """What a fault does when its stage is reached."""

    # Send the fault's reply instead of the normal answer; the command is not
    # carried out. A 421 reply also closes the connection.
    REPLY = "reply"
    # Never answer; keep reading and discarding until the client gives up.
    SILENCE = "silence"
    # Close the connection without answering.
    DROP = "drop"
    # Wait, then answer as usual (or as a later fault at the same stage says).
    DELAY = "delay"


@dataclass
class Fault:
    """One injected misbehaviour; `fired` counts how often it has applied."""

    stage: Stage
    action: FaultAction
    reply: Reply | None = None
    seconds: float = 0.0
    # Apply this many times, then never again; None applies until cleared.
    times: int | None = None
    # Apply only when the stage's user or address equals this, case-insensitively.
    match: str | None = None
    fired: int = 0

    @property
    def exhausted(self) -> bool:
        """Whether the fault has fired as many times as it was allowed to."""
        return self.times is not None and self.fired >= self.times

    def applies(self, stage: Stage, subjects: Collection[str]) -> bool:
        """Whether the fault fires at `stage` for a command about `subjects`."""
        if self.stage != stage or self.exhausted:
            return False
        if self.match is None:
            return True
        return self.match.casefold() in {subject.casefold() for subject in subjects}


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message, exactly as the client submitted it."""

    session_id: int
    mail_from: str
    # The recipients the server accepted, in order.
    rcpt_tos: list[str]
    # The message after dot-unstuffing: the bytes the client meant to send.
    data: bytes
    # The MAIL FROM parameters as sent, for example ["SIZE=1234", "BODY=8BITMIME"].
    mail_options: list[str]
    body_8bitmime: bool
    smtputf8: bool
    auth_user: str | None
    auth_mechanism: str | None
    tls_version: str | None
    tls_cipher: str | None
    received_at: datetime.datetime


@dataclass(frozen=True)
class TranscriptLine:
    """One line of a session: a client command or a server reply line."""

    session_id: int
    direction: Literal["client", "server"]
    text: str


@dataclass
class SessionRecord:
    """What the sandbox knows about one connection, kept after it closes."""

    session_id: int
    peer: str
    started_at: datetime.datetime
    # Every byte received before TLS; shared with the connection's reader.
    plaintext: bytearray
    tls_version: str | None = None
    tls_cipher: str | None = None
    # Why the STARTTLS handshake failed, when it did.
    tls_error: str | None = None
    auth_user: str | None = None
    auth_mechanism: str | None = None
    # Bytes the client pipelined after STARTTLS, thrown away unread (RFC 3207 §5).
    discarded_after_starttls: int = 0
    # Commands that were already here when the one before them was read: the
    # client sent them without waiting for a reply (RFC 2920 PIPELINING).
    pipelined_commands: int = 0
    # An unexpected exception inside the sandbox itself.
    error: str | None = None
    closed: bool = False
    transcript: list[TranscriptLine] = field(default_factory=list)


@dataclass(frozen=True)
class _Credentials:
    """What a client presented in AUTH; `secret` is a password or a bearer token."""

    mechanism: str
    username: str
    secret: str
    # The PLAIN authorization identity, when the client sent one.
    authorization_id: str = ""


class _CloseConnection(Exception):
    """The session is over: QUIT, a 421, a drop, a timeout or the peer left."""


class _RecordingReader(asyncio.StreamReader):
    """A stream reader that keeps a copy of every byte fed to it before TLS.

    Before STARTTLS the transport feeds raw socket bytes; after it, the TLS layer
    feeds decrypted ones. Switching `recording` off just before the handshake
    therefore captures exactly what crossed the wire in the clear.
    """

    def __init__(self, *, limit: int, recording: bool) -> None:
        super().__init__(limit=limit)
        self.recording = recording
        self.plaintext = bytearray()
        # How many pieces of data arrived, before and after TLS.
        self.feeds = 0

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        chunk = bytes(data)
        self.feeds += 1
        if self.recording:
            self.plaintext += chunk
        super().feed_data(chunk)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _parse_path(argument: str, keyword: str) -> tuple[str, list[str]] | None:
    """Split "FROM:<a@b> SIZE=1" into the address and its parameters.

    Returns None when the argument does not have that shape (RFC 5321 §4.1.2). A
    source route ("<@relay:user@host>", RFC 5321 appendix C) is dropped.
    """
    matched = re.match(
        rf"^{keyword}:\s*<([^<>]*)>(.*)$", argument.strip(), re.IGNORECASE | re.DOTALL
    )
    if matched is None:
        return None

    address = matched.group(1)
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]

    return address, matched.group(2).split()


def _decode_base64(text: str) -> str | None:
    """Decode one SASL response; "=" is the empty response (RFC 4954 section 4)."""
    if text == "=":
        return ""
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _parse_xoauth2(response: str) -> tuple[str, str] | None:
    """Return (user, token) from an XOAUTH2 response, or None if it is malformed.

    The format is "user=" USER ^A "auth=Bearer " TOKEN ^A ^A.
    """
    if not response.endswith("\x01\x01"):
        return None
    fields = response[:-2].split("\x01")
    if len(fields) != 2:
        return None

    user_field, auth_field = fields
    if not user_field.startswith("user=") or not auth_field.startswith("auth=Bearer "):
        return None

    return user_field.removeprefix("user="), auth_field.removeprefix("auth=Bearer ")


class _Session:
    """One client connection, from the banner to the close."""

    def __init__(
        self,
        exchange: SandboxExchange,
        *,
        reader: _RecordingReader,
        writer: asyncio.StreamWriter,
        record: SessionRecord,
    ) -> None:
        self._exchange = exchange
        self._reader = reader
        self._writer = writer
        self.record = record
        # Bytes taken out of the reader; with its feed count it tells what a client
        # pipelined behind STARTTLS.
        self._consumed = 0
        # The reader's feed count when the last command was read.
        self._feeds_at_last_command = -1
        self._tls = False
        self._legacy_tls = False
        self._greeted = False
        self._user: str | None = None
        self._user_slot: str | None = None
        self._mechanism: str | None = None
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self._mail_from: str | None = None
        self._mail_options: list[str] = []
        self._body_8bitmime = False
        self._smtputf8 = False
        self._recipients: list[str] = []

    async def run(self) -> None:
        """Greet, then answer commands in the order they arrive until the end."""
        handlers: dict[str, Callable[[str], Awaitable[None]]] = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "STARTTLS": self._starttls,
            "AUTH": self._auth,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
            "VRFY": self._vrfy,
            "QUIT": self._quit,
        }

        with contextlib.suppress(_CloseConnection):
            await self._greet()
            while True:
                line = await self._read_command()
                if line is None:
                    continue
                verb, _, argument = line.partition(" ")
                verb = verb.upper()
                if self._legacy_tls:
                    await self._send(_LEGACY_TLS)
                handler = handlers.get(verb)
                if handler is None or (verb == "STARTTLS" and not self._offers_tls()):
                    await self._send(_unrecognized(verb))
                    continue
                await handler(argument)

    def abort(self) -> None:
        """Cut the connection at once, without a TLS or TCP goodbye."""
        self._writer.transport.abort()

    def release(self) -> None:
        """Give back this session's slot in its user's concurrency count."""
        if self._user_slot is not None:
            self._exchange._release_user_slot(self._user_slot)
            self._user_slot = None

    # Reading and writing.

    async def _read_segment(self) -> bytes:
        """Return bytes up to and including the next LF, or a bounded run of them."""
        try:
            async with asyncio.timeout(self._exchange.idle_timeout):
                try:
                    segment = await self._reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as exc:
                    segment = await self._reader.read(max(exc.consumed, 1))
        except TimeoutError as exc:
            await self._send(_IDLE_TIMEOUT)
            raise _CloseConnection from exc
        except (asyncio.IncompleteReadError, OSError) as exc:
            raise _CloseConnection from exc
        if not segment:
            raise _CloseConnection

        self._consumed += len(segment)
        return segment

    async def _read_line(self, *, limit: int, crlf_only: bool) -> tuple[bytes, bool]:
        """Return the next line and whether it is complete.

        A line ends at CRLF; with `crlf_only` false a bare LF ends it too. A line
        longer than `limit` comes back in pieces, each marked incomplete but the last.
        """
        line = bytearray()
        while True:
            line += await self._read_segment()
            if line.endswith(b"\r\n") or (not crlf_only and line.endswith(b"\n")):
                return bytes(line), True
            if len(line) >= limit:
                return bytes(line), False

    async def _read_command(self) -> str | None:
        """Return the next command line without its line ending, or None if too long."""
        limit = self._exchange.max_line_length
        raw, complete = await self._read_line(limit=limit, crlf_only=False)
        too_long = not complete or len(raw) > limit
        while not complete:
            _, complete = await self._read_line(limit=limit, crlf_only=False)
        if too_long:
            self._log("client", f"<command line over {limit} octets>")
            await self._send(_LINE_TOO_LONG)
            return None

        # No data came since the last command was read: this one was already
        # here, sent before that command's reply.
        if self._reader.feeds == self._feeds_at_last_command:
            self.record.pipelined_commands += 1
        self._feeds_at_last_command = self._reader.feeds

        line = raw.rstrip(b"\r\n").decode("utf-8", errors="replace")
        self._log("client", line)
        return line

    async def _read_response(self) -> str | None:
        """Read one SASL response line; None (after a 501) if it is "*" or too long."""
        line = await self._read_command()
        if line is None:
            return None
        if line.strip() == "*":
            await self._send(_AUTH_CANCELLED)
            return None
        return line.strip()

    async def _send(self, reply: Reply) -> None:
        """Send a reply; a 421 then closes the connection (RFC 5321 §3.8)."""
        for text in reply.lines:
            self._log("server", f"{reply.code} {text}")
        self._exchange.replies_sent[reply.code] += 1

        self._writer.write(reply.encode())
        try:
            async with asyncio.timeout(self._exchange.idle_timeout):
                await self._writer.drain()
        except OSError as exc:
            # TimeoutError is an OSError too: a client that stops reading is gone.
            raise _CloseConnection from exc

        if reply.closes_connection:
            raise _CloseConnection

    def _log(self, direction: Literal["client", "server"], text: str) -> None:
        line = TranscriptLine(self.record.session_id, direction, text)
        self.record.transcript.append(line)
        self._exchange.transcript.append(line)

    # Faults.

    async def _answer_fault(
        self, stage: Stage, subjects: Collection[str] = ()
    ) -> Reply | None:
        """Apply the faults set for `stage`; return the reply sent instead, if any.

        Every matching delay is served first, then the first matching reply,
        silence or drop, in the order the faults were set.
        """
        matching = [
            fault for fault in self._exchange.faults if fault.applies(stage, subjects)
        ]
        for fault in matching:
            if fault.action is FaultAction.DELAY:
                fault.fired += 1
                await asyncio.sleep(fault.seconds)

        for fault in matching:
            if fault.action is FaultAction.DELAY:
                continue
            fault.fired += 1
            if fault.action is FaultAction.SILENCE:
                await self._hold_silently()
            if fault.action is FaultAction.DROP:
                self.abort()
                raise _CloseConnection
            if fault.reply is not None:
                await self._send(fault.reply)
            return fault.reply

        return None

    async def _hold_silently(self) -> None:
        """Read and drop everything until the client leaves or stays idle too long."""
        try:
            async with asyncio.timeout(self._exchange.idle_timeout):
                while await self._reader.read(_MESSAGE_PIECE_LENGTH):
                    pass
        except OSError:
            pass
        raise _CloseConnection

    # The banner and the hello.

    def _offers_tls(self) -> bool:
        return (
            self._exchange.mode == "starttls"
            and self._exchange.offer_starttls
            and not self._tls
        )

    def _may_authenticate(self) -> bool:
        return self._tls or self._exchange.allow_auth_before_tls

    async def _greet(self) -> None:
        if self._exchange.active_sessions > self._exchange.max_sessions:
            await self._send(_TOO_MANY_SESSIONS)
        if await self._answer_fault(Stage.GREETING):
            return

        stamp = email.utils.format_datetime(_utcnow())
        name = self._exchange.server_name
        await self._send(
            Reply.of(
                ReplyCode.SERVICE_READY,
                f"{name} Microsoft ESMTP MAIL Service ready at {stamp}",
            )
        )

    async def _ehlo(self, argument: str) -> None:
        if not argument.strip():
            await self._send(_INVALID_DOMAIN)
            return
        if await self._answer_fault(Stage.EHLO):
            return

        self._reset_transaction()
        self._greeted = True
        keywords = [f"SIZE {ADVERTISED_MESSAGE_SIZE}"]
        if self._exchange.offer_pipelining:
            keywords.append("PIPELINING")
        keywords.append("ENHANCEDSTATUSCODES")
        if self._offers_tls():
            keywords.append("STARTTLS")
        if self._may_authenticate():
            keywords.append("AUTH " + " ".join(self._exchange.auth_mechanisms))
        keywords.append("8BITMIME")
        if self._tls:
            keywords.append("SMTPUTF8")
        hello = f"{self._exchange.server_name} Hello [{self.record.peer}]"
        await self._send(Reply(code=ReplyCode.OK, lines=(hello, *keywords)))

    async def _helo(self, argument: str) -> None:
        if not argument.strip():
            await self._send(_INVALID_DOMAIN)
            return
        if await self._answer_fault(Stage.EHLO):
            return

        self._reset_transaction()
        self._greeted = True
        hello = f"{self._exchange.server_name} Hello [{self.record.peer}]"
        await self._send(Reply.of(ReplyCode.OK, hello))

    async def _starttls(self, argument: str) -> None:
        if argument.strip():
            await self._send(_INVALID_ARGUMENTS)
            return
        if await self._answer_fault(Stage.STARTTLS):
            return
        await self._send(_START_TLS)

        # Commands pipelined behind STARTTLS arrived in the clear; RFC 3207 §5 says
        # to drop them, or an attacker could inject commands into the TLS session.
        # Bytes landing in the instant between this check and the switch of the
        # transport are not caught; only a client breaking RFC 3207 sends them.
        pending = len(self._reader.plaintext) - self._consumed
        if pending > 0:
            await self._reader.readexactly(pending)
            self._consumed += pending
            self.record.discarded_after_starttls += pending
        self._reader.recording = False

        try:
            await self._writer.start_tls(
                self._exchange._tls_context,
                ssl_handshake_timeout=self._exchange.tls_handshake_timeout,
            )
        except OSError as exc:
            self.record.tls_error = f"{type(exc).__name__}: {exc}"
            self.abort()
            raise _CloseConnection from exc

        self.note_tls_established()
        # RFC 3207 §4.2: forget everything learnt from the client before TLS.
        self._greeted = False
        self._reset_transaction()
        self.release()
        self._user = None
        self._mechanism = None

    def note_tls_established(self) -> None:
        """Record the negotiated protocol and cipher; flag TLS 1.0/1.1 for a 421."""
        ssl_object = self._writer.get_extra_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            return

        self._tls = True
        self.record.tls_version = ssl_object.version()
        cipher = ssl_object.cipher()
        self.record.tls_cipher = cipher[0] if cipher else None
        self._legacy_tls = self.record.tls_version in {"TLSv1", "TLSv1.1"}

    # Authentication (RFC 4954).

    async def _auth(self, argument: str) -> None:
        if not self._may_authenticate():
            await self._send(_STARTTLS_REQUIRED)
            return
        if not self._greeted:
            await self._send(_SEND_HELLO_FIRST)
            return
        if self._user is not None:
            await self._send(_ALREADY_AUTHENTICATED)
            return
        if self._mail_from is not None:
            await self._send(_AUTH_IN_TRANSACTION)
            return
        mechanism, _, initial = argument.strip().partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in self._exchange.auth_mechanisms:
            await self._send(_UNRECOGNIZED_MECHANISM)
            return

        credentials = await self._receive_credentials(mechanism, initial.strip())
        if credentials is None:
            return
        if await self._answer_fault(Stage.AUTH, (credentials.username,)):
            self._exchange.auth_failures += 1
            return
        rejection = self._exchange._check_credentials(credentials)
        if rejection is not None:
            self._exchange.auth_failures += 1
            await self._send(rejection)
            return
        slot = self._exchange._claim_user_slot(credentials.username)
        if slot is None:
            self._exchange.sender_limit_rejections += 1
            await self._send(_SENDER_THREAD_LIMIT)
            return

        self._user_slot = slot
        self._user = self._exchange._canonical_user(credentials)
        self._mechanism = mechanism
        self.record.auth_user = self._user
        self._exchange.sessions_authenticated += 1
        self.record.auth_mechanism = mechanism
        await self._send(_AUTH_SUCCEEDED)

    async def _challenge(self, prompt: str, initial: str) -> str | None:
        """Return the client's decoded answer to a 334 prompt, or its initial one."""
        response: str | None = initial
        if not initial:
            encoded = base64.b64encode(prompt.encode()).decode("ascii")
            await self._send(Reply.of(ReplyCode.AUTH_CONTINUE, encoded))
            response = await self._read_response()
        if response is None:
            return None

        decoded = _decode_base64(response)
        if decoded is None:
            await self._send(_UNDECODABLE_RESPONSE)
        return decoded

    async def _receive_credentials(
        self, mechanism: str, initial: str
    ) -> _Credentials | None:
        """Run the mechanism's exchange; None means a reply was already sent."""
        if mechanism == "LOGIN":
            username = await self._challenge("Username:", initial)
            if username is None:
                return None
            password = await self._challenge("Password:", "")
            if password is None:
                return None
            return _Credentials(mechanism, username, password)

        response = await self._challenge("", initial)
        if response is None:
            return None

        if mechanism == "PLAIN":
            parts = response.split("\x00")
            if len(parts) != 3:
                await self._send(_UNDECODABLE_RESPONSE)
                return None
            authorization_id, username, password = parts
            return _Credentials(mechanism, username, password, authorization_id)

        parsed = _parse_xoauth2(response)
        if parsed is None:
            self._exchange.auth_failures += 1
            await self._send(_AUTH_UNSUCCESSFUL)
            return None
        username, token = parsed
        return _Credentials(mechanism, username, token)

    # The mail transaction.

    async def _mail(self, argument: str) -> None:
        if not self._tls:
            await self._send(_STARTTLS_REQUIRED)
            return
        if not self._greeted:
            await self._send(_SEND_HELLO_FIRST)
            return
        if self._user is None:
            await self._send(_NOT_AUTHENTICATED)
            return
        if self._mail_from is not None:
            await self._send(_SENDER_ALREADY_SPECIFIED)
            return
        parsed = _parse_path(argument, "FROM")
        if parsed is None:
            await self._send(_INVALID_ARGUMENTS)
            return
        sender, parameters = parsed
        refusal = self._check_mail_parameters(parameters)
        if (
            refusal is None
            and not sender.isascii()
            and "SMTPUTF8" not in {parameter.upper() for parameter in parameters}
        ):
            refusal = _NON_ASCII_ADDRESS
        if refusal is not None:
            await self._send(refusal)
            return

        if await self._answer_fault(Stage.MAIL, (sender,)):
            return
        if self._exchange._is_throttled(self._user):
            self._exchange.throttled_count += 1
            await self._send(self._exchange._throttle_reply(self.record.peer))
            return
        foreign_sender = bool(sender) and sender.casefold() != self._user.casefold()
        if self._exchange.enforce_send_as and foreign_sender:
            await self._send(_SEND_AS_DENIED)
            return

        self._mail_from = sender
        self._mail_options = parameters
        upper = {parameter.upper() for parameter in parameters}
        self._body_8bitmime = "BODY=8BITMIME" in upper
        self._smtputf8 = "SMTPUTF8" in upper
        await self._send(_SENDER_OK)

    def _check_mail_parameters(self, parameters: list[str]) -> Reply | None:
        """Return the refusal for a MAIL FROM parameter we do not take, if any."""
        for parameter in parameters:
            keyword, _, value = parameter.partition("=")
            keyword = keyword.upper()
            if keyword == "SIZE":
                if not value.isdigit():
                    return _INVALID_ARGUMENTS
                if int(value) > ADVERTISED_MESSAGE_SIZE:
                    return _MESSAGE_TOO_BIG
            elif keyword == "BODY":
                if value.upper() not in {"7BIT", "8BITMIME"}:
                    return _INVALID_ARGUMENTS
            elif keyword == "SMTPUTF8":
                if value:
                    return _INVALID_ARGUMENTS
            elif keyword != "AUTH":
                return _unsupported_option(parameter)
        return None

    async def _rcpt(self, argument: str) -> None:
        if not self._tls:
            await self._send(_STARTTLS_REQUIRED)
            return
        if self._mail_from is None:
            await self._send(_NEED_MAIL)
            return
        parsed = _parse_path(argument, "TO")
        if parsed is None:
            await self._send(_INVALID_ARGUMENTS)
            return
        recipient, parameters = parsed
        if not recipient:
            await self._send(_INVALID_ARGUMENTS)
            return
        if parameters:
            # DSN is not advertised, so NOTIFY= and ORCPT= are not taken either.
            await self._send(_unsupported_option(parameters[0]))
            return
        if not recipient.isascii() and not self._smtputf8:
            await self._send(_NON_ASCII_ADDRESS)
            return

        if await self._answer_fault(Stage.RCPT, (recipient,)):
            return
        if len(self._recipients) >= self._exchange.max_recipients_per_message:
            await self._send(_TOO_MANY_RECIPIENTS)
            return

        self._recipients.append(recipient)
        await self._send(_RECIPIENT_OK)

    async def _data(self, argument: str) -> None:
        if not self._tls:
            await self._send(_STARTTLS_REQUIRED)
            return
        if argument.strip():
            await self._send(_INVALID_ARGUMENTS)
            return
        if self._mail_from is None:
            await self._send(_NEED_MAIL)
            return
        if not self._recipients:
            if self._exchange.accept_data_without_recipients:
                await self._swallow_message()
                return
            await self._send(_NEED_RCPT)
            return
        if await self._answer_fault(Stage.DATA_COMMAND, self._recipients):
            return

        await self._send(_START_MAIL_INPUT)
        try:
            await self._finish_message(self._mail_from)
        finally:
            self._reset_transaction()

    async def _swallow_message(self) -> None:
        """354 with no recipient, as RFC 2920 section 3.1 allows a server to
        answer a pipelined DATA: the message is read and refused as a whole."""
        await self._send(_START_MAIL_INPUT)
        try:
            _, size = await self._receive_message_body()
            self._log("client", f"<{size} octets of message data>")
            await self._send(_NO_VALID_RECIPIENTS)
        finally:
            self._reset_transaction()

    async def _finish_message(self, sender: str) -> None:
        """Read the message, then accept it or refuse it as a whole."""
        data, size = await self._receive_message_body()
        self._log("client", f"<{size} octets of message data>")
        if size > self._exchange.max_message_size:
            await self._send(_MESSAGE_TOO_BIG)
            return
        if await self._answer_fault(Stage.DATA, self._recipients):
            return

        message = ReceivedMessage(
            session_id=self.record.session_id,
            mail_from=sender,
            rcpt_tos=list(self._recipients),
            data=data,
            mail_options=list(self._mail_options),
            body_8bitmime=self._body_8bitmime,
            smtputf8=self._smtputf8,
            auth_user=self._user,
            auth_mechanism=self._mechanism,
            tls_version=self.record.tls_version,
            tls_cipher=self.record.tls_cipher,
            received_at=_utcnow(),
        )
        message_id = await self._exchange._accept_message(message)
        await self._send(
            Reply.of(
                ReplyCode.OK,
                f"2.0.0 OK <{message_id}@{self._exchange.server_name}>"
                " Queued mail for delivery",
            )
        )

    async def _receive_message_body(self) -> tuple[bytes, int]:
        """Read up to the terminating CRLF.CRLF; return the bytes and their size.

        Only CRLF ends a line here, so a bare LF followed by a dot never ends the
        message (the SMTP smuggling trick). A leading dot is removed from each line
        (RFC 5321 §4.5.2). Bytes past the mailbox limit are counted, not kept.
        """
        limit = self._exchange.max_message_size
        data = bytearray()
        size = 0
        at_line_start = True
        while True:
            piece, complete = await self._read_line(
                limit=_MESSAGE_PIECE_LENGTH, crlf_only=True
            )
            if at_line_start and piece == b".\r\n":
                return bytes(data), size
            if at_line_start and piece.startswith(b"."):
                piece = piece[1:]
            size += len(piece)
            if size <= limit:
                data += piece
            at_line_start = complete

    # Simple commands.

    async def _rset(self, argument: str) -> None:
        self._reset_transaction()
        await self._send(_RESETTING)

    async def _noop(self, argument: str) -> None:
        await self._send(_OK)

    async def _vrfy(self, argument: str) -> None:
        await self._send(_CANNOT_VERIFY)

    async def _quit(self, argument: str) -> None:
        await self._send(_CLOSING)
        raise _CloseConnection


def _unrecognized(verb: str) -> Reply:
    return Reply.of(ReplyCode.SYNTAX_ERROR, f"5.3.3 Unrecognized command '{verb}'")


def _unsupported_option(parameter: str) -> Reply:
    return Reply.of(
        ReplyCode.PARAMETERS_NOT_RECOGNIZED, f"5.5.4 Unsupported option: {parameter}"
    )


def _require_loopback(host: str) -> None:
    """Raise ValueError unless `host` is a loopback IP address literal."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(
            f"the sandbox binds to a loopback IP literal such as 127.0.0.1 or ::1,"
            f" not {host!r}"
        ) from exc
    if not address.is_loopback:
        raise ValueError(f"the sandbox binds to loopback only, not {host}")


class SandboxExchange:
    """An Exchange Online-like SMTP submission server bound to loopback.

    Use it as `async with SandboxExchange(pki=..., users={...}) as exchange:` and
    point a client at `exchange.address`. See the module docstring for the stages
    where faults apply.
    """

    def __init__(
        self,
        *,
        pki: SandboxPKI,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: Mode = "starttls",
        users: dict[str, str] | None = None,
        token_validator: Callable[[str, str], str | None] | None = None,
        certificate: CertificateKind | str = CertificateKind.GOOD,
        tls_maximum_version: ssl.TLSVersion | None = None,
        offer_starttls: bool = True,
        allow_auth_before_tls: bool = False,
        auth_mechanisms: Sequence[str] = ("LOGIN", "PLAIN", "XOAUTH2"),
        max_message_size: int = DEFAULT_MAILBOX_MESSAGE_SIZE,
        max_recipients_per_message: int = 500,
        max_sessions_per_user: int = 3,
        messages_per_minute: int | None = None,
        rate_window: float = _RATE_WINDOW_SECONDS,
        enforce_send_as: bool = False,
        offer_pipelining: bool = True,
        accept_data_without_recipients: bool = False,
        max_sessions: int = 50,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        idle_timeout: float = 60.0,
        tls_handshake_timeout: float = 10.0,
        server_name: str = DEFAULT_SERVER_NAME,
    ) -> None:
        _require_loopback(host)
        if mode not in ("starttls", "implicit"):
            raise ValueError(f"mode must be 'starttls' or 'implicit', not {mode!r}")
        unknown = {mechanism.upper() for mechanism in auth_mechanisms} - {
            "LOGIN",
            "PLAIN",
            "XOAUTH2",
        }
        if unknown:
            raise ValueError(f"unsupported AUTH mechanisms: {sorted(unknown)}")

        self.pki = pki
        self.host = host
        self._port = port
        self.mode: Mode = mode
        self.users = dict(users or {})
        self.token_validator = token_validator
        self._certificate = CertificateKind(certificate)
        self._tls_maximum_version = tls_maximum_version
        self._tls_context = self._build_tls_context()
        self.offer_starttls = offer_starttls
        self.allow_auth_before_tls = allow_auth_before_tls
        self.auth_mechanisms = tuple(mechanism.upper() for mechanism in auth_mechanisms)
        self.max_message_size = max_message_size
        self.max_recipients_per_message = max_recipients_per_message
        self.max_sessions_per_user = max_sessions_per_user
        self.messages_per_minute = messages_per_minute
        # The "minute" of messages_per_minute; tests shorten it to run quickly.
        self.rate_window = rate_window
        self.enforce_send_as = enforce_send_as
        self.offer_pipelining = offer_pipelining
        # Answer DATA 354 even when no recipient was taken (see _swallow_message).
        self.accept_data_without_recipients = accept_data_without_recipients
        self.max_sessions = max_sessions
        self.max_line_length = max_line_length
        self.idle_timeout = idle_timeout
        self.tls_handshake_timeout = tls_handshake_timeout
        self.server_name = server_name

        self.faults: list[Fault] = []
        self.messages: list[ReceivedMessage] = []
        self.sessions: list[SessionRecord] = []
        self.transcript: list[TranscriptLine] = []
        self.auth_failures = 0
        self.sessions_authenticated = 0
        self.sender_limit_rejections = 0
        self.throttled_count = 0
        self.connections_accepted = 0
        self.replies_sent: collections.Counter[int] = collections.Counter()
        # Keyed by the user name folded to lower case.
        self.max_concurrent_sessions_seen: dict[str, int] = {}
        # Exceptions the sandbox itself raised while serving; a test peer with a bug
        # must fail the test, not pass it by accident.
        self.internal_errors: list[BaseException] = []

        self._server: asyncio.Server | None = None
        self._open_sessions: dict[asyncio.Task[None], _Session] = {}
        self._authenticated_per_user: collections.Counter[str] = collections.Counter()
        self._accepted_times: dict[str, collections.deque[float]] = {}
        self._state_changed = asyncio.Condition()
        self._next_session_id = 1

    # Lifecycle.

    async def __aenter__(self) -> SandboxExchange:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on; the port is fixed by `start`."""
        return self.host, self._port

    @property
    def port(self) -> int:
        """The port the server listens on; 0 until the first `start`."""
        return self._port

    @property
    def is_running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._server is not None

    @property
    def active_sessions(self) -> int:
        """How many connections are open right now."""
        return len(self._open_sessions)

    @property
    def plaintext_received(self) -> bytes:
        """Every byte received on any connection before TLS was established."""
        return b"".join(bytes(record.plaintext) for record in self.sessions)

    @property
    def certificate(self) -> CertificateKind:
        """The certificate kind presented; implicit mode needs a restart to switch."""
        return self._certificate

    @certificate.setter
    def certificate(self, kind: CertificateKind | str) -> None:
        self._certificate = CertificateKind(kind)
        self._tls_context = self._build_tls_context()

    async def start(self) -> None:
        """Listen on the host and port; after a `stop`, the same port again."""
        if self._server is not None:
            raise RuntimeError("the sandbox Exchange is already running")

        loop = asyncio.get_running_loop()
        # SO_REUSEADDR lets a restart bind the port while old connections linger in
        # TIME_WAIT, so an outage-and-recovery test can reuse the address.
        if self.mode == "implicit":
            self._server = await loop.create_server(
                self._make_protocol,
                host=self.host,
                port=self._port,
                reuse_address=True,
                ssl=self._build_tls_context(),
                ssl_handshake_timeout=self.tls_handshake_timeout,
            )
        else:
            self._server = await loop.create_server(
                self._make_protocol, host=self.host, port=self._port, reuse_address=True
            )

        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every open connection, as an outage would."""
        if self._server is None:
            return

        server, self._server = self._server, None
        server.close()
        for session in self._open_sessions.values():
            session.abort()
        tasks = list(self._open_sessions)
        if tasks:
            # A cut connection ends its session at the next read or write; only one
            # sleeping in a delay fault needs to be cancelled.
            _, stragglers = await asyncio.wait(tasks, timeout=_STOP_GRACE_SECONDS)
            for task in stragglers:
                task.cancel()
            await asyncio.gather(*stragglers, return_exceptions=True)
        await server.wait_closed()

    # Faults.

    def inject(
        self,
        stage: Stage | str,
        reply: str | Sequence[str],
        *,
        times: int | None = None,
        match: str | None = None,
    ) -> Fault:
        """Answer `stage` with `reply` (one line or several) instead of the usual.

        The command is not carried out. A 421 reply also closes the connection.
        """
        return self._add_fault(
            stage, FaultAction.REPLY, reply=Reply.parse(reply), times=times, match=match
        )

    def silent_at(
        self, stage: Stage | str, *, times: int | None = None, match: str | None = None
    ) -> Fault:
        """Never answer at `stage`; the client must time out."""
        return self._add_fault(stage, FaultAction.SILENCE, times=times, match=match)

    def delay(
        self,
        stage: Stage | str,
        seconds: float,
        *,
        times: int | None = None,
        match: str | None = None,
    ) -> Fault:
        """Wait `seconds` before answering at `stage`."""
        return self._add_fault(
            stage, FaultAction.DELAY, seconds=seconds, times=times, match=match
        )

    def drop_at(
        self, stage: Stage | str, *, times: int | None = None, match: str | None = None
    ) -> Fault:
        """Close the connection without answering at `stage`."""
        return self._add_fault(stage, FaultAction.DROP, times=times, match=match)

    def clear_faults(self) -> None:
        """Remove every fault; the server behaves normally again."""
        self.faults.clear()

    def _add_fault(
        self,
        stage: Stage | str,
        action: FaultAction,
        *,
        reply: Reply | None = None,
        seconds: float = 0.0,
        times: int | None,
        match: str | None,
    ) -> Fault:
        stage = Stage(stage)
        if match is not None and stage not in _MATCHABLE_STAGES:
            raise ValueError(f"the {stage} stage has no address or user to match")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1, or None for always")

        fault = Fault(
            stage=stage,
            action=action,
            reply=reply,
            seconds=seconds,
            times=times,
            match=match,
        )
        self.faults.append(fault)
        return fault

    # Waiting for results.

    async def wait_for_messages(
        self, count: int, timeout: float = 5.0
    ) -> list[ReceivedMessage]:
        """Wait until at least `count` messages were accepted; raise TimeoutError."""
        async with asyncio.timeout(timeout), self._state_changed:
            await self._state_changed.wait_for(lambda: len(self.messages) >= count)
        return list(self.messages)

    async def wait_for_idle(self, timeout: float = 5.0) -> None:
        """Wait until no connection is open; raise TimeoutError."""
        async with asyncio.timeout(timeout), self._state_changed:
            await self._state_changed.wait_for(lambda: not self._open_sessions)

    # Serving connections.

    def _build_tls_context(self) -> ssl.SSLContext:
        return self.pki.server_context(
            self._certificate, maximum_version=self._tls_maximum_version
        )

    def _make_protocol(self) -> asyncio.StreamReaderProtocol:
        reader = _RecordingReader(
            limit=_MESSAGE_PIECE_LENGTH, recording=self.mode == "starttls"
        )
        return asyncio.StreamReaderProtocol(reader, self._serve_connection)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not isinstance(reader, _RecordingReader):
            raise TypeError("connections must be read through a _RecordingReader")

        task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        record = SessionRecord(
            session_id=self._next_session_id,
            peer=str(peer[0]) if peer else "unknown",
            started_at=_utcnow(),
            plaintext=reader.plaintext,
        )
        self._next_session_id += 1
        self.connections_accepted += 1
        self.sessions.append(record)
        session = _Session(self, reader=reader, writer=writer, record=record)
        session.note_tls_established()
        if task is not None:
            self._open_sessions[task] = session

        try:
            await self._run_session(session, writer)
        except asyncio.CancelledError:
            # Only `stop` cancels a session, after cutting its connection. Python
            # 3.11's StreamReaderProtocol calls exception() on the finished task,
            # which raises for a cancelled one and logs a spurious error; so the
            # session ends normally instead.
            session.abort()
        finally:
            record.closed = True
            if task is not None:
                self._open_sessions.pop(task, None)
            async with self._state_changed:
                self._state_changed.notify_all()

    async def _run_session(
        self, session: _Session, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await session.run()
        except Exception as exc:
            # Recorded rather than raised: asyncio would only print it, and a test
            # can assert that `internal_errors` stayed empty.
            session.record.error = f"{type(exc).__name__}: {exc}"
            self.internal_errors.append(exc)
        finally:
            session.release()
            writer.close()
            try:
                # A TLS close waits for the client's close_notify; a client that
                # never sends one must not hold the session open.
                async with asyncio.timeout(_CLOSE_GRACE_SECONDS):
                    await writer.wait_closed()
            except OSError:
                session.abort()

    # Accounts, limits and messages.

    def _check_credentials(self, credentials: _Credentials) -> Reply | None:
        """Return None if the credentials are good, else the refusal to send."""
        if credentials.mechanism == "XOAUTH2":
            if self.token_validator is None:
                return _AUTH_UNSUCCESSFUL
            verdict = self.token_validator(credentials.username, credentials.secret)
            return None if verdict is None else Reply.parse(verdict)

        if credentials.authorization_id not in ("", credentials.username):
            return _AUTH_UNSUCCESSFUL
        expected = self._password_for(credentials.username)
        if expected is None or not hmac.compare_digest(
            expected.encode(), credentials.secret.encode()
        ):
            return _AUTH_UNSUCCESSFUL
        return None

    def _password_for(self, username: str) -> str | None:
        folded = username.casefold()
        for name, password in self.users.items():
            if name.casefold() == folded:
                return password
        return None

    def _canonical_user(self, credentials: _Credentials) -> str:
        """The user name as configured, or as the token's user= said it."""
        folded = credentials.username.casefold()
        for name in self.users:
            if name.casefold() == folded:
                return name
        return credentials.username

    def _claim_user_slot(self, username: str) -> str | None:
        """Count one more session for the user; None if the limit is reached."""
        key = username.casefold()
        if self._authenticated_per_user[key] >= self.max_sessions_per_user:
            return None

        self._authenticated_per_user[key] += 1
        self.max_concurrent_sessions_seen[key] = max(
            self.max_concurrent_sessions_seen.get(key, 0),
            self._authenticated_per_user[key],
        )
        return key

    def _release_user_slot(self, key: str) -> None:
        self._authenticated_per_user[key] -= 1

    def _is_throttled(self, username: str) -> bool:
        """Whether the user sent `messages_per_minute` messages in the last minute."""
        if self.messages_per_minute is None:
            return False

        window = self._accepted_times.setdefault(
            username.casefold(), collections.deque()
        )
        horizon = time.monotonic() - self.rate_window
        while window and window[0] <= horizon:
            window.popleft()
        return len(window) >= self.messages_per_minute

    def _throttle_reply(self, peer: str) -> Reply:
        return Reply.of(
            ReplyCode.LOCAL_ERROR,
            f"4.7.500 Server busy. Please try again later from [{peer}]."
            " (S77714) [SANDBOX]",
        )

    async def _accept_message(self, message: ReceivedMessage) -> str:
        """Store an accepted message, count it for the rate limit, return its id."""
        if message.auth_user is not None:
            key = message.auth_user.casefold()
            self._accepted_times.setdefault(key, collections.deque()).append(
                time.monotonic()
            )
        self.messages.append(message)

        async with self._state_changed:
            self._state_changed.notify_all()
        return f"SANDBOX{len(self.messages):08d}"
