"""When each queued message is tried, and what a failure does to the queue.

Delivery claims due messages from the spool, hands each to a worker that owns one
reusable upstream session, and turns every outcome into a spool state: delivered,
deferred on the retry schedule, held with the whole queue (authentication and
configuration trouble), or failed. It never parses SMTP: replies arrive already
classified by `relay.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import BinaryIO, Protocol

import structlog

from relay.config import DaemonConfig, MailSettings, SettingsStore
from relay.errors import (
    Category,
    Disposition,
    LimitReachedError,
    RelayError,
    SmtpReplyError,
    UpstreamConnectionError,
    UpstreamError,
)
from relay.inbound import MessageSink
from relay.limits import LimitsRegistry, MailboxLimiter
from relay.metrics import RelayMetrics
from relay.sendas import envelope_sender, rewrite_from_header
from relay.spool import MessageState, QueuedMessage, Spool
from relay.upstream import TokenProvider, UpstreamSession

log = structlog.get_logger(__name__)

# An upstream session unused for this long is closed; Exchange drops idle ones.
IDLE_SESSION_SECONDS = 30.0
# Failures of reaching the server at all, as opposed to its replies.
_UNREACHABLE_CATEGORIES = frozenset(
    {Category.DNS, Category.TIMEOUT, Category.CONNECTION, Category.TLS}
)
# At shutdown, messages being sent get this long to finish before they are cut off.
STOP_GRACE_SECONDS = 10.0
# How often an idle worker looks whether its session should close.
IDLE_CHECK_SECONDS = 1.0
# Messages claimed ahead for each worker while mail flows: one trip to the
# spool fills the queue for several deliveries, and the dispatcher is woken to
# refill it only once it runs low. After a failure, one ahead each, so that
# few messages are tried against a server that has just gone away.
QUEUE_AHEAD_PER_WORKER = 10
# A worker giving way to clients that are sending (delivery.give_way_to_clients)
# waits at most this long before it delivers one message anyway: a flood that
# never ends slows delivery down, never stops it. It looks again this often.
GIVE_WAY_SECONDS = 1.0
GIVE_WAY_CHECK_SECONDS = 0.01
# Bodies up to this size are read at once, from the event loop; bigger ones are
# read whole in a thread, and the biggest are sent from their file in blocks.
READ_INLINE_BODY_BYTES = 16 * 1024
READ_WHOLE_BODY_BYTES = 256 * 1024
# The recipient budget's state file, in the spool directory.
RECIPIENT_BUDGET_FILE = "recipient-budget.json"


class ErrorRecorder(Protocol):
    def record_error(
        self,
        error: RelayError,
        *,
        settings: MailSettings,
        queue_id: str | None = None,
        recipient: str | None = None,
    ) -> bool: ...


# The client address recorded for the relay's own failure notices.
FAILURE_NOTICE_CLIENT = "epp-mail-relay"


def failure_notice_body(
    message: QueuedMessage, reasons: list[str], *, sender: str, to: str
) -> bytes:
    """A plain-text notice that a message could not be delivered (never its body)."""
    when = format_datetime(datetime.fromtimestamp(message.queued_at, UTC))
    lines = [
        f"From: Mail relay <{sender}>",
        f"To: <{to}>",
        f"Subject: Undelivered mail: queue id {message.queue_id}",
        f"Date: {format_datetime(datetime.now(UTC))}",
        f"Message-ID: {make_msgid(domain='epp-mail-relay.invalid')}",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        "The mail relay could not deliver a message and has stopped trying.",
        "",
        f"Queue id:   {message.queue_id}",
        f"Accepted:   {when}",
        f"Sender:     <{message.mail_from}>",
        f"Recipients: {', '.join(message.recipients)}",
        "",
        "Reason:",
        *[f"  {_one_line(reason)}" for reason in reasons],
        "",
        "The Mail Server Logs tab has the details.",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def retry_delay(
    attempts: int, *, initial: float, multiplier: float, maximum: float, jitter: float
) -> float:
    """Seconds until the next try: exponential, capped, spread by jitter."""
    base = min(maximum, initial * multiplier ** max(0, attempts - 1))
    return base * (1 + random.uniform(-jitter, jitter))


class DeliveryService:
    """Background delivery of the spool to the upstream server."""

    def __init__(
        self,
        *,
        spool: Spool,
        config: DaemonConfig,
        settings: SettingsStore,
        recorder: ErrorRecorder,
        tls_context: ssl.SSLContext,
        token_provider: TokenProvider | None = None,
        clock: Callable[[], float] = time.time,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self._spool = spool
        self._config = config
        self._settings = settings
        self._recorder = recorder
        self._metrics = metrics if metrics is not None else RelayMetrics()
        self._tls_context = tls_context
        self._token_provider = token_provider
        self._clock = clock
        self._wake = asyncio.Event()
        self._queue: asyncio.Queue[QueuedMessage] = asyncio.Queue()
        # More workers than the mailbox has sessions would only wait for a slot.
        self._worker_count = min(
            config.delivery.concurrency, config.limits.max_sessions
        )
        self._idle_workers = self._worker_count
        self._queue_maybe_drained = True
        self.limits = LimitsRegistry(
            config.limits,
            state_file=spool.directory / RECIPIENT_BUDGET_FILE,
            clock=clock,
        )
        # The mailbox whose session slot each open session holds.
        self._session_slots: dict[UpstreamSession, MailboxLimiter] = {}
        self._in_flight: dict[str, QueuedMessage] = {}
        # Deliveries to every recipient whose outcome is still being committed.
        self._recording: set[asyncio.Task[None]] = set()
        # After a DNS, connect or TLS failure nothing is claimed until this time.
        self._upstream_unreachable_until = 0.0
        # Messages the spool refused to defer (a full disk): still SENDING on
        # disk, so nothing would claim them again before a restart.
        self._stranded: dict[str, QueuedMessage] = {}
        self._settings_version = settings.version
        self.held = False
        self.hold_reason: RelayError | None = None
        self.last_error: RelayError | None = None
        self.delivered_count = 0
        # How many clients are sending a message right now (see give_way_to).
        self._arriving: Callable[[], int] | None = None

    def give_way_to(self, arriving: Callable[[], int]) -> None:
        """Let delivery wait while `arriving()` clients outnumber its workers."""
        self._arriving = arriving

    def wake(self) -> None:
        """Look at the queue now (a message arrived, or the settings changed)."""
        self._wake.set()

    def reconfigure(self, config: DaemonConfig) -> None:
        """Use a reloaded configuration's retry, timeout and poll settings.

        The worker count stays as it was started; it changes on restart only.
        """
        self._config = config
        self.wake()

    async def release_hold(self) -> int:
        """Put every held message back in the queue and resume sending."""
        self._upstream_unreachable_until = 0.0
        self.held = False
        self.hold_reason = None
        released = await self._spool.release_held(now=self._clock())
        if released:
            log.info("queue_released", messages=released)
        self.wake()
        return released

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch due messages to the workers until `stop` is set."""
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: self._wake.set())
        try:
            counts = await self._spool.counts_by_state()
            self.held = counts.get(MessageState.HELD, 0) > 0
        except RelayError as error:
            log.error("delivery_start_failed", error=error.message)
        workers = [
            asyncio.create_task(self._worker(), name=f"delivery-worker-{number}")
            for number in range(self._worker_count)
        ]
        try:
            while not stop.is_set():
                try:
                    await self._dispatch_due_messages()
                    timeout = await self._seconds_until_due()
                except Exception as exc:
                    # The dispatcher must outlive a passing spool or settings
                    # fault: without it nothing queued would ever leave.
                    log.error(
                        "delivery_dispatch_failed",
                        error_type=type(exc).__name__,
                        error=str(exc),
                    )
                    timeout = self._config.delivery.poll_interval
                await self._sleep(stop, timeout)
        finally:
            stopping.cancel()
            await self._stop_workers(workers)
            self.limits.budget.save()

    async def _dispatch_due_messages(self) -> None:
        # Cleared before looking, so a wake() that comes while we look is kept.
        self._wake.clear()
        self.limits.budget.save_if_due()
        await self._follow_settings()
        await self._requeue_stranded()
        free = self._free_slots()
        if self.held or free <= 0:
            return
        if self._mailbox_blocked_until():
            await self._report_spent_budget()
            return
        if self._upstream_unreachable_until > self._clock():
            return
        claimed = await self._spool.claim_due(limit=free)
        for message in claimed:
            self._queue.put_nowait(message)
        # A full claim leaves more due for the workers' next wake-ups to take.
        self._queue_maybe_drained = len(claimed) < free

    async def _stop_workers(self, workers: list[asyncio.Task[None]]) -> None:
        """Let messages in flight finish briefly, then requeue everything else."""
        unstarted: list[QueuedMessage] = []
        while not self._queue.empty():
            unstarted.append(self._queue.get_nowait())
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self._in_flight and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        # Not cancelled: a delivery left SENDING on disk would be sent again.
        await asyncio.gather(*list(self._recording), return_exceptions=True)

        # A message cut off mid-delivery may already be with the upstream: sending
        # it again risks a duplicate, which beats losing it.
        for message in unstarted + list(self._in_flight.values()):
            with contextlib.suppress(Exception):
                await self._spool.defer(
                    message.queue_id,
                    next_attempt_at=self._clock(),
                    error=message.last_error or "",
                    count_attempt=False,
                )
        self._in_flight.clear()

    async def _follow_settings(self) -> None:
        """New Mail Settings release a held queue: they may be the fix."""
        try:
            self._settings.reload_if_changed()
        except RelayError as error:
            log.error("settings_unreadable", error=error.message)
            return
        if self._settings.version != self._settings_version:
            self._settings_version = self._settings.version
            log.info("settings_changed", version=self._settings_version)
            await self.release_hold()

    def _free_slots(self) -> int:
        """How many more messages to claim: one for each idle worker, and some
        ahead each, so that a worker never waits for the dispatcher between two
        messages (QUEUE_AHEAD_PER_WORKER while mail flows, else one)."""
        ahead = self._worker_count
        if self.last_error is None and not self.held:
            ahead *= QUEUE_AHEAD_PER_WORKER
        return self._idle_workers + ahead - self._queue.qsize()

    async def _seconds_until_due(self) -> float:
        """How long the dispatcher may sleep; a wake() cuts it short."""
        poll = self._config.delivery.poll_interval
        no_worker_free = self._free_slots() <= 0
        if self.held or no_worker_free:
            return poll
        blocked_until = max(
            self._mailbox_blocked_until(), self._upstream_unreachable_until
        )
        if blocked_until > self._clock():
            return max(0.0, min(poll, blocked_until - self._clock()))
        if not self._queue_maybe_drained:
            return poll
        next_due = await self._spool.next_due_at()
        if next_due is None:
            return poll
        return max(0.0, min(poll, next_due - self._clock()))

    async def _report_spent_budget(self) -> None:
        """Say once that mail waits for the recipient budget, even if none was tried.

        After a restart with the day's budget spent, nothing is claimed, so no
        delivery would ever tell the administrator why the queue does not move.
        """
        settings = self._settings.current
        limiter = self.limits.for_mailbox(settings.username)
        if limiter.budget_reported or limiter.recipients_available() > 0:
            return
        next_due = await self._spool.next_due_at()
        if next_due is None or next_due > self._clock():
            return
        limiter.budget_reported = True
        error = LimitReachedError.recipient_budget(
            mailbox=limiter.mailbox,
            limit=limiter.budget.limit,
            until=limiter.budget.frees_at(limiter.mailbox),
        )
        await self._record(error, settings, None)

    def _mailbox_blocked_until(self) -> float:
        """Until when the current mailbox may not send (a pause or no budget); 0."""
        return self.limits.for_mailbox(self._settings.current.username).blocked_until()

    async def _sleep(self, stop: asyncio.Event, timeout: float) -> None:
        # `stop` wakes it too: run() sets the wake event when stop is set.
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _worker(self) -> None:
        session: UpstreamSession | None = None
        idle_since = time.monotonic()
        try:
            while True:
                message = await self._next_message()
                if message is None:
                    if session is not None and self._should_close_idle(
                        session, idle_since
                    ):
                        await self._end_session(session)
                        session = None
                    continue
                self._idle_workers -= 1
                self._in_flight[message.queue_id] = message
                try:
                    await self._give_way_to_clients()
                    session = await self._deliver(message, session)
                except Exception as exc:
                    await self._recover_from_fault(message, exc)
                finally:
                    self._in_flight.pop(message.queue_id, None)
                    self._idle_workers += 1
                    idle_since = time.monotonic()
                    if self._queue.qsize() <= self._worker_count or self.last_error:
                        self.wake()
        finally:
            await self._end_session(session)

    async def _give_way_to_clients(self) -> None:
        """Wait, a while at most, as long as clients sending outnumber the workers.

        The relay accepts and delivers on one core: measured with 20 clients
        sending at once, giving way accepts 40% more messages a second, and the
        whole backlog is delivered as soon as without it.
        """
        arriving = self._arriving
        if arriving is None or not self._config.delivery.give_way_to_clients:
            return
        deadline = time.monotonic() + GIVE_WAY_SECONDS
        # Looked at every 10 ms: cheaper than being woken at each of the
        # hundreds of replies a second that change the count.
        while arriving() > self._worker_count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(GIVE_WAY_CHECK_SECONDS)

    async def _next_message(self) -> QueuedMessage | None:
        """The next queued message, or None after IDLE_CHECK_SECONDS without one."""
        try:
            # While mail flows the next message is already waiting; only an
            # empty queue is worth a timed wait (a task and a timer each).
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        try:
            return await asyncio.wait_for(self._queue.get(), timeout=IDLE_CHECK_SECONDS)
        except TimeoutError:
            return None

    def _should_close_idle(self, session: UpstreamSession, idle_since: float) -> bool:
        """Close a session idle too long, or whose slot someone else waits for."""
        if time.monotonic() - idle_since >= IDLE_SESSION_SECONDS:
            return True
        limiter = self._session_slots.get(session)
        return limiter is not None and limiter.sessions_wanted

    async def _start_session(
        self, settings: MailSettings, limiter: MailboxLimiter
    ) -> UpstreamSession:
        """Open a session within the mailbox's session limit; raises a RelayError."""
        await limiter.acquire_session()
        session = self._new_session(settings)
        self._session_slots[session] = limiter
        try:
            with self._metrics.time_upstream("open"):
                await session.open()
        except BaseException:
            await self._end_session(session)
            raise
        return session

    async def _end_session(self, session: UpstreamSession | None) -> None:
        """Close a session and give its mailbox slot back."""
        if session is None:
            return
        try:
            await session.close()
        finally:
            limiter = self._session_slots.pop(session, None)
            if limiter is not None:
                limiter.release_session()

    async def _recover_from_fault(self, message: QueuedMessage, exc: Exception) -> None:
        """A fault of our own (spool, bug) defers the message, never strands it."""
        log.error(
            "delivery_internal_error",
            queue_id=message.queue_id,
            error_type=type(exc).__name__,
            error=str(exc),
        )
        try:
            await self._spool.defer(
                message.queue_id,
                next_attempt_at=self._clock() + self._config.retry.initial_delay,
                error=f"internal error: {type(exc).__name__}",
            )
        except Exception as defer_exc:
            log.error(
                "delivery_defer_failed",
                queue_id=message.queue_id,
                error_type=type(defer_exc).__name__,
                error=str(defer_exc),
            )
            self._stranded[message.queue_id] = message

    async def _requeue_stranded(self) -> None:
        """Defer again the messages whose deferral failed, once the spool takes it."""
        for queue_id, message in list(self._stranded.items()):
            try:
                await self._spool.defer(
                    queue_id,
                    next_attempt_at=self._clock(),
                    error=message.last_error or "",
                    count_attempt=False,
                )
            except Exception:
                return  # the spool still refuses; the next look tries again
            del self._stranded[queue_id]

    async def _deliver(
        self, message: QueuedMessage, session: UpstreamSession | None
    ) -> UpstreamSession | None:
        settings = self._settings.current
        limiter = self.limits.for_mailbox(settings.username)
        started = time.monotonic()
        if self.held:
            await self._spool.hold(message.queue_id, error=message.last_error or "held")
            return session
        if session is not None and (
            session.settings is not settings
            or not session.usable
            or session.age() > self._config.delivery.connection_reuse_seconds
        ):
            await self._end_session(session)
            session = None

        outcome = _Outcome(unsent=list(message.recipients))
        body = await self._open_body(message)
        try:
            session = await self._send_transactions(
                message, body, session, settings, limiter, outcome
            )
        finally:
            if not isinstance(body, bytes):
                body.close()
        await self._settle(message, outcome, settings, limiter, started=started)
        return session

    async def _open_body(self, message: QueuedMessage) -> bytes | BinaryIO:
        if message.size <= READ_INLINE_BODY_BYTES:
            return self._spool.read_small_body(message.queue_id)
        if message.size <= READ_WHOLE_BODY_BYTES:
            return await self._spool.read_body(message.queue_id)
        return await self._spool.open_body(message.queue_id)

    async def _send_transactions(
        self,
        message: QueuedMessage,
        body: bytes | BinaryIO,
        session: UpstreamSession | None,
        settings: MailSettings,
        limiter: MailboxLimiter,
        outcome: _Outcome,
    ) -> UpstreamSession | None:
        """Send transactions until every recipient is done, or something stops it.

        More recipients than a transaction takes go in the next transaction on
        the same session at once, each recipient exactly once. Each transaction
        waits its turn in the mailbox's pace and spends from its recipient budget.
        """
        mail_from, rewrite_head = self._sender_for(message, settings)
        limits = self._config.limits
        # A reused connection may have been dropped by the server while idle
        # (Exchange does): that costs one fresh connection, not a failure.
        reconnects_left = 1 if session is not None else 0
        while outcome.unsent:
            allowed = limiter.reserve_recipients(len(outcome.unsent))
            if allowed <= 0:
                outcome.budget_spent = True
                return session
            batch, held_back = outcome.unsent[:allowed], outcome.unsent[allowed:]
            accepted_now = 0
            try:
                await limiter.wait_until_resumed()
                await limiter.pace.acquire()
            except BaseException:
                limiter.settle_recipients(allowed, accepted=0)
                raise
            try:
                if session is None:
                    session = await self._start_session(settings, limiter)
                with self._metrics.time_upstream("send"):
                    result = await session.send(
                        mail_from=mail_from,
                        recipients=batch,
                        body=body,
                        smtputf8=message.smtputf8,
                        body_8bit=message.body_8bit,
                        max_recipients=limits.max_recipients_per_message,
                        rewrite_head=rewrite_head,
                    )
            except RelayError as error:
                if session is not None and not session.usable:
                    await self._end_session(session)
                    session = None
                nothing_sent = not outcome.accepted
                if (
                    reconnects_left > 0
                    and nothing_sent
                    and isinstance(error, UpstreamConnectionError)
                ):
                    reconnects_left -= 1
                    continue
                outcome.error = error
                return session
            else:
                accepted_now = len(result.accepted)
            finally:
                limiter.pace.release()
                limiter.settle_recipients(allowed, accepted=accepted_now)

            reconnects_left = 0
            if result.accepted:
                limiter.succeeded()
            outcome.accepted += result.accepted
            outcome.refused |= result.refused
            outcome.deferred |= result.deferred
            outcome.reply = result.reply or outcome.reply
            outcome.transactions += 1 if result.accepted else 0
            outcome.unsent = list(result.unsent) + held_back
            if not result.accepted:
                # No progress in this transaction: the rest waits for a retry.
                return session
        return session

    def _sender_for(
        self, message: QueuedMessage, settings: MailSettings
    ) -> tuple[str, Callable[[bytes], bytes] | None]:
        """The envelope sender and header rewrite that Send As asks for."""
        send_as = self._config.send_as
        if not (send_as.rewrite_sender or send_as.rewrite_from_header):
            return message.mail_from, None
        mailbox = settings.username
        # The From: header alone would not do: Exchange checks MAIL FROM first.
        mail_from = envelope_sender(message.mail_from, mailbox=mailbox)
        if not send_as.rewrite_from_header:
            return mail_from, None
        return mail_from, functools.partial(rewrite_from_header, mailbox=mailbox)

    def _new_session(self, settings: MailSettings) -> UpstreamSession:
        return UpstreamSession(
            settings=settings,
            timeouts=self._config.timeouts,
            tls_context=self._tls_context,
            local_hostname=self._config.listen.hostname,
            token_provider=self._token_provider,
        )

    async def _settle(
        self,
        message: QueuedMessage,
        outcome: _Outcome,
        settings: MailSettings,
        limiter: MailboxLimiter,
        *,
        started: float,
    ) -> None:
        """Record what the transactions achieved; put off or fail what is left."""
        remaining: QueuedMessage | None = message
        if outcome.accepted or outcome.refused:
            failed = {
                recipient: error.message for recipient, error in outcome.refused.items()
            }
            if not failed and len(outcome.accepted) == len(message.recipients):
                # Delivered to all: nothing is left to decide, so the worker goes
                # on while the outcome is committed with those that come meanwhile.
                await self._record_in_background(message, outcome.accepted)
                remaining = None
            else:
                remaining = await self._spool.record_attempt(
                    message.queue_id, delivered=outcome.accepted, failed=failed
                )
            if outcome.accepted:
                self._metrics.messages_delivered.inc()
                # Mail flows again: the status line stops showing an old trouble
                # (the Mail Server Logs tab keeps its history).
                self._upstream_unreachable_until = 0.0
                self.last_error = None
            if remaining is not None and remaining.state is MessageState.FAILED:
                self._metrics.messages_failed.inc()
            for recipient, error in outcome.refused.items():
                await self._record(
                    error, settings, message.queue_id, recipient=recipient
                )
            if outcome.refused:
                reasons = [f"{r}: {e.message}" for r, e in outcome.refused.items()]
                await self._notify_administrator(message, reasons, settings)

        if remaining is not None and remaining.recipients:
            await self._put_off(remaining, outcome, settings, limiter)

        self.delivered_count += len(outcome.accepted)
        log.info(
            "message_relayed",
            queue_id=message.queue_id,
            size=message.size,
            recipients=len(message.recipients),
            delivered=len(outcome.accepted),
            refused=len(outcome.refused),
            deferred=len(outcome.deferred),
            transactions=outcome.transactions,
            upstream_reply=outcome.reply,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _record_in_background(
        self, message: QueuedMessage, delivered: list[str]
    ) -> None:
        # Bounded, so that a crash sends again a bounded number of messages: those
        # in flight and at most QUEUE_AHEAD_PER_WORKER per worker waiting here.
        # One per worker would be tighter, but then each worker stops at every
        # store that holds the spool's writer: 30% more CPU per 2 KB message.
        while len(self._recording) >= self._worker_count * QUEUE_AHEAD_PER_WORKER:
            await asyncio.wait(
                set(self._recording), return_when=asyncio.FIRST_COMPLETED
            )
        task = asyncio.create_task(self._record_delivery(message, delivered))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _record_delivery(
        self, message: QueuedMessage, delivered: list[str]
    ) -> None:
        try:
            await self._spool.record_attempt(message.queue_id, delivered=delivered)
        except Exception as exc:
            # As when recording fails in the worker: sent again, never stranded.
            await self._recover_from_fault(message, exc)

    async def _put_off(
        self,
        message: QueuedMessage,
        outcome: _Outcome,
        settings: MailSettings,
        limiter: MailboxLimiter,
    ) -> None:
        """Decide the fate of recipients still pending after this delivery."""
        error = outcome.error
        if error is not None and error.disposition is Disposition.THROTTLE:
            await self._pause(message, error, settings, until=limiter.throttled())
            return
        if error is not None:
            await self._handle_failure(message, error, settings)
            return
        if outcome.budget_spent:
            until = limiter.budget.frees_at(limiter.mailbox)
            budget = LimitReachedError.recipient_budget(
                mailbox=limiter.mailbox, limit=limiter.budget.limit, until=until
            )
            # One row per time the budget runs out, not one per message waiting.
            report = not limiter.budget_reported
            limiter.budget_reported = True
            await self._pause(message, budget, settings, until=until, report=report)
            return
        # Recipients the server put off (4xx) wait for the next try; any other
        # leftover is a recipient it never answered for, tried again the same way.
        pending_error: RelayError = next(
            iter(outcome.deferred.values()),
            UpstreamError(
                "The upstream server did not accept every recipient",
                disposition=Disposition.DEFER,
            ),
        )
        await self._defer(message, pending_error, settings)

    async def _pause(
        self,
        message: QueuedMessage,
        error: RelayError,
        settings: MailSettings,
        *,
        until: float,
        report: bool = True,
    ) -> None:
        """Wait out a limit of the mailbox: no attempt counted, no life spent."""
        self.last_error = error
        await self._spool.defer(
            message.queue_id,
            next_attempt_at=until,
            error=error.message,
            count_attempt=False,
            paused=True,
        )
        self._metrics.messages_deferred.inc()
        if report:
            await self._record(error, settings, message.queue_id)

    async def _handle_failure(
        self, message: QueuedMessage, error: RelayError, settings: MailSettings
    ) -> None:
        self.last_error = error
        log.warning(
            "delivery_failed",
            queue_id=message.queue_id,
            category=str(error.category),
            code=error.code,
            disposition=str(error.disposition),
            error=error.message,
        )

        if error.disposition is Disposition.HOLD:
            await self._spool.hold(message.queue_id, error=error.message)
            if not self.held:
                log.error("queue_held", reason=error.message)
            self.held = True
            self.hold_reason = error
            await self._record(error, settings, None)
            return
        if error.disposition in (Disposition.FAIL_MESSAGE, Disposition.FAIL_RECIPIENT):
            await self._spool.fail(message.queue_id, error=error.message)
            self._metrics.messages_failed.inc()
            await self._record(error, settings, message.queue_id)
            await self._notify_administrator(message, [error.message], settings)
            return
        await self._defer(message, error, settings)

    async def _notify_administrator(
        self, message: QueuedMessage, reasons: list[str], settings: MailSettings
    ) -> None:
        """Queue a failure notice to the administrator e-mail, when configured.

        A notice about a notice is never sent, so a broken administrator address
        cannot start a loop; the failure is in the Mail Server Logs either way.
        """
        if not self._config.delivery.failure_notice or not settings.admin_email:
            return
        if message.client_address == FAILURE_NOTICE_CLIENT:
            return
        body = failure_notice_body(
            message, reasons, sender=settings.username, to=settings.admin_email
        )
        try:
            queue_id = await self._spool.store(
                mail_from=settings.username,
                recipients=[settings.admin_email],
                body=body,
                smtputf8=False,
                body_8bit=any(byte >= 0x80 for byte in body),
                client_address=FAILURE_NOTICE_CLIENT,
            )
        except RelayError as error:
            log.error("failure_notice_not_queued", error=error.message)
            return
        log.info("failure_notice_queued", queue_id=queue_id, about=message.queue_id)
        self.wake()

    async def _defer(
        self, message: QueuedMessage, error: RelayError, settings: MailSettings
    ) -> None:
        retry = self._config.retry
        now = self._clock()
        # Time spent waiting out the mailbox's limits is not the message's fault.
        if now - message.queued_at - message.paused_seconds >= retry.give_up_after:
            days = retry.give_up_after / 86400
            gave_up = UpstreamError(
                f"Gave up after {days:g} days of retrying; last error: {error.message}",
                code=error.code,
                disposition=Disposition.FAIL_MESSAGE,
            )
            gave_up.category = error.category
            await self._spool.fail(message.queue_id, error=gave_up.message)
            self._metrics.messages_failed.inc()
            await self._notify_administrator(message, [gave_up.message], settings)
            await self._record(gave_up, settings, message.queue_id)
            return

        delay = retry_delay(
            message.attempts + 1,
            initial=retry.initial_delay,
            multiplier=retry.multiplier,
            maximum=retry.max_delay,
            jitter=retry.jitter,
        )
        await self._spool.defer(
            message.queue_id, next_attempt_at=now + delay, error=error.message
        )
        if error.category in _UNREACHABLE_CATEGORIES:
            # The server, not this message, is the trouble: the rest of the queue
            # waits as long instead of each message knocking on its own schedule.
            self._upstream_unreachable_until = max(
                self._upstream_unreachable_until, now + delay
            )
        self._metrics.messages_deferred.inc()
        await self._record(error, settings, message.queue_id)

    async def _record(
        self,
        error: RelayError,
        settings: MailSettings,
        queue_id: str | None,
        *,
        recipient: str | None = None,
    ) -> None:
        self.last_error = error
        await asyncio.to_thread(
            self._recorder.record_error,
            error,
            settings=settings,
            queue_id=queue_id,
            recipient=recipient,
        )


@dataclass
class _Outcome:
    """What the transactions of one delivery achieved, and why they stopped."""

    unsent: list[str]
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, SmtpReplyError] = field(default_factory=dict)
    deferred: dict[str, SmtpReplyError] = field(default_factory=dict)
    reply: str = ""
    transactions: int = 0
    error: RelayError | None = None
    budget_spent: bool = False


