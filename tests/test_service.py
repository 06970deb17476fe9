"""The relay as a systemd service: sd_notify, reload, log rotation, startup checks.

The daemon runs as a child process (`python -m relay.cli serve`) with a real
NOTIFY_SOCKET datagram socket that the test binds, as systemd would. The unit
files are checked with systemd-analyze when it is installed (required in CI).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.config import (
    DaemonConfig,
    RetryConfig,
    apply_reloadable,
    parse_daemon_config,
    write_mail_settings,
)
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.exchange import SandboxExchange
from relay.service import RelayStatus, SystemdNotifier
from tests.conftest import (
    MAILBOX,
    PASSWORD,
    basic_settings,
    read_log_lines,
    relay_config_dict,
    send_mail_async,
    wait_for,
)
from tests.daemon_harness import free_port, toml_text

REPOSITORY = Path(__file__).resolve().parent.parent
UNIT_FILE = REPOSITORY / "systemd" / "epp-mail-relay.service"
TMPFILES_FILE = REPOSITORY / "systemd" / "tmpfiles.d" / "epp-mail-relay.conf"
SYSUSERS_FILE = REPOSITORY / "systemd" / "sysusers.d" / "epp-mail-relay.conf"
INSTALLED_COMMAND = "/opt/epp-mail-relay/bin/epp-mail-relay"
# systemd-analyze security --threshold counts in tenths: 30 is an exposure of 3.0.
EXPOSURE_THRESHOLD = 30


# -- helpers -----------------------------------------------------------------------


class NotifySocket:
    """The service manager's end of sd_notify: a bound datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.setblocking(False)
        self.received: list[tuple[float, str]] = []

    async def next_message(self, timeout: float = 20.0) -> str:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self._socket, 65536), timeout)
        message = data.decode()
        self.received.append((time.monotonic(), message))
        return message

    async def wait_for(self, assignment: str, timeout: float = 20.0) -> str:
        """The next message holding `assignment` (e.g. READY=1) as one of its lines."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.next_message(max(0.01, deadline - time.monotonic()))
            if assignment in message.split("\n"):
                return message

    def close(self) -> None:
        self._socket.close()


class ServiceDaemon:
    """`epp-mail-relay serve` as a child process, started the way systemd would."""

    def __init__(self, directory: Path, raw: dict[str, dict[str, Any]]) -> None:
        self.directory = directory
        self.raw = raw
        self.config_path = directory / "relay.toml"
        self.output = directory / "daemon-output.txt"
        self.process: subprocess.Popen[bytes] | None = None
        self.write_config()

    @property
    def port(self) -> int:
        return int(self.raw["listen"]["port"])

    @property
    def log_file(self) -> Path:
        return Path(self.raw["paths"]["log_file"])

    def write_config(self) -> None:
        self.config_path.write_text(toml_text(self.raw))

    def start(self, *, environment: dict[str, str] | None = None) -> None:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        env.update(environment or {})
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
            env=env,
            cwd=REPOSITORY,
        )

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait, timeout)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The daemon's own JSON log events called `name`."""
        found = []
        for line in self.output.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
        return found

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


DaemonFactory = Callable[..., ServiceDaemon]


@pytest.fixture
def service_daemon(tmp_path: Path, pki: SandboxPKI) -> Iterator[DaemonFactory]:
    daemons: list[ServiceDaemon] = []

    def factory(exchange_port: int, **overrides: dict[str, Any]) -> ServiceDaemon:
        directory = tmp_path / f"daemon{len(daemons)}"
        directory.mkdir()
        raw = relay_config_dict(directory, ca_file=pki.ca_file, overrides=overrides)
        raw["listen"]["port"] = free_port()
        write_mail_settings(
            directory / "mail-settings.json", basic_settings(exchange_port)
        )
        daemon = ServiceDaemon(directory, raw)
        daemons.append(daemon)
        return daemon

    yield factory
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    # A short path: AF_UNIX addresses are limited to 108 bytes.
    directory = Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp"))
    if not os.access(directory, os.W_OK):
        directory = tmp_path
    path = directory / f"epp-notify-{os.getpid()}-{time.monotonic_ns()}.sock"
    notify = NotifySocket(path)
    yield notify
    notify.close()
    path.unlink(missing_ok=True)


