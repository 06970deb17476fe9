"""The relay daemon as a child process, a load of legacy clients, and a crash campaign.

Shared by the reliability tests and the soak scripts in `bench/`: a campaign starts
`epp-mail-relay serve` in a subprocess, keeps real SMTP clients sending to it, kills
it with SIGKILL at random instants, restarts it, and finally counts what the sandbox
Exchange received by unique Message-ID.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
import re
import signal
import smtplib
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay import config as relay_config
from relay.config import write_mail_settings
from relay.delivery import QUEUE_AHEAD_PER_WORKER
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.exchange import ReceivedMessage, SandboxExchange
from tests.conftest import MAILBOX, PASSWORD, basic_settings, relay_config_dict

_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>\r\n]+)>", re.MULTILINE | re.IGNORECASE)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def toml_text(raw: dict[str, dict[str, Any]]) -> str:
    """The configuration dict as TOML (strings, numbers, booleans, lists)."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, list):
            return "[" + ", ".join(value(v) for v in item) + "]"
        return '"' + str(item).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value(item)}" for key, item in values.items()]
    return "\n".join(lines) + "\n"


def relaxed_limits() -> dict[str, dict[str, Any]]:
    """Config overrides lifting the per-mailbox pacing, for tests that need speed.

    Only the keys the configuration knows are set, so the overrides follow the
    `[limits]` section as it is.
    """
    wanted = {
        "messages_per_minute": 1_000_000,
        "daily_recipients": 10_000_000,
        "throttle_backoff": 0.3,
        "throttle_backoff_max": 1.0,
    }
    limits_type = getattr(relay_config, "LimitsConfig", None)
    if limits_type is None:
        return {}
    known = {f.name for f in dataclasses.fields(limits_type)}
    return {"limits": {key: value for key, value in wanted.items() if key in known}}


def merge_overrides(
    *parts: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Config overrides combined section by section, later parts winning."""
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for section, values in part.items():
            merged.setdefault(section, {}).update(values)
    return merged


def write_daemon_files(
    directory: Path,
    *,
    pki: SandboxPKI,
    exchange_port: int,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> tuple[Path, int]:
    """Write relay.toml and the Mail Settings; return the config path and SMTP port."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    raw = relay_config_dict(
        directory,
        ca_file=pki.ca_file,
        overrides=merge_overrides(relaxed_limits(), overrides or {}),
    )
    raw["listen"]["port"] = port
    config_path = directory / "relay.toml"
    config_path.write_text(toml_text(raw))
    write_mail_settings(
        Path(raw["paths"]["settings_file"]), basic_settings(exchange_port)
    )
    return config_path, port