class SpoolingSink(MessageSink):
    """Store and forward (e-mail type `smtp`): 250 once the spool has it on disk."""

    def __init__(
        self,
        *,
        spool: Spool,
        delivery: DeliveryService,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self._spool = spool
        self._delivery = delivery
        self._metrics = metrics if metrics is not None else RelayMetrics()
        self.accepted_count = 0

    def new_body_file(self) -> Path | None:
        # On the spool's own file system, so that storing it is a rename.
        return self._spool.new_temp_file()

    def has_room_for(self, size: int) -> bool:
        return self._spool.has_room_for(size)

    async def accept(
        self,
        *,
        mail_from: str,
        recipients: list[str],
        body: bytes | Path,
        smtputf8: bool,
        body_8bit: bool,
        client_address: str,
    ) -> str:
        if isinstance(body, Path):
            size = os.stat(body).st_size
            queue_id = await self._spool.store_from_file(
                body,
                mail_from=mail_from,
                recipients=recipients,
                smtputf8=smtputf8,
                body_8bit=body_8bit,
                client_address=client_address,
            )
        else:
            size = len(body)
            queue_id = await self._spool.store(
                mail_from=mail_from,
                recipients=recipients,
                body=body,
                smtputf8=smtputf8,
                body_8bit=body_8bit,
                client_address=client_address,
            )
        self.accepted_count += 1
        self._metrics.messages_accepted.inc()
        self._delivery.wake()
        log.debug(
            "message_queued",
            queue_id=queue_id,
            size=size,
            recipients=len(recipients),
            client=client_address,
        )
        return f"250 2.0.0 OK queued as {queue_id}"


class PassThroughSink(MessageSink):
    """Pass-through (e-mail type `native`): the client gets the upstream's verdict."""

    def __init__(
        self,
        *,
        config: DaemonConfig,
        settings: SettingsStore,
        recorder: ErrorRecorder,
        tls_context: ssl.SSLContext,
        token_provider: TokenProvider | None = None,
        limits: LimitsRegistry | None = None,
    ) -> None:
        self._config = config
        self._settings = settings
        self._recorder = recorder
        self._tls_context = tls_context
        self._token_provider = token_provider
        # Shared with delivery, so that both count against one mailbox's limits.
        self._limits = limits or LimitsRegistry(config.limits, state_file=None)

    def reconfigure(self, config: DaemonConfig) -> None:
        """Use a reloaded configuration's timeouts for the next message."""
        self._config = config

    async def accept(
        self,
        *,
        mail_from: str,
        recipients: list[str],
        body: bytes | Path,
        smtputf8: bool,
        body_8bit: bool,
        client_address: str,
    ) -> str:
        if isinstance(body, Path):
            # Only when the mode changed while the body arrived; pass-through
            # bodies are otherwise kept in memory.
            path = body
            body = await asyncio.to_thread(path.read_bytes)
            path.unlink(missing_ok=True)
        settings = self._settings.current
        limiter = self._limits.for_mailbox(settings.username)
        session = UpstreamSession(
            settings=settings,
            timeouts=self._config.timeouts,
            tls_context=self._tls_context,
            local_hostname=self._config.listen.hostname,
            token_provider=self._token_provider,
        )
        if self._config.send_as.rewrite_sender or (
            self._config.send_as.rewrite_from_header
        ):
            mail_from = envelope_sender(mail_from, mailbox=settings.username)
        rewrite_head = (
            functools.partial(rewrite_from_header, mailbox=settings.username)
            if self._config.send_as.rewrite_from_header
            else None
        )
        outcome = _Outcome(unsent=list(recipients))
        await limiter.acquire_session()
        try:
            await session.open()
            # Recipients beyond what one transaction takes go in the next one.
            while outcome.unsent:
                await limiter.pace.acquire()
                try:
                    result = await session.send(
                        mail_from=mail_from,
                        recipients=outcome.unsent,
                        body=body,
                        smtputf8=smtputf8,
                        body_8bit=body_8bit,
                        max_recipients=self._config.limits.max_recipients_per_message,
                        rewrite_head=rewrite_head,
                    )
                finally:
                    limiter.pace.release()
                outcome.accepted += result.accepted
                outcome.refused |= result.refused
                outcome.deferred |= result.deferred
                outcome.reply = result.reply or outcome.reply
                outcome.unsent = list(result.unsent)
                if not result.accepted:
                    break
        except RelayError as error:
            await asyncio.to_thread(
                self._recorder.record_error, error, settings=settings
            )
            if not outcome.accepted:
                return _reply_for_failure(error)
            # Some recipients have the message already: a 4xx would make the
            # client send it to them again. The row names what stopped the rest.
        finally:
            await session.close()
            limiter.release_session()

        for recipient, refusal in outcome.refused.items():
            await asyncio.to_thread(
                self._recorder.record_error,
                refusal,
                settings=settings,
                recipient=recipient,
            )
        if outcome.accepted:
            return (
                f"250 2.0.0 Delivered by the upstream server: {_short(outcome.reply)}"
            )
        first = next(iter((outcome.refused | outcome.deferred).values()))
        return _reply_for_failure(first)


def _reply_for_failure(error: RelayError) -> str:
    """The reply a pass-through client gets: temporary unless the message is refused."""
    if isinstance(error, SmtpReplyError) and error.disposition in (
        Disposition.FAIL_MESSAGE,
        Disposition.FAIL_RECIPIENT,
    ):
        if error.enhanced_code is not None:
            # The upstream's text already opens with its enhanced status code.
            return f"{error.reply_code} {_short(error.reply_text)}"
        return f"{error.reply_code} 5.0.0 {_short(error.reply_text)}"
    # Our own credentials or the upstream's availability are never the client's
    # fault: it should keep the message and try again.
    return (
        f"451 4.4.0 Upstream delivery not possible now ({error.category}); "
        "try again later"
    )


def _short(text: str) -> str:
    return " ".join(text.split())[:300]


class ModeSwitchingSink(MessageSink):
    """Chooses store-and-forward or pass-through per message from the settings."""

    def __init__(
        self,
        *,
        settings: SettingsStore,
        spooling: SpoolingSink,
        passthrough: PassThroughSink,
    ) -> None:
        self._settings = settings
        self._spooling = spooling
        self._passthrough = passthrough

    def new_body_file(self) -> Path | None:
        return self._current_sink().new_body_file()

    def has_room_for(self, size: int) -> bool:
        return self._current_sink().has_room_for(size)

    def _current_sink(self) -> MessageSink:
        if self._settings.current.email_type == "native":
            return self._passthrough
        return self._spooling

    async def accept(
        self,
        *,
        mail_from: str,
        recipients: list[str],
        body: bytes | Path,
        smtputf8: bool,
        body_8bit: bool,
        client_address: str,
    ) -> str:
        return await self._current_sink().accept(
            mail_from=mail_from,
            recipients=recipients,
            body=body,
            smtputf8=smtputf8,
            body_8bit=body_8bit,
            client_address=client_address,
        )
