"""Shared fixtures: the sandbox Exchange, a relay on loopback, marker secrets."""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.app import RelayApp
from relay.config import MailSettings, parse_daemon_config, write_mail_settings
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.entra import SandboxEntra
from relay.sandbox.exchange import SandboxExchange

MAILBOX = "relay@contoso.test"
# Marker secrets: tests search every output for these.
PASSWORD = "Marker-Password-q7Zr9XkP2w"
INBOUND_PASSWORD = "Marker-Inbound-Pw-L4mQ8tVb"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPKI:
    return SandboxPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def entra(pki: SandboxPKI) -> AsyncIterator[SandboxEntra]:
    """The sandbox Entra ID, with the admin tests' client secret and redirect URI."""
    from tests.admin_support import start_entra  # it imports this module

    server = await start_entra(pki)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def oauth_exchange(
    pki: SandboxPKI, entra: SandboxEntra
) -> AsyncIterator[SandboxExchange]:
    """The sandbox Exchange taking the sandbox Entra's tokens for XOAUTH2."""
    from tests.admin_support import start_oauth_exchange

    server = await start_oauth_exchange(pki, entra)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def exchange(pki: SandboxPKI) -> AsyncIterator[SandboxExchange]:
    server = SandboxExchange(pki=pki, users={MAILBOX: PASSWORD})
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def relay_config_dict(
    directory: Path,
    *,
    ca_file: Path,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """A daemon configuration for a relay on a free loopback port under `directory`."""
    raw: dict[str, dict[str, Any]] = {
        "listen": {"addresses": ["127.0.0.1"], "port": 0, "idle_timeout": 30.0},
        "paths": {
            "spool_dir": str(directory / "spool"),
            "settings_file": str(directory / "mail-settings.json"),
            "token_cache": str(directory / "token-cache.json"),
            "log_file": str(directory / "logs" / "epp_mail.log"),
            "database": str(directory / "logs" / "epp_mail.db"),
        },
        "retry": {"initial_delay": 0.3, "max_delay": 1.0, "jitter": 0.1},
        "timeouts": {"connect": 5.0, "command": 5.0, "data": 30.0},
        "tls": {"ca_file": str(ca_file)},
        "delivery": {"poll_interval": 0.1},
        # Exchange's pace (30 a minute) would make every multi-message test
        # wait; tests of pacing itself set their own.
        "limits": {"messages_per_minute": 6000},
        "logs": {"syslog": False},
        # Port 0: every relay in a test run gets its own free admin port.
        "admin": {"port": 0, "token_file": str(directory / "admin-token")},
    }
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return raw


def basic_settings(port: int, **changes: Any) -> MailSettings:
    values: dict[str, Any] = {
        "auth_type": "basic",
        "email_type": "smtp",
        "hostname": "localhost",
        "port": port,
        "username": MAILBOX,
        "password": PASSWORD,
        "encryption": "starttls",
        "admin_email": "admin@contoso.test",
    }
    values.update(changes)
    return MailSettings(**values)


@dataclass
class RunningRelay:
    app: RelayApp
    directory: Path
    stopped: bool = False

    async def stop(self) -> None:
        """Stop this relay now, as at a restart (the fixture skips it later)."""
        if not self.stopped:
            self.stopped = True
            await self.app.stop()

    @property
    def port(self) -> int:
        assert self.app.inbound.port is not None
        return self.app.inbound.port

    @property
    def log_file(self) -> Path:
        return self.app.config.paths.log_file

    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.app.config.paths.database)

    def log_lines(self) -> list[dict[str, Any]]:
        return read_log_lines(self.log_file)


def read_rows(database: Path) -> list[dict[str, Any]]:
    if not database.exists():
        return []
    connection = sqlite3.connect(database)
    connection.row_factory = sqlite3.Row
    try:
        return [
            dict(row)
            for row in connection.execute("SELECT * FROM mail_server_logs ORDER BY id")
        ]
    finally:
        connection.close()


def read_log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


RelayFactory = Callable[..., Awaitable[RunningRelay]]


@pytest.fixture
async def start_relay(tmp_path: Path, pki: SandboxPKI) -> AsyncIterator[RelayFactory]:
    """Start relays with given Mail Settings and config overrides; stop them after."""
    started: list[RunningRelay] = []

    async def factory(
        settings: MailSettings,
        *,
        overrides: dict[str, dict[str, Any]] | None = None,
        directory: Path | None = None,
    ) -> RunningRelay:
        directory = directory or tmp_path / f"relay{len(started)}"
        raw = relay_config_dict(directory, ca_file=pki.ca_file, overrides=overrides)
        config = parse_daemon_config(raw, base_dir=directory)
        write_mail_settings(config.paths.settings_file, settings)
        app = RelayApp(config)
        await app.start()
        relay = RunningRelay(app=app, directory=directory)
        started.append(relay)
        return relay

    yield factory
    for relay in started:
        await relay.stop()