class DaemonProcess:
    """`python -m relay.cli serve` in a child process, started and killed at will."""

    def __init__(
        self,
        config_path: Path,
        port: int,
        output: Path,
        *,
        log_level: str = "info",
    ) -> None:
        self.config_path = config_path
        self.port = port
        self.output = output
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start_blocking(self, *, timeout: float = 20.0) -> float:
        """Start the daemon and wait until it accepts; return the seconds it took."""
        started = time.monotonic()
        with self.output.open("ab") as output:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "relay.cli",
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--log-level",
                    self.log_level,
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return time.monotonic() - started
            time.sleep(0.02)
        raise AssertionError(
            "the daemon did not start: "
            + self.output.read_text(errors="replace")[-3000:]
        )

    async def start(self, *, timeout: float = 20.0) -> float:
        """Like `start_blocking`, without stopping the caller's event loop."""
        return await asyncio.to_thread(self.start_blocking, timeout=timeout)

    def signal_blocking(self, signum: int) -> int:
        """Send `signum` and reap the process; return its exit status."""
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout=30)

    async def kill(self, signum: int = signal.SIGKILL) -> int:
        """Kill the daemon (SIGKILL by default) and wait for it to be gone."""
        return await asyncio.to_thread(self.signal_blocking, signum)

    def peak_rss_kib(self) -> int:
        """The process's peak resident set size (VmHWM) in KiB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None, status
        return int(match.group(1))

    def current_rss_kib(self) -> int:
        """The process's resident set size now (VmRSS) in KiB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None, status
        return int(match.group(1))

    def ensure_stopped(self) -> None:
        """Kill a daemon still running (test teardown)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@dataclass
class LoadGenerator:
    """Legacy clients (smtplib, one thread each) sending unique Message-IDs."""

    port: int
    clients: int = 3
    messages_per_connection: int = 5
    acknowledged: set[str] = field(default_factory=set)
    attempted: int = 0
    client_errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for number in range(self.clients):
            thread = threading.Thread(
                target=self._run, args=(number,), name=f"load-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, number: int) -> None:
        sequence = 0
        while not self._stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                    client.ehlo("load.local")
                    for _ in range(self.messages_per_connection):
                        if self._stop.is_set():
                            break
                        sequence += 1
                        message_id = f"{number}.{sequence}@load.test"
                        with self._lock:
                            self.attempted += 1
                        # sendmail raises unless the DATA reply was 250.
                        client.sendmail(
                            MAILBOX, ["ops@contoso.test"], _load_message(message_id)
                        )
                        with self._lock:
                            self.acknowledged.add(message_id)
            except (OSError, smtplib.SMTPException):
                with self._lock:
                    self.client_errors += 1
                # The daemon is down or was just killed: try again shortly.
                time.sleep(0.02)


def _load_message(message_id: str) -> bytes:
    return (
        f"From: {MAILBOX}\r\nTo: ops@contoso.test\r\nSubject: load {message_id}\r\n"
        f"Message-ID: <{message_id}>\r\n\r\nsteady load\r\n"
    ).encode()


def message_id_counts(messages: Iterable[ReceivedMessage]) -> collections.Counter[str]:
    """How many times each Message-ID arrived at the sandbox."""
    counts: collections.Counter[str] = collections.Counter()
    for message in messages:
        found = _MESSAGE_ID.search(message.data)
        if found:
            counts[found.group(1).decode()] += 1
    return counts


async def wait_for_delivery(
    exchange: SandboxExchange,
    acknowledged: set[str],
    *,
    stall_seconds: float,
    max_seconds: float,
) -> float:
    """Wait until every acknowledged Message-ID arrived; return the seconds taken.

    Gives up when nothing new arrives for `stall_seconds`, or after `max_seconds`:
    a long queue drains as fast as delivery goes, a stuck one ends the wait.
    """
    started = time.monotonic()
    seen: set[str] = set()
    counted = 0
    last_progress = started
    while True:
        now = time.monotonic()
        messages = exchange.messages
        if len(messages) > counted:
            seen |= set(message_id_counts(messages[counted:]))
            counted = len(messages)
            last_progress = now
        if acknowledged <= seen:
            break
        if now - last_progress > stall_seconds or now - started > max_seconds:
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - started


def spool_states(spool_dir: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """Messages left in a stopped daemon's spool by state, and why any is stuck."""
    database = spool_dir / "spool.db"
    if not database.exists():
        return {}, ()
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        states = dict(
            connection.execute("SELECT state, COUNT(*) FROM messages GROUP BY state")
        )
        reasons = tuple(
            f"{state}: {error}"
            for state, error in connection.execute(
                "SELECT DISTINCT state, last_error FROM messages "
                "WHERE state IN ('held', 'failed', 'sending') LIMIT 10"
            )
        )
    finally:
        connection.close()
    return states, reasons


@dataclass(frozen=True)
class CrashReport:
    """What a crash campaign did and what the sandbox received."""

    kills: int
    acknowledged: int
    attempted: int
    delivered_unique: int
    lost: tuple[str, ...]
    # Extra copies of messages that arrived more than once.
    duplicates: int
    max_copies: int
    # Messages whose client never saw a 250 (the kill came first), delivered anyway.
    unacknowledged_delivered: int
    client_errors: int
    seconds: float
    mean_start_seconds: float
    # Upper bound on duplicates: every kill may catch, per worker, a delivery in
    # flight and QUEUE_AHEAD_PER_WORKER whose outcomes wait for their commit.
    in_flight_bound: int
    drain_seconds: float
    # What the spool still held at the end, by state, and why (if stuck).
    spool_states: dict[str, int]
    spool_reasons: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"{self.kills} kills in {self.seconds:.1f} s; "
            f"{self.acknowledged} acknowledged of {self.attempted} attempted; "
            f"{len(self.lost)} lost; {self.duplicates} duplicates "
            f"(max {self.max_copies} copies, bound {self.in_flight_bound}); "
            f"{self.unacknowledged_delivered} unacknowledged but delivered; "
            f"restart {self.mean_start_seconds * 1000:.0f} ms on average; "
            f"queue drained in {self.drain_seconds:.1f} s; "
            f"left in the spool: {self.spool_states or 'nothing'} "
            f"{'; '.join(self.spool_reasons)}"
        )


