"""The durable queue: message bodies as files, envelopes and states in SQLite.

RFC 5321 section 6.1: a server that answers 250 to DATA has taken responsibility
for the message and must not lose it "because the host later crashes". The spool
is where that promise is kept. Once `Spool.store` returns, the body file has been
fsync'd, renamed into place, its directory fsync'd, and the envelope committed to
SQLite (WAL, synchronous=FULL). Crash recovery at open puts messages whose delivery
was cut short back in the queue, so a crash at any instant means a message is sent
once or, at worst, twice; never zero times.

The spool directory (directories 0700, files 0600):

    spool.lock   held with flock(2) while a Spool is open: one owner at a time
    spool.db     envelopes, per-recipient states, retry schedule, and the
                 bodies of messages up to INLINE_BODY_BYTES (SQLite)
    messages/    one file per bigger message body, named by its queue id
    tmp/         bodies being written; emptied at open

The life of a message:

    store ─> QUEUED ─claim_due─> SENDING ─record_attempt─> all delivered: removed
               ^                   │
               │                   ├─defer─> DEFERRED ─(due)─> claim_due
               │                   ├─hold──> HELD ─release_held / retry_now─> QUEUED
               │                   └─fail──> FAILED ─purge_failed─> removed
               └── open() after a crash: SENDING ─> QUEUED

DELIVERED names the outcome for callers; the spool keeps no delivered messages.
The spool knows states and reasons as plain text: it does not know SMTP replies.
It never stores a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import fcntl
import functools
import io
import json
import os
import re
import secrets
import sqlite3
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from relay.errors import SpoolError, SpoolFullError

_T = TypeVar("_T")

# Digits in ASCII order, so that ids sort as text the way their timestamps sort.
_QUEUE_ID_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Nine base-62 digits count microseconds since 1970 until the year 2398; seven
# random digits keep ids unique across restarts even when the clock steps back.
_QUEUE_ID_TIME_DIGITS = 9
_QUEUE_ID_RANDOM_DIGITS = 7
_QUEUE_ID_PATTERN = re.compile(r"[0-9A-Za-z]{16}")

# Bodies up to this size live in the database, committed with their envelope:
# one write to the log and one fsync per group commit instead of a file to
# create, fsync, rename and later unlink per message (creating files dominated
# the CPU of the relay at small messages). Up to the inbound side's in-memory
# limit: measured here, a 100 KB message is accepted a quarter faster this way
# than as a file, for some 15% more CPU in all (reading and freeing its chain
# of overflow pages). Bigger bodies, streamed to disk as they arrive, stay
# files under messages/.
INLINE_BODY_BYTES = 256 * 1024
# A body goes into the database only while the disk has this much room above
# the free-space floor. A database needs room to write its log and to copy the
# log into itself (checkpoint) even to delete rows: close to the floor, bodies
# are files again, which cost nothing to remove.
_INLINE_HEADROOM_BYTES = 16 * 1024 * 1024
# One group commit writes at most this many body bytes into the database, and
# the log is copied back after 4 MB (1 MB within the headroom): together they
# bound the log's growth, well inside the headroom. Copying back less often
# costs less: measured here, 10% less CPU per 100 KB message than after 1 MB.
_BATCH_BODY_BYTES = 4 * 1024 * 1024
_WAL_AUTOCHECKPOINT_BYTES = 4 * 1024 * 1024
_WAL_AUTOCHECKPOINT_NEAR_FLOOR_BYTES = 1024 * 1024
# The write-ahead log is cut back to this size after a checkpoint.
_WAL_SIZE_LIMIT = 4 * 1024 * 1024
# Space freed by delivered messages is reused by new ones; once this much is
# free (the queue shrank after an outage, say), it goes back to the file system.
_FREE_BYTES_TO_RELEASE = 1024 * 1024
# The page size of a new spool database. Each page is a write to the log and
# another at checkpoint: with SQLite's 4 KB a 100 KB body took 25 of each, and
# those writes were an eighth of the relay's CPU. Measured here, 16 KB pages
# cost 7% less CPU per 100 KB message than 4 KB (8 KB: 4%, 64 KB: none), and
# the same at 2 KB. A database keeps the page size it was created with.
_PAGE_SIZE = 16 * 1024

# 2 added messages.paused_seconds; a version 1 database gains it at open.
# 3 added the bodies table (created at open).
_SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id         TEXT PRIMARY KEY,
    mail_from        TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    queued_at        REAL NOT NULL,
    next_attempt_at  REAL NOT NULL,
    state_changed_at REAL NOT NULL,
    size             INTEGER NOT NULL,
    smtputf8         INTEGER NOT NULL,
    body_8bit        INTEGER NOT NULL,
    client_address   TEXT NOT NULL,
    last_error       TEXT,
    paused_seconds   REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_by_due_time ON messages (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS recipients (
    queue_id   TEXT NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
    position   INTEGER NOT NULL,
    address    TEXT NOT NULL,
    state      TEXT NOT NULL,
    reason     TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (queue_id, position),
    UNIQUE (queue_id, address)
);
CREATE TABLE IF NOT EXISTS bodies (
    queue_id TEXT PRIMARY KEY REFERENCES messages (queue_id) ON DELETE CASCADE,
    data     BLOB NOT NULL
);
"""

_INSERT_MESSAGE = """
INSERT INTO messages (
    queue_id, mail_from, state, attempts, queued_at, next_attempt_at,
    state_changed_at, size, smtputf8, body_8bit, client_address, last_error
) VALUES (?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?, ?, NULL)
"""
_INSERT_BODY = "INSERT INTO bodies (queue_id, data) VALUES (?, ?)"
_SELECT_BODY = "SELECT data FROM bodies WHERE queue_id = ?"
_INSERT_RECIPIENT = """
INSERT INTO recipients (queue_id, position, address, state, updated_at)
VALUES (?, ?, ?, 'pending', ?)
"""
_SELECT_MESSAGE = "SELECT * FROM messages WHERE queue_id = ?"
_SELECT_DUE_MESSAGES = """
SELECT * FROM messages
WHERE state IN ('queued', 'deferred') AND next_attempt_at <= ?
ORDER BY next_attempt_at, queue_id LIMIT ?
"""
_SELECT_MESSAGES = """
SELECT * FROM messages WHERE ? IS NULL OR state = ?
ORDER BY queued_at, queue_id LIMIT ?
"""
_DEFER_MESSAGE = """
UPDATE messages SET state = 'deferred', next_attempt_at = ?, last_error = ?,
    attempts = attempts + ?, state_changed_at = ?,
    paused_seconds = paused_seconds + ?
WHERE queue_id = ?
"""
_HOLD_MESSAGE = """
UPDATE messages SET state = 'held', last_error = ?, state_changed_at = ?
WHERE queue_id = ?
"""
# The states to requeue come as a JSON array; a NULL queue id means every message.
_REQUEUE_MESSAGES = """
UPDATE messages SET state = 'queued', next_attempt_at = ?, state_changed_at = ?
WHERE state IN (SELECT value FROM json_each(?)) AND (? IS NULL OR queue_id = ?)
"""
_MISSING_BODY_ERROR = "The message file is missing from the spool"


