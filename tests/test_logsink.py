"""Tests for relay.logsink: the error record, its policies, and secret redaction."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import sqlite3
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import example, given
from hypothesis import strategies as st

from relay.config import MailSettings
from relay.errors import SmtpReplyError, Stage, UpstreamDnsError
from relay.logsink import (
    REDACTED,
    REDACTOR,
    SCHEMA_SQL,
    LogSink,
    SecretRedactor,
    configure_logging,
)

PASSWORD = "Tr0ub4dor&3-marker"
CLIENT_SECRET = "cs~Q8Q~secret-value-marker"
START = datetime(2026, 5, 9, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def auth_failure() -> SmtpReplyError:
    return SmtpReplyError(535, "5.7.3 Authentication unsuccessful", stage=Stage.AUTH)


def basic_settings() -> MailSettings:
    return MailSettings(
        auth_type="basic",
        hostname="smtp.example.invalid",
        port=587,
        username="relay@example.invalid",
        password=PASSWORD,
        encryption="starttls",
    )


def oauth_settings() -> MailSettings:
    return MailSettings(
        auth_type="oauth",
        hostname="smtp.office365.com",
        username="relay@example.invalid",
        tenant_id="11111111-2222-3333-4444-555555555555",
        client_id="66666666-7777-8888-9999-000000000000",
        client_secret=CLIENT_SECRET,
        redirect_uri="https://appliance.example.invalid/oauth/callback",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def redactor() -> SecretRedactor:
    return SecretRedactor()


@pytest.fixture
def sink(
    tmp_path: Path, clock: FakeClock, redactor: SecretRedactor
) -> Iterator[LogSink]:
    with LogSink(
        log_file=tmp_path / "logs" / "epp_mail.log",
        database=tmp_path / "logs" / "epp_mail.db",
        dedupe_window=3600,
        retention_days=90,
        max_rows=100,
        syslog=False,
        redactor=redactor,
        clock=clock,
    ) as opened:
        yield opened


def table_rows(database: Path) -> list[dict[str, Any]]:
    connection = sqlite3.connect(database)
    connection.row_factory = sqlite3.Row
    try:
        return [
            dict(row) for row in connection.execute("SELECT * FROM mail_server_logs")
        ]
    finally:
        connection.close()


def log_lines(log_file: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_file.read_text().splitlines()]


# -- the error row and the log line --------------------------------------------------


def test_logsink_schema_matches_contract(sink: LogSink, tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "logs" / "epp_mail.db")
    columns = [
        (name, kind, bool(not_null), default, bool(primary_key))
        for _, name, kind, not_null, default, primary_key in connection.execute(
            "PRAGMA table_info(mail_server_logs)"
        )
    ]
    connection.close()

    assert columns == [
        ("id", "INTEGER", False, None, True),
        ("auth_type", "TEXT", True, None, False),
        ("status", "TEXT", True, None, False),
        ("log_message", "TEXT", True, None, False),
        ("registered_at", "TEXT", True, None, False),
        ("settings_snapshot", "TEXT", True, None, False),
        ("category", "TEXT", False, None, False),
        ("code", "TEXT", False, None, False),
        ("queue_id", "TEXT", False, None, False),
        ("recipient", "TEXT", False, None, False),
        ("repeat_count", "INTEGER", True, "1", False),
        ("last_seen_at", "TEXT", True, None, False),
    ]


def test_logsink_schema_indexes_registered_at_and_category(
    sink: LogSink, tmp_path: Path
) -> None:
    connection = sqlite3.connect(tmp_path / "logs" / "epp_mail.db")
    indexed = {
        connection.execute(f"PRAGMA index_info({name})").fetchone()[2]
        for (name,) in connection.execute(
            "SELECT name FROM sqlite_master"
            " WHERE type = 'index' AND tbl_name = 'mail_server_logs'"
            " AND sql IS NOT NULL"
        )
    }
    connection.close()

    assert indexed == {"registered_at", "category"}


def test_logsink_schema_constant_is_what_the_database_holds(
    sink: LogSink, tmp_path: Path
) -> None:
    connection = sqlite3.connect(tmp_path / "logs" / "epp_mail.db")
    (table_sql,) = connection.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'mail_server_logs'"
    ).fetchone()
    connection.close()

    assert table_sql.replace("IF NOT EXISTS ", "") in SCHEMA_SQL.replace(
        "IF NOT EXISTS ", ""
    )


def test_logsink_database_uses_wal(sink: LogSink, tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "logs" / "epp_mail.db")
    (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
    connection.close()

    assert mode == "wal"


def test_logsink_error_row_has_all_columns(sink: LogSink, tmp_path: Path) -> None:
    sink.record_error(
        auth_failure(),
        settings=basic_settings(),
        queue_id="q-0001",
        recipient="someone@example.invalid",
    )

    (row,) = table_rows(tmp_path / "logs" / "epp_mail.db")
    assert row == {
        "id": 1,
        "auth_type": "basic",
        "status": "error",
        "log_message": "535 5.7.3 Authentication unsuccessful",
        "registered_at": "2026-05-09T12:00:00.000Z",
        "settings_snapshot": json.dumps(basic_settings().snapshot(), sort_keys=True),
        "category": "smtp",
        "code": "535 5.7.3",
        "queue_id": "q-0001",
        "recipient": "someone@example.invalid",
        "repeat_count": 1,
        "last_seen_at": "2026-05-09T12:00:00.000Z",
    }


def test_logsink_error_row_snapshot_has_no_password(
    sink: LogSink, tmp_path: Path
) -> None:
    sink.record_error(auth_failure(), settings=basic_settings())

    (row,) = table_rows(tmp_path / "logs" / "epp_mail.db")
    snapshot = json.loads(row["settings_snapshot"])
    assert "password" not in snapshot and PASSWORD not in row["settings_snapshot"]


def test_logsink_oauth_row_snapshot_has_tenant_but_no_client_secret(
    sink: LogSink, tmp_path: Path
) -> None:
    sink.record_error(auth_failure(), settings=oauth_settings())

    (row,) = table_rows(tmp_path / "logs" / "epp_mail.db")
    snapshot = json.loads(row["settings_snapshot"])
    assert (snapshot["tenant_id"], "client_secret" in snapshot) == (
        "11111111-2222-3333-4444-555555555555",
        False,
    )


def test_logsink_log_line_matches_row(sink: LogSink, tmp_path: Path) -> None:
    sink.record_error(
        UpstreamDnsError("smtp.example.invalid"),
        settings=basic_settings(),
        queue_id="q-0002",
    )

    (line,) = log_lines(tmp_path / "logs" / "epp_mail.log")
    (row,) = sink.list_rows()
    assert line == {"event": "mail_error", **row}


def test_logsink_log_line_carries_category_and_message(
    sink: LogSink, tmp_path: Path
) -> None:
    sink.record_error(
        UpstreamDnsError("smtp.example.invalid"), settings=basic_settings()
    )

    (line,) = log_lines(tmp_path / "logs" / "epp_mail.log")
    assert (line["category"], line["log_message"]) == (
        "dns",
        "Could not resolve hostname smtp.example.invalid",
    )


def test_logsink_creates_log_directory_with_mode_0750(
    sink: LogSink, tmp_path: Path
) -> None:
    mode = stat.S_IMODE((tmp_path / "logs").stat().st_mode)

    assert mode == 0o750 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_logsink_record_event_writes_success_row(sink: LogSink) -> None:
    sink.record_event(
        auth_type="oauth",
        status="success",
        message="Your email has been verified. Authorization complete!",
        settings=oauth_settings(),
    )

    (row,) = sink.list_rows()
    assert (row["status"], row["log_message"], row["category"]) == (
        "success",
        "Your email has been verified. Authorization complete!",
        None,
    )


def test_logsink_record_event_refuses_unknown_status(sink: LogSink) -> None:
    with pytest.raises(ValueError, match="status"):
        sink.record_event(
            auth_type="basic",
            status="warning",
            message="Changes have been saved!",
            settings=basic_settings(),
        )


def test_logsink_list_rows_newest_first(sink: LogSink, clock: FakeClock) -> None:
    sink.record_error(
        UpstreamDnsError("first.example.invalid"), settings=basic_settings()
    )
    clock.advance(10)
    sink.record_error(
        UpstreamDnsError("second.example.invalid"), settings=basic_settings()
    )

    messages = [row["log_message"] for row in sink.list_rows()]
    assert messages == [
        "Could not resolve hostname second.example.invalid",
        "Could not resolve hostname first.example.invalid",
    ]


def test_logsink_list_rows_filters_by_category_and_since(
    sink: LogSink, clock: FakeClock
) -> None:
    sink.record_error(
        UpstreamDnsError("old.example.invalid"), settings=basic_settings()
    )
    clock.advance(60)
    sink.record_error(auth_failure(), settings=basic_settings())
    sink.record_error(
        UpstreamDnsError("new.example.invalid"), settings=basic_settings()
    )

    rows = sink.list_rows(category="dns", since=START + timedelta(seconds=30))
    assert [row["log_message"] for row in rows] == [
        "Could not resolve hostname new.example.invalid"
    ]


def test_logsink_is_safe_from_worker_threads(sink: LogSink) -> None:
    def record(number: int) -> None:
        sink.record_error(
            UpstreamDnsError(f"host{number}.example.invalid"), settings=basic_settings()
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(record, range(40)))

    assert len(sink.list_rows(limit=100)) == 40


# -- de-duplication --------------------------------------------------------------


def test_logsink_repeat_within_window_increments_repeat_count(
    sink: LogSink, clock: FakeClock
) -> None:
    sink.record_error(auth_failure(), settings=basic_settings())
    clock.advance(600)
    written = sink.record_error(auth_failure(), settings=basic_settings())

    (row,) = sink.list_rows()
    assert (written, row["repeat_count"], row["last_seen_at"]) == (
        False,
        2,
        "2026-05-09T12:10:00.000Z",
    )


def test_logsink_repeat_within_window_writes_no_second_line(
    sink: LogSink, clock: FakeClock, tmp_path: Path
) -> None:
    sink.record_error(auth_failure(), settings=basic_settings())
    clock.advance(600)
    sink.record_error(auth_failure(), settings=basic_settings())

    assert len(log_lines(tmp_path / "logs" / "epp_mail.log")) == 1


def test_logsink_repeat_after_window_adds_row(sink: LogSink, clock: FakeClock) -> None:
    sink.record_error(auth_failure(), settings=basic_settings())
    clock.advance(1800)
    sink.record_error(auth_failure(), settings=basic_settings())
    # The window counts from the row's first sighting, not from the last repeat.
    clock.advance(1800)
    written = sink.record_error(auth_failure(), settings=basic_settings())

    assert (written, [row["repeat_count"] for row in sink.list_rows()]) == (
        True,
        [1, 2],
    )


def test_logsink_same_error_with_other_auth_type_is_not_a_repeat(
    sink: LogSink,
) -> None:
    sink.record_error(auth_failure(), settings=basic_settings())

    assert sink.record_error(auth_failure(), settings=oauth_settings()) is True


def test_logsink_repeat_is_recognised_after_restart(
    tmp_path: Path, clock: FakeClock
) -> None:
    options: dict[str, Any] = {
        "log_file": tmp_path / "epp_mail.log",
        "database": tmp_path / "epp_mail.db",
        "dedupe_window": 3600,
        "retention_days": 90,
        "max_rows": 100,
        "syslog": False,
        "redactor": SecretRedactor(),
        "clock": clock,
    }
    with LogSink(**options) as first:
        first.record_error(auth_failure(), settings=basic_settings())
    clock.advance(60)

    with LogSink(**options) as second:
        assert second.record_error(auth_failure(), settings=basic_settings()) is False


# -- retention --------------------------------------------------------------------


def test_logsink_max_rows_keeps_newest(tmp_path: Path, clock: FakeClock) -> None:
    with LogSink(
        log_file=tmp_path / "epp_mail.log",
        database=tmp_path / "epp_mail.db",
        dedupe_window=3600,
        retention_days=90,
        max_rows=3,
        syslog=False,
        redactor=SecretRedactor(),
        clock=clock,
    ) as sink:
        for number in range(5):
            clock.advance(1)
            sink.record_error(
                UpstreamDnsError(f"host{number}.example.invalid"),
                settings=basic_settings(),
            )

        messages = [row["log_message"] for row in sink.list_rows()]
    assert messages == [
        "Could not resolve hostname host4.example.invalid",
        "Could not resolve hostname host3.example.invalid",
        "Could not resolve hostname host2.example.invalid",
    ]


def test_logsink_retention_deletes_old_rows(sink: LogSink, clock: FakeClock) -> None:
    sink.record_error(
        UpstreamDnsError("old.example.invalid"), settings=basic_settings()
    )
    clock.advance(91 * 24 * 3600)
    sink.record_error(
        UpstreamDnsError("new.example.invalid"), settings=basic_settings()
    )

    assert [row["log_message"] for row in sink.list_rows()] == [
        "Could not resolve hostname new.example.invalid"
    ]


def test_logsink_retention_keeps_rows_inside_the_period(
    sink: LogSink, clock: FakeClock
) -> None:
    sink.record_error(
        UpstreamDnsError("old.example.invalid"), settings=basic_settings()
    )
    clock.advance(89 * 24 * 3600)
    sink.record_error(
        UpstreamDnsError("new.example.invalid"), settings=basic_settings()
    )

    assert len(sink.list_rows()) == 2


def test_logsink_retention_applies_when_opened(
    tmp_path: Path, clock: FakeClock
) -> None:
    options: dict[str, Any] = {
        "log_file": tmp_path / "epp_mail.log",
        "database": tmp_path / "epp_mail.db",
        "dedupe_window": 3600,
        "retention_days": 1,
        "max_rows": 100,
        "syslog": False,
        "redactor": SecretRedactor(),
        "clock": clock,
    }
    with LogSink(**options) as first:
        first.record_error(auth_failure(), settings=basic_settings())
    clock.advance(2 * 24 * 3600)

    with LogSink(**options) as second:
        assert second.list_rows() == []


# -- rotation ---------------------------------------------------------------------


def test_logsink_writes_new_file_after_rename(sink: LogSink, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "epp_mail.log"
    sink.record_error(
        UpstreamDnsError("first.example.invalid"), settings=basic_settings()
    )
    log_file.rename(tmp_path / "logs" / "epp_mail.log.1")

    sink.record_error(
        UpstreamDnsError("second.example.invalid"), settings=basic_settings()
    )

    assert [line["log_message"] for line in log_lines(log_file)] == [
        "Could not resolve hostname second.example.invalid"
    ]


def test_logsink_rotated_file_gets_no_new_lines(sink: LogSink, tmp_path: Path) -> None:
    rotated = tmp_path / "logs" / "epp_mail.log.1"
    sink.record_error(
        UpstreamDnsError("first.example.invalid"), settings=basic_settings()
    )
    (tmp_path / "logs" / "epp_mail.log").rename(rotated)

    sink.record_error(
        UpstreamDnsError("second.example.invalid"), settings=basic_settings()
    )

    assert [line["log_message"] for line in log_lines(rotated)] == [
        "Could not resolve hostname first.example.invalid"
    ]


def test_logsink_writes_new_file_after_removal(sink: LogSink, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "epp_mail.log"
    sink.record_error(
        UpstreamDnsError("first.example.invalid"), settings=basic_settings()
    )
    log_file.unlink()

    sink.record_error(
        UpstreamDnsError("second.example.invalid"), settings=basic_settings()
    )

    assert len(log_lines(log_file)) == 1


def test_logsink_reopen_creates_file_at_path(sink: LogSink, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "epp_mail.log"
    sink.record_error(
        UpstreamDnsError("first.example.invalid"), settings=basic_settings()
    )
    log_file.rename(tmp_path / "logs" / "epp_mail.log.1")

    sink.reopen()

    assert log_file.exists()


# -- secrets ------------------------------------------------------------------------


_LOGIN_PAYLOAD = base64.b64encode(PASSWORD.encode()).decode()
_PLAIN_PAYLOAD = base64.b64encode(
    f"\0relay@example.invalid\0{PASSWORD}".encode()
).decode()


@pytest.mark.parametrize(
    ("reply_text", "secret_bearing"),
    [
        pytest.param(f"5.7.3 bad password {PASSWORD} refused", PASSWORD, id="plain"),
        pytest.param(f"5.7.3 got {_LOGIN_PAYLOAD}", _LOGIN_PAYLOAD, id="auth-login"),
        pytest.param(f"5.7.3 got {_PLAIN_PAYLOAD}", _PLAIN_PAYLOAD, id="auth-plain"),
    ],
)
def test_logsink_secret_in_error_never_reaches_file_or_table(
    sink: LogSink, tmp_path: Path, reply_text: str, secret_bearing: str
) -> None:
    sink.record_error(
        SmtpReplyError(535, reply_text, stage=Stage.AUTH),
        settings=basic_settings(),
        queue_id=f"queue-{PASSWORD}",
    )

    written = (tmp_path / "logs" / "epp_mail.log").read_text() + json.dumps(
        table_rows(tmp_path / "logs" / "epp_mail.db")
    )
    assert [form for form in (PASSWORD, secret_bearing) if form in written] == []


def test_logsink_registered_secret_is_scrubbed_from_event_rows(
    sink: LogSink, redactor: SecretRedactor
) -> None:
    redactor.add("refresh-token-0123456789")

    sink.record_event(
        auth_type="oauth",
        status="info",
        message="refreshed with refresh-token-0123456789",
        settings=oauth_settings(),
    )

    (row,) = sink.list_rows()
    assert row["log_message"] == f"refreshed with {REDACTED}"


def test_logsink_redactor_ignores_short_values() -> None:
    redactor = SecretRedactor()
    redactor.add("")
    redactor.add("abc")

    assert redactor.scrub("abc and more") == "abc and more"


def test_logsink_redactor_scrubs_xoauth2_payload() -> None:
    token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.payload.signature"
    redactor = SecretRedactor()
    redactor.add(token)
    payload = base64.b64encode(
        f"user=relay@example.invalid\x01auth=Bearer {token}\x01\x01".encode()
    ).decode()

    scrubbed = redactor.scrub(f"AUTH XOAUTH2 {payload}")

    recovered = base64.b64decode(
        scrubbed.removeprefix("AUTH XOAUTH2 ").replace(REDACTED, "") + "==="
    )
    assert b"payload.signature" not in recovered


@given(
    secret=st.text(min_size=4, max_size=40),
    before=st.text(max_size=40),
    after=st.text(max_size=40),
)
# Secrets that overlap the marker: replacing one can rebuild it at the seam.
@example(secret="ted]a", before="", after="a")
@example(secret="d][r", before="d][r", after="")
@example(secret="redacted", before="", after="")
def test_logsink_scrub_never_returns_the_secret(
    secret: str, before: str, after: str
) -> None:
    redactor = SecretRedactor()
    redactor.add(secret)

    assert secret not in redactor.scrub(before + secret + after)


@given(
    secrets=st.lists(st.text(min_size=4, max_size=12), min_size=1, max_size=3),
    pieces=st.lists(st.text(max_size=12), max_size=4),
)
def test_logsink_scrub_never_returns_any_of_several_secrets(
    secrets: list[str], pieces: list[str]
) -> None:
    redactor = SecretRedactor()
    for secret in secrets:
        redactor.add(secret)
    text = "".join(
        piece + secrets[index % len(secrets)] for index, piece in enumerate(pieces)
    )

    scrubbed = redactor.scrub(text)

    assert [secret for secret in secrets if secret in scrubbed] == []


@given(
    secret=st.text(min_size=4, max_size=40),
    prefix=st.binary(max_size=5),
    suffix=st.binary(max_size=5),
)
def test_logsink_scrub_removes_base64_characters_made_of_the_secret(
    secret: str, prefix: bytes, suffix: bytes
) -> None:
    redactor = SecretRedactor()
    redactor.add(secret)
    raw = secret.encode()
    payload = base64.b64encode(prefix + raw + suffix).decode()
    # Base64 character i carries bits 6i to 6i+6: these carry only the secret's bits.
    first = -(-len(prefix) * 8 // 6)
    end = (len(prefix) + len(raw)) * 8 // 6

    assert payload[first:end] not in redactor.scrub(payload)


# -- structlog --------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo configure_logging: structlog defaults, the root logger as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def log_stream(restore_logging: None) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level="debug", stream=stream, json_output=True)
    return stream


def logged_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_logsink_processor_masks_password_keys(log_stream: io.StringIO) -> None:
    structlog.get_logger("tests").info(
        "upstream_login", username="relay@example.invalid", password="pw-visible-1"
    )

    (event,) = logged_events(log_stream)
    assert event["password"] == REDACTED


@pytest.mark.parametrize(
    "key",
    [
        "client_secret",
        "access_token",
        "refresh_token",
        "Authorization",
        "auth_payload",
        "code_verifier",
        "smtp_password",
    ],
)
def test_logsink_processor_masks_credential_named_keys(
    log_stream: io.StringIO, key: str
) -> None:
    structlog.get_logger("tests").info("token_request", **{key: "value-visible-2"})

    assert "value-visible-2" not in log_stream.getvalue()


def test_logsink_processor_keeps_ordinary_keys(log_stream: io.StringIO) -> None:
    structlog.get_logger("tests").info(
        "token_refreshed", token_endpoint="https://login.example.invalid/token"
    )

    (event,) = logged_events(log_stream)
    assert event["token_endpoint"] == "https://login.example.invalid/token"


def test_logsink_processor_scrubs_registered_secrets(log_stream: io.StringIO) -> None:
    REDACTOR.add("registered-secret-for-structlog")

    structlog.get_logger("tests").warning(
        "upstream_reply",
        reply="535 rejected registered-secret-for-structlog",
        details={"note": ["registered-secret-for-structlog"]},
    )

    assert "registered-secret-for-structlog" not in log_stream.getvalue()


def test_logsink_processor_scrubs_secrets_in_exceptions(
    log_stream: io.StringIO,
) -> None:
    REDACTOR.add("exception-secret-for-structlog")

    try:
        raise RuntimeError("failed with exception-secret-for-structlog")
    except RuntimeError:
        structlog.get_logger("tests").exception("unexpected_failure")

    assert "exception-secret-for-structlog" not in log_stream.getvalue()


def test_logsink_standard_logging_is_redacted(log_stream: io.StringIO) -> None:
    REDACTOR.add("stdlib-secret-for-logging")

    logging.getLogger("mail.log").warning("AUTH line %s", "stdlib-secret-for-logging")

    assert "stdlib-secret-for-logging" not in log_stream.getvalue()


def test_logsink_json_events_have_utc_timestamp(log_stream: io.StringIO) -> None:
    structlog.get_logger("tests").info("message_relayed", queue_id="q-1")

    (event,) = logged_events(log_stream)
    assert (event["event"], event["level"], event["timestamp"][-1]) == (
        "message_relayed",
        "info",
        "Z",
    )


class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_logsink_console_output_on_a_terminal(restore_logging: None) -> None:
    stream = TerminalStream()
    configure_logging(level="info", stream=stream)

    structlog.get_logger("tests").info("queue_held", reason="auth")

    with pytest.raises(json.JSONDecodeError):
        json.loads(stream.getvalue())


def test_logsink_level_filters_debug(log_stream: io.StringIO) -> None:
    configure_logging(level="info", stream=log_stream, json_output=True)

    structlog.get_logger("tests").debug("noisy_detail")

    assert log_stream.getvalue() == ""


# -- syslog -----------------------------------------------------------------------


@pytest.fixture
def syslog_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[socket.socket]:
    # AF_UNIX paths are limited to about 100 bytes, hence a short directory.
    address = tmp_path_factory.mktemp("syslog") / "log.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(address))
    server.settimeout(0.5)
    yield server
    server.close()


def syslog_sink(tmp_path: Path, server: socket.socket) -> LogSink:
    return LogSink(
        log_file=tmp_path / "epp_mail.log",
        database=tmp_path / "epp_mail.db",
        dedupe_window=3600,
        retention_days=90,
        max_rows=100,
        syslog=True,
        redactor=SecretRedactor(),
        syslog_address=Path(server.getsockname()),
    )


def test_logsink_syslog_message_uses_mail_facility(
    tmp_path: Path, syslog_server: socket.socket
) -> None:
    with syslog_sink(tmp_path, syslog_server) as sink:
        sink.record_error(auth_failure(), settings=basic_settings())

    packet = syslog_server.recv(2048).decode()
    # Facility mail (2) times 8 plus severity err (3).
    assert packet.startswith("<19>epp-mail-relay[") and "535 5.7.3" in packet


def test_logsink_syslog_skips_oauth_failures(
    tmp_path: Path, syslog_server: socket.socket
) -> None:
    with syslog_sink(tmp_path, syslog_server) as sink:
        sink.record_error(auth_failure(), settings=oauth_settings())

    with pytest.raises(TimeoutError):
        syslog_server.recv(2048)


def test_logsink_syslog_without_socket_still_records(tmp_path: Path) -> None:
    with LogSink(
        log_file=tmp_path / "epp_mail.log",
        database=tmp_path / "epp_mail.db",
        dedupe_window=3600,
        retention_days=90,
        max_rows=100,
        syslog=True,
        redactor=SecretRedactor(),
        syslog_address=tmp_path / "no-such-socket",
    ) as sink:
        assert sink.record_error(auth_failure(), settings=basic_settings()) is True
