"""The `epp-mail-relay` command as a user runs it."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.cli import format_log_table, main, parse_assignments
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.entra import SandboxEntra
from relay.sandbox.exchange import SandboxExchange
from relay.spool import MessageState
from relay.tokens import SIGN_IN_FAILED_TEXT, SIGN_IN_OK_TEXT
from tests.admin_support import (
    callback_uri,
    oauth_overrides,
    oauth_settings,
    toml_text,
)
from tests.conftest import (
    PASSWORD,
    RelayFactory,
    RunningRelay,
    basic_settings,
    relay_config_dict,
    send_mail_async,
    wait_for,
)
from tests.test_tokens import open_authorize_url


def test_cli_demo_relays_mail_and_exits_0() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "relay.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    tail = completed.stdout
    assert (
        completed.returncode,
        "AUTH XOAUTH2" in tail,
        "Your email has been verified. Authorization complete!" in tail,
        "535 5.7.3 Authentication unsuccessful" in tail,
    ) == (0, True, True, True), completed.stderr[-2000:]


def test_cli_log_table_has_the_ui_columns() -> None:
    table = format_log_table(
        [
            {
                "auth_type": "oauth",
                "status": "error",
                "log_message": "AADSTS700082: The refresh token has expired",
                "registered_at": "2026-12-04T10:00:00.000Z",
                "repeat_count": 3,
            }
        ]
    )
    header, _, row = table.splitlines()
    assert (header.split(" | ")[0], row.startswith("OAuth"), "(x3)" in row) == (
        "Authentication Type",
        True,
        True,
    )


# -- the commands that talk to the daemon's admin API ----------------------------

SAVED = "Changes have been saved!"
SENT = "A test e-mail was sent to admin@contoso.test"


def write_config(relay: RunningRelay, pki: SandboxPKI, **overrides: Any) -> Path:
    """The relay's configuration as a TOML file, as the operator has it."""
    raw = relay_config_dict(relay.directory, ca_file=pki.ca_file, overrides=overrides)
    path = relay.directory / "relay.toml"
    path.write_text(toml_text(raw))
    return path


async def run_cli(relay: RunningRelay, pki: SandboxPKI, *arguments: str) -> int:
    """The command run in this process (in a thread: it has its own event loop)."""
    config = write_config(relay, pki)
    assert relay.app.admin is not None
    argv = [*arguments, "--config", str(config), "--admin-url", relay.app.admin.url]
    return await asyncio.to_thread(main, argv)


# The relay in this process logs to the same captured stdout as the command.
_RELAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


