"""The daemon as a process: crash safety, clean shutdown, secrets kept secret."""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.config import write_mail_settings
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.exchange import SandboxExchange
from tests.conftest import (
    MAILBOX,
    PASSWORD,
    RelayFactory,
    basic_settings,
    read_rows,
    relay_config_dict,
    send_mail_async,
    wait_for,
)
from tests.daemon_harness import free_port, toml_text


class Daemon:
    """`epp-mail-relay serve` in a child process."""

    def __init__(self, config_path: Path, port: int, output: Path) -> None:
        self.config_path = config_path
        self.port = port
        self.output = output
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relay.cli",
                "serve",
                "--config",
                str(self.config_path),
            ],
            stdout=self.output.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("daemon did not start: " + self.output.read_text())

    def kill(self, signum: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout=30)


@pytest.fixture
def daemon_factory(tmp_path: Path, pki: SandboxPKI) -> Iterator[Any]:
    daemons: list[Daemon] = []

    def factory(exchange_port: int, **overrides: dict[str, Any]) -> Daemon:
        port = free_port()
        raw = relay_config_dict(tmp_path, ca_file=pki.ca_file, overrides=overrides)
        raw["listen"]["port"] = port
        config_path = tmp_path / "relay.toml"
        config_path.write_text(toml_text(raw))
        assert tomllib.loads(config_path.read_text())["listen"]["port"] == port
        write_mail_settings(
            tmp_path / "mail-settings.json", basic_settings(exchange_port)
        )
        daemon = Daemon(config_path, port, tmp_path / "daemon-output.txt")
        daemons.append(daemon)
        return daemon

    yield factory
    for daemon in daemons:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


async def test_app_kill_9_after_250_then_restart_delivers(
    exchange: SandboxExchange, daemon_factory: Any
) -> None:
    await exchange.stop()  # the upstream is down: the message can only be in the spool
    daemon = daemon_factory(exchange.port)
    daemon.start()
    code, _ = await send_mail_async(
        daemon.port, body=b"Subject: survive\r\n\r\nkill -9\r\n"
    )
    assert code == 250
    daemon.kill(signal.SIGKILL)

    await exchange.start()
    daemon.start()
    await exchange.wait_for_messages(1, timeout=30)
    assert b"Subject: survive" in exchange.messages[0].data


async def test_app_sigterm_shuts_down_cleanly_and_keeps_the_queue(
    exchange: SandboxExchange, daemon_factory: Any
) -> None:
    await exchange.stop()
    daemon = daemon_factory(exchange.port)
    daemon.start()
    for number in range(3):
        await send_mail_async(
            daemon.port, body=f"Subject: q{number}\r\n\r\nx\r\n".encode()
        )
    exit_code = daemon.kill(signal.SIGTERM)

    await exchange.start()
    daemon.start()
    await exchange.wait_for_messages(3, timeout=30)
    assert (exit_code, len(exchange.messages)) == (0, 3)


async def test_app_refuses_a_settings_file_readable_by_others(
    exchange: SandboxExchange, daemon_factory: Any, tmp_path: Path
) -> None:
    daemon = daemon_factory(exchange.port)
    (tmp_path / "mail-settings.json").chmod(0o644)
    completed = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "relay.cli",
            "serve",
            "--config",
            str(daemon.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (completed.returncode, "readable by other users" in completed.stderr) == (
        2,
        True,
    )


async def test_app_bad_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[listen]\nport = "twenty-five"\n')
    completed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "relay.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (completed.returncode, "listen.port" in completed.stderr) == (2, True)


async def test_app_password_and_auth_payloads_appear_nowhere(
    exchange: SandboxExchange,
    start_relay: RelayFactory,
    capfd: pytest.CaptureFixture[str],
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    await send_mail_async(relay.port)
    await exchange.wait_for_messages(1, timeout=15)
    exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    # Saved again: the next message opens a new session, whose AUTH is refused.
    relay.app.settings.save(basic_settings(exchange.port))
    await send_mail_async(relay.port)
    await wait_for(lambda: relay.app.delivery.held)

    forms = {
        PASSWORD,
        base64.b64encode(PASSWORD.encode()).decode(),
        base64.b64encode(f"\0{MAILBOX}\0{PASSWORD}".encode()).decode(),
    }
    outputs = [
        relay.log_file.read_text(),
        repr(read_rows(relay.app.config.paths.database)),
        "".join(capfd.readouterr()),
        repr(
            [
                await relay.app.spool.get(m.queue_id)
                for m in await relay.app.spool.list_messages()
            ]
        ),
    ]
    spool_files = [
        p.read_bytes().decode("latin-1")
        for p in relay.directory.rglob("*")
        if p.is_file() and p.name != "mail-settings.json"
    ]
    leaks = [form for form in forms for text in outputs + spool_files if form in text]
    assert (len(read_rows(relay.app.config.paths.database)) >= 1, leaks) == (True, [])
