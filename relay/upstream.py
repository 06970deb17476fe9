"""One authenticated SMTP session with the upstream server, over verified TLS.

The session connects, secures the channel (STARTTLS or implicit TLS), authenticates
(AUTH PLAIN/LOGIN or XOAUTH2) and then carries any number of messages. It decides
nothing about retries: every failure leaves as a `relay.errors` type, translated in
one place (`translate_exception`) from aiosmtplib, ssl and socket exceptions.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from relay.config import MailSettings, TimeoutsConfig, TlsConfig
from relay.dotstuffing import DotStuffer
from relay.errors import (
    ConfigError,
    Disposition,
    RelayError,
    SmtpReplyError,
    Stage,
    UpstreamConnectionError,
    UpstreamDnsError,
    UpstreamTimeoutError,
    UpstreamTlsError,
)

TokenProvider = Callable[[], Awaitable[str]]

# Bytes of a message read and written at a time.
_BLOCK_SIZE = 256 * 1024
# A reply line longer than RFC 5321's 512 octets, with room to spare, or more
# unparsed reply bytes than this, is a server gone wrong.
_MAX_REPLY_LINE = 8192
_MAX_REPLY_BUFFER = 1024 * 1024
# What must never reach the server inside a command (a second command).
_COMMAND_BREAK = re.compile(rb"[\r\n]")
_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class DeliveryResult:
    """What the upstream did with one message."""

    accepted: tuple[str, ...]
    # Recipients refused for good (5xx at RCPT), with the reply as an error.
    refused: dict[str, SmtpReplyError] = field(default_factory=dict)
    # Recipients refused for now (4xx at RCPT): they stay pending.
    deferred: dict[str, SmtpReplyError] = field(default_factory=dict)
    reply: str = ""
    # Recipients not offered in this transaction, because the server answered
    # "too many recipients" (452 4.5.3) or the transaction was full: they go in
    # the next transaction, at once.
    unsent: tuple[str, ...] = ()


def build_tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """A client context that verifies certificates and host names, TLS 1.2 at least."""
    context = ssl.create_default_context(
        cafile=str(tls.ca_file) if tls.ca_file else None
    )
    context.minimum_version = _TLS_VERSIONS[tls.minimum_version]
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class UpstreamSession:
    """A reusable, authenticated connection to the upstream SMTP server."""

    def __init__(
        self,
        *,
        settings: MailSettings,
        timeouts: TimeoutsConfig,
        tls_context: ssl.SSLContext,
        local_hostname: str,
        token_provider: TokenProvider | None = None,
    ) -> None:
        self.settings = settings
        self._timeouts = timeouts
        self._tls_context = tls_context
        self._local_hostname = local_hostname
        self._token_provider = token_provider
        self._smtp: aiosmtplib.SMTP | None = None
        self._in_sync = False
        # The server takes MAIL, RCPT and DATA in one go (RFC 2920).
        self._pipelining: PipeliningProtocol | None = None
        # Where the transaction under way is, for naming a failure.
        self._stage = Stage.MAIL
        self.messages_sent = 0
        self.opened_at: float | None = None

    @property
    def usable(self) -> bool:
        """Whether the next message may go over this connection."""
        return self._smtp is not None and self._smtp.is_connected and self._in_sync

    async def open(self) -> None:
        """Connect, secure the channel and authenticate; raises a RelayError."""
        settings = self.settings
        if not settings.hostname:
            raise ConfigError("hostname", "no upstream SMTP server is configured")
        # RFC 6761 section 6.4: names under .invalid never resolve, so answer at
        # once instead of asking a resolver that may not be reachable.
        if settings.hostname.rstrip(".").lower().endswith(".invalid"):
            raise UpstreamDnsError(settings.hostname)

        implicit_tls = settings.encryption == "ssl"
        smtp = aiosmtplib.SMTP(
            hostname=settings.hostname,
            port=settings.port,
            local_hostname=self._local_hostname,
            use_tls=implicit_tls,
            start_tls=False,
            tls_context=self._tls_context,
            timeout=self._timeouts.command,
        )
        self._smtp = smtp
        self._in_sync = False

        stage = Stage.CONNECT
        try:
            await smtp.connect(timeout=self._timeouts.connect)
            stage = Stage.EHLO
            await smtp.ehlo()
            if not implicit_tls:
                stage = Stage.STARTTLS
                if not smtp.supports_extension("starttls"):
                    raise starttls_not_offered(settings)
                await smtp.starttls(server_hostname=settings.hostname)
                stage = Stage.EHLO
                await smtp.ehlo()
            stage = Stage.AUTH
            await authenticate(smtp, settings, token_provider=self._token_provider)
        except BaseException as exc:
            smtp.close()
            self._smtp = None
            if isinstance(exc, RelayError):
                raise
            if isinstance(exc, Exception):
                raise translate_exception(
                    exc, stage=stage, settings=settings, timeouts=self._timeouts
                ) from exc
            raise

        self._in_sync = True
        self.opened_at = time.monotonic()
        if smtp.supports_extension("pipelining"):
            self._pipelining = PipeliningProtocol.take_over(smtp)

    @property
    def pipelining(self) -> bool:
        """Whether transactions go out as one group of commands (RFC 2920)."""
        return self._pipelining is not None

    def age(self) -> float:
        """Seconds since the session was opened (0 before)."""
        return 0.0 if self.opened_at is None else time.monotonic() - self.opened_at

    async def send(
        self,
        *,
        mail_from: str,
        recipients: Sequence[str],
        body: bytes | BinaryIO,
        smtputf8: bool,
        body_8bit: bool,
        max_recipients: int | None = None,
        rewrite_head: Callable[[bytes], bytes] | None = None,
    ) -> DeliveryResult:
        """Send one transaction; refused and unsent recipients come back in the result.

        `body` is the message, or a file holding it, read in blocks so that a big
        one is never all in memory. At most `max_recipients` are offered; the
        rest, and those the server has no room for, come back as `unsent`.
        `rewrite_head` may change the message's first block (its header).
        """
        if self._smtp is None or not self.usable:
            raise UpstreamConnectionError("the upstream session is not open")
        smtp = self._smtp

        # Until the transaction ends cleanly, the connection is not to be reused.
        self._in_sync = False
        self._stage = Stage.MAIL
        try:
            source = await _MessageSource.open(body, rewrite_head=rewrite_head)
            mail_options = [f"SIZE={source.size}"]
            if smtputf8 and smtp.supports_extension("smtputf8"):
                mail_options.append("SMTPUTF8")
            if body_8bit and smtp.supports_extension("8bitmime"):
                mail_options.append("BODY=8BITMIME")
            address_encoding = "utf-8" if smtputf8 else "ascii"
            mail_command = _mail_command(mail_from, mail_options, address_encoding)
            offered = list(
                recipients[:max_recipients] if max_recipients else recipients
            )
            unsent = list(recipients[len(offered) :])
            rcpt_commands = [
                _rcpt_command(recipient, address_encoding) for recipient in offered
            ]
            sorter = _RecipientSorter(offered, unsent)

            if self._pipelining is not None:
                response = await self._send_pipelined(
                    self._pipelining, mail_command, rcpt_commands, sorter, source
                )
                if response is None:
                    return sorter.result()
            else:
                await self._mail(smtp, mail_command)
                self._stage = Stage.RCPT
                for recipient, command in zip(offered, rcpt_commands, strict=True):
                    reply = await smtp.execute_command(command[:-2])
                    if not sorter.take(recipient, reply):
                        break
                if not sorter.accepted:
                    await self._reset(smtp)
                    return sorter.result()
                self._stage = Stage.DATA
                response = await self._data(smtp, source)
        except SmtpReplyError as error:
            if error.reply_code != 421:
                await self._reset(smtp)
            raise
        except RelayError:
            raise
        except Exception as exc:
            smtp.close()
            raise translate_exception(
                exc, stage=self._stage, settings=self.settings, timeouts=self._timeouts
            ) from exc

        self._in_sync = True
        self.messages_sent += 1
        return sorter.result(reply=f"{response.code} {response.message}")

    async def _send_pipelined(
        self,
        protocol: PipeliningProtocol,
        mail_command: bytes,
        rcpt_commands: list[bytes],
        sorter: _RecipientSorter,
        source: _MessageSource,
    ) -> aiosmtplib.SMTPResponse | None:
        """MAIL, every RCPT and DATA in one write, then their replies in order.

        Returns the reply to the message, or None when no recipient was taken
        (the transaction is then reset). RFC 2920 section 3.1: DATA ends the
        group; the message follows only once DATA was answered 354.
        """
        timeout = self._timeouts.command
        protocol.write(mail_command + b"".join(rcpt_commands) + b"DATA\r\n")

        mail_reply = await protocol.read_response(timeout)
        mail_error: SmtpReplyError | None = None
        if mail_reply.code != 250:
            mail_error = SmtpReplyError(
                mail_reply.code, mail_reply.message, stage=Stage.MAIL
            )
            if mail_reply.code == 421:
                raise mail_error  # the server is closing: no more replies come

        self._stage = Stage.RCPT
        rcpt_error: SmtpReplyError | None = None
        for recipient in sorter.offered:
            reply = await protocol.read_response(timeout)
            if mail_error is not None or rcpt_error is not None:
                continue  # answers to commands that no longer count
            try:
                sorter.take(recipient, reply, pipelined=True)
            except SmtpReplyError as error:
                if reply.code == 421:
                    raise
                rcpt_error = error
        self._stage = Stage.DATA
        data_reply = await protocol.read_response(timeout)

        failure = mail_error or rcpt_error
        if failure is not None or not sorter.accepted:
            if data_reply.code == 354 and sorter.accepted:
                # The server waits for a message to recipients it took, but the
                # transaction is abandoned: a lone "." would deliver them an empty
                # message, so the connection is dropped instead.
                self._smtp_or_closed().close()
            elif data_reply.code == 354:
                # DATA taken with no recipient (RFC 2920 section 3.1): an empty
                # message ends it, and the server refuses it as a whole.
                protocol.write(b".\r\n")
                await protocol.read_response(timeout)
            if failure is not None:
                raise failure
            await self._reset(self._smtp_or_closed())
            return None
        if data_reply.code != 354:
            raise SmtpReplyError(data_reply.code, data_reply.message, stage=Stage.DATA)
        return await self._send_body(protocol, source)

    def _smtp_or_closed(self) -> aiosmtplib.SMTP:
        if self._smtp is None:
            raise UpstreamConnectionError("the upstream session closed")
        return self._smtp

    async def _data(
        self, smtp: aiosmtplib.SMTP, source: _MessageSource
    ) -> aiosmtplib.SMTPResponse:
        """DATA, then the message once the server said 354."""
        response = await smtp.execute_command(b"DATA")
        if response.code != 354:
            raise SmtpReplyError(response.code, response.message, stage=Stage.DATA)
        protocol = smtp.protocol
        if protocol is None:
            raise UpstreamConnectionError("the upstream session closed before DATA")
        return await self._send_body(protocol, source)

    async def _send_body(
        self, protocol: SMTPProtocol, source: _MessageSource
    ) -> aiosmtplib.SMTPResponse:
        """The message in blocks, each once the last has left, then its reply.

        aiosmtplib's data() copies the whole message three times and hands it to
        the socket in one piece; a 30 MB attachment would cost 120 MB here.
        """
        stuffer = DotStuffer()
        async with asyncio.timeout(self._timeouts.data):
            # Each block leaves once the next is read, and the last one with the
            # terminator: a small message costs one TLS record and one send.
            stuffed = b""
            async for block in source.blocks():
                if stuffed:
                    protocol.write(stuffed)
                    # The protocol's flow control, as StreamWriter.drain() uses it.
                    await protocol._drain_helper()
                stuffed = stuffer.stuff(block)
            protocol.write(stuffed + stuffer.finish())
            response = await protocol.read_response()
        if response.code != 250:
            raise SmtpReplyError(response.code, response.message, stage=Stage.DATA)
        return response

    async def _mail(self, smtp: aiosmtplib.SMTP, mail_command: bytes) -> None:
        response = await smtp.execute_command(mail_command[:-2])
        if response.code != 250:
            raise SmtpReplyError(response.code, response.message, stage=Stage.MAIL)

    async def _reset(self, smtp: aiosmtplib.SMTP) -> None:
        """End a failed transaction; a session that cannot RSET is not reused."""
        try:
            response = await smtp.rset()
        except Exception:
            smtp.close()
            return
        self._in_sync = response.code == 250

    async def verify(self) -> None:
        """Check an open session is still alive (NOOP) before reusing it."""
        if self._smtp is None:
            return
        try:
            response = await self._smtp.noop(timeout=min(10.0, self._timeouts.command))
        except Exception:
            self._in_sync = False
            self._smtp.close()
            return
        self._in_sync = response.code == 250

    async def close(self) -> None:
        """Say QUIT if the server is still listening, then drop the connection."""
        smtp, self._smtp = self._smtp, None
        self._in_sync = False
        self._pipelining = None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=5.0)
        except Exception:
            # QUIT is a courtesy: a server that has already gone needs nothing more.
            smtp.close()


def _mail_command(mail_from: str, options: list[str], encoding: str) -> bytes:
    # The null reverse-path of a bounce must go out as MAIL FROM:<> (RFC 5321
    # section 4.5.5), which the library's address quoting does not keep.
    arguments = [b"MAIL FROM:<" + mail_from.encode(encoding) + b">"]
    arguments += [option.encode("ascii") for option in options]
    command = b" ".join(arguments)
    if _COMMAND_BREAK.search(command):
        raise ValueError("an envelope address holds a line break")
    return command + b"\r\n"


def _rcpt_command(recipient: str, encoding: str) -> bytes:
    command = b"RCPT TO:<" + recipient.encode(encoding) + b">"
    if _COMMAND_BREAK.search(command):
        raise ValueError("an envelope address holds a line break")
    return command + b"\r\n"


class _RecipientSorter:
    """Sorts a transaction's recipients by the server's answers to their RCPT."""

    def __init__(self, offered: list[str], unsent: list[str]) -> None:
        self.offered = offered
        self.unsent = unsent
        self._never_offered = len(unsent)
        self.accepted: list[str] = []
        self.refused: dict[str, SmtpReplyError] = {}
        self.deferred: dict[str, SmtpReplyError] = {}

    def take(
        self,
        recipient: str,
        reply: aiosmtplib.SMTPResponse,
        *,
        pipelined: bool = False,
    ) -> bool:
        """File one answer; False when the transaction is full and the rest of
        the offered recipients wait for the next one. Raises the reply as an
        error when it stops the whole message (not a recipient's own fault)."""
        if reply.code in (250, 251):
            self.accepted.append(recipient)
            return True
        error = SmtpReplyError(
            reply.code, reply.message, stage=Stage.RCPT, recipient=recipient
        )
        if reply.code == 421:
            # The server is closing the session: nothing more will be answered.
            raise error
        if _transaction_full(error) and self.accepted:
            # RFC 5321 section 4.5.3.1.10: the rest go in a new transaction. Sent
            # in one group, each later one is answered: this one waits alone.
            if pipelined:
                self.unsent.insert(len(self.unsent) - self._never_offered, recipient)
                return True
            position = self.offered.index(recipient)
            self.unsent[:0] = self.offered[position:]
            return False
        if error.disposition is Disposition.FAIL_RECIPIENT:
            self.refused[recipient] = error
        elif error.disposition is Disposition.DEFER:
            self.deferred[recipient] = error
        else:
            raise error
        return True

    def result(self, *, reply: str = "") -> DeliveryResult:
        return DeliveryResult(
            accepted=tuple(self.accepted),
            refused=self.refused,
            deferred=self.deferred,
            reply=reply,
            unsent=tuple(self.unsent),
        )


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, keeping every reply of a pipelined group (RFC 2920).

    aiosmtplib reads one reply per command and drops what arrives while no
    command waits, which is every reply after the first of a group. This one
    parses every complete reply as it comes into a queue that read_response()
    takes from in order; aiosmtplib's own commands (RSET, NOOP, QUIT) keep
    working through it.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        connection_lost_callback: Callable[[SMTPProtocol], None] | None = None,
    ) -> None:
        super().__init__(loop=loop, connection_lost_callback=connection_lost_callback)
        self._incoming = bytearray()
        self._replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self._reply_waiter: asyncio.Future[None] | None = None
        self._failure: Exception | None = None

    @classmethod
    def take_over(cls, smtp: aiosmtplib.SMTP) -> PipeliningProtocol | None:
        """Put a pipelining protocol under an open, idle aiosmtplib session."""
        transport, previous = smtp.transport, smtp.protocol
        if transport is None or previous is None:
            return None

        def lost(protocol: SMTPProtocol) -> None:
            if smtp.protocol is protocol:
                smtp.close()

        protocol = cls(loop=asyncio.get_running_loop(), connection_lost_callback=lost)
        protocol.connection_made(transport)
        transport.set_protocol(protocol)
        smtp.protocol = protocol
        return protocol

    def data_received(self, data: bytes) -> None:
        if self._failure is not None:
            return
        self._incoming += data
        try:
            self._replies.extend(_complete_replies(self._incoming))
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)
            return
        if len(self._incoming) > _MAX_REPLY_BUFFER:
            self._fail(
                aiosmtplib.SMTPResponseException(
                    aiosmtplib.SMTPStatus.invalid_response, "Response too long"
                )
            )
            return
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._quit_sent and not self._replies:
            # A server may hang up on QUIT without a word: that is its goodbye.
            self._replies.append(
                aiosmtplib.SMTPResponse(aiosmtplib.SMTPStatus.closing, "")
            )
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        if exc is not None:
            lost.__cause__ = exc
        self._fail(lost)
        super().connection_lost(exc)

    def _fail(self, failure: Exception) -> None:
        if self._failure is None:
            self._failure = failure
        self._wake()

    def _wake(self) -> None:
        waiter = self._reply_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_response(
        self, timeout: float | None = None
    ) -> aiosmtplib.SMTPResponse:
        """The next reply in order; waits up to `timeout` seconds for it."""
        while not self._replies:
            if self._failure is not None:
                raise self._failure
            waiter = self._loop.create_future()
            self._reply_waiter = waiter
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from exc
            finally:
                self._reply_waiter = None
        return self._replies.popleft()