@pytest.fixture
async def second_exchange(pki: SandboxPKI) -> AsyncIterator[SandboxExchange]:
    server = SandboxExchange(pki=pki, users={MAILBOX: PASSWORD})
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def _last_line(text: str) -> str:
    """The command's own message, after whatever the log printed before it."""
    return text.strip().splitlines()[-1]


async def _serve_once(config_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `serve` expecting it to refuse to start; its output and exit status."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "relay.cli", "serve", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=REPOSITORY,
    )


# -- the notifier ------------------------------------------------------------------


async def test_service_notifier_sends_to_a_path_socket(
    notify_socket: NotifySocket,
) -> None:
    notifier = SystemdNotifier(str(notify_socket.path))
    notifier.ready(status="3 queued")
    assert await notify_socket.next_message(5) == "READY=1\nSTATUS=3 queued"


async def test_service_notifier_sends_to_an_abstract_socket() -> None:
    name = f"epp-mail-relay-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(5)
    try:
        SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@" + name}).stopping()
        message = await asyncio.to_thread(receiver.recv, 4096)
    finally:
        receiver.close()
    assert message == b"STOPPING=1"


async def test_service_notifier_without_notify_socket_does_nothing() -> None:
    notifier = SystemdNotifier.from_environment({"WATCHDOG_USEC": "200000"})
    sent = [notifier.ready(status="x"), notifier.watchdog(), notifier.stopping()]
    # Returns at once instead of pinging nobody forever.
    await asyncio.wait_for(notifier.run_watchdog(healthy=lambda: True), 1)
    assert sent == [False, False, False]


async def test_service_watchdog_pings_stop_while_the_relay_is_unhealthy(
    notify_socket: NotifySocket,
) -> None:
    notifier = SystemdNotifier(str(notify_socket.path), watchdog_interval=0.1)
    pinger = asyncio.create_task(notifier.run_watchdog(healthy=lambda: False))
    await asyncio.sleep(0.3)
    pinger.cancel()
    notifier.status("probe")  # something to receive, so the wait below ends
    assert await notify_socket.next_message(5) == "STATUS=probe"


async def test_service_notifier_survives_a_vanished_manager(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "gone.sock"))
    assert notifier.watchdog() is False


def test_service_watchdog_is_ignored_when_meant_for_another_process() -> None:
    notifier = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    )
    assert notifier.watchdog_interval is None


def test_service_watchdog_interval_is_read_in_seconds() -> None:
    notifier = SystemdNotifier.from_environment(
        {
            "NOTIFY_SOCKET": "/run/x",
            "WATCHDOG_USEC": "200000",
            "WATCHDOG_PID": str(os.getpid()),
        }
    )
    assert notifier.watchdog_interval == 0.2


def test_service_status_line_shows_queue_depth_and_last_error() -> None:
    status = RelayStatus(
        queue={"queued": 2, "deferred": 1},
        held=True,
        last_error="smtp: 535 5.7.3 Authentication unsuccessful",
    )
    assert status.describe() == (
        "2 queued, 0 sending, 1 deferred, 0 held, 0 failed; queue held; "
        "last error: smtp: 535 5.7.3 Authentication unsuccessful"
    )


# -- the daemon and the service manager --------------------------------------------