def printed(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """What the command printed (stdout, stderr), without the relay's log lines."""
    captured = capsys.readouterr()
    out, err = (
        "\n".join(line for line in text.splitlines() if not _RELAY_LOG_LINE.match(line))
        for text in (captured.out, captured.err)
    )
    return out, err


async def test_cli_status_prints_the_queue_and_auth(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    code = await run_cli(relay, pki, "status")
    out = printed(capsys)[0]
    assert (code, "0 queued, 0 sending" in out, "Auth:         Basic" in out) == (
        0,
        True,
        True,
    )


async def test_cli_status_without_a_running_daemon_exits_4(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    config = write_config(relay, pki)
    url = relay.app.admin.url if relay.app.admin else ""
    await relay.stop()
    code = await asyncio.to_thread(
        main, ["status", "--config", str(config), "--admin-url", url]
    )
    assert (code, "is the daemon running?" in printed(capsys)[1]) == (4, True)


async def test_cli_settings_show_never_prints_a_secret(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    code = await run_cli(relay, pki, "settings", "show")
    out = printed(capsys)[0]
    assert (code, "Password:" in out, "(set)" in out, PASSWORD in out) == (
        0,
        True,
        True,
        False,
    )


async def test_cli_settings_set_saves_and_prints_changes_saved(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    code = await run_cli(
        relay, pki, "settings", "set", "admin_email=ops@contoso.test", "port=587"
    )
    assert (
        code,
        printed(capsys)[0].strip(),
        relay.app.settings.current.admin_email,
        relay.app.settings.current.port,
    ) == (0, SAVED, "ops@contoso.test", 587)


async def test_cli_settings_set_reads_a_secret_from_stdin(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    monkeypatch.setattr("sys.stdin", io.StringIO("Typed-Password-5\n"))
    await run_cli(relay, pki, "settings", "set", "password")
    assert relay.app.settings.current.password == "Typed-Password-5"


async def test_cli_settings_set_refuses_a_secret_on_the_command_line(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    code = await run_cli(relay, pki, "settings", "set", "password=visible-in-ps")
    assert (
        code,
        relay.app.settings.current.password,
        "visible to other users" in printed(capsys)[1],
    ) == (
        2,
        PASSWORD,
        True,
    )


async def test_cli_settings_set_bad_value_prints_the_error_text_and_field(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    code = await run_cli(relay, pki, "settings", "set", "auth_type=kerberos")
    err = printed(capsys)[1].splitlines()
    assert (code, err) == (
        1,
        [
            "Cannot execute command! An error occurred!",
            '  auth_type: must be "basic" or "oauth"',
        ],
    )


async def test_cli_test_email_prints_the_sent_text(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    code = await run_cli(relay, pki, "test-email")
    assert (code, printed(capsys)[0].strip(), len(exchange.messages)) == (
        0,
        SENT,
        1,
    )


async def test_cli_test_email_failure_prints_the_failed_text(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    code = await run_cli(relay, pki, "test-email")
    assert (code, printed(capsys)[1].splitlines()[0]) == (
        1,
        "Failed to send the test e-mail! Please verify if the E-mail Server "
        "Settings are correct!",
    )


async def test_cli_queue_lists_retries_and_deletes_messages(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"retry": {"initial_delay": 60.0, "max_delay": 120.0}},
    )
    exchange.inject("mail", "451 4.3.0 Try again later", times=2)
    await send_mail_async(relay.port)
    await send_mail_async(relay.port)
    for _ in range(150):
        counts = await relay.app.spool.counts_by_state()
        if counts[MessageState.DEFERRED] == 2:
            break
        await asyncio.sleep(0.1)
    first, second = [m.queue_id for m in await relay.app.spool.list_messages()]

    listed = await run_cli(relay, pki, "queue", "list")
    listing = printed(capsys)[0]
    deleted = await run_cli(relay, pki, "queue", "delete", first)
    retried = await run_cli(relay, pki, "queue", "retry", second)
    await exchange.wait_for_messages(1, timeout=15)
    assert (
        listed,
        first in listing and second in listing,
        "deferred" in listing,
        deleted,
        retried,
        len(exchange.messages),
    ) == (0, True, True, 0, 0, 1)


async def test_cli_queue_release_sends_held_mail(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    await send_mail_async(relay.port)
    await wait_for(lambda: relay.app.delivery.held)
    exchange.clear_faults()
    code = await run_cli(relay, pki, "queue", "release")
    await exchange.wait_for_messages(1, timeout=15)
    assert (code, printed(capsys)[0].strip()) == (0, "1 held messages released.")


async def test_cli_queue_delete_of_an_unknown_id_fails(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    assert await run_cli(relay, pki, "queue", "delete", "NoSuchId") == 1


def test_cli_parse_assignments_asks_for_secrets_and_types_the_port() -> None:
    asked: list[str] = []

    def read_secret(name: str) -> str:
        asked.append(name)
        return "s3cret"

    changes = parse_assignments(
        ["hostname=smtp.office365.com", "port=587", "client_secret"],
        read_secret=read_secret,
    )
    assert (changes, asked) == (
        {"hostname": "smtp.office365.com", "port": 587, "client_secret": "s3cret"},
        ["client_secret"],
    )


# -- signin -----------------------------------------------------------------------


class CliProcess:
    """`epp-mail-relay signin` in a child process, read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def start(
        cls, relay: RunningRelay, pki: SandboxPKI, *arguments: str
    ) -> CliProcess:
        config = write_config(relay, pki)
        assert relay.app.admin is not None
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay.cli",
            *arguments,
            "--config",
            str(config),
            "--admin-url",
            relay.app.admin.url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(process)

    async def authorization_url(self) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(30):
            while True:
                line = (await self.process.stdout.readline()).decode()
                self.lines.append(line)
                if not line:
                    raise AssertionError("".join(self.lines))
                if line.strip().startswith("https://"):
                    return line.strip()

    async def finish(self, stdin: bytes = b"") -> tuple[int, str]:
        async with asyncio.timeout(60):
            output, _ = await self.process.communicate(stdin or None)
        return self.process.returncode or 0, "".join(self.lines) + output.decode()


def _loopback_redirect_uri() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/epp/oauth/callback"


async def test_cli_signin_receives_the_redirect_on_a_loopback_listener(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    redirect_uri = _loopback_redirect_uri()
    entra.redirect_uris = (redirect_uri,)
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra, redirect_uri=redirect_uri),
        overrides=oauth_overrides(entra, pki),
    )
    cli = await CliProcess.start(relay, pki, "signin", "--timeout", "30")
    answer = await open_authorize_url(await cli.authorization_url(), pki)
    assert answer.location is not None and answer.location.startswith(redirect_uri)
    # What the browser does next: follow the redirect to the CLI's listener.
    for _ in range(50):
        try:
            async with (
                aiohttp.ClientSession() as browser,
                browser.get(answer.location) as page,
            ):
                browser_text = await page.text()
            break
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.1)
    code, output = await cli.finish()
    assert (code, SIGN_IN_OK_TEXT in output, SIGN_IN_OK_TEXT in browser_text) == (
        0,
        True,
        True,
    )


async def test_cli_signin_reads_the_pasted_redirect_url(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra), overrides=oauth_overrides(entra, pki)
    )
    cli = await CliProcess.start(relay, pki, "signin", "--timeout", "30")
    answer = await open_authorize_url(await cli.authorization_url(), pki)
    assert answer.location is not None
    code, output = await cli.finish((answer.location + "\n").encode())
    assert (code, SIGN_IN_OK_TEXT in output) == (0, True)


async def test_cli_signin_prints_the_failed_text_for_a_bad_paste(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra), overrides=oauth_overrides(entra, pki)
    )
    cli = await CliProcess.start(relay, pki, "signin", "--timeout", "30")
    await cli.authorization_url()
    code, output = await cli.finish(b"https://appliance.contoso.test/?code=x&state=y\n")
    assert (code, SIGN_IN_FAILED_TEXT in output) == (1, True)


async def test_cli_signin_waits_when_the_daemon_receives_the_redirect(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra), overrides=oauth_overrides(entra, pki)
    )
    entra.redirect_uris = (callback_uri(relay),)
    await relay.app.save_settings(
        dataclasses.replace(
            relay.app.settings.current, redirect_uri=callback_uri(relay)
        )
    )
    cli = await CliProcess.start(relay, pki, "signin", "--timeout", "30")
    answer = await open_authorize_url(await cli.authorization_url(), pki)
    assert answer.location is not None
    async with aiohttp.ClientSession() as browser, browser.get(answer.location):
        pass
    code, output = await cli.finish()
    assert (code, SIGN_IN_OK_TEXT in output) == (0, True)


async def test_cli_signin_with_a_device_code_prints_the_prompt_and_the_result(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra, oauth_flow="device_code"),
        overrides=oauth_overrides(entra, pki),
    )
    code = await run_cli(relay, pki, "signin", "--timeout", "30")
    out = printed(capsys)[0].splitlines()
    assert (code, "code" in out[0], out[-1]) == (0, True, SIGN_IN_OK_TEXT)


async def test_cli_signin_with_client_credentials_prints_the_result(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra, oauth_flow="client_credentials"),
        overrides=oauth_overrides(entra, pki),
    )
    code = await run_cli(relay, pki, "signin")
    assert (code, printed(capsys)[0].strip()) == (0, SIGN_IN_OK_TEXT)