async def run_crash_campaign(
    directory: Path,
    *,
    pki: SandboxPKI,
    kills: int,
    min_uptime: float = 0.05,
    max_uptime: float = 0.6,
    clients: int = 3,
    seed: int = 6,
    drain_stall_seconds: float = 20.0,
    max_seconds: float | None = None,
) -> CrashReport:
    """Kill -9 the daemon `kills` times under load; count the mail at the sandbox.

    `max_seconds` bounds the kill phase: the campaign stops killing once it is
    spent, whatever `kills` says.
    """
    rng = random.Random(seed)
    exchange = SandboxExchange(pki=pki, users={MAILBOX: PASSWORD})
    await exchange.start()
    concurrency = 3
    config_path, port = write_daemon_files(
        directory,
        pki=pki,
        exchange_port=exchange.port,
        overrides={"delivery": {"concurrency": concurrency}},
    )
    daemon = DaemonProcess(config_path, port, directory / "daemon-output.txt")
    load = LoadGenerator(port=port, clients=clients)
    started = time.monotonic()
    start_times: list[float] = []
    done_kills = 0
    try:
        load.start()
        for _ in range(kills):
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                break
            start_times.append(await daemon.start())
            await asyncio.sleep(rng.uniform(min_uptime, max_uptime))
            await daemon.kill(signal.SIGKILL)
            done_kills += 1
        start_times.append(await daemon.start())
        # Let the clients finish their current message against the live daemon.
        await asyncio.sleep(0.3)
        await asyncio.to_thread(load.stop)

        acknowledged = set(load.acknowledged)
        drain_seconds = await wait_for_delivery(
            exchange,
            acknowledged,
            stall_seconds=drain_stall_seconds,
            max_seconds=600.0,
        )
        # Deliveries cut by the last kill may still arrive as duplicates.
        await asyncio.sleep(1.0)
        await daemon.kill(signal.SIGTERM)
    finally:
        load.stop()
        daemon.ensure_stopped()
        await exchange.stop()

    counts = message_id_counts(exchange.messages)
    lost = tuple(sorted(acknowledged - set(counts)))
    states, reasons = spool_states(directory / "spool")
    return CrashReport(
        kills=done_kills,
        acknowledged=len(acknowledged),
        attempted=load.attempted,
        delivered_unique=len(counts),
        lost=lost,
        duplicates=sum(count - 1 for count in counts.values()),
        max_copies=max(counts.values(), default=0),
        unacknowledged_delivered=len(set(counts) - acknowledged),
        client_errors=load.client_errors,
        seconds=time.monotonic() - started,
        mean_start_seconds=sum(start_times) / max(1, len(start_times)),
        in_flight_bound=done_kills * concurrency * (1 + QUEUE_AHEAD_PER_WORKER),
        drain_seconds=drain_seconds,
        spool_states=states,
        spool_reasons=reasons,
    )


@dataclass(frozen=True)
class OutageReport:
    """What an outage campaign did and what the sandbox received."""

    outages: int
    outage_seconds: float
    acknowledged: int
    delivered_unique: int
    lost: tuple[str, ...]
    duplicates: int
    error_rows: int
    drain_seconds: float

    def summary(self) -> str:
        return (
            f"{self.outages} outages ({self.outage_seconds:.1f} s down in all); "
            f"{self.acknowledged} acknowledged; {len(self.lost)} lost; "
            f"{self.duplicates} duplicates; {self.error_rows} error rows; "
            f"queue drained {self.drain_seconds:.1f} s after the last recovery"
        )