def _complete_replies(buffer: bytearray) -> list[aiosmtplib.SMTPResponse]:
    """Take every complete reply (RFC 5321 section 4.2) off the front of buffer."""
    replies: list[aiosmtplib.SMTPResponse] = []
    lines: list[bytes] = []
    consumed = 0
    start = 0
    while True:
        end = buffer.find(b"\n", start)
        if end == -1:
            break
        line = bytes(buffer[start : end + 1])
        start = end + 1
        if len(line) > _MAX_REPLY_LINE:
            raise aiosmtplib.SMTPResponseException(
                aiosmtplib.SMTPStatus.invalid_response, "Response too long"
            )
        code_text = line[:3]
        if not code_text.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
            raise aiosmtplib.SMTPResponseException(
                aiosmtplib.SMTPStatus.invalid_response,
                "Malformed SMTP response line: "
                + line.decode("utf-8", "replace").strip(),
            )
        lines.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":
            text = b"\n".join(lines).decode("utf-8", "surrogateescape")
            replies.append(aiosmtplib.SMTPResponse(int(code_text), text))
            lines = []
            consumed = start
    del buffer[:consumed]
    return replies


def starttls_not_offered(settings: MailSettings) -> UpstreamTlsError:
    """The server's EHLO lacks STARTTLS: nothing secret may follow in the clear."""
    return UpstreamTlsError(
        f"STARTTLS is not offered by {settings.hostname}:{settings.port}; "
        "credentials are never sent without TLS"
    )


