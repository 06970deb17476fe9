"""`epp-mail-relay doctor`: walk the path to the upstream server one step at a time.

    Settings -> DNS -> TCP connect -> [TLS, implicit] -> Greeting -> EHLO
             -> [TLS, STARTTLS -> EHLO again] -> [Token, OAuth] -> AUTH

Each step is tried only after the one before it worked; the first failure ends
the walk and is shown with the category and message a Mail Server Logs row
would carry, because it is made by the same code (`relay.errors` types and
`upstream.translate_exception`). No mail is sent: the session ends with QUIT
after AUTH. The doctor reads the configuration and Mail Settings files itself
and needs no running daemon.

Names under .invalid fail at once (RFC 6761 section 6.4); every other name is
resolved with the event loop's getaddrinfo under the connect timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import aiosmtplib

from relay.config import (
    DaemonConfig,
    MailSettings,
    TimeoutsConfig,
    load_mail_settings,
)
from relay.errors import (
    ConfigError,
    RelayError,
    Stage,
    UpstreamDnsError,
)
from relay.tokens import TokenManager
from relay.upstream import (
    TokenProvider,
    authenticate,
    build_tls_context,
    starttls_not_offered,
    translate_exception,
)

EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2
_LABEL_WIDTH: Final = 14


@dataclass(frozen=True)
class StepResult:
    """One step of the walk: its name, whether it worked, what it found."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class DoctorReport:
    """Every step tried, and the error of the first that failed (None: all fine)."""

    steps: tuple[StepResult, ...]
    error: RelayError | None

    @property
    def failed_step(self) -> str | None:
        return self.steps[-1].name if self.error is not None else None


class _StepFailed(Exception):
    def __init__(self, error: RelayError) -> None:
        super().__init__(error.message)
        self.error = error


