"""`epp-mail-relay demo`: the relay relaying real mail through its loopback sandbox.

Starts the sandbox Exchange (STARTTLS, AUTH, certificates from a throw-away CA) and
the relay on free loopback ports, sends mail with Python's smtplib the way a legacy
service would, and prints what arrived and what the Mail Server Logs tab shows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import shutil
import smtplib
import ssl
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import aiohttp

from relay.app import RelayApp
from relay.cli import format_log_table, read_log_rows
from relay.config import MailSettings, parse_daemon_config, write_mail_settings
from relay.logsink import configure_logging
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.entra import SandboxEntra
from relay.sandbox.exchange import SandboxExchange

MAILBOX = "alerts@contoso.test"
REDIRECT_URI = "http://localhost/epp/oauth/callback"
REFUSED = "nobody@contoso.test"


def demo_config(directory: Path, *, ca_file: Path) -> dict[str, object]:
    """A daemon configuration for a throw-away relay on a free loopback port."""
    return {
        "listen": {"addresses": ["127.0.0.1"], "port": 0},
        "paths": {
            "spool_dir": str(directory / "spool"),
            "settings_file": str(directory / "mail-settings.json"),
            "token_cache": str(directory / "token-cache.json"),
            "log_file": str(directory / "epp_logger" / "epp_mail.log"),
            "database": str(directory / "epp_logger" / "epp_mail.db"),
        },
        "retry": {"initial_delay": 1.0, "max_delay": 5.0, "jitter": 0.1},
        "tls": {"ca_file": str(ca_file)},
        "delivery": {"poll_interval": 0.2},
        "logs": {"syslog": False},
        # The demo shows relaying; an admin port and token file are not needed.
        "admin": {"enabled": False},
    }


def _plain_message() -> EmailMessage:
    message = EmailMessage()
    message["From"] = MAILBOX
    message["To"] = "ops@contoso.test"
    message["Subject"] = "Disk usage above 90% on appliance"
    message.set_content("The data volume is 91% full.\n")
    return message


def _utf8_message() -> EmailMessage:
    message = EmailMessage()
    message["From"] = MAILBOX
    message["To"] = "équipe@contoso.test"
    message["Subject"] = "Rapport quotidien – état du système ✓"
    message.set_content("Tout va bien. Température: 42 °C. Ünïcödé body.\n", cte="8bit")
    message.add_attachment(
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16,
        maintype="image",
        subtype="png",
        filename="graph.png",
    )
    return message


def _send(port: int, message: EmailMessage, *, recipients: list[str]) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("legacy-service.local")
        options = ["SMTPUTF8"] if not all(r.isascii() for r in recipients) else []
        client.send_message(
            message, from_addr=MAILBOX, to_addrs=recipients, mail_options=options
        )
        reply = client.noop()
    return f"{reply[0]}"


async def run_demo(*, keep: bool = False) -> int:
    """Run the whole demo; returns the process exit code."""
    started = time.monotonic()
    # The demo tells its own story; the relay's events would only interleave.
    configure_logging(level="critical", stream=sys.stderr)
    directory = Path(tempfile.mkdtemp(prefix="epp-mail-relay-demo-"))
    try:
        return await _run(directory, started)
    finally:
        if keep:
            print(f"\nDemo files kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


async def _run(directory: Path, started: float) -> int:
    pki = SandboxPKI.create(directory / "pki")
    password = secrets.token_urlsafe(18)
    client_secret = secrets.token_urlsafe(24)
    entra = SandboxEntra(
        server_ssl_context=pki.server_context(),
        client_secret=client_secret,
        redirect_uris=(REDIRECT_URI,),
        mailbox=MAILBOX,
    )
    await entra.start()
    exchange = SandboxExchange(
        pki=pki, users={MAILBOX: password}, token_validator=entra.validate_access_token
    )
    await exchange.start()

    raw_config = demo_config(directory, ca_file=pki.ca_file)
    raw_config["oauth"] = {
        "authority_host": entra.base_url,
        "ca_file": str(pki.ca_file),
    }
    config = parse_daemon_config(raw_config, base_dir=directory)
    settings = MailSettings(
        auth_type="basic",
        email_type="smtp",
        hostname="localhost",
        port=exchange.port,
        username=MAILBOX,
        password=password,
        encryption="starttls",
        admin_email="admin@contoso.test",
    )
    write_mail_settings(config.paths.settings_file, settings)
    app = RelayApp(config)
    await app.start()
    port = app.inbound.port
    assert port is not None
    print(f"sandbox Exchange on 127.0.0.1:{exchange.port} (STARTTLS + AUTH)")
    print(f"sandbox Entra ID on {entra.base_url} (HTTPS)")
    print(f"relay listening on 127.0.0.1:{port}\n")

    try:
        print("1. a plain alert")
        await asyncio.to_thread(
            _send, port, _plain_message(), recipients=["ops@contoso.test"]
        )
        print("2. an 8-bit UTF-8 report with an attachment")
        await asyncio.to_thread(
            _send, port, _utf8_message(), recipients=["équipe@contoso.test"]
        )
        print(f"3. a message to {REFUSED}, whom the server refuses (550 5.1.1)")
        exchange.inject(
            "rcpt",
            "550 5.1.1 User unknown; RecipientNotFound; "
            "Recipient not found by SMTP address lookup",
            match=REFUSED,
        )
        await asyncio.to_thread(
            _send, port, _plain_message(), recipients=[REFUSED, "ops@contoso.test"]
        )
        await exchange.wait_for_messages(3, timeout=20)

        print(
            "4. a message while the server refuses AUTH (535 5.7.3): the queue is held"
        )
        # The server is restarted with AUTH refused, as when a tenant turns SMTP
        # AUTH off: the relay's open connection ends and the next AUTH fails.
        await exchange.stop()
        exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
        await exchange.start()
        await asyncio.to_thread(
            _send, port, _plain_message(), recipients=["ops@contoso.test"]
        )
        await _wait_until(lambda: app.delivery.held, timeout=20)
        print(
            "   ... held. The administrator saves the settings again; delivery resumes."
        )
        exchange.clear_faults()
        app.settings.save(settings)
        app.delivery.wake()
        await exchange.wait_for_messages(4, timeout=20)

        print("5. the administrator switches to OAuth 2.0 and clicks Sign In")
        app.settings.save(
            dataclasses.replace(
                settings,
                auth_type="oauth",
                password="",
                tenant_id=entra.tenant_id,
                client_id=entra.client_id,
                client_secret=client_secret,
                redirect_uri=REDIRECT_URI,
            )
        )
        redirect = await _open_in_browser(await app.begin_sign_in(), pki.ca_file)
        result = await app.complete_sign_in(redirect)
        print(f"   {result.message}")
        print("6. an alert relayed with AUTH XOAUTH2")
        await asyncio.to_thread(
            _send, port, _plain_message(), recipients=["ops@contoso.test"]
        )
        await exchange.wait_for_messages(5, timeout=20)
    finally:
        await app.stop()
        await exchange.stop()
        await entra.stop()

    print("\nWhat the sandbox Exchange received:")
    for number, received in enumerate(exchange.messages, 1):
        subject = _subject(received.data)
        print(
            f"  {number}. from <{received.mail_from}> to {', '.join(received.rcpt_tos)}"
            f" - {len(received.data)} bytes - AUTH {received.auth_mechanism}"
            f" - {subject}"
        )
    print("\nMail Server Logs:")
    print(format_log_table(read_log_rows(config.paths.database)))
    print(f"\nDemo finished in {time.monotonic() - started:.1f} s.")
    return 0


async def _open_in_browser(url: str, ca_file: Path) -> str:
    """What the administrator's browser does: follow the sign-in URL to the redirect."""
    trust = ssl.create_default_context(cafile=str(ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=trust, allow_redirects=False) as response,
    ):
        location = response.headers.get("Location")
    if location is None:
        raise RuntimeError("the sandbox Entra did not redirect back")
    return location


def _subject(data: bytes) -> str:
    from email import message_from_bytes
    from email.policy import default

    message = message_from_bytes(data, policy=default)
    return str(message.get("Subject", ""))


async def _wait_until(predicate: object, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("the demo waited too long")
        await asyncio.sleep(0.1)