async def test_service_ready_only_after_the_listener_is_bound(
    exchange: SandboxExchange,
    service_daemon: DaemonFactory,
    notify_socket: NotifySocket,
) -> None:
    daemon = service_daemon(exchange.port)
    daemon.start(environment={"NOTIFY_SOCKET": str(notify_socket.path)})
    ready = await notify_socket.wait_for("READY=1")
    spool_database = daemon.directory / "spool" / "spool.db"
    assert (
        _connects(daemon.port),
        spool_database.exists(),
        "STATUS=0 queued, 0 sending, 0 deferred, 0 held, 0 failed" in ready,
    ) == (True, True, True)


async def test_service_watchdog_pings_at_half_the_interval(
    exchange: SandboxExchange,
    service_daemon: DaemonFactory,
    notify_socket: NotifySocket,
) -> None:
    daemon = service_daemon(exchange.port)
    daemon.start(
        environment={
            "NOTIFY_SOCKET": str(notify_socket.path),
            "WATCHDOG_USEC": "200000",
        }
    )
    await notify_socket.wait_for("READY=1")
    pings = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        await notify_socket.wait_for("WATCHDOG=1", timeout=2)
        pings.append(time.monotonic())
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    # Half of 200 ms, loosely: a loaded machine may deliver a ping late.
    assert 0.07 <= statistics.median(gaps) <= 0.15


async def test_service_sigterm_sends_stopping_and_exits_cleanly(
    exchange: SandboxExchange,
    service_daemon: DaemonFactory,
    notify_socket: NotifySocket,
) -> None:
    daemon = service_daemon(exchange.port)
    daemon.start(environment={"NOTIFY_SOCKET": str(notify_socket.path)})
    await notify_socket.wait_for("READY=1")
    daemon.signal(signal.SIGTERM)
    stopping = await notify_socket.wait_for("STOPPING=1")
    assert (stopping.startswith("STOPPING=1"), await daemon.wait()) == (True, 0)


async def test_service_sighup_reports_reloading_then_ready(
    exchange: SandboxExchange,
    service_daemon: DaemonFactory,
    notify_socket: NotifySocket,
) -> None:
    daemon = service_daemon(exchange.port)
    daemon.start(environment={"NOTIFY_SOCKET": str(notify_socket.path)})
    await notify_socket.wait_for("READY=1")
    daemon.signal(signal.SIGHUP)
    reloading = await notify_socket.wait_for("RELOADING=1")
    await notify_socket.wait_for("READY=1")
    assert reloading.split("\n")[1].startswith("MONOTONIC_USEC=")


async def test_service_sighup_applies_changes_with_a_session_open(
    exchange: SandboxExchange,
    second_exchange: SandboxExchange,
    service_daemon: DaemonFactory,
    notify_socket: NotifySocket,
) -> None:
    daemon = service_daemon(exchange.port)
    daemon.start(environment={"NOTIFY_SOCKET": str(notify_socket.path)})
    await notify_socket.wait_for("READY=1")

    client = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", daemon.port, timeout=30)
    try:
        await asyncio.to_thread(client.ehlo, "legacy.local")
        await asyncio.to_thread(client.mail, MAILBOX)
        # Mid-session: new Mail Settings (another server) and a new retry policy.
        write_mail_settings(
            daemon.directory / "mail-settings.json",
            basic_settings(second_exchange.port),
        )
        daemon.raw["retry"]["initial_delay"] = 5.0
        daemon.write_config()
        daemon.signal(signal.SIGHUP)
        await notify_socket.wait_for("READY=1")
        rcpt_code, _ = await asyncio.to_thread(client.rcpt, "ops@contoso.test")
        data_code, _ = await asyncio.to_thread(
            client.data, b"Subject: after reload\r\n\r\nstill here\r\n"
        )
    finally:
        await asyncio.to_thread(client.close)
    await second_exchange.wait_for_messages(1, timeout=15)

    reloaded = daemon.events("relay_reloaded")
    assert (
        rcpt_code,
        data_code,
        len(second_exchange.messages),
        len(exchange.messages),
        reloaded[-1]["config_applied"],
    ) == (250, 250, 1, 0, ["retry"])