class MessageState(enum.StrEnum):
    """Where a message is in its life; see the module docstring for the moves."""

    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    HELD = "held"
    FAILED = "failed"
    DELIVERED = "delivered"


class RecipientState(enum.StrEnum):
    """The outcome so far for one recipient of a message."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, kw_only=True)
class QueuedMessage:
    """A spooled message's envelope and schedule, without its body."""

    queue_id: str
    mail_from: str
    # Only the recipients still waiting for delivery.
    recipients: tuple[str, ...]
    state: MessageState
    attempts: int
    # When the message was first accepted, for giving up after some days;
    # unrelated to how often it was tried.
    queued_at: float
    next_attempt_at: float
    size: int
    smtputf8: bool
    body_8bit: bool
    client_address: str
    last_error: str | None
    # Seconds spent waiting out the mailbox's limits (throttling, the daily
    # recipient budget): they do not count toward giving up.
    paused_seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class _NewMessage:
    queue_id: str
    mail_from: str
    recipients: tuple[str, ...]
    size: int
    smtputf8: bool
    body_8bit: bool
    client_address: str
    queued_at: float


@dataclass(eq=False)
class _PendingStore:
    """A message waiting for the next group commit.

    Its body is already in messages/ (streamed, `body` None), or still to be
    written by the commit itself, which then names it (`message.queue_id`):
    into the database (`inline`) when small, else to a file.
    """

    message: _NewMessage
    waiter: asyncio.Future[None]
    body: bytes | None = None
    inline: bytes | None = None
    error: BaseException | None = None

    @property
    def result(self) -> None:
        """What the waiter learns on success: nothing beyond the commit."""
        return None


@dataclass(eq=False)
class _PendingOutcome:
    """A delivery attempt's outcome waiting for the next commit of outcomes."""

    queue_id: str
    delivered: tuple[str, ...]
    failed: dict[str, str]
    waiter: asyncio.Future[QueuedMessage | None]
    message: QueuedMessage | None = None
    body_file_left: bool = False
    error: BaseException | None = None

    @property
    def result(self) -> QueuedMessage | None:
        """What the waiter learns on success: the message, or None once gone."""
        return self.message


_PendingT = TypeVar("_PendingT", _PendingStore, _PendingOutcome)

_NO_FAILURES: Mapping[str, str] = types.MappingProxyType({})


