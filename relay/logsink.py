"""Where the relay's logs go: structlog setup, secret redaction, the error record.

Two outputs, one rule:

- the process log: structlog on standard error (captured by the journal), short
  event names with key/value pairs, JSON off a terminal, a readable line on one;
- the error record for the administrator: one JSON line per failure in
  ``epp_mail.log``, one row in the ``mail_server_logs`` table that the appliance's
  Mail Server Logs tab reads, and a copy to syslog with facility mail;
- the rule: no secret reaches either. Every string passes through a
  `SecretRedactor` that knows the configured password and client secret, and the
  structlog chain masks any value whose key names a credential.

This module records what it is given; deciding what is an error belongs to
`relay.errors` and to the callers.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
import socket
import sqlite3
import stat
import sys
import syslog
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from relay.config import MailSettings
from relay.errors import ConfigError, RelayError

__all__ = [
    "REDACTED",
    "REDACTOR",
    "SCHEMA_SQL",
    "LogSink",
    "SecretRedactor",
    "configure_logging",
    "redact_secrets",
]

REDACTED: Final = "[redacted]"

# Shorter values would mask ordinary words and digits all over the logs; a secret
# that short is not protected by scrubbing, only by the key-name masking below.
MINIMUM_SECRET_LENGTH: Final = 4

# Key names (after lower-casing and turning "-" into "_") whose values are never
# shown: the name itself or a name ending in "_<word>", so "smtp_password",
# "client_secret" and "refresh_token" match while "token_endpoint" does not.
_SENSITIVE_KEY: Final = re.compile(
    r"(?:^|_)(?:password|passwd|pwd|secret|token|authorization|auth_payload"
    r"|code_verifier|cookie|api_key)$"
)

SCHEMA_SQL: Final = """\
CREATE TABLE IF NOT EXISTS mail_server_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    auth_type TEXT NOT NULL CHECK (auth_type IN ('basic', 'oauth')),
    status TEXT NOT NULL CHECK (status IN ('error', 'success', 'info')),
    log_message TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    settings_snapshot TEXT NOT NULL,
    category TEXT,
    code TEXT,
    queue_id TEXT,
    recipient TEXT,
    repeat_count INTEGER NOT NULL DEFAULT 1,
    last_seen_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS mail_server_logs_registered_at
    ON mail_server_logs (registered_at);
CREATE INDEX IF NOT EXISTS mail_server_logs_category
    ON mail_server_logs (category);