async def test_service_sighup_with_a_broken_config_keeps_the_old_one(
    exchange: SandboxExchange,
    service_daemon: DaemonFactory,
    notify_socket: NotifySocket,
) -> None:
    daemon = service_daemon(exchange.port)
    daemon.start(environment={"NOTIFY_SOCKET": str(notify_socket.path)})
    await notify_socket.wait_for("READY=1")
    daemon.config_path.write_text('[retry]\ninitial_delay = "soon"\n')
    daemon.signal(signal.SIGHUP)
    await notify_socket.wait_for("READY=1")

    code, _ = await send_mail_async(daemon.port)
    await exchange.wait_for_messages(1, timeout=15)
    failures = daemon.events("config_reload_failed")
    assert (code, failures[-1]["key"]) == (250, "retry.initial_delay")


async def test_service_log_rotation_starts_a_new_file(
    exchange: SandboxExchange,
    service_daemon: DaemonFactory,
    notify_socket: NotifySocket,
) -> None:
    await exchange.stop()  # every try fails: one error line per retry
    daemon = service_daemon(exchange.port, logs={"dedupe_window": 0.0})
    daemon.start(environment={"NOTIFY_SOCKET": str(notify_socket.path)})
    await notify_socket.wait_for("READY=1")
    await send_mail_async(daemon.port)
    await wait_for(lambda: len(read_log_lines(daemon.log_file)) >= 1)

    # What logrotate does: rename, no signal.
    daemon.log_file.rename(daemon.log_file.with_name("epp_mail.log.1"))
    await wait_for(lambda: len(read_log_lines(daemon.log_file)) >= 1)
    assert read_log_lines(daemon.log_file)[0]["event"] == "mail_error"


# -- startup checks ----------------------------------------------------------------
# The configuration error and the readable Mail Settings file are covered in
# tests/test_app.py (exit status 2).


async def test_service_startup_refuses_a_busy_port(
    exchange: SandboxExchange, service_daemon: DaemonFactory
) -> None:
    daemon = service_daemon(exchange.port)
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", daemon.port))
        occupant.listen()
        completed = await _serve_once(daemon.config_path)
    assert (completed.returncode, _last_line(completed.stderr)) == (
        3,
        f"epp-mail-relay: cannot start: port {daemon.port} is already in use on "
        "127.0.0.1: is another mail server running?",
    )


async def test_service_startup_refuses_a_busy_admin_port(
    exchange: SandboxExchange, service_daemon: DaemonFactory
) -> None:
    admin_port = free_port()
    daemon = service_daemon(exchange.port, admin={"port": admin_port})
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", admin_port))
        occupant.listen()
        completed = await _serve_once(daemon.config_path)
    assert (completed.returncode, _last_line(completed.stderr)) == (
        3,
        f"epp-mail-relay: cannot start: admin port {admin_port} on 127.0.0.1 is "
        "already in use: choose another [admin] port, or set [admin] enabled = false",
    )


async def test_service_startup_refuses_an_unusable_spool_directory(
    exchange: SandboxExchange, service_daemon: DaemonFactory, tmp_path: Path
) -> None:
    # Root writes through any permission bits; a file where a directory must be
    # stops even root.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    daemon = service_daemon(exchange.port, paths={"spool_dir": str(blocker / "spool")})
    completed = await _serve_once(daemon.config_path)
    message = _last_line(completed.stderr)
    assert (
        completed.returncode,
        message.startswith(
            f"epp-mail-relay: cannot start: spool directory {blocker / 'spool'} "
            "is not usable: "
        ),
        "Not a directory" in message,
    ) == (3, True, True)