def send_mail(
    port: int,
    *,
    mail_from: str = MAILBOX,
    recipients: list[str] | None = None,
    body: bytes = b"Subject: hello\r\n\r\nHello from a legacy service.\r\n",
    mail_options: list[str] | None = None,
) -> tuple[int, bytes]:
    """Send one message as a legacy service would; returns the DATA reply, or
    the MAIL reply when the sender is refused (a full spool says 452 there)."""
    recipients = recipients or ["ops@contoso.test"]
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("legacy.local")
        code, reply = client.mail(mail_from, mail_options or [])
        if code != 250:
            return code, reply
        for recipient in recipients:
            client.rcpt(recipient)
        return client.data(body)


async def send_mail_async(port: int, **kwargs: Any) -> tuple[int, bytes]:
    return await asyncio.to_thread(send_mail, port, **kwargs)


async def open_data(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client whose DATA was answered 354, that has sent none of the message."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    for command in (
        b"HELO legacy\r\n",
        b"MAIL FROM:<alerts@contoso.test>\r\n",
        b"RCPT TO:<ops@contoso.test>\r\n",
        b"DATA\r\n",
    ):
        writer.write(command)
        await reader.readline()
    return reader, writer


async def wait_for(
    predicate: Callable[[], bool], *, timeout: float = 15.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def strip_received(data: bytes) -> bytes:
    """The message without the relay's leading Received: header (and its folds)."""
    assert data.startswith(b"Received: ")
    lines = data.split(b"\r\n")
    index = 1
    while lines[index].startswith((b"\t", b" ")):
        index += 1
    return b"\r\n".join(lines[index:])


@pytest.fixture
def captured_secrets() -> Iterator[list[str]]:
    yield [PASSWORD, INBOUND_PASSWORD]


# --- the whole suite's final check: marker secrets stayed in their files ----------

# Files whose job is to hold a marker secret; everything else must not.
SECRET_HOLDERS = frozenset(
    {"mail-settings.json", ".mail-settings.json.tmp", "inbound-users"}
)
_secret_sightings: list[str] = []
_basetemp: list[Path] = []


def marker_secret_forms() -> dict[str, bytes]:
    """Each marker secret as it may leak: plain, and in any base64 payload."""
    forms: dict[str, bytes] = {}
    for name, secret in (
        ("PASSWORD", PASSWORD),
        ("INBOUND_PASSWORD", INBOUND_PASSWORD),
    ):
        raw = secret.encode()
        forms[name] = raw
        # Inside a longer base64 payload (AUTH PLAIN, XOAUTH2) the secret sits at
        # one of three alignments; these characters depend on the secret alone.
        for offset in range(3):
            encoded = base64.b64encode(b"\0" * offset + raw)
            first, end = -(-offset * 8 // 6), (offset + len(raw)) * 8 // 6
            forms[f"{name} in base64 (offset {offset})"] = encoded[first:end]
    return forms


def _sighted(text: bytes) -> list[str]:
    return [name for name, form in marker_secret_forms().items() if form in text]


@pytest.fixture(scope="session", autouse=True)
def _remember_basetemp(tmp_path_factory: pytest.TempPathFactory) -> None:
    _basetemp.append(tmp_path_factory.getbasetemp())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Note any test whose captured output or exception text shows a marker."""
    texts = [content for _, content in report.sections]
    if report.longrepr is not None and not report.failed:
        texts.append(str(report.longrepr))
    for text in texts:
        for name in _sighted(text.encode("utf-8", "surrogateescape")):
            _secret_sightings.append(f"{name} in the output of {report.nodeid}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a marker secret reached any output or file but its own."""
    # Captured output accumulates over a test's phases: report each test once.
    sightings = list(dict.fromkeys(_secret_sightings))
    for basetemp in _basetemp:
        for path in sorted(basetemp.rglob("*")):
            if path.name in SECRET_HOLDERS or path.is_symlink() or not path.is_file():
                continue
            sightings += [f"{name} in {path}" for name in _sighted(path.read_bytes())]
    if not sightings:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("Marker secrets leaked:", red=True, bold=True)
        for sighting in sightings:
            reporter.write_line(f"  {sighting}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