async def run_outage_campaign(
    directory: Path,
    *,
    pki: SandboxPKI,
    outages: int,
    min_down: float = 0.5,
    max_down: float = 3.0,
    min_up: float = 0.5,
    max_up: float = 2.0,
    clients: int = 3,
    seed: int = 6,
    drain_stall_seconds: float = 20.0,
) -> OutageReport:
    """Take the sandbox down `outages` times (refusing, or answering 421) under load."""
    rng = random.Random(seed)
    exchange = SandboxExchange(pki=pki, users={MAILBOX: PASSWORD})
    await exchange.start()
    config_path, port = write_daemon_files(
        directory, pki=pki, exchange_port=exchange.port
    )
    daemon = DaemonProcess(config_path, port, directory / "daemon-output.txt")
    load = LoadGenerator(port=port, clients=clients)
    down_total = 0.0
    try:
        await daemon.start()
        load.start()
        for number in range(outages):
            await asyncio.sleep(rng.uniform(min_up, max_up))
            down = rng.uniform(min_down, max_down)
            down_total += down
            if number % 2:
                # At MAIL too: open sessions are reused, and would not see a
                # greeting until they close.
                for stage in ("greeting", "mail"):
                    exchange.inject(
                        stage,
                        "421 4.3.2 Service not available, closing transmission channel",
                    )
                await asyncio.sleep(down)
                exchange.clear_faults()
            else:
                await exchange.stop()
                await asyncio.sleep(down)
                await exchange.start()
        await asyncio.to_thread(load.stop)
        recovered = time.monotonic()
        acknowledged = set(load.acknowledged)
        await wait_for_delivery(
            exchange,
            acknowledged,
            stall_seconds=drain_stall_seconds,
            max_seconds=600.0,
        )
        drain_seconds = time.monotonic() - recovered
        await daemon.kill(signal.SIGTERM)
    finally:
        load.stop()
        daemon.ensure_stopped()
        await exchange.stop()

    counts = message_id_counts(exchange.messages)
    database = directory / "logs" / "epp_mail.db"
    error_rows = _count_rows(database)
    return OutageReport(
        outages=outages,
        outage_seconds=down_total,
        acknowledged=len(acknowledged),
        delivered_unique=len(counts),
        lost=tuple(sorted(acknowledged - set(counts))),
        duplicates=sum(count - 1 for count in counts.values()),
        error_rows=error_rows,
        drain_seconds=drain_seconds,
    )


def _count_rows(database: Path) -> int:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return int(
            connection.execute("SELECT COUNT(*) FROM mail_server_logs").fetchone()[0]
        )
    finally:
        connection.close()


class Conversation:
    """A raw SMTP client: send bytes exactly as given, read whole replies."""

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.stream = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> bytes:
        """One reply, all of its lines; b"" if the server closed the connection."""
        reply = b""
        while True:
            line: bytes = self.stream.readline()
            reply += line
            if len(line) < 4 or line[3:4] != b"-":
                return reply

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: bytes) -> bytes:
        self.send(line)
        return self.reply()

    def abort(self) -> None:
        """Vanish: close with a TCP reset instead of a goodbye."""
        self.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.close()

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


@contextmanager
def conversation(port: int, *, timeout: float = 10.0) -> Iterator[Conversation]:
    talk = Conversation(port, timeout=timeout)
    try:
        yield talk
    finally:
        talk.close()


@dataclass(frozen=True)
class FloodFigures:
    """The daemon's memory while `connections` idle clients held a connection."""

    connections: int
    greeted: int
    # The greeting of one connection past the limit.
    refused: bytes
    before_kib: int
    during_kib: int
    peak_kib: int
    seconds: float

    @property
    def per_connection_kib(self) -> float:
        return (self.during_kib - self.before_kib) / self.connections

    def summary(self) -> str:
        return (
            f"{self.connections} idle connections: {self.greeted} greeted, one more "
            f"refused ({self.refused[:9].decode(errors='replace')}); RSS "
            f"{self.before_kib} KiB before, {self.during_kib} KiB during "
            f"({self.per_connection_kib:.1f} KiB each), peak {self.peak_kib} KiB; "
            f"opened in {self.seconds:.2f} s"
        )


def idle_flood(daemon: DaemonProcess, count: int) -> FloodFigures:
    """Open `count` idle connections, one more past the limit; measure the daemon."""
    before = daemon.current_rss_kib()
    started = time.monotonic()
    held: list[Conversation] = []
    try:
        for _ in range(count):
            held.append(Conversation(daemon.port, timeout=30))
        seconds = time.monotonic() - started
        with conversation(daemon.port) as extra:
            refused = extra.greeting
        during = daemon.current_rss_kib()
        greeted = sum(1 for talk in held if talk.greeting.startswith(b"220"))
    finally:
        for talk in held:
            talk.close()
    time.sleep(0.5)
    return FloodFigures(
        connections=count,
        greeted=greeted,
        refused=refused,
        before_kib=before,
        during_kib=during,
        peak_kib=daemon.peak_rss_kib(),
        seconds=seconds,
    )