"""

_COLUMNS: Final = (
    "id",
    "auth_type",
    "status",
    "log_message",
    "registered_at",
    "settings_snapshot",
    "category",
    "code",
    "queue_id",
    "recipient",
    "repeat_count",
    "last_seen_at",
)
_AUTH_TYPES: Final = frozenset({"basic", "oauth"})
_STATUSES: Final = frozenset({"error", "success", "info"})

DEFAULT_SYSLOG_ADDRESS: Final = Path("/dev/log")
_SYSLOG_IDENT: Final = "epp-mail-relay"
_SYSLOG_PRIORITY: Final = syslog.LOG_MAIL | syslog.LOG_ERR
# RFC 3164 section 4.1: a syslog packet is at most 1024 bytes.
_SYSLOG_MAX_BYTES: Final = 1024

_logger = structlog.get_logger(__name__)


class SecretRedactor:
    """Replaces every registered secret, and its encoded forms, with "[redacted]".

    Besides the secret itself it scrubs the forms a secret takes on the wire: its
    base64 (an SMTP AUTH LOGIN line), the base64 characters that depend only on
    the secret wherever it sits inside a longer base64 payload (AUTH PLAIN's
    "\\0user\\0secret", XOAUTH2's "auth=Bearer <token>"), its URL-encoded form
    (a token request body) and its JSON-escaped form.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        # Replaced as a whole on each add, so scrub() reads it without the lock.
        self._fragments: tuple[str, ...] = ()

    def add(self, secret: str) -> None:
        """Register a secret; empty or very short values are ignored."""
        if len(secret) < MINIMUM_SECRET_LENGTH:
            return

        with self._lock:
            if secret in self._secrets:
                return
            self._secrets.add(secret)
            fragments = set(self._fragments) | _encoded_forms(secret)
            # Longest first, so that a secret is matched whole before any part of it.
            self._fragments = tuple(sorted(fragments, key=lambda f: (-len(f), f)))

    def scrub(self, text: str) -> str:
        """Return `text` with every occurrence of a registered secret replaced."""
        fragments = self._fragments
        spans = _find_spans(text, fragments)
        if not spans:
            return text

        scrubbed = _replace_spans(text, spans)

        # A secret that overlaps the marker itself (one ending in "ted]", say) can
        # reappear at a seam; then the whole text is withheld rather than risk it.
        if _find_spans(scrubbed, fragments):
            return "***" if _find_spans(REDACTED, fragments) else REDACTED
        return scrubbed

    def scrub_value(self, value: Any) -> Any:
        """Scrub strings inside `value`, masking mapping keys that name credentials.

        Numbers, booleans and None pass through; other objects become their
        scrubbed `str()`, because their repr could carry a secret.
        """
        if isinstance(value, str):
            return self.scrub(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {
                self.scrub(key) if isinstance(key, str) else key: (
                    REDACTED if _is_sensitive_key(key) else self.scrub_value(item)
                )
                for key, item in value.items()
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [self.scrub_value(item) for item in value]
        return self.scrub(str(value))

    def redact_event(self, event_dict: EventDict) -> EventDict:
        """Mask credential-named keys and scrub registered secrets in an event."""
        return {
            key: REDACTED if _is_sensitive_key(key) else self.scrub_value(value)
            for key, value in event_dict.items()
        }


REDACTOR: Final = SecretRedactor()


def redact_secrets(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Structlog processor: redact the event with the module's `REDACTOR`."""
    return REDACTOR.redact_event(event_dict)


def _is_sensitive_key(key: object) -> bool:
    return _is_sensitive_name(str(key))


@functools.lru_cache(maxsize=4096)
def _is_sensitive_name(name: str) -> bool:
    # Events use a few dozen key names over and over: each is judged once.
    return bool(_SENSITIVE_KEY.search(name.lower().replace("-", "_")))


def _encoded_forms(secret: str) -> set[str]:
    forms = {secret}
    raw = secret.encode("utf-8", "surrogatepass")

    # Inside a longer base64 payload the secret starts at one of three byte
    # alignments; for each, keep only the characters made of the secret's bits.
    whole = base64.b64encode(raw).decode("ascii")
    base64_forms = {whole}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode("ascii")
        first = -(-offset * 8 // 6)
        end = (offset + len(raw)) * 8 // 6
        base64_forms.add(encoded[first:end])
    base64_forms |= {form.translate(_URLSAFE_BASE64) for form in base64_forms}
    forms |= base64_forms

    forms.add(urllib.parse.quote(secret, safe=""))
    forms.add(urllib.parse.quote_plus(secret, safe=""))
    forms.add(json.dumps(secret)[1:-1])
    forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    return {form for form in forms if len(form) >= MINIMUM_SECRET_LENGTH}


_URLSAFE_BASE64: Final = str.maketrans("+/", "-_")


def _find_spans(text: str, fragments: tuple[str, ...]) -> list[tuple[int, int]]:
    """Merged (start, end) ranges of every occurrence, overlapping ones included."""
    spans: list[tuple[int, int]] = []
    for fragment in fragments:
        start = text.find(fragment)
        while start != -1:
            spans.append((start, start + len(fragment)))
            start = text.find(fragment, start + 1)
    if not spans:
        return spans

    spans.sort()
    merged = [spans[0]]
    for start, end in spans[1:]:
        last_start, last_end = merged[-1]
        # Touching ranges merge too: two markers side by side would form a seam.
        if start <= last_end:
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    return merged


def _replace_spans(text: str, spans: list[tuple[int, int]]) -> str:
    pieces: list[str] = []
    position = 0
    for start, end in spans:
        pieces.append(text[position:start])
        pieces.append(REDACTED)
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


class _RelayLogHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` installs on the root logger (found again
    by its type when logging is configured a second time)."""


def configure_logging(
    *,
    level: str = "info",
    stream: TextIO | None = None,
    json_output: bool | None = None,
    once: bool = False,
) -> None:
    """Set up structlog, and route the standard `logging` module through it.

    Events go to `stream` (standard error by default) as JSON lines when it is not a
    terminal or `json_output` is true, and as a readable console line otherwise.
    Timestamps are ISO 8601 in UTC. Libraries that log with `logging` (aiosmtpd,
    asyncio, msal) pass through the same redaction, because their debug output can
    carry raw SMTP lines.

    `once` is for a process that configures logging a single time, as the daemon
    does: each logger then builds its processor chain at its first event instead
    of at every event. A later call would not reach loggers already used.
    """
    level_number = logging.getLevelNamesMapping().get(level.upper())
    if level_number is None:
        raise ConfigError(
            "level", f"unknown log level {level!r}; use debug, info, warning or error"
        )
    output = stream if stream is not None else sys.stderr
    if json_output is None:
        json_output = not _is_terminal(output)

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer()
    )
    # Exceptions are turned into text before redaction, so that a secret quoted
    # in an exception message is scrubbed like any other value.
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        logger_factory=structlog.PrintLoggerFactory(file=output),
        # Uncached unless configured once: a second call (tests) must reach
        # every logger.
        cache_logger_on_first_use=once,
    )

    handler = _RelayLogHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
                structlog.processors.format_exc_info,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _RelayLogHandler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(level_number)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _format_timestamp(moment: datetime) -> str:
    """UTC, millisecond precision, fixed width, so text order is time order."""
    if moment.tzinfo is None:
        raise ValueError("the log clock must return timezone-aware datetimes")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _utc_now() -> datetime:
    return datetime.now(UTC)


class LogSink:
    """Writes the error record: ``epp_mail.log``, ``mail_server_logs``, syslog.

    De-duplication: a failure is identified by ``error.fingerprint()`` (category,
    code, message) plus the settings' auth type. When the same failure was
    recorded as a new row less than ``dedupe_window`` seconds ago (counted from
    that row's ``registered_at``, not from its last repeat), nothing new is
    written: the row's ``repeat_count`` goes up by one and ``last_seen_at``
    moves to now; no log line and no syslog message are sent. A failure that
    lasts longer than the window therefore yields one row per window. The check
    reads the table, so it holds across restarts and across processes.

    Retention, applied on every new row and when the sink opens: rows registered
    more than ``retention_days`` ago are deleted, and only the newest ``max_rows``
    rows are kept (by id arithmetic, which is exact while ids are contiguous; if
    another program deletes rows from the middle, fewer rows are kept). Nothing is
    pruned while nothing new is recorded.

    Every string written passes through the redactor; the configured password
    and client secret are registered with it on each call.

    Calls are synchronous and short; one thread at a time may use the sink
    (callers in the event loop wrap them in ``asyncio.to_thread``).
    """

    def __init__(
        self,
        *,
        log_file: Path,
        database: Path,
        dedupe_window: float,
        retention_days: float,
        max_rows: int,
        syslog: bool = True,
        redactor: SecretRedactor | None = None,
        clock: Callable[[], datetime] | None = None,
        syslog_address: Path = DEFAULT_SYSLOG_ADDRESS,
    ) -> None:
        if dedupe_window < 0:
            raise ConfigError("logs.dedupe_window", "must not be negative")
        if retention_days <= 0:
            raise ConfigError("logs.retention_days", "must be positive")
        if max_rows < 1:
            raise ConfigError("logs.max_rows", "must be at least 1")

        self._log_file = log_file
        self._dedupe_window = timedelta(seconds=dedupe_window)
        self._retention = timedelta(days=retention_days)
        self._max_rows = max_rows
        self._syslog_enabled = syslog
        self._syslog_address = syslog_address
        self._redactor = redactor if redactor is not None else REDACTOR
        self._clock = clock if clock is not None else _utc_now
        self._lock = threading.Lock()
        self._log_descriptor: int | None = None
        self._log_identity: tuple[int, int] | None = None
        self._syslog_socket: socket.socket | None = None

        for directory in {log_file.parent, database.parent}:
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._connection = _open_database(database)
        with self._lock, self._transaction():
            self._prune(self._clock())

    # -- public API ---------------------------------------------------------------

    def record_error(
        self,
        error: RelayError,
        *,
        settings: MailSettings,
        queue_id: str | None = None,
        recipient: str | None = None,
    ) -> bool:
        """Record one failure; return True for a new row, False for a repeat.

        See the class docstring for the de-duplication and retention policy.
        """
        self._register_settings_secrets(settings)
        category, code, message = error.fingerprint()
        scrub = self._redactor.scrub

        with self._lock:
            now = self._clock()
            row: dict[str, Any] = {
                "auth_type": settings.auth_type,
                "status": "error",
                "log_message": scrub(message),
                "registered_at": _format_timestamp(now),
                "settings_snapshot": self._redactor.scrub_value(settings.snapshot()),
                "category": category,
                "code": scrub(code) if code else None,
                "queue_id": scrub(queue_id) if queue_id is not None else None,
                "recipient": scrub(recipient) if recipient is not None else None,
                "repeat_count": 1,
            }
            row["last_seen_at"] = row["registered_at"]

            try:
                with self._transaction():
                    if self._record_repeat(row, now):
                        return False
                    row["id"] = self._insert(row)
                    self._prune(now)
            except sqlite3.Error as exc:
                _logger.warning("log_table_write_failed", error=str(exc))
                row["id"] = None

            self._write_line("mail_error", row)
            if settings.auth_type == "basic":
                self._send_to_syslog(row, settings)
        return True

    def record_event(
        self,
        *,
        auth_type: str,
        status: str,
        message: str,
        settings: MailSettings,
        category: str | None = None,
        code: str | None = None,
    ) -> None:
        """Record a row the administrator should see that is not a failure.

        For example status "success" with "Your email has been verified.
        Authorization complete!". It is also written to the log file, as event
        "mail_event"; it is never de-duplicated and never sent to syslog.
        """
        if auth_type not in _AUTH_TYPES:
            raise ValueError(f"auth_type must be one of {sorted(_AUTH_TYPES)}")
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {sorted(_STATUSES)}")

        self._register_settings_secrets(settings)
        scrub = self._redactor.scrub

        with self._lock:
            now = self._clock()
            row: dict[str, Any] = {
                "auth_type": auth_type,
                "status": status,
                "log_message": scrub(message),
                "registered_at": _format_timestamp(now),
                "settings_snapshot": self._redactor.scrub_value(settings.snapshot()),
                "category": scrub(category) if category is not None else None,
                "code": scrub(code) if code is not None else None,
                "queue_id": None,
                "recipient": None,
                "repeat_count": 1,
            }
            row["last_seen_at"] = row["registered_at"]

            try:
                with self._transaction():
                    row["id"] = self._insert(row)
                    self._prune(now)
            except sqlite3.Error as exc:
                _logger.warning("log_table_write_failed", error=str(exc))
                row["id"] = None

            self._write_line("mail_event", row)

    def list_rows(
        self,
        *,
        limit: int = 50,
        offset: int = 0,
        category: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Rows newest first, the settings snapshot decoded into a dict.

        `since` and `until` bound registered_at, both ends included.
        """
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")

        conditions: list[str] = []
        parameters: list[Any] = []
        if category is not None:
            conditions.append("category = ?")
            parameters.append(category)
        if since is not None:
            conditions.append("registered_at >= ?")
            parameters.append(_format_timestamp(since))
        if until is not None:
            conditions.append("registered_at <= ?")
            parameters.append(_format_timestamp(until))
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        # Only fixed column names and placeholders are formatted in; values are bound.
        query = (
            f"SELECT {', '.join(_COLUMNS)} FROM mail_server_logs {where} "  # noqa: S608
            "ORDER BY registered_at DESC, id DESC LIMIT ? OFFSET ?"
        )

        with self._lock:
            cursor = self._connection.execute(query, [*parameters, limit, offset])
            rows = [dict(zip(_COLUMNS, values, strict=True)) for values in cursor]
        for row in rows:
            row["settings_snapshot"] = _decode_snapshot(row["settings_snapshot"])
        return rows

    def reopen(self) -> None:
        """Close and reopen the log file (SIGHUP after an outside rotation)."""
        with self._lock:
            self._close_log_file()
            try:
                self._open_log_file()
            except OSError as exc:
                # The next line tries again; a signal handler has nobody to raise to.
                _logger.warning(
                    "log_file_open_failed", path=str(self._log_file), error=str(exc)
                )

    def close(self) -> None:
        """Release the file, the database connection and the syslog socket."""
        with self._lock:
            self._close_log_file()
            if self._syslog_socket is not None:
                self._syslog_socket.close()
                self._syslog_socket = None
            self._connection.close()

    def __enter__(self) -> LogSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the table ----------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock first, so the repeat check and the insert
        # are one step even when the CLI writes to the same table.
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        self._connection.execute("COMMIT")

    def _record_repeat(self, row: dict[str, Any], now: datetime) -> bool:
        window_start = _format_timestamp(now - self._dedupe_window)
        found = self._connection.execute(
            "SELECT id FROM mail_server_logs"
            " WHERE status = 'error' AND auth_type = ? AND category IS ?"
            " AND COALESCE(code, '') = ? AND log_message = ? AND registered_at > ?"
            " ORDER BY registered_at DESC, id DESC LIMIT 1",
            (
                row["auth_type"],
                row["category"],
                row["code"] or "",
                row["log_message"],
                window_start,
            ),
        ).fetchone()
        if found is None:
            return False

        self._connection.execute(
            "UPDATE mail_server_logs"
            " SET repeat_count = repeat_count + 1, last_seen_at = ? WHERE id = ?",
            (row["last_seen_at"], found[0]),
        )
        return True

    def _insert(self, row: dict[str, Any]) -> int:
        values = {
            **row,
            "settings_snapshot": json.dumps(row["settings_snapshot"], sort_keys=True),
        }
        columns = [column for column in _COLUMNS if column != "id"]
        # Only fixed column names and placeholders are formatted in; values are bound.
        cursor = self._connection.execute(
            f"INSERT INTO mail_server_logs ({', '.join(columns)})"  # noqa: S608
            f" VALUES ({', '.join('?' for _ in columns)})",
            [values[column] for column in columns],
        )
        if cursor.lastrowid is None:
            raise sqlite3.DatabaseError("INSERT into mail_server_logs returned no id")
        return cursor.lastrowid

    def _prune(self, now: datetime) -> None:
        self._connection.execute(
            "DELETE FROM mail_server_logs WHERE registered_at < ?",
            (_format_timestamp(now - self._retention),),
        )
        # Ids only grow and only the oldest rows are deleted, so the newest
        # max_rows rows are those with id > max(id) - max_rows: no counting needed.
        self._connection.execute(
            "DELETE FROM mail_server_logs"
            " WHERE id <= (SELECT MAX(id) FROM mail_server_logs) - ?",
            (self._max_rows,),
        )

    def _register_settings_secrets(self, settings: MailSettings) -> None:
        self._redactor.add(settings.password)
        self._redactor.add(settings.client_secret)

    # -- the log file -------------------------------------------------------------

    def _write_line(self, event: str, row: dict[str, Any]) -> None:
        line = json.dumps({"event": event, **row}, ensure_ascii=False) + "\n"
        try:
            self._reopen_if_rotated()
            descriptor = self._open_log_file()
            _write_all(descriptor, line.encode("utf-8"))
        except OSError as exc:
            _logger.warning(
                "log_file_write_failed", path=str(self._log_file), error=str(exc)
            )

    def _reopen_if_rotated(self) -> None:
        # The same check as logging.handlers.WatchedFileHandler: logrotate renames
        # or removes the file, and the next line must start the new one.
        if self._log_descriptor is None:
            return
        try:
            status = os.stat(self._log_file)
        except FileNotFoundError:
            self._close_log_file()
            return
        if (status.st_dev, status.st_ino) != self._log_identity:
            self._close_log_file()

    def _open_log_file(self) -> int:
        if self._log_descriptor is None:
            self._log_file.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            # O_APPEND makes each single write() land whole at the end, even with
            # another process (the CLI) appending to the same file.
            descriptor = os.open(
                self._log_file,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                0o640,
            )
            status = os.fstat(descriptor)
            self._log_descriptor = descriptor
            self._log_identity = (status.st_dev, status.st_ino)
        return self._log_descriptor

    def _close_log_file(self) -> None:
        if self._log_descriptor is not None:
            os.close(self._log_descriptor)
            self._log_descriptor = None
            self._log_identity = None

    # -- syslog -------------------------------------------------------------------

    def _send_to_syslog(self, row: dict[str, Any], settings: MailSettings) -> None:
        """Send one line with facility mail, if enabled and a syslog socket exists.

        Only Basic-auth failures are sent, as the appliance's syslog contract
        asks; a missing or stopped syslog daemon costs nothing but this message.
        """
        if not self._syslog_enabled or not _is_socket(self._syslog_address):
            return

        code = f" [{row['code']}]" if row["code"] else ""
        text = (
            f"mail error ({row['category']}){code}: {row['log_message']}"
            f"; server {settings.hostname}:{settings.port}"
        )
        if row["queue_id"]:
            text += f"; queue id {row['queue_id']}"
        text = self._redactor.scrub(" ".join(text.split()))
        packet = f"<{_SYSLOG_PRIORITY}>{_SYSLOG_IDENT}[{os.getpid()}]: {text}".encode()
        packet = packet[:_SYSLOG_MAX_BYTES].decode("utf-8", "ignore").encode()

        try:
            if self._syslog_socket is None:
                self._syslog_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._syslog_socket.sendto(packet, str(self._syslog_address))
        except OSError as exc:
            _logger.warning("syslog_write_failed", error=str(exc))


def _open_database(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are opened explicitly by LogSink._transaction.
    connection = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=5.0
    )
    connection.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL loses at most the last rows on power loss, never the file.
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(SCHEMA_SQL)
    return connection


def _decode_snapshot(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        # A row written by another program; show what is there.
        return text


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False