class Doctor:
    """The step-by-step check of one Mail Settings snapshot against its server."""

    def __init__(
        self,
        *,
        settings: MailSettings,
        timeouts: TimeoutsConfig,
        tls_context: ssl.SSLContext,
        local_hostname: str,
        token_provider: TokenProvider | None = None,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> None:
        self._settings = settings
        self._timeouts = timeouts
        self._tls_context = tls_context
        self._local_hostname = local_hostname
        self._token_provider = token_provider
        self._on_step = on_step
        self._steps: list[StepResult] = []
        self._access_token: str | None = None

    async def run(self) -> DoctorReport:
        """Walk every step until one fails; never raises a RelayError."""
        smtp: aiosmtplib.SMTP | None = None
        try:
            await self._step("Settings", self._check_settings)
            addresses = await self._step("DNS", self._resolve)
            await self._step("TCP connect", lambda: self._connect_tcp(addresses))
            implicit_tls = self._settings.encryption == "ssl"
            if implicit_tls:
                await self._step("TLS (implicit)", self._implicit_tls)
            smtp = self._new_smtp()
            await self._step("Greeting", lambda: self._greeting(smtp))
            await self._step("EHLO", lambda: self._ehlo(smtp, Stage.EHLO))
            if not implicit_tls:
                await self._step("TLS (STARTTLS)", lambda: self._starttls(smtp))
                await self._step("EHLO after TLS", lambda: self._ehlo(smtp, Stage.EHLO))
            if self._settings.auth_type == "oauth":
                await self._step("Token", self._token)
            await self._step("AUTH", lambda: self._authenticate(smtp))
        except _StepFailed as failure:
            return DoctorReport(tuple(self._steps), failure.error)
        finally:
            if smtp is not None:
                await _quit(smtp)
        return DoctorReport(tuple(self._steps), None)

    async def _step(self, name: str, work: Callable[[], Awaitable[Any]]) -> Any:
        """Run one step; record its result; a failure stops the walk."""
        try:
            detail, value = await work()
        except RelayError as error:
            self._record(StepResult(name, ok=False, detail=error.message))
            raise _StepFailed(error) from error
        self._record(StepResult(name, ok=True, detail=detail))
        return value

    def _record(self, result: StepResult) -> None:
        self._steps.append(result)
        if self._on_step is not None:
            self._on_step(result)

    def _translate(self, exc: BaseException, stage: Stage) -> RelayError:
        if isinstance(exc, RelayError):
            return exc
        return translate_exception(
            exc, stage=stage, settings=self._settings, timeouts=self._timeouts
        )

    # -- the steps ----------------------------------------------------------------

    async def _check_settings(self) -> tuple[str, None]:
        settings = self._settings
        if not settings.hostname:
            raise ConfigError("hostname", "no upstream SMTP server is configured")
        if not settings.username:
            raise ConfigError("username", "is not set")
        mode = "SSL/TLS" if settings.encryption == "ssl" else "STARTTLS"
        auth = "OAuth 2.0" if settings.auth_type == "oauth" else "Basic"
        return (
            f"{settings.hostname}:{settings.port}, {mode}, {auth} as "
            f"{settings.username}",
            None,
        )

    async def _resolve(self) -> tuple[str, list[tuple[Any, ...]]]:
        host, port = self._settings.hostname, self._settings.port
        # RFC 6761 section 6.4: never ask a resolver about .invalid.
        if host.rstrip(".").lower().endswith(".invalid"):
            raise UpstreamDnsError(host)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeouts.connect):
                infos = await loop.getaddrinfo(
                    host.strip("[]"), port, type=socket.SOCK_STREAM
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamDnsError(host) from exc
        if not infos:
            raise UpstreamDnsError(host)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        return f"{host} -> {', '.join(addresses)}", infos

    async def _connect_tcp(self, infos: list[tuple[Any, ...]]) -> tuple[str, None]:
        """Open (and close) a TCP connection to the first address that answers."""
        last_error: BaseException = UpstreamDnsError(self._settings.hostname)
        for family, _, protocol, _, address in infos:
            started = time.monotonic()
            try:
                async with asyncio.timeout(self._timeouts.connect):
                    _, writer = await asyncio.open_connection(
                        host=address[0], port=address[1], family=family, proto=protocol
                    )
            except (OSError, TimeoutError) as exc:
                last_error = exc
                continue
            elapsed = (time.monotonic() - started) * 1000
            writer.close()
            await _closed(writer)
            return f"{_format_address(address)} answered in {elapsed:.0f} ms", None
        raise self._translate(last_error, Stage.CONNECT) from last_error

    async def _implicit_tls(self) -> tuple[str, None]:
        """The TLS handshake and certificate check of an SSL/TLS (port 465) server."""
        host, port = self._settings.hostname, self._settings.port
        try:
            async with asyncio.timeout(self._timeouts.connect):
                _, writer = await asyncio.open_connection(
                    host=host,
                    port=port,
                    ssl=self._tls_context,
                    server_hostname=host,
                    ssl_handshake_timeout=self._timeouts.connect,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise self._translate(exc, Stage.CONNECT) from exc
        detail = _describe_tls(writer.get_extra_info("ssl_object"))
        writer.close()
        await _closed(writer)
        return detail, None

    def _new_smtp(self) -> aiosmtplib.SMTP:
        settings = self._settings
        return aiosmtplib.SMTP(
            hostname=settings.hostname,
            port=settings.port,
            local_hostname=self._local_hostname,
            use_tls=settings.encryption == "ssl",
            start_tls=False,
            tls_context=self._tls_context,
            timeout=self._timeouts.command,
        )

    async def _greeting(self, smtp: aiosmtplib.SMTP) -> tuple[str, None]:
        try:
            response = await smtp.connect(timeout=self._timeouts.connect)
        except Exception as exc:
            raise self._translate(exc, Stage.CONNECT) from exc
        return f"{response.code} {_one_line(response.message)}", None

    async def _ehlo(self, smtp: aiosmtplib.SMTP, stage: Stage) -> tuple[str, None]:
        try:
            await smtp.ehlo()
        except Exception as exc:
            raise self._translate(exc, stage) from exc
        offered = []
        if smtp.supports_extension("starttls"):
            offered.append("STARTTLS")
        methods = " ".join(method.upper() for method in smtp.server_auth_methods)
        offered.append(f"AUTH {methods}" if methods else "no AUTH")
        return "offers " + ", ".join(offered), None

    async def _starttls(self, smtp: aiosmtplib.SMTP) -> tuple[str, None]:
        if not smtp.supports_extension("starttls"):
            raise starttls_not_offered(self._settings)
        try:
            await smtp.starttls(server_hostname=self._settings.hostname)
        except Exception as exc:
            raise self._translate(exc, Stage.STARTTLS) from exc
        transport = smtp.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        return _describe_tls(ssl_object), None

    async def _token(self) -> tuple[str, None]:
        if self._token_provider is None:
            raise ConfigError("auth_type", "OAuth is chosen but not set up")
        self._access_token = await self._token_provider()
        return f"an access token for {self._settings.username} was issued", None

    async def _authenticate(self, smtp: aiosmtplib.SMTP) -> tuple[str, None]:
        # The token of the Token step, so that AUTH does not ask Entra again.
        access_token = self._access_token

        async def cached_token() -> str:
            return access_token or ""

        provider = cached_token if access_token is not None else None
        try:
            await authenticate(smtp, self._settings, token_provider=provider)
        except Exception as exc:
            raise self._translate(exc, Stage.AUTH) from exc
        mechanism = "XOAUTH2" if self._settings.auth_type == "oauth" else "PLAIN/LOGIN"
        return f"accepted ({mechanism}) for {self._settings.username}", None


async def _closed(writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(2.0):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        # Closing is a courtesy here; the answer was already had.
        pass


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    try:
        if smtp.is_connected:
            await smtp.quit(timeout=5.0)
    except Exception:
        smtp.close()


def _format_address(address: tuple[Any, ...]) -> str:
    host = str(address[0])
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def _describe_tls(ssl_object: Any) -> str:
    """Version, and whose certificate was verified until when."""
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return "TLS established"
    certificate: dict[str, Any] = dict(ssl_object.getpeercert() or {})
    alternative_names: tuple[tuple[str, str], ...] = certificate.get(
        "subjectAltName", ()
    )
    names = [value for kind, value in alternative_names if kind == "DNS"]
    subject = _name_field(certificate.get("subject", ()), "commonName") or ", ".join(
        names[:3]
    )
    issuer_name = certificate.get("issuer", ())
    issuer = _name_field(issuer_name, "commonName") or _name_field(
        issuer_name, "organizationName"
    )
    text = f"{ssl_object.version()}, certificate verified"
    if subject:
        text += f" for {subject}"
    if issuer:
        text += f", issued by {issuer}"
    not_after = certificate.get("notAfter")
    if isinstance(not_after, str):
        expires = datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), UTC)
        text += f", valid until {expires:%Y-%m-%d}"
    return text


def _name_field(name: Any, key: str) -> str:
    for relative in name:
        for field_name, value in relative:
            if field_name == key:
                return str(value)
    return ""


# -- the command -------------------------------------------------------------------


def format_step(result: StepResult) -> str:
    """One line of the doctor's output."""
    mark = "ok  " if result.ok else "FAIL"
    return f"  [{mark}] {result.name:<{_LABEL_WIDTH}} {result.detail}"


def format_failure(error: RelayError) -> str:
    """What a Mail Server Logs row would show for the first failure."""
    lines = [
        "",
        "The Mail Server Logs would show:",
        f"  Category: {error.category}",
    ]
    if error.code:
        lines.append(f"  Code:     {error.code}")
    lines.append(f"  Message:  {error.message}")
    return "\n".join(lines)


async def run_doctor(
    config: DaemonConfig, *, timeout: float | None = None, out: TextIO
) -> int:
    """Check the configured upstream; print each step; return the exit code."""
    try:
        settings = load_mail_settings(config.paths.settings_file)
    except ConfigError as error:
        print(f"epp-mail-relay: configuration error: {error.message}", file=out)
        return EXIT_CONFIG
    timeouts = config.timeouts
    if timeout is not None:
        timeouts = dataclasses.replace(
            timeouts, connect=timeout, command=timeout, data=timeout
        )

    token_provider: TokenProvider | None = None
    if settings.auth_type == "oauth":
        try:
            manager = TokenManager(
                settings=settings,
                oauth_config=config.oauth,
                cache_path=config.paths.token_cache,
            )
        except RelayError as error:
            print(format_failure(error), file=out)
            return EXIT_FAILED
        token_provider = manager.get_access_token

    print(
        f"Checking {settings.hostname or '(no hostname)'}:{settings.port}; "
        "no mail is sent.",
        file=out,
        flush=True,
    )
    doctor = Doctor(
        settings=settings,
        timeouts=timeouts,
        tls_context=build_tls_context(config.tls),
        local_hostname=config.listen.hostname,
        token_provider=token_provider,
        on_step=lambda step: print(format_step(step), file=out, flush=True),
    )
    report = await doctor.run()
    if report.error is None:
        print("\nEvery step worked.", file=out)
        return 0
    print(format_failure(report.error), file=out)
    return EXIT_FAILED
