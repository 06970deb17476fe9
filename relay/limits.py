"""The sending limits of one mailbox, kept on the relay's side of the connection.

Exchange Online counts per mailbox: 3 concurrent connections (a fourth is
answered 432 4.3.2), 30 messages a minute (then 451 4.7.500) and 10,000
recipients a day (then 554 5.2.0 and nothing more until the day has passed).
Meeting a limit costs a round of refusals and, for the daily one, a whole day, so
the relay stays under them:

    MailboxLimiter                  one per mailbox, from LimitsRegistry
    ├── session slots               at most `max_sessions` upstream sessions
    ├── PaceKeeper                  transactions spaced evenly, never a burst,
    │                               and never more than the rate in any window
    ├── throttle pause              a throttling reply pauses the whole mailbox,
    │                               doubling on repeats
    └── RecipientBudget             recipients in the rolling day, in a small
                                    state file so that a restart keeps the count

Nothing here speaks SMTP or touches the spool: delivery asks before each step and
reports after it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from relay.config import LimitsConfig

log = structlog.get_logger(__name__)

# Recipients are counted in buckets of this many seconds; a bucket leaves the
# rolling window only when its last second has, so the count errs high.
_BUDGET_BUCKET_SECONDS = 300.0
_BUDGET_FILE_VERSION = 1
# At most one state file write per this many seconds while mail flows.
_BUDGET_SAVE_INTERVAL = 1.0
# A window entry for a transaction still under way: it counts until it ends.
_IN_FLIGHT = math.inf


class PaceKeeper:
    """Spaces transactions evenly: `rate` per `period`, never two at once.

    A token bucket holding one token, refilled every `period / rate` seconds,
    gives the even spacing. Exchange counts the messages it accepted in the last
    minute, so a sliding window of finished transactions (each counted from the
    moment its reply arrived) also keeps any `period` from holding more than
    `rate`, however late replies come.
    """

    def __init__(
        self,
        *,
        rate: int,
        period: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._period = period
        self._interval = period / rate
        self._clock = clock
        self._next_token_at = clock()
        self._window: collections.deque[float] = collections.deque()
        self._in_flight = 0
        # FIFO: the transaction that waited longest goes first.
        self._turn = asyncio.Lock()
        self._finished = asyncio.Event()

    async def acquire(self) -> None:
        """Wait until one more transaction may start now; then count it."""
        async with self._turn:
            while True:
                now = self._clock()
                wait = max(self._next_token_at - now, self._window_wait(now))
                if wait <= 0:
                    break
                self._finished.clear()
                # A transaction finishing may open the window before the timer.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._finished.wait(),
                        timeout=None if wait == _IN_FLIGHT else wait,
                    )
            self._next_token_at = max(now, self._next_token_at) + self._interval
            self._in_flight += 1

    def release(self) -> None:
        """The transaction started by the last `acquire` has ended."""
        self._in_flight -= 1
        self._window.append(self._clock())
        self._finished.set()

    def _window_wait(self, now: float) -> float:
        horizon = now - self._period
        while self._window and self._window[0] <= horizon:
            self._window.popleft()
        if len(self._window) + self._in_flight < self._rate:
            return 0.0
        if not self._window:
            return _IN_FLIGHT
        # Strictly after the oldest leaves, as Exchange drops it only then.
        return self._window[0] - horizon + 0.001


class RecipientBudget:
    """Recipients sent per mailbox in a rolling period, kept in a state file.

    The file is rewritten atomically (by rename) at most once a second while
    recipients are spent, and at `save`, which delivery calls when it stops. It
    is not fsync'd: a restart keeps the count, and a crash or a power cut loses
    at most the last second of it, which costs that many recipients of margin.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        limit: int,
        period: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._limit = limit
        self._period = period
        self._clock = clock
        # Mailbox (folded) -> {bucket start: recipients}.
        self._spent: dict[str, dict[float, int]] = self._load()
        self._saved_at = 0.0
        self._unsaved = False

    @property
    def limit(self) -> int:
        """Recipients allowed per period."""
        return self._limit

    def available(self, mailbox: str) -> int:
        """How many more recipients the mailbox may send now."""
        return max(0, self._limit - sum(self._current(mailbox).values()))

    def spend(self, mailbox: str, count: int) -> None:
        """Count `count` recipients sent now, and write the state file."""
        if count <= 0:
            return
        now = self._clock()
        bucket = now - now % _BUDGET_BUCKET_SECONDS
        buckets = self._current(mailbox)
        buckets[bucket] = buckets.get(bucket, 0) + count
        self._unsaved = True
        self.save_if_due()

    def save_if_due(self) -> None:
        """Write the state file if counts changed and the last write is old enough."""
        if time.monotonic() - self._saved_at >= _BUDGET_SAVE_INTERVAL:
            self.save()

    def frees_at(self, mailbox: str) -> float:
        """When the oldest counted recipients leave the window (now if none)."""
        buckets = self._current(mailbox)
        if not buckets:
            return self._clock()
        return min(buckets) + _BUDGET_BUCKET_SECONDS + self._period

    def _current(self, mailbox: str) -> dict[float, int]:
        key = mailbox.casefold()
        buckets = self._spent.setdefault(key, {})
        horizon = self._clock() - self._period - _BUDGET_BUCKET_SECONDS
        for bucket in [start for start in buckets if start <= horizon]:
            del buckets[bucket]
        return buckets

    def _load(self) -> dict[str, dict[float, int]]:
        if self._path is None:
            return {}
        try:
            raw: Any = json.loads(self._path.read_text(encoding="utf-8"))
            return {
                str(mailbox): {float(start): int(count) for start, count in buckets}
                for mailbox, buckets in raw["mailboxes"].items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Starting from zero may overshoot today's limit once; refusing to
            # start would stop all mail over a file only the relay writes.
            log.warning(
                "recipient_budget_unreadable", path=str(self._path), error=str(exc)
            )
            return {}

    def save(self) -> None:
        """Write the counts to the state file now, if anything changed."""
        if self._path is None or not self._unsaved:
            return
        self._saved_at = time.monotonic()
        self._unsaved = False
        state = {
            "version": _BUDGET_FILE_VERSION,
            "mailboxes": {
                mailbox: sorted(buckets.items())
                for mailbox, buckets in self._spent.items()
                if buckets
            },
        }
        temporary = self._path.with_name(f".{self._path.name}.tmp")
        try:
            descriptor = os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
            try:
                os.write(descriptor, json.dumps(state).encode())
            finally:
                os.close(descriptor)
            os.replace(temporary, self._path)
        except OSError as exc:
            # The count in memory stays right; only a restart would forget it.
            log.warning(
                "recipient_budget_not_saved", path=str(self._path), error=str(exc)
            )


class MailboxLimiter:
    """Session slots, pacing and throttle pauses for one mailbox."""

    def __init__(
        self,
        *,
        mailbox: str,
        config: LimitsConfig,
        budget: RecipientBudget,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.mailbox = mailbox
        self._config = config
        self.budget = budget
        self._clock = clock
        self._slots = asyncio.Semaphore(config.max_sessions)
        self._slot_waiters = 0
        self.pace = PaceKeeper(
            rate=config.messages_per_minute, period=config.rate_period
        )
        self.paused_until = 0.0
        self._throttle_streak = 0
        self.budget_reported = False
        self._reserved = 0

    # Session slots

    async def acquire_session(self) -> None:
        """Wait for a free upstream session slot for this mailbox."""
        self._slot_waiters += 1
        try:
            await self._slots.acquire()
        finally:
            self._slot_waiters -= 1

    def release_session(self) -> None:
        """An upstream session of this mailbox has closed."""
        self._slots.release()

    @property
    def sessions_wanted(self) -> bool:
        """Whether someone waits for a slot: idle sessions should close."""
        return self._slot_waiters > 0

    # Throttling

    def throttled(self) -> float:
        """A throttling reply arrived: pause the mailbox; return when it resumes."""
        backoff = min(
            self._config.throttle_backoff_max,
            self._config.throttle_backoff * 2**self._throttle_streak,
        )
        self._throttle_streak += 1
        self.paused_until = max(self.paused_until, self._clock() + backoff)
        log.warning(
            "mailbox_throttled", mailbox=self.mailbox, pause_seconds=round(backoff, 1)
        )
        return self.paused_until

    def succeeded(self) -> None:
        """A transaction went through: the next throttle pause starts small again."""
        self._throttle_streak = 0

    async def wait_until_resumed(self) -> None:
        """Sleep out a throttle pause, if one is in force."""
        delay = self.paused_until - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)

    # The recipient budget

    def recipients_available(self) -> int:
        """How many recipients may be sent now; 0 when the day's budget is spent."""
        available = self.budget.available(self.mailbox) - self._reserved
        if available > 0:
            self.budget_reported = False
        return max(0, available)

    def reserve_recipients(self, wanted: int) -> int:
        """Set aside up to `wanted` recipients of the budget; return how many.

        Sessions sending at the same time would otherwise each see the last few
        recipients of the day as theirs.
        """
        granted = min(wanted, self.recipients_available())
        self._reserved += granted
        return granted

    def settle_recipients(self, reserved: int, *, accepted: int) -> None:
        """Give a reservation back, counting the recipients the server accepted."""
        self._reserved -= reserved
        self.budget.spend(self.mailbox, accepted)

    def blocked_until(self) -> float:
        """Until when nothing may be sent (throttle pause or spent budget); 0: now."""
        until = self.paused_until
        if self.budget.available(self.mailbox) <= 0:
            until = max(until, self.budget.frees_at(self.mailbox))
        return until if until > self._clock() else 0.0


class LimitsRegistry:
    """One MailboxLimiter per mailbox, sharing one recipient budget file."""

    def __init__(
        self,
        config: LimitsConfig,
        *,
        state_file: Path | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._clock = clock
        self.budget = RecipientBudget(
            state_file,
            limit=config.daily_recipients,
            period=config.recipient_period,
            clock=clock,
        )
        self._limiters: dict[str, MailboxLimiter] = {}

    def for_mailbox(self, mailbox: str) -> MailboxLimiter:
        """The limiter of a mailbox (user names compare case-insensitively)."""
        key = mailbox.casefold()
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = MailboxLimiter(
                mailbox=mailbox,
                config=self.config,
                budget=self.budget,
                clock=self._clock,
            )
            self._limiters[key] = limiter
        return limiter
