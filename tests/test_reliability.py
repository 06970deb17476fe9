"""Crash, outage and full disk: nothing acknowledged is lost, nothing piles up.

The crash test drives `epp-mail-relay serve` as a real process under load from
real SMTP clients and kills it with SIGKILL at random instants; the longer soak is
`bench/soak_crash.py`. Outages are the sandbox Exchange stopped or answering 421.
A full disk is a size-limited tmpfs when the tests run as root.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import itertools
import json
import os
import re
import signal
import smtplib
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.sandbox.certs import SandboxPKI
from relay.sandbox.exchange import ReceivedMessage, SandboxExchange
from tests.conftest import (
    INBOUND_PASSWORD,
    MAILBOX,
    PASSWORD,
    RelayFactory,
    basic_settings,
    send_mail_async,
    strip_received,
    wait_for,
)
from tests.daemon_harness import (
    DaemonProcess,
    merge_overrides,
    message_id_counts,
    relaxed_limits,
    run_crash_campaign,
    write_daemon_files,
)

# At least 50 kills, as the reliability contract says; the soak script does more.
CI_KILLS = 50


def _numbered(number: int, *, size: int = 0) -> bytes:
    padding = b"".join(b"%06d padding line\r\n" % line for line in range(size // 20))
    return (
        f"From: {MAILBOX}\r\nTo: ops@contoso.test\r\nSubject: n{number}\r\n"
        f"Message-ID: <{number}@reliability.test>\r\n\r\nbody {number}\r\n"
    ).encode() + padding


def _by_message_id(messages: list[ReceivedMessage]) -> dict[str, bytes]:
    """The bytes each Message-ID arrived with (the last copy, if several)."""
    found = {}
    for message in messages:
        match = re.search(rb"^Message-ID: <([^>]+)>", message.data, re.MULTILINE)
        if match:
            found[match.group(1).decode()] = message.data
    return found


# --- crash -------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_reliability_kill_9_under_load_loses_no_acknowledged_message(
    pki: SandboxPKI, tmp_path: Path
) -> None:
    report = await run_crash_campaign(
        tmp_path / "crash", pki=pki, kills=CI_KILLS, max_seconds=150
    )
    print(report.summary())
    assert (
        report.kills,
        report.lost,
        report.acknowledged > 10 * CI_KILLS,
        report.duplicates <= report.in_flight_bound,
    ) == (CI_KILLS, (), True, True)


# --- outage ------------------------------------------------------------------------


async def test_reliability_refused_connections_defer_then_everything_arrives(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    await exchange.stop()
    relay = await start_relay(basic_settings(exchange.port), overrides=relaxed_limits())
    for number in range(10):
        code, _ = await send_mail_async(relay.port, body=_numbered(number))
        assert code == 250
    # Retries at 0.3 s doubling to 1 s: several rounds while the server is away.
    await asyncio.sleep(2.5)
    attempts = [m.attempts for m in await relay.app.spool.list_messages()]

    await exchange.start()
    await exchange.wait_for_messages(10, timeout=15)
    counts = message_id_counts(exchange.messages)
    assert (
        sorted(counts) == sorted(f"{n}@reliability.test" for n in range(10)),
        max(counts.values()),
        min(attempts) >= 2,
    ) == (True, 1, True)


async def test_reliability_outage_error_rows_stay_bounded(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    await exchange.stop()
    relay = await start_relay(basic_settings(exchange.port), overrides=relaxed_limits())
    for number in range(10):
        await send_mail_async(relay.port, body=_numbered(number))
    await asyncio.sleep(2.5)
    rows = relay.rows()
    # Dozens of failed attempts, one row: the same failure is counted, not repeated.
    assert (
        len(rows),
        rows[0]["category"],
        rows[0]["repeat_count"] >= 20,
        len(relay.log_lines()),
    ) == (1, "connection", True, 1)


async def test_reliability_421_outage_retries_follow_the_schedule(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    exchange.inject(
        "greeting", "421 4.3.2 Service not available, closing transmission channel"
    )
    schedule = {"initial_delay": 0.25, "multiplier": 2.0, "max_delay": 1.0}
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides=merge_overrides(
            relaxed_limits(), {"retry": {**schedule, "jitter": 0.1}}
        ),
    )
    await send_mail_async(relay.port, body=_numbered(1))
    await wait_for(lambda: len(exchange.sessions) >= 5, timeout=15)
    exchange.clear_faults()
    await exchange.wait_for_messages(1, timeout=10)

    starts = [session.started_at for session in exchange.sessions[:5]]
    gaps = [
        (later - earlier).total_seconds()
        for earlier, later in itertools.pairwise(starts)
    ]
    expected = [0.25, 0.5, 1.0, 1.0]
    # Jitter is +/-10 %; the dispatcher and the connection add a little on top.
    on_schedule = [
        base * 0.9 - 0.02 <= gap <= base * 1.1 + 0.2
        for gap, base in zip(gaps, expected, strict=True)
    ]
    assert (on_schedule, len(relay.rows())) == ([True] * 4, 1), gaps


# --- full disk ---------------------------------------------------------------------


async def test_reliability_spool_floor_from_the_config_refuses_with_452(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    # A floor no file system meets: every new message is refused, none is lost.
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"paths": {"spool_min_free_bytes": 1 << 62}},
    )

    def mail_reply() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.ehlo("legacy.local")
            return client.mail(MAILBOX)

    # Already at MAIL, before the client spends time on the body.
    code, reply = await asyncio.to_thread(mail_reply)
    counts = await relay.app.spool.counts_by_state()
    assert (code, reply[:5], sum(counts.values())) == (452, b"4.3.1", 0)


@contextlib.contextmanager
def _tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at `directory`; skips the test when it cannot mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size},mode=0700",
            "tmpfs",
            str(directory),
        ],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=False)
        if os.path.ismount(directory):
            subprocess.run(["umount", "-l", str(directory)], check=False)


def _fill(directory: Path) -> Path:
    """Write a ballast file until the file system says ENOSPC."""
    ballast = directory / "ballast"
    chunk = b"\0" * 65536
    with ballast.open("wb") as output:
        while True:
            try:
                output.write(chunk)
                output.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    # Whatever fits in the last partial chunk, too.
    with contextlib.suppress(OSError), ballast.open("ab") as output:
        for _ in range(64):
            output.write(b"\0" * 1024)
            output.flush()
    return ballast


async def _send_until_refused(
    port: int, *, size: int, limit: int
) -> tuple[list[int], bytes]:
    """Send numbered messages until one is refused; return the accepted numbers."""
    accepted: list[int] = []
    for number in range(limit):
        code, reply = await send_mail_async(port, body=_numbered(number, size=size))
        if code != 250:
            return accepted, b"%d %s" % (code, reply)
        accepted.append(number)
    return accepted, b""


async def test_reliability_tmpfs_floor_refuses_new_mail_then_resumes_as_queue_drains(
    exchange: SandboxExchange, start_relay: RelayFactory, tmp_path: Path
) -> None:
    with _tmpfs(tmp_path / "spoolfs", "6m") as mount:
        await exchange.stop()
        relay = await start_relay(
            basic_settings(exchange.port),
            overrides=merge_overrides(
                relaxed_limits(),
                {
                    "paths": {
                        "spool_dir": str(mount / "spool"),
                        "spool_min_free_bytes": 2 * 1024 * 1024,
                    }
                },
            ),
        )
        accepted, refusal = await _send_until_refused(
            relay.port, size=200_000, limit=40
        )

        await exchange.start()
        await exchange.wait_for_messages(len(accepted), timeout=30)
        await wait_for(lambda: not any((mount / "spool" / "messages").iterdir()))
        code, _ = await send_mail_async(relay.port, body=_numbered(999, size=200_000))
        await exchange.wait_for_messages(len(accepted) + 1, timeout=15)
        arrived = _by_message_id(exchange.messages)
        intact = [
            strip_received(arrived[f"{number}@reliability.test"])
            == _numbered(number, size=200_000)
            for number in accepted
        ]
        await relay.stop()
    assert (
        len(accepted) >= 5,
        refusal.startswith(b"452 4.3.1"),
        all(intact),
        code,
    ) == (True, True, True, 250), refusal


def _no_floor_spool(mount: Path) -> dict[str, dict[str, Any]]:
    # No floor: another program fills the disk to the last byte.
    return merge_overrides(
        relaxed_limits(),
        {"paths": {"spool_dir": str(mount / "spool"), "spool_min_free_bytes": 0}},
    )


async def _code(port: int, number: int, *, size: int) -> int:
    code, _ = await send_mail_async(port, body=_numbered(number, size=size))
    return code


async def test_reliability_tmpfs_really_full_refuses_452_and_keeps_the_queue(
    exchange: SandboxExchange, start_relay: RelayFactory, tmp_path: Path
) -> None:
    with _tmpfs(tmp_path / "spoolfs", "8m") as mount:
        await exchange.stop()
        relay = await start_relay(
            basic_settings(exchange.port), overrides=_no_floor_spool(mount)
        )
        queued = [await _code(relay.port, n, size=100_000) for n in range(5)]
        ballast = _fill(mount)
        # Small (kept in memory) and big (streamed to a file) messages alike.
        refused = [
            await _code(relay.port, n, size=size)
            for n, size in ((100, 1_000), (101, 400_000))
        ]
        # Delivery meets the full disk too: the server comes back meanwhile.
        await exchange.start()
        await asyncio.sleep(1.5)
        ballast.unlink()
        resumed = await _code(relay.port, 102, size=1_000)
        await exchange.wait_for_messages(6, timeout=30)
        arrived = _by_message_id(exchange.messages)
        leftovers = sorted(p.name for p in (mount / "spool" / "tmp").iterdir())
        await relay.stop()
    intact = all(
        strip_received(arrived[f"{n}@reliability.test"]) == _numbered(n, size=100_000)
        for n in range(5)
    )
    assert (queued, refused, resumed, intact, leftovers) == (
        [250] * 5,
        [452, 452],
        250,
        True,
        [],
    ), sorted(arrived)


async def test_reliability_full_disk_during_delivery_does_not_strand_the_message(
    exchange: SandboxExchange, start_relay: RelayFactory, tmp_path: Path
) -> None:
    # The upstream holds the DATA reply, the disk fills meanwhile, then the
    # upstream says "try later": the spool cannot write the deferral. The message
    # used to stay SENDING until the next restart.
    exchange.delay("data", 1.0, times=1)
    exchange.inject("data", "421 4.3.2 Service not available", times=1)
    with _tmpfs(tmp_path / "spoolfs", "8m") as mount:
        relay = await start_relay(
            basic_settings(exchange.port), overrides=_no_floor_spool(mount)
        )
        accepted = await _code(relay.port, 1, size=1_000)
        await wait_for(lambda: exchange.faults[0].fired == 1, timeout=10)
        ballast = _fill(mount)
        await wait_for(lambda: exchange.faults[1].fired == 1, timeout=10)
        await asyncio.sleep(1.0)
        ballast.unlink()
        await exchange.wait_for_messages(1, timeout=10)
        await relay.stop()
    assert (accepted, sorted(_by_message_id(exchange.messages))) == (
        250,
        ["1@reliability.test"],
    )


# --- secrets -----------------------------------------------------------------------


def _secret_forms() -> dict[str, str]:
    forms = {}
    for name, secret in (("password", PASSWORD), ("inbound", INBOUND_PASSWORD)):
        forms[name] = secret
        forms[f"{name} base64"] = base64.b64encode(secret.encode()).decode()
    for user, secret in ((MAILBOX, PASSWORD), ("printer", INBOUND_PASSWORD)):
        plain = base64.b64encode(f"\0{user}\0{secret}".encode()).decode()
        forms[f"PLAIN for {user}"] = plain
    return forms


def _everything_written(directory: Path, *, skip: set[Path]) -> dict[str, str]:
    """Every file under `directory` as text, SQLite databases dumped row by row."""
    texts: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path in skip:
            continue
        raw = path.read_bytes()
        texts[str(path)] = raw.decode("latin-1")
        if raw.startswith(b"SQLite format 3"):
            connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                texts[f"{path} (rows)"] = "\n".join(connection.iterdump())
            finally:
                connection.close()
    return texts


def _auth_dialogue(port: int, lines: list[bytes]) -> list[bytes]:
    replies: list[bytes] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("legacy.local")
        for line in lines:
            client.send(line)
            replies.append(b"%d %s" % client.getreply())
    return replies


@pytest.mark.timeout(120)
async def test_reliability_marker_secrets_appear_in_no_output(
    exchange: SandboxExchange, pki: SandboxPKI, tmp_path: Path
) -> None:
    credentials = tmp_path / "inbound-users"
    credentials.write_text(f"printer:{INBOUND_PASSWORD}\n")
    credentials.chmod(0o600)
    config_path, port = write_daemon_files(
        tmp_path / "relay",
        pki=pki,
        exchange_port=exchange.port,
        overrides={
            "listen": {
                "auth_credentials_file": str(credentials),
                "auth_required": True,
            }
        },
    )
    # Debug: the most the daemon ever writes about a session.
    daemon = DaemonProcess(
        config_path, port, tmp_path / "relay" / "daemon-output.txt", log_level="debug"
    )
    await daemon.start()
    try:
        await _run_secret_scenario(exchange, port)
    finally:
        await daemon.kill(signal.SIGTERM)
        daemon.ensure_stopped()

    settings_file = tmp_path / "relay" / "mail-settings.json"
    texts = _everything_written(tmp_path / "relay", skip={settings_file})
    leaks = sorted(
        f"{form_name} in {where}"
        for where, text in texts.items()
        for form_name, form in _secret_forms().items()
        if form in text
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / "relay" / "logs" / "epp_mail.log")
        .read_text()
        .splitlines()
    ]
    assert (leaks, len(rows) >= 1) == ([], True)


async def _run_secret_scenario(exchange: SandboxExchange, port: int) -> None:
    """Inbound AUTH done right and wrong, then an upstream AUTH refusal."""
    plain = base64.b64encode(f"\0printer\0{INBOUND_PASSWORD}".encode())
    login_user = base64.b64encode(b"printer")
    login_password = base64.b64encode(INBOUND_PASSWORD.encode())
    # The password typed where the user name goes, and a password sent raw
    # instead of in base64: both are common client mistakes.
    swapped_user = base64.b64encode(INBOUND_PASSWORD.encode())
    await asyncio.to_thread(_auth_dialogue, port, [b"AUTH PLAIN " + plain + b"\r\n"])
    await asyncio.to_thread(
        _auth_dialogue,
        port,
        [b"AUTH LOGIN\r\n", login_user + b"\r\n", login_password + b"\r\n"],
    )
    await asyncio.to_thread(
        _auth_dialogue,
        port,
        [b"AUTH LOGIN " + swapped_user + b"\r\n", login_password + b"\r\n"],
    )
    await asyncio.to_thread(
        _auth_dialogue, port, [b"AUTH PLAIN\r\n", INBOUND_PASSWORD.encode() + b"\r\n"]
    )

    def send_authenticated(body: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.login("printer", INBOUND_PASSWORD)
            client.sendmail(MAILBOX, ["ops@contoso.test"], body)

    await asyncio.to_thread(send_authenticated, _numbered(1))
    await exchange.wait_for_messages(1, timeout=15)
    exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    await asyncio.to_thread(send_authenticated, _numbered(2))
    await wait_for(lambda: exchange.auth_failures >= 1, timeout=15)
    await asyncio.sleep(0.5)