async def test_service_startup_refuses_an_unusable_log_directory(
    exchange: SandboxExchange, service_daemon: DaemonFactory, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    daemon = service_daemon(
        exchange.port, paths={"log_file": str(blocker / "logs" / "epp_mail.log")}
    )
    completed = await _serve_once(daemon.config_path)
    assert (completed.returncode, _last_line(completed.stderr)) == (
        3,
        f"epp-mail-relay: cannot start: [Errno 20] Not a directory: "
        f"'{blocker / 'logs'}'",
    )


async def test_service_startup_refuses_an_admin_token_readable_by_others(
    exchange: SandboxExchange, service_daemon: DaemonFactory
) -> None:
    daemon = service_daemon(exchange.port)
    token_file = daemon.directory / "admin-token"
    token_file.write_text("0123456789abcdef\n")
    token_file.chmod(0o644)
    completed = await _serve_once(daemon.config_path)
    assert (completed.returncode, _last_line(completed.stderr)) == (
        2,
        f"epp-mail-relay: configuration error: admin.token_file: {token_file} is "
        "readable by other users (mode 0644); run: chmod 600 " + str(token_file),
    )


# -- reloading, in process ---------------------------------------------------------


def test_service_reload_applies_retry_and_keeps_listen_for_restart() -> None:
    current = DaemonConfig()
    new = parse_daemon_config(
        {"retry": {"initial_delay": 5.0}, "listen": {"port": 2525}},
        base_dir=Path("/"),
    )
    merged, applied, needs_restart = apply_reloadable(current, new)
    assert (merged.retry, merged.listen.port, applied, needs_restart) == (
        RetryConfig(initial_delay=5.0),
        25,
        ("retry",),
        ("listen",),
    )


# -- the unit files ----------------------------------------------------------------


def _systemd_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("EPP_REQUIRE_SYSTEMD_ANALYZE"):
            pytest.fail(f"{name} is required in CI (package systemd)")
        pytest.skip(f"{name} is not installed")
    return path


def test_service_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _systemd_tool("systemd-analyze")
    # verify insists that ExecStart= exists: point it at this checkout's command.
    command = Path(sys.executable).with_name("epp-mail-relay")
    unit = tmp_path / UNIT_FILE.name
    unit.write_text(UNIT_FILE.read_text().replace(INSTALLED_COMMAND, str(command)))
    completed = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # An unknown or misspelt key is only a warning (exit status 0), named by file.
    about_the_unit = [
        line for line in completed.stderr.splitlines() if unit.name in line
    ]
    assert (completed.returncode, about_the_unit) == (0, [])


def test_service_unit_exposure_is_at_most_three(tmp_path: Path) -> None:
    analyze = _systemd_tool("systemd-analyze")
    completed = subprocess.run(
        [
            analyze,
            "security",
            "--offline=yes",
            f"--threshold={EXPOSURE_THRESHOLD}",
            "--no-pager",
            str(UNIT_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-600:] + completed.stderr


def test_service_tmpfiles_give_the_log_directory_to_the_service_user(
    tmp_path: Path,
) -> None:
    sysusers = _systemd_tool("systemd-sysusers")
    tmpfiles = _systemd_tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles can only chown as root")
    root = tmp_path / "root"
    (root / "etc" / "tmpfiles.d").mkdir(parents=True)
    shutil.copy(TMPFILES_FILE, root / "etc" / "tmpfiles.d" / TMPFILES_FILE.name)

    subprocess.run(
        [sysusers, f"--root={root}", str(SYSUSERS_FILE)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    subprocess.run(
        [tmpfiles, f"--root={root}", "--create", TMPFILES_FILE.name],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = (root / "etc" / "passwd").read_text().splitlines()
    user = next(line for line in passwd if line.startswith("epp-mail-relay:"))
    uid, gid = int(user.split(":")[2]), int(user.split(":")[3])
    status = (root / "var" / "eppfiles" / "epp_logger").stat()
    assert (status.st_uid, status.st_gid, oct(status.st_mode & 0o7777)) == (
        uid,
        gid,
        "0o2750",
    )