async def authenticate(
    smtp: aiosmtplib.SMTP,
    settings: MailSettings,
    *,
    token_provider: TokenProvider | None,
) -> None:
    """AUTH as the settings say: XOAUTH2 for OAuth, else PLAIN or LOGIN.

    Raises ConfigError when the server offers no usable mechanism, SmtpReplyError
    (via aiosmtplib) when it refuses the credentials.
    """
    offered = {method.lower() for method in smtp.server_auth_methods}

    if settings.auth_type == "oauth":
        if token_provider is None:
            raise ConfigError("auth_type", "OAuth is chosen but not set up")
        if "xoauth2" not in offered:
            raise ConfigError(
                "auth_type", f"{settings.hostname} does not offer AUTH XOAUTH2"
            )
        access_token = await token_provider()
        try:
            await smtp.auth_xoauth2(settings.username, access_token)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise _refused_token(exc) from exc
        return

    if not settings.username:
        raise ConfigError("username", "Basic authentication needs a username")
    # PLAIN takes one round trip; Exchange Online offers only LOGIN.
    if "plain" in offered:
        await smtp.auth_plain(settings.username, settings.password)
    elif "login" in offered:
        await smtp.auth_login(settings.username, settings.password)
    else:
        raise ConfigError(
            "auth_type",
            f"{settings.hostname} offers neither AUTH PLAIN nor AUTH LOGIN",
        )