class Spool:
    """The durable message queue in one directory; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        *,
        min_free_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self._min_free_bytes = min_free_bytes
        self._clock = clock
        self._messages_dir = self.directory / "messages"
        # Plain strings for the per-message paths: pathlib costs more than the
        # system calls on the paths of a small message.
        self._messages_prefix = f"{self._messages_dir}{os.sep}"
        self._tmp_prefix = f"{self.directory / 'tmp'}{os.sep}"
        self._tmp_dir = self.directory / "tmp"
        self._database_path = self.directory / "spool.db"

        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # Reads one small body on the event loop's thread, outside any
        # transaction of the reader's, so that it always sees the last commit.
        self._body_reader: sqlite3.Connection | None = None
        # Free pages inside spool.db: room for new bodies the file system's
        # free space does not show.
        self._reusable_bytes = 0
        self._page_size = 4096
        # Whether the log is copied back at the smaller size (near the floor).
        self._log_kept_small = False
        self._lock_descriptor: int | None = None
        self._messages_dir_descriptor: int | None = None

        # One writer at a time: SQLite serializes writers anyway, and a connection
        # must not carry two threads' statements inside one transaction.
        self._writer_lock = asyncio.Lock()
        self._reader_lock = asyncio.Lock()
        self._pending_stores: list[_PendingStore] = []
        self._pending_outcomes: list[_PendingOutcome] = []
        self._queue_id_lock = threading.Lock()
        self._last_queue_id_micros = 0

    @property
    def min_free_bytes(self) -> int:
        """Free space a store must leave on the spool's file system."""
        return self._min_free_bytes

    # Opening and closing

    async def open(self, *, read_only: bool = False) -> int:
        """Open the spool and recover from a crash; return how many were requeued.

        Messages left SENDING by a crash go back to QUEUED, due now. Body files
        without a row (the process died between the rename and the commit, so
        nobody was told 250) and leftover temporary files are removed. A row whose
        body file has gone is marked FAILED so that an operator sees it.

        `read_only` opens a spool that a running daemon owns, for looking only
        (the queue command): no lock, no recovery, every write refused, returns 0.
        Recovery beside a live owner would requeue the messages it is sending and
        delete the bodies it has not committed yet.
        """
        if self._reader is not None:
            raise RuntimeError("the spool is already open")

        if read_only:
            await self._in_thread(
                self._open_read_only_blocking, action="opening the spool"
            )
            return 0
        return await self._in_thread(self._open_blocking, action="opening the spool")

    async def close(self) -> None:
        """Close the database and give up the directory lock; waits for writers."""
        if self._reader is None:
            return

        async with self._writer_lock, self._reader_lock:
            await self._in_thread(self._close_blocking, action="closing the spool")

    def _open_blocking(self) -> int:
        for directory in (self.directory, self._messages_dir, self._tmp_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        self._lock_descriptor = _lock_directory(self.directory)

        try:
            self._messages_dir_descriptor = os.open(
                self._messages_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            )
            self._connect()
            for directory in (self.directory, self._messages_dir, self._tmp_dir):
                # New directories and the new database file are entries in their
                # parents; only an fsync of the parent makes them survive a crash.
                _fsync_directory(directory)
            return self._recover()
        except BaseException:
            self._close_blocking()
            raise

    def _open_read_only_blocking(self) -> None:
        if not self._database_path.is_file():
            raise SpoolError(f"There is no mail spool at {self.directory}")
        reader = _connect_database(self._database_path)
        reader.execute("PRAGMA query_only = ON")
        self._reader = reader
        self._body_reader = _connect_body_reader(self._database_path)

    def _connect(self) -> None:
        # Created here so that SQLite, which gives its -wal and -shm files the
        # database file's mode, never makes a world-readable file.
        descriptor = os.open(
            self._database_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        os.fchmod(descriptor, 0o600)
        os.close(descriptor)

        writer = _connect_database(self._database_path)
        self._writer = writer
        # Takes effect only while the file is empty (a new spool).
        writer.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
        journal_mode = writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if journal_mode != "wal":
            raise SpoolError(
                f"The spool database {self._database_path} cannot use WAL journaling"
            )
        # FULL: in WAL mode the log is fsync'd at every commit, so a commit that
        # returned is on disk; NORMAL would trade that for speed.
        writer.execute("PRAGMA synchronous = FULL")
        writer.execute("PRAGMA foreign_keys = ON")
        writer.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        version = writer.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise SpoolError(
                f"The spool database {self._database_path} was written by a newer "
                f"version of the relay (schema {version})"
            )
        # Bodies come and go in the database: its free pages must be able to go
        # back to the file system, which needs auto_vacuum from the start (a new
        # database) or a VACUUM (one written by a version without it).
        if writer.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            writer.execute("PRAGMA auto_vacuum = INCREMENTAL")
            writer.execute("VACUUM")
        writer.executescript(_SCHEMA)
        self._page_size = writer.execute("PRAGMA page_size").fetchone()[0]
        self._note_free_pages(writer)
        self._keep_log_small(
            self._within_headroom(self._free_bytes(with_reusable=True))
        )
        columns = {row[1] for row in writer.execute("PRAGMA table_info(messages)")}
        if "paused_seconds" not in columns:
            writer.execute(
                "ALTER TABLE messages ADD COLUMN paused_seconds REAL NOT NULL DEFAULT 0"
            )
        writer.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

        reader = _connect_database(self._database_path)
        reader.execute("PRAGMA query_only = ON")
        self._reader = reader
        self._body_reader = _connect_body_reader(self._database_path)

    def _recover(self) -> int:
        now = self._clock()
        with self._write_transaction() as connection:
            recovered = connection.execute(
                "UPDATE messages SET state = ?, next_attempt_at = ?, "
                "state_changed_at = ? WHERE state = ?",
                (MessageState.QUEUED, now, now, MessageState.SENDING),
            ).rowcount
            spooled = {
                row["queue_id"]: MessageState(row["state"])
                for row in connection.execute("SELECT queue_id, state FROM messages")
            }
            inline_bodies = {
                row[0] for row in connection.execute("SELECT queue_id FROM bodies")
            }
            body_files = {
                entry.name
                for entry in os.scandir(self._messages_dir)
                if entry.is_file(follow_symlinks=False)
            }
            bodiless = [
                queue_id
                for queue_id, state in spooled.items()
                if queue_id not in body_files
                and queue_id not in inline_bodies
                and state is not MessageState.FAILED
            ]
            for queue_id in bodiless:
                self._fail_message(connection, queue_id, _MISSING_BODY_ERROR, now)

        for name in body_files - spooled.keys():
            (self._messages_dir / name).unlink(missing_ok=True)
        for entry in os.scandir(self._tmp_dir):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        return recovered

    def _close_blocking(self) -> None:
        for connection in (self._body_reader, self._reader, self._writer):
            if connection is not None:
                connection.close()
        self._body_reader = None
        self._reader = None
        self._writer = None

        if self._messages_dir_descriptor is not None:
            os.close(self._messages_dir_descriptor)
            self._messages_dir_descriptor = None
        if self._lock_descriptor is not None:
            # Closing the descriptor releases the flock(2) lock with it.
            os.close(self._lock_descriptor)
            self._lock_descriptor = None

    # Accepting messages

    async def store(
        self,
        *,
        mail_from: str,
        recipients: Sequence[str],
        body: bytes,
        smtputf8: bool,
        body_8bit: bool,
        client_address: str,
    ) -> str:
        """Keep a message durably and return its queue id; only then may one say 250.

        Raises SpoolFullError when the body would leave less than min_free_bytes
        free on the spool's file system, or the disk fills up meanwhile; nothing
        partial is left behind. Other file and database failures raise SpoolError.
        """
        unique_recipients = _unique_recipients(recipients)
        self._require_open()

        # The body is written by the group commit, with those of the other
        # sessions storing at the same time: one trip to a thread for them all.
        return await self._commit_new_message(
            _NewMessage(
                queue_id="",
                mail_from=mail_from,
                recipients=unique_recipients,
                size=len(body),
                smtputf8=smtputf8,
                body_8bit=body_8bit,
                client_address=client_address,
                queued_at=self._clock(),
            ),
            body=body,
        )

    async def store_from_file(
        self,
        temp_file: Path,
        *,
        mail_from: str,
        recipients: Sequence[str],
        smtputf8: bool,
        body_8bit: bool,
        client_address: str,
    ) -> str:
        """Keep a body already written to a file from `new_temp_file`; as `store`.

        The spool takes the file over: it is moved into the queue on success and
        removed on failure.
        """
        unique_recipients = _unique_recipients(recipients)
        self._require_open()
        if Path(temp_file).parent != self._tmp_dir:
            raise ValueError(f"{temp_file} is not a temporary file of this spool")

        queue_id, size = await self._place_body(
            functools.partial(self._adopt_temp_file, Path(temp_file))
        )
        await self._commit_new_message(
            _NewMessage(
                queue_id=queue_id,
                mail_from=mail_from,
                recipients=unique_recipients,
                size=size,
                smtputf8=smtputf8,
                body_8bit=body_8bit,
                client_address=client_address,
                queued_at=self._clock(),
            )
        )
        return queue_id

    def new_temp_file(self) -> Path:
        """Create an empty private file on the spool's file system to stream into."""
        self._require_open()

        path = self._tmp_dir / f"incoming-{secrets.token_hex(8)}.tmp"
        descriptor = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        os.fchmod(descriptor, 0o600)
        os.close(descriptor)
        return path

    async def _place_body(self, work: Callable[[], tuple[str, int]]) -> tuple[str, int]:
        """Move a body into messages/; if the caller is cancelled, take it out again."""
        task = self._start_in_thread(work, action="storing a message")
        try:
            await _wait_until_done(task)
        except asyncio.CancelledError:
            if not task.cancelled() and task.exception() is None:
                queue_id, _ = task.result()
                self.body_path(queue_id).unlink(missing_ok=True)
            raise
        return task.result()

    def _write_body_file(self, body: bytes) -> tuple[str, int]:
        self._check_free_space(len(body))
        queue_id = self._unused_queue_id()
        temporary = f"{self._tmp_prefix}{queue_id}.tmp"

        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        try:
            try:
                os.fchmod(descriptor, 0o600)
                _write_all(descriptor, body)
                # The data and the size that reads it back; the timestamps an
                # fsync would also flush are not needed and cost a journal write.
                os.fdatasync(descriptor)
            finally:
                os.close(descriptor)
            # rename(2) is atomic: messages/ never holds a half-written body. The
            # new entry is made durable by the directory fsync at commit.
            os.rename(temporary, self._body_file(queue_id))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        return queue_id, len(body)

    def _adopt_temp_file(self, temp_file: Path) -> tuple[str, int]:
        try:
            descriptor = os.open(temp_file, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.fchmod(descriptor, 0o600)
                size = os.fstat(descriptor).st_size
                os.fdatasync(descriptor)
            finally:
                os.close(descriptor)
            self._check_free_space(0)
            queue_id = self._unused_queue_id()
            os.rename(temp_file, self.body_path(queue_id))
        except BaseException:
            temp_file.unlink(missing_ok=True)
            raise
        return queue_id, size

    def has_room_for(self, incoming_bytes: int) -> bool:
        """Whether a message this large would still leave the free-space floor."""
        try:
            self._check_free_space(incoming_bytes)
        except SpoolFullError:
            return False
        return True

    def _check_free_space(self, incoming_bytes: int) -> None:
        self._require_room(self._free_bytes(), incoming_bytes)

    def _free_bytes(self, *, with_reusable: bool = False) -> int:
        usage = os.statvfs(self._tmp_dir)
        free_bytes: int = usage.f_bavail * usage.f_frsize
        return free_bytes + (self._reusable_bytes if with_reusable else 0)

    def _within_headroom(self, free_bytes: int) -> bool:
        """Whether `free_bytes` leaves less than the database's headroom above
        the floor: bodies are files then, and the log is kept small."""
        return free_bytes < self._min_free_bytes + _INLINE_HEADROOM_BYTES

    def _fit_log_to_room(self, free_bytes: int) -> None:
        """Copy the log back sooner within the headroom above the floor.

        In the writer's thread; only a change of side costs a statement.
        """
        near_floor = self._within_headroom(free_bytes)
        if near_floor != self._log_kept_small:
            self._keep_log_small(near_floor)

    def _keep_log_small(self, small: bool) -> None:
        self._log_kept_small = small
        size = (
            _WAL_AUTOCHECKPOINT_NEAR_FLOOR_BYTES if small else _WAL_AUTOCHECKPOINT_BYTES
        )
        self._writer_connection().execute(
            f"PRAGMA wal_autocheckpoint = {size // self._page_size}"
        )

    def _note_free_pages(self, connection: sqlite3.Connection) -> None:
        pages: int = connection.execute("PRAGMA freelist_count").fetchone()[0]
        self._reusable_bytes = pages * self._page_size

    def _release_free_pages(self) -> None:
        """Give spool.db's free pages back to the file system once there are many.

        In the writer's thread, outside a transaction.
        """
        connection = self._writer_connection()
        self._note_free_pages(connection)
        if self._reusable_bytes >= _FREE_BYTES_TO_RELEASE:
            # It frees one page per step and returns no row, so execute() would
            # stop after one page; executescript() steps it to the end.
            connection.executescript("PRAGMA incremental_vacuum")
            self._note_free_pages(connection)

    def _require_room(self, free_bytes: int, incoming_bytes: int) -> None:
        if free_bytes - incoming_bytes < self._min_free_bytes:
            raise SpoolFullError(
                f"The mail spool is full: {_megabytes(free_bytes)} free on the file "
                f"system of {self.directory}, {_megabytes(self._min_free_bytes)} must "
                "stay free"
            )

    def _unused_queue_id(self) -> str:
        queue_id = self._new_queue_id()
        # Only after the clock stepped back and seven random digits repeated; a
        # rename over an existing body would silently lose that message.
        while os.path.exists(self._body_file(queue_id)):
            queue_id = self._new_queue_id()
        return queue_id

    def _new_queue_id(self) -> str:
        with self._queue_id_lock:
            micros = max(int(self._clock() * 1_000_000), self._last_queue_id_micros + 1)
            self._last_queue_id_micros = micros
        return _base62(micros, _QUEUE_ID_TIME_DIGITS) + _base62(
            secrets.randbelow(62**_QUEUE_ID_RANDOM_DIGITS), _QUEUE_ID_RANDOM_DIGITS
        )

    async def _commit_new_message(
        self, message: _NewMessage, *, body: bytes | None = None
    ) -> str:
        """Commit a message, together with any other stores waiting; its queue id.

        Group commit: while one batch pays for its fsyncs and database commit,
        later stores queue up, and whoever holds the writer lock next writes all
        their bodies and commits all their rows in one trip to a thread.
        """
        pending = _PendingStore(
            message, asyncio.get_running_loop().create_future(), body=body
        )

        def abandon() -> None:
            if body is None:
                # Nobody will answer 250 for it, so its body must not linger.
                self.body_path(message.queue_id).unlink(missing_ok=True)

        await self._commit_in_group(
            pending,
            self._pending_stores,
            take=_take_batch,
            work=self._store_batch,
            action="storing a message",
            abandon=abandon,
        )
        return pending.message.queue_id

    async def _commit_in_group(
        self,
        pending: _PendingT,
        waiting: list[_PendingT],
        *,
        take: Callable[[list[_PendingT]], list[_PendingT]],
        work: Callable[[list[_PendingT]], None],
        action: str,
        abandon: Callable[[], None] | None = None,
    ) -> None:
        """Wait until `pending` is committed, with whatever else waits beside it.

        Group commit: while one batch is in its thread, later ones queue up in
        `waiting`, and whoever holds the writer lock next commits what `take`
        gives it in one trip. The commit's failure, if any, is raised here for
        every member of the batch. A caller cancelled before its batch started
        leaves the queue, and `abandon` cleans up after it.
        """
        waiting.append(pending)
        try:
            async with self._writer_lock:
                while pending in waiting:
                    batch = take(waiting)
                    task = self._start_in_thread(
                        functools.partial(work, batch), action=action
                    )
                    # Settled from the task, so that the whole batch learns the
                    # outcome even if the caller that started it is cancelled.
                    task.add_done_callback(functools.partial(_settle_batch, batch))
                    await _wait_until_done(task)
        except asyncio.CancelledError:
            if pending in waiting:
                waiting.remove(pending)
                if abandon is not None:
                    abandon()
            elif pending.waiter.done() and not pending.waiter.cancelled():
                pending.waiter.exception()  # retrieved: nobody waits for it now
            raise
        await pending.waiter

    def _store_batch(self, batch: list[_PendingStore]) -> None:
        """Place the bodies still in memory, then commit every message's rows.

        Small bodies go into the database with their rows; bigger ones are
        written to files first. A body that does not fit (a full disk, the
        free-space floor) fails its own store only.
        """
        free_bytes: int | None = None
        for pending in batch:
            body = pending.body
            if body is None:
                continue
            try:
                with _translated_errors("storing a message"):
                    if free_bytes is None:
                        free_bytes = self._free_bytes(with_reusable=True)
                    if len(body) <= INLINE_BODY_BYTES and not self._within_headroom(
                        free_bytes - len(body)
                    ):
                        free_bytes -= len(body)
                        queue_id, size = self._new_queue_id(), len(body)
                        pending.inline = body
                    else:
                        queue_id, size = self._write_body_file(body)
            except SpoolError as error:
                pending.error = error
                continue
            pending.message = dataclasses.replace(
                pending.message, queue_id=queue_id, size=size
            )
            pending.body = None
        self._fit_log_to_room(
            self._free_bytes(with_reusable=True) if free_bytes is None else free_bytes
        )
        placed = [pending for pending in batch if pending.error is None]
        if placed:
            self._insert_new_messages(
                [pending.message for pending in placed],
                inline_bodies=[
                    (pending.message.queue_id, pending.inline)
                    for pending in placed
                    if pending.inline is not None
                ],
            )

    def _insert_new_messages(
        self,
        messages: list[_NewMessage],
        *,
        inline_bodies: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        connection = self._writer_connection()
        now = self._clock()
        inline_ids = {queue_id for queue_id, _ in inline_bodies}
        file_ids = [m.queue_id for m in messages if m.queue_id not in inline_ids]

        try:
            if file_ids:
                # fsync(2) on a file does not persist the directory entry that
                # names it (POSIX leaves that to the directory): fsync messages/
                # itself, so that no committed row can point at a rename lost in
                # a crash.
                os.fsync(self._directory_descriptor())
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(
                _INSERT_MESSAGE,
                [
                    (
                        message.queue_id,
                        message.mail_from,
                        message.queued_at,
                        message.queued_at,
                        now,
                        message.size,
                        message.smtputf8,
                        message.body_8bit,
                        message.client_address,
                    )
                    for message in messages
                ],
            )
            connection.executemany(
                _INSERT_RECIPIENT,
                [
                    (message.queue_id, position, address, now)
                    for message in messages
                    for position, address in enumerate(message.recipients)
                ],
            )
            connection.executemany(_INSERT_BODY, inline_bodies)
        except BaseException:
            _rollback(connection)
            self._remove_body_files(file_ids)
            raise

        try:
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(connection)
            # After an I/O error the commit record may already be in the log and
            # the rows may come back at the next open, so their bodies stay; open()
            # removes them if the rows do not. A full disk wrote no commit record.
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                self._remove_body_files(file_ids)
            raise

    # Delivering messages

    async def claim_due(
        self, *, limit: int, now: float | None = None
    ) -> list[QueuedMessage]:
        """Mark up to `limit` due QUEUED or DEFERRED messages SENDING and return them.

        The longest-due come first (earliest next_attempt_at, then oldest queue
        id). A claimed message is not claimed again until delivery reports on it
        or the spool is reopened after a crash.
        """
        due_by = self._clock() if now is None else now
        return await self._write(
            functools.partial(self._claim_due_blocking, limit, due_by),
            action="claiming due messages",
        )

    def _claim_due_blocking(self, limit: int, due_by: float) -> list[QueuedMessage]:
        now = self._clock()
        connection = self._writer_connection()
        # A claim need not survive a crash: recovery turns SENDING back into
        # QUEUED anyway. The next FULL commit makes it durable with itself.
        connection.execute("PRAGMA synchronous = NORMAL")
        try:
            with self._write_transaction() as connection:
                claimed = _fetch_messages(
                    connection, _SELECT_DUE_MESSAGES, (due_by, limit)
                )
                connection.executemany(
                    "UPDATE messages SET state = ?, state_changed_at = ? "
                    "WHERE queue_id = ?",
                    [
                        (MessageState.SENDING, now, message.queue_id)
                        for message in claimed
                    ],
                )
        finally:
            connection.execute("PRAGMA synchronous = FULL")
        return [
            dataclasses.replace(message, state=MessageState.SENDING)
            for message in claimed
        ]

    async def open_body(self, queue_id: str) -> BinaryIO:
        """The message's body as an open file, for sending a big one in blocks."""
        path = self.body_path(queue_id)
        return await self._in_thread(
            functools.partial(self._open_body_blocking, queue_id, path),
            action="reading a message",
        )

    def _open_body_blocking(self, queue_id: str, path: Path) -> BinaryIO:
        inline = self._inline_body(queue_id)
        if inline is not None:
            return io.BytesIO(inline)
        return _open_body_file(path)

    def read_small_body(self, queue_id: str) -> bytes:
        """The body of a message of a few KB, read at once on the caller's thread.

        A recently stored small body is in SQLite's or the kernel's cache:
        reading it costs less than handing the read to a thread.
        """
        with _translated_errors("reading a message"):
            return self._read_body_blocking(queue_id)

    async def read_body(self, queue_id: str) -> bytes:
        """The message's body, byte for byte as it was stored."""
        return await self._in_thread(
            functools.partial(self._read_body_blocking, queue_id),
            action="reading a message",
        )

    def _read_body_blocking(self, queue_id: str) -> bytes:
        path = self._body_file(queue_id)
        inline = self._inline_body(queue_id)
        if inline is not None:
            return inline
        return _read_body_file(path)

    def _inline_body(self, queue_id: str) -> bytes | None:
        if self._body_reader is None:
            raise SpoolError("The mail spool is closed")
        row = self._body_reader.execute(_SELECT_BODY, (queue_id,)).fetchone()
        return None if row is None else bytes(row[0])

    async def has_body(self, queue_id: str) -> bool:
        """Whether the spool still keeps a body for this queue id, in either place."""
        path = self.body_path(queue_id)
        return await self._in_thread(
            lambda: self._inline_body(queue_id) is not None or path.exists(),
            action="reading a message",
        )

    def _body_file(self, queue_id: str) -> str:
        if not _QUEUE_ID_PATTERN.fullmatch(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        return self._messages_prefix + queue_id

    def body_path(self, queue_id: str) -> Path:
        """Where the body of a message lives; refuses anything but a queue id."""
        if not _QUEUE_ID_PATTERN.fullmatch(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        return self._messages_dir / queue_id

    async def record_attempt(
        self,
        queue_id: str,
        *,
        delivered: Sequence[str] = (),
        failed: Mapping[str, str] = _NO_FAILURES,
    ) -> QueuedMessage | None:
        """Record per-recipient outcomes; return the message, or None once it is gone.

        `failed` maps a recipient to the reason it was refused for good. When no
        recipient is pending any more, a message delivered to all is removed (row
        and body) and None returned; one with a failed recipient becomes FAILED and
        keeps its body until purged. While recipients are pending the state is left
        as it is, for the caller to defer, hold or fail the rest. Recipients already
        settled, or unknown, are ignored.
        """
        self._require_open()
        pending = _PendingOutcome(
            queue_id,
            tuple(delivered),
            dict(failed),
            asyncio.get_running_loop().create_future(),
        )
        # Like stores, the outcomes that come while another write is under way
        # are recorded together: one transaction and one trip to a thread.
        await self._commit_in_group(
            pending,
            self._pending_outcomes,
            take=_take_all,
            work=self._record_batch_blocking,
            action="recording a delivery attempt",
        )
        return pending.message

    def _record_batch_blocking(self, batch: list[_PendingOutcome]) -> None:
        connection = self._writer_connection()
        # Not fsync'd on its own: the next FULL commit (any store) carries it to
        # disk, and a process crash loses nothing. Only a power cut in between
        # can forget a delivery, and the message is then sent again: twice at
        # worst, never lost. Postfix does not sync its queue file removal either.
        connection.execute("PRAGMA synchronous = NORMAL")
        try:
            with self._write_transaction() as connection:
                for pending in batch:
                    # Each in a savepoint: a fault fails that outcome alone.
                    connection.execute("SAVEPOINT outcome")
                    try:
                        with _translated_errors("recording a delivery attempt"):
                            pending.message, pending.body_file_left = (
                                self._record_outcomes(
                                    connection,
                                    pending.queue_id,
                                    pending.delivered,
                                    pending.failed,
                                )
                            )
                    except SpoolError as error:
                        connection.execute("ROLLBACK TO outcome")
                        pending.error = error
                    connection.execute("RELEASE outcome")
            if any(p.message is None and p.error is None for p in batch):
                self._release_free_pages()
        finally:
            connection.execute("PRAGMA synchronous = FULL")
        # The rows went first: a crash before these unlinks leaves orphan files
        # for open() to remove, never a row without its body.
        self._remove_body_files(
            pending.queue_id
            for pending in batch
            if pending.body_file_left and pending.error is None
        )

    def _record_outcomes(
        self,
        connection: sqlite3.Connection,
        queue_id: str,
        delivered: tuple[str, ...],
        failed: dict[str, str],
    ) -> tuple[QueuedMessage | None, bool]:
        """One message's outcomes, inside the caller's transaction."""
        now = self._clock()
        connection.executemany(
            "UPDATE recipients SET state = ?, reason = NULL, updated_at = ? "
            "WHERE queue_id = ? AND address = ? AND state = ?",
            [
                (
                    RecipientState.DELIVERED,
                    now,
                    queue_id,
                    address,
                    RecipientState.PENDING,
                )
                for address in delivered
            ],
        )
        connection.executemany(
            "UPDATE recipients SET state = ?, reason = ?, updated_at = ? "
            "WHERE queue_id = ? AND address = ? AND state = ?",
            [
                (
                    RecipientState.FAILED,
                    reason,
                    now,
                    queue_id,
                    address,
                    RecipientState.PENDING,
                )
                for address, reason in failed.items()
            ],
        )
        states = _recipient_state_counts(connection, queue_id)

        if not states or states.get(RecipientState.PENDING):
            messages = _fetch_messages(connection, _SELECT_MESSAGE, (queue_id,))
            return (messages[0] if messages else None), False

        if states.get(RecipientState.FAILED):
            reasons = connection.execute(
                "SELECT address, reason FROM recipients "
                "WHERE queue_id = ? AND state = ? ORDER BY position",
                (queue_id, RecipientState.FAILED),
            ).fetchall()
            summary = "; ".join(f"{row[0]}: {row[1]}" for row in reasons)
            self._fail_message(connection, queue_id, summary, now)
            failed_message = _fetch_messages(connection, _SELECT_MESSAGE, (queue_id,))
            return failed_message[0], False

        # A body in the database goes with the row; only a file needs removing.
        inline = connection.execute(
            "DELETE FROM bodies WHERE queue_id = ?", (queue_id,)
        ).rowcount
        connection.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))
        return None, not inline

    async def defer(
        self,
        queue_id: str,
        *,
        next_attempt_at: float,
        error: str,
        count_attempt: bool = True,
        paused: bool = False,
    ) -> None:
        """Put a message off until `next_attempt_at`, remembering why.

        `paused`: the wait is for the mailbox's limits, not for this message, so
        it is added to the message's paused_seconds and never brings the day it
        is given up any closer.
        """
        now = self._clock()
        parameters = (
            next_attempt_at,
            error,
            int(count_attempt),
            now,
            max(0.0, next_attempt_at - now) if paused else 0.0,
            queue_id,
        )
        await self._write(
            functools.partial(self._execute, _DEFER_MESSAGE, parameters),
            action="deferring a message",
        )

    async def hold(self, queue_id: str, *, error: str) -> None:
        """Keep a message from being claimed until it is released."""
        parameters = (error, self._clock(), queue_id)
        await self._write(
            functools.partial(self._execute, _HOLD_MESSAGE, parameters),
            action="holding a message",
        )

    async def fail(self, queue_id: str, *, error: str) -> None:
        """Give up on a whole message: it and its pending recipients become FAILED."""
        await self._write(
            functools.partial(self._fail_blocking, queue_id, error),
            action="failing a message",
        )

    def _fail_blocking(self, queue_id: str, error: str) -> None:
        with self._write_transaction() as connection:
            self._fail_message(connection, queue_id, error, self._clock())

    async def release_held(self, *, now: float | None = None) -> int:
        """Queue every HELD message again, due at `now`; return how many."""
        due_at = self._clock() if now is None else now
        return await self._write(
            functools.partial(self._requeue, (MessageState.HELD,), None, due_at),
            action="releasing held messages",
        )

    async def retry_now(self, queue_id: str | None = None) -> int:
        """Queue one DEFERRED or HELD message again now, or all when None."""
        return await self._write(
            functools.partial(
                self._requeue,
                (MessageState.DEFERRED, MessageState.HELD),
                queue_id,
                self._clock(),
            ),
            action="retrying messages",
        )

    def _requeue(
        self,
        from_states: tuple[MessageState, ...],
        queue_id: str | None,
        due_at: float,
    ) -> int:
        parameters = (
            due_at,
            self._clock(),
            json.dumps(list(from_states)),
            queue_id,
            queue_id,
        )
        return self._execute(_REQUEUE_MESSAGES, parameters)

    # Operating the queue

    async def delete(self, queue_id: str) -> bool:
        """Remove a message (row and body) whatever its state; False if unknown."""
        deleted = await self._write(
            functools.partial(self._delete_blocking, queue_id),
            action="deleting a message",
        )
        if deleted:
            await self._in_thread(
                functools.partial(self._remove_body_files, [queue_id]),
                action="deleting a message",
            )
        return deleted

    async def purge_failed(self, *, older_than: float) -> int:
        """Remove FAILED messages that failed before `older_than`; return how many."""
        deleted = await self._write(
            functools.partial(self._purge_failed_blocking, older_than),
            action="purging failed messages",
        )
        await self._in_thread(
            functools.partial(self._remove_body_files, deleted),
            action="purging failed messages",
        )
        return len(deleted)

    def _purge_failed_blocking(self, older_than: float) -> list[str]:
        with self._write_transaction() as connection:
            expired = [
                row["queue_id"]
                for row in connection.execute(
                    "SELECT queue_id FROM messages "
                    "WHERE state = ? AND state_changed_at < ?",
                    (MessageState.FAILED, older_than),
                )
            ]
            connection.executemany(
                "DELETE FROM messages WHERE queue_id = ?",
                [(queue_id,) for queue_id in expired],
            )
        self._release_free_pages()
        return expired

    def _delete_blocking(self, queue_id: str) -> bool:
        with self._write_transaction() as connection:
            deleted: int = connection.execute(
                "DELETE FROM messages WHERE queue_id = ?", (queue_id,)
            ).rowcount
        self._release_free_pages()
        return deleted > 0

    async def get(self, queue_id: str) -> QueuedMessage | None:
        """One message's envelope and schedule, or None if it is not spooled."""
        messages = await self._read(
            functools.partial(self._select, _SELECT_MESSAGE, (queue_id,)),
            action="reading the queue",
        )
        return messages[0] if messages else None

    async def list_messages(
        self, *, state: MessageState | None = None, limit: int = 100
    ) -> list[QueuedMessage]:
        """Messages in the order they were accepted, optionally of one state."""
        return await self._read(
            functools.partial(self._select, _SELECT_MESSAGES, (state, state, limit)),
            action="reading the queue",
        )

    async def counts_by_state(self) -> dict[MessageState, int]:
        """How many messages are in each state, every state present."""
        rows = await self._read(
            functools.partial(
                self._select_rows,
                "SELECT state, COUNT(*) FROM messages GROUP BY state",
                (),
            ),
            action="reading the queue",
        )
        counts = dict.fromkeys(MessageState, 0)
        counts.update({MessageState(row[0]): row[1] for row in rows})
        return counts

    async def next_due_at(self) -> float | None:
        """The earliest next_attempt_at among QUEUED and DEFERRED messages."""
        rows = await self._read(
            functools.partial(
                self._select_rows,
                "SELECT MIN(next_attempt_at) FROM messages WHERE state IN (?, ?)",
                (MessageState.QUEUED, MessageState.DEFERRED),
            ),
            action="reading the queue",
        )
        earliest: float | None = rows[0][0]
        return earliest

    async def recipient_states(
        self, queue_id: str
    ) -> dict[str, tuple[RecipientState, str | None]]:
        """Every recipient of a message, in RCPT order, with its state and reason."""
        rows = await self._read(
            functools.partial(
                self._select_rows,
                "SELECT address, state, reason FROM recipients "
                "WHERE queue_id = ? ORDER BY position",
                (queue_id,),
            ),
            action="reading the queue",
        )
        return {row[0]: (RecipientState(row[1]), row[2]) for row in rows}

    # Shared blocking helpers: run in a worker thread, under the right lock

    def _execute(self, sql: str, parameters: Sequence[Any]) -> int:
        with self._write_transaction() as connection:
            changed: int = connection.execute(sql, parameters).rowcount
        return changed

    def _fail_message(
        self, connection: sqlite3.Connection, queue_id: str, error: str, now: float
    ) -> None:
        connection.execute(
            "UPDATE messages SET state = ?, last_error = ?, state_changed_at = ? "
            "WHERE queue_id = ?",
            (MessageState.FAILED, error, now, queue_id),
        )
        connection.execute(
            "UPDATE recipients SET state = ?, reason = ?, updated_at = ? "
            "WHERE queue_id = ? AND state = ?",
            (RecipientState.FAILED, error, now, queue_id, RecipientState.PENDING),
        )

    def _remove_body_files(self, queue_ids: Iterable[str]) -> None:
        # A body left behind by a failure here has no row any more, and the next
        # open() removes it.
        for queue_id in queue_ids:
            with contextlib.suppress(OSError):
                os.unlink(self._body_file(queue_id))

    def _select(self, sql: str, parameters: tuple[Any, ...]) -> list[QueuedMessage]:
        with self._read_transaction() as connection:
            return _fetch_messages(connection, sql, parameters)

    def _select_rows(self, sql: str, parameters: tuple[Any, ...]) -> list[sqlite3.Row]:
        with self._read_transaction() as connection:
            return connection.execute(sql, parameters).fetchall()

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        connection = self._writer_connection()
        # IMMEDIATE takes the write lock up front, so a transaction never fails
        # half-way for want of it.
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            _rollback(connection)
            raise

    @contextlib.contextmanager
    def _read_transaction(self) -> Iterator[sqlite3.Connection]:
        if self._reader is None:
            raise SpoolError("The mail spool is closed")
        connection = self._reader
        # One snapshot for the messages and their recipients.
        connection.execute("BEGIN")
        try:
            yield connection
        finally:
            _rollback(connection)

    def _require_open(self) -> None:
        self._writer_connection()

    def _writer_connection(self) -> sqlite3.Connection:
        # A closed spool is a moment in a shutdown, not a bug: callers answer it
        # like any other spool failure (the client is told to try again).
        if self._writer is None:
            if self._reader is not None:
                raise SpoolError("The mail spool was opened read-only")
            raise SpoolError("The mail spool is closed")
        return self._writer

    def _directory_descriptor(self) -> int:
        if self._messages_dir_descriptor is None:
            raise SpoolError("The mail spool is closed")
        return self._messages_dir_descriptor

    # Running blocking work off the event loop

    async def _write(self, work: Callable[[], _T], *, action: str) -> _T:
        async with self._writer_lock:
            return await self._in_thread(work, action=action)

    async def _read(self, work: Callable[[], _T], *, action: str) -> _T:
        async with self._reader_lock:
            return await self._in_thread(work, action=action)

    async def _in_thread(self, work: Callable[[], _T], *, action: str) -> _T:
        task = self._start_in_thread(work, action=action)
        await _wait_until_done(task)
        return task.result()

    def _start_in_thread(
        self, work: Callable[[], _T], *, action: str
    ) -> asyncio.Future[_T]:
        def translated() -> _T:
            with _translated_errors(action):
                return work()

        return asyncio.ensure_future(asyncio.to_thread(translated))


async def _wait_until_done(task: asyncio.Future[Any]) -> None:
    """Wait for work in a thread to end, even if the caller is cancelled meanwhile.

    A thread cannot be stopped. Were its lock released early, the next writer's
    statements would land inside this one's transaction.
    """
    cancellation: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancellation = exc

    if cancellation is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the cancelled caller will not look at it
        raise cancellation


def _take_all(waiting: list[_PendingOutcome]) -> list[_PendingOutcome]:
    batch = list(waiting)
    waiting.clear()
    return batch


def _take_batch(pending_stores: list[_PendingStore]) -> list[_PendingStore]:
    """Take the stores for one commit off the list: all, or those within the
    batch's body bytes (at least one). The rest wait for the next commit."""
    body_bytes = 0
    count = 0
    for pending in pending_stores:
        body_bytes += len(pending.body) if pending.body is not None else 0
        if count and body_bytes > _BATCH_BODY_BYTES:
            break
        count += 1
    batch = pending_stores[:count]
    del pending_stores[:count]
    return batch


def _settle_batch(
    batch: Sequence[_PendingStore | _PendingOutcome], task: asyncio.Future[None]
) -> None:
    """Tell each waiter of a group commit its own outcome, or the commit's failure."""
    for pending in batch:
        waiter: asyncio.Future[Any] = pending.waiter
        if waiter.done():
            continue  # its caller was cancelled while waiting
        if task.cancelled():
            waiter.cancel()
            continue
        failure = pending.error or task.exception()
        if failure is None:
            waiter.set_result(pending.result)
        else:
            waiter.set_exception(failure)


@contextlib.contextmanager
def _translated_errors(action: str) -> Iterator[None]:
    """Translate file and database failures into SpoolError or SpoolFullError."""
    try:
        yield
    except SpoolError:
        raise
    except sqlite3.Error as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
            raise SpoolFullError(
                f"The mail spool's disk is full while {action}", code="SQLITE_FULL"
            ) from exc
        raise SpoolError(f"The spool database failed while {action}: {exc}") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SpoolFullError(
                f"The mail spool's disk is full while {action}: {exc.strerror}",
                code=errno.errorcode[exc.errno],
            ) from exc
        raise SpoolError(
            f"The spool's files failed while {action}: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename else "")
        ) from exc


def _lock_directory(directory: Path) -> int:
    """Take the spool directory for this process alone, or raise SpoolError.

    A second owner's recovery would requeue our SENDING messages as crash
    leftovers and delete the bodies we have not committed yet.
    """
    descriptor = os.open(
        directory / "spool.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(descriptor)
        raise SpoolError(
            f"The spool {directory} is in use by another relay process"
        ) from exc
    return descriptor


def _connect_database(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are begun and committed explicitly. Used by
    # one worker thread at a time, under the spool's locks.
    connection = sqlite3.connect(
        path, timeout=30.0, isolation_level=None, check_same_thread=False
    )
    connection.row_factory = sqlite3.Row
    return connection


def _connect_body_reader(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(
        path, timeout=30.0, isolation_level=None, check_same_thread=False
    )
    connection.execute("PRAGMA query_only = ON")
    return connection


def _fetch_messages(
    connection: sqlite3.Connection, sql: str, parameters: Sequence[Any]
) -> list[QueuedMessage]:
    rows = connection.execute(sql, parameters).fetchall()
    if not rows:
        return []

    pending: dict[str, list[str]] = {row["queue_id"]: [] for row in rows}
    for queue_id, address in connection.execute(
        "SELECT queue_id, address FROM recipients WHERE state = ? "
        "AND queue_id IN (SELECT value FROM json_each(?)) ORDER BY queue_id, position",
        (RecipientState.PENDING, json.dumps(list(pending))),
    ):
        pending[queue_id].append(address)

    return [
        QueuedMessage(
            queue_id=row["queue_id"],
            mail_from=row["mail_from"],
            recipients=tuple(pending[row["queue_id"]]),
            state=MessageState(row["state"]),
            attempts=row["attempts"],
            queued_at=row["queued_at"],
            next_attempt_at=row["next_attempt_at"],
            size=row["size"],
            smtputf8=bool(row["smtputf8"]),
            body_8bit=bool(row["body_8bit"]),
            client_address=row["client_address"],
            last_error=row["last_error"],
            # A spool of schema 1 opened read-only has no such column yet.
            paused_seconds=_column(row, "paused_seconds", 0.0),
        )
        for row in rows
    ]


def _column(row: sqlite3.Row, name: str, default: Any) -> Any:
    # sqlite3.Row answers `in` about its values; the names are its keys().
    return row[name] if name in row.keys() else default  # noqa: SIM118


def _recipient_state_counts(
    connection: sqlite3.Connection, queue_id: str
) -> dict[RecipientState, int]:
    return {
        RecipientState(row[0]): row[1]
        for row in connection.execute(
            "SELECT state, COUNT(*) FROM recipients WHERE queue_id = ? GROUP BY state",
            (queue_id,),
        )
    }


def _rollback(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


def _read_body_file(path: Path | str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError as exc:
        name = os.path.basename(path)
        raise SpoolError(f"{_MISSING_BODY_ERROR} (queue id {name})") from exc


def _open_body_file(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except FileNotFoundError as exc:
        raise SpoolError(f"{_MISSING_BODY_ERROR} (queue id {path.name})") from exc


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


def _unique_recipients(recipients: Sequence[str]) -> tuple[str, ...]:
    """The recipients in RCPT order, each once: a repeated RCPT is one delivery."""
    if isinstance(recipients, str):
        raise TypeError("recipients must be a sequence of addresses, not one string")
    unique = tuple(dict.fromkeys(recipients))
    if not unique:
        raise ValueError("a message needs at least one recipient")
    return unique


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, remainder = divmod(number, 62)
        digits.append(_QUEUE_ID_DIGITS[remainder])
    return "".join(reversed(digits))


def _megabytes(byte_count: int) -> str:
    return f"{byte_count / (1024 * 1024):.0f} MB"