def _refused_token(exc: aiosmtplib.SMTPAuthenticationError) -> SmtpReplyError:
    """Exchange refused a token msal had just vouched for: only a new sign-in helps.

    Asking Entra for another token would only repeat the refusal (a token for the
    wrong mailbox or audience, consent withdrawn), so the queue holds instead.
    """
    error = SmtpReplyError(exc.code, exc.message, stage=Stage.AUTH)
    if error.enhanced_code == "5.7.3":
        error.message += (
            " - reauthorization required: Exchange refused the access token;"
            " sign in again"
        )
    return error


class _MessageSource:
    """A message to send, from memory or from its spool file, in blocks."""

    def __init__(self, head: bytes, rest: bytes | BinaryIO, *, size: int) -> None:
        self._head = head
        self._rest = rest
        self.size = size

    @classmethod
    async def open(
        cls,
        body: bytes | BinaryIO,
        *,
        rewrite_head: Callable[[bytes], bytes] | None,
    ) -> _MessageSource:
        """Read the first block (rewritten if asked) and learn the size to declare."""
        rest: bytes | BinaryIO
        if isinstance(body, bytes):
            head, rest, size = body[:_BLOCK_SIZE], body[_BLOCK_SIZE:], len(body)
        else:
            head, size = await asyncio.to_thread(_read_head, body)
            rest = body
        if rewrite_head is not None:
            rewritten = rewrite_head(head)
            size += len(rewritten) - len(head)
            head = rewritten
        return cls(head, rest, size=size)

    async def blocks(self) -> AsyncIterator[bytes]:
        """The message's bytes, the first block first."""
        yield self._head
        if isinstance(self._rest, bytes):
            view = memoryview(self._rest)
            for start in range(0, len(view), _BLOCK_SIZE):
                yield bytes(view[start : start + _BLOCK_SIZE])
            return
        while block := await asyncio.to_thread(self._rest.read, _BLOCK_SIZE):
            yield block


def _read_head(file: BinaryIO) -> tuple[bytes, int]:
    # Each transaction of a split message reads the file from its start again.
    file.seek(0)
    return file.read(_BLOCK_SIZE), os.fstat(file.fileno()).st_size


def _transaction_full(error: SmtpReplyError) -> bool:
    """Whether a RCPT reply says this transaction takes no more recipients."""
    if error.enhanced_code == "4.5.3":
        return True
    return error.reply_code == 452 and "too many recipients" in error.reply_text.lower()


def translate_exception(
    exc: BaseException,
    *,
    stage: Stage,
    settings: MailSettings,
    timeouts: TimeoutsConfig,
) -> RelayError:
    """Map an aiosmtplib, ssl or socket exception to the relay's error types."""
    host, port = settings.hostname, settings.port
    causes = list(_exception_chain(exc))

    for cause in causes:
        if isinstance(cause, socket.gaierror):
            return UpstreamDnsError(host)

    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return UpstreamTlsError(_certificate_problem(cause, host))
        if isinstance(cause, ssl.SSLError):
            reason = cause.reason or type(cause).__name__
            return UpstreamTlsError(f"TLS handshake failed - {reason.lower()}")

    if stage is Stage.STARTTLS and isinstance(exc, aiosmtplib.SMTPResponseException):
        # A refused STARTTLS is a TLS failure like a failed handshake: the mail
        # waits, and a stripping attacker in the path cannot hold the queue.
        reply = " ".join(f"{exc.code} {exc.message}".split())
        return UpstreamTlsError(
            f"TLS handshake failed - the server refused STARTTLS: {reply}"
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            stage = Stage.AUTH
        return SmtpReplyError(exc.code, exc.message, stage=stage)

    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError) or (
        stage is Stage.CONNECT and isinstance(exc, TimeoutError)
    ):
        return UpstreamTimeoutError.while_connecting(
            hostname=host, port=port, seconds=timeouts.connect
        )
    if isinstance(exc, TimeoutError):
        seconds = timeouts.data if stage is Stage.DATA else timeouts.command
        return UpstreamTimeoutError.waiting_for_reply(
            hostname=host, port=port, seconds=seconds, stage=stage
        )

    for cause in causes:
        if isinstance(cause, ConnectionRefusedError):
            return UpstreamConnectionError(f"Connection refused by {host}:{port}")

    if stage is Stage.STARTTLS and isinstance(exc, aiosmtplib.SMTPException):
        return UpstreamTlsError(f"TLS handshake failed - {_detail(exc)}")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return UpstreamConnectionError(
            f"Connection to {host}:{port} closed by the server during {stage.upper()}"
        )
    if isinstance(exc, aiosmtplib.SMTPException | OSError):
        detail = _detail(exc)
        return UpstreamConnectionError(
            f"Connection to {host}:{port} failed during {stage.upper()}: {detail}"
        )
    return UpstreamConnectionError(
        f"Unexpected failure talking to {host}:{port} during {stage.upper()}: "
        f"{type(exc).__name__}"
    )


def _detail(exc: BaseException) -> str:
    # Not every aiosmtplib error keeps a message (SMTPRecipientsRefused does not).
    return str(getattr(exc, "message", None) or exc or type(exc).__name__)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _certificate_problem(error: ssl.SSLCertVerificationError, host: str) -> str:
    detail = (error.verify_message or "").lower()
    if "hostname mismatch" in detail or "ip address mismatch" in detail:
        return (
            "TLS handshake failed - peer certificate validation error: "
            f"the certificate is not valid for {host}"
        )
    if "expired" in detail:
        return "TLS handshake failed - peer certificate validation error: expired"
    return "TLS handshake failed - peer certificate validation error"
