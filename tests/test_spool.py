"""The spool keeps every acknowledged message, across restarts and kill -9."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import sqlite3
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.errors import SpoolError, SpoolFullError
from relay.spool import INLINE_BODY_BYTES, MessageState, RecipientState, Spool

REPOSITORY = Path(__file__).resolve().parent.parent
START = 1_750_000_000.0
# Small bodies live in the database, bigger ones as files under messages/.
SMALL_BODY = b"Subject: disk almost full\r\n\r\nSee the dashboard.\r\n"
FILE_BODY = b"Subject: a big report\r\n\r\n" + b"x" * INLINE_BODY_BYTES
BODY_PLACES = pytest.mark.parametrize(
    "body", [SMALL_BODY, FILE_BODY], ids=["in-database", "as-file"]
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
async def spool(spool_dir: Path, clock: FakeClock) -> AsyncIterator[Spool]:
    spool = Spool(spool_dir, clock=clock)
    await spool.open()
    yield spool
    await spool.close()


async def store(spool: Spool, **overrides: Any) -> str:
    envelope: dict[str, Any] = {
        "mail_from": "alerts@appliance.example",
        "recipients": ["admin@example.com"],
        "body": SMALL_BODY,
        "smtputf8": False,
        "body_8bit": False,
        "client_address": "127.0.0.1",
    }
    envelope.update(overrides)
    return await spool.store(**envelope)


async def reopen(spool: Spool, clock: Callable[[], float]) -> Spool:
    """Close a spool and open a new one on its directory, as a restart would."""
    await spool.close()
    restarted = Spool(spool.directory, clock=clock)
    await restarted.open()
    return restarted


def files_in_spool(directory: Path) -> list[str]:
    """Every body and temporary file, as "messages/<id>" or "tmp/<name>"."""
    return sorted(
        f"{subdirectory}/{path.name}"
        for subdirectory in ("messages", "tmp")
        for path in (directory / subdirectory).iterdir()
    )


def crash_test_body(index: int) -> bytes:
    """A body the killed child and the test both derive from the message number."""
    header = f"Subject: crash test {index}\r\n\r\n".encode()
    return header + bytes(range(256)) * (1 + index * 37 % 400)


# Stores messages, eight at a time, until killed; prints each id once store()
# returned, which is when the relay would answer 250. Bounded in count and time
# in case nobody kills it.
CRASH_CHILD = """
import asyncio, sys, time
from pathlib import Path
from relay.spool import Spool
from tests.test_spool import crash_test_body

async def main():
    spool = Spool(Path(sys.argv[1]))
    await spool.open()
    deadline = time.monotonic() + 30

    async def store_one(index):
        queue_id = await spool.store(
            mail_from="cron@appliance.example",
            recipients=[f"user{index}@example.com"],
            body=crash_test_body(index),
            smtputf8=False,
            body_8bit=True,
            client_address="127.0.0.1",
        )
        print(queue_id, index, flush=True)

    for batch in range(0, 5000, 8):
        if time.monotonic() > deadline:
            break
        await asyncio.gather(*(store_one(batch + k) for k in range(8)))

asyncio.run(main())
"""


async def run_and_kill_storing_child(
    spool_dir: Path, *, kill_after: int
) -> dict[str, int]:
    """Run a child that stores messages, SIGKILL it, return the ids it acknowledged."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASH_CHILD,
        str(spool_dir),
        cwd=REPOSITORY,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )
    assert child.stdout is not None

    acknowledged: dict[str, int] = {}
    try:
        while len(acknowledged) < kill_after:
            line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
            if not line:
                break
            queue_id, index = line.decode().split()
            acknowledged[queue_id] = int(index)
    finally:
        child.kill()
        await child.wait()

    if child.returncode != -9:
        pytest.fail(f"the child ended by itself (exit {child.returncode})")
    return acknowledged


# Restart and crash recovery


async def test_spool_store_survives_restart(spool: Spool, clock: FakeClock) -> None:
    queue_id = await store(spool)

    restarted = await reopen(spool, clock)
    message = await restarted.get(queue_id)
    await restarted.close()

    assert message is not None and message.recipients == ("admin@example.com",)


@pytest.mark.parametrize("kill_after", [1, 30, 150])
async def test_spool_keeps_every_acknowledged_message_after_kill(
    spool_dir: Path, kill_after: int
) -> None:
    acknowledged = await run_and_kill_storing_child(spool_dir, kill_after=kill_after)

    spool = Spool(spool_dir)
    await spool.open()
    bodies = {queue_id: await spool.read_body(queue_id) for queue_id in acknowledged}
    await spool.close()

    assert {
        queue_id: hashlib.sha256(body).hexdigest() for queue_id, body in bodies.items()
    } == {
        queue_id: hashlib.sha256(crash_test_body(index)).hexdigest()
        for queue_id, index in acknowledged.items()
    }


async def test_spool_requeues_claimed_message_after_crash(
    spool: Spool, clock: FakeClock
) -> None:
    queue_id = await store(spool)
    await spool.claim_due(limit=10)
    clock.now += 300

    restarted = await reopen(spool, clock)
    message = await restarted.get(queue_id)
    await restarted.close()

    assert message is not None and (message.state, message.next_attempt_at) == (
        MessageState.QUEUED,
        clock.now,
    )


async def test_spool_open_returns_number_of_requeued_messages(
    spool: Spool, clock: FakeClock
) -> None:
    for _ in range(3):
        await store(spool)
    await spool.claim_due(limit=2)

    await spool.close()
    restarted = Spool(spool.directory, clock=clock)
    recovered = await restarted.open()
    await restarted.close()

    assert recovered == 2


async def test_spool_removes_orphan_body_files_at_open(
    spool: Spool, clock: FakeClock
) -> None:
    queue_id = await store(spool, body=FILE_BODY)
    inline_id = await store(spool, body=SMALL_BODY)
    # What a crash between the rename and the commit leaves: a body, no row.
    (spool.directory / "messages" / "0000000000orphan").write_bytes(b"never acked")
    (spool.directory / "tmp" / "half-written.tmp").write_bytes(b"Subject: ")

    restarted = await reopen(spool, clock)
    kept = await restarted.read_body(inline_id)
    await restarted.close()

    assert (files_in_spool(spool.directory), kept) == (
        [f"messages/{queue_id}"],
        SMALL_BODY,
    )


async def test_spool_keeps_small_bodies_in_the_database_and_big_ones_as_files(
    spool: Spool,
) -> None:
    small = await store(spool, body=SMALL_BODY)
    big = await store(spool, body=FILE_BODY)

    assert (
        files_in_spool(spool.directory),
        await spool.read_body(small),
        await spool.read_body(big),
        spool.read_small_body(small),
        (await spool.open_body(small)).read(),
    ) == ([f"messages/{big}"], SMALL_BODY, FILE_BODY, SMALL_BODY, SMALL_BODY)


async def test_spool_fails_message_whose_body_row_vanished(
    spool: Spool, clock: FakeClock
) -> None:
    queue_id = await store(spool, body=SMALL_BODY)
    await spool.close()
    connection = sqlite3.connect(spool.directory / "spool.db")
    with connection:
        connection.execute("DELETE FROM bodies WHERE queue_id = ?", (queue_id,))
    connection.close()

    restarted = Spool(spool.directory, clock=clock)
    await restarted.open()
    message = await restarted.get(queue_id)
    await restarted.close()

    assert message is not None and message.state is MessageState.FAILED


async def test_spool_fails_message_whose_body_file_vanished(
    spool: Spool, clock: FakeClock
) -> None:
    queue_id = await store(spool, body=FILE_BODY)
    spool.body_path(queue_id).unlink()

    restarted = await reopen(spool, clock)
    message = await restarted.get(queue_id)
    await restarted.close()

    assert message is not None and message.state is MessageState.FAILED


async def test_spool_refuses_a_second_owner_of_the_directory(spool: Spool) -> None:
    with pytest.raises(SpoolError, match="in use by another relay process"):
        await Spool(spool.directory).open()


# Storing


async def test_spool_body_round_trips_8bit_bytes(spool: Spool) -> None:
    body = b"Subject: caf\xc3\xa9\r\n\r\n" + bytes(range(256)) + b"\r\n.\r\n\x00\xff"

    queue_id = await store(spool, body=body, body_8bit=True)

    assert await spool.read_body(queue_id) == body


async def test_spool_body_round_trips_five_megabytes(spool: Spool) -> None:
    body = os.urandom(5 * 1024 * 1024 + 17)

    queue_id = await store(spool, body=body, body_8bit=True)

    assert await spool.read_body(queue_id) == body


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    mail_from=st.text(max_size=60),
    recipients=st.lists(st.text(min_size=1, max_size=60), min_size=1, max_size=8),
    body=st.binary(max_size=4096),
    smtputf8=st.booleans(),
    body_8bit=st.booleans(),
)
def test_spool_round_trips_any_envelope_and_body(
    mail_from: str,
    recipients: list[str],
    body: bytes,
    smtputf8: bool,
    body_8bit: bool,
) -> None:
    async def store_and_reload() -> tuple[Any, ...]:
        with tempfile.TemporaryDirectory() as directory:
            spool = Spool(Path(directory))
            await spool.open()
            queue_id = await spool.store(
                mail_from=mail_from,
                recipients=recipients,
                body=body,
                smtputf8=smtputf8,
                body_8bit=body_8bit,
                client_address="::1",
            )
            restarted = await reopen(spool, spool_clock)
            message = await restarted.get(queue_id)
            stored_body = await restarted.read_body(queue_id)
            await restarted.close()
        assert message is not None
        return (
            message.mail_from,
            message.recipients,
            message.smtputf8,
            message.body_8bit,
            message.size,
            stored_body,
        )

    spool_clock = FakeClock()

    assert asyncio.run(store_and_reload()) == (
        mail_from,
        tuple(dict.fromkeys(recipients)),
        smtputf8,
        body_8bit,
        len(body),
        body,
    )


async def test_spool_concurrent_stores_are_all_kept(
    spool: Spool, clock: FakeClock
) -> None:
    bodies = [
        f"Subject: {index}\r\n\r\nbody {index}\r\n".encode() for index in range(200)
    ]
    queue_ids = await asyncio.gather(*(store(spool, body=body) for body in bodies))

    restarted = await reopen(spool, clock)
    stored = [await restarted.read_body(queue_id) for queue_id in queue_ids]
    await restarted.close()

    assert stored == bodies


async def test_spool_store_from_file_keeps_the_streamed_body(spool: Spool) -> None:
    body = b"Subject: streamed\r\n\r\n" + b"line of a large report\r\n" * 10_000
    temp_file = spool.new_temp_file()
    temp_file.write_bytes(body)

    queue_id = await spool.store_from_file(
        temp_file,
        mail_from="reports@appliance.example",
        recipients=["admin@example.com"],
        smtputf8=False,
        body_8bit=False,
        client_address="127.0.0.1",
    )

    assert (await spool.read_body(queue_id), temp_file.exists()) == (body, False)


async def test_spool_store_from_file_refuses_a_file_outside_the_spool(
    spool: Spool, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere.eml"
    outside.write_bytes(b"Subject: x\r\n\r\n")

    with pytest.raises(ValueError, match="not a temporary file"):
        await spool.store_from_file(
            outside,
            mail_from="",
            recipients=["admin@example.com"],
            smtputf8=False,
            body_8bit=False,
            client_address="127.0.0.1",
        )


async def test_spool_store_collapses_repeated_recipients(spool: Spool) -> None:
    queue_id = await store(
        spool, recipients=["a@example.com", "b@example.com", "a@example.com"]
    )

    message = await spool.get(queue_id)

    assert message is not None and message.recipients == (
        "a@example.com",
        "b@example.com",
    )


async def test_spool_store_refuses_a_message_without_recipients(spool: Spool) -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        await store(spool, recipients=[])


async def test_spool_queue_ids_are_unique_and_sort_in_acceptance_order(
    spool: Spool,
) -> None:
    # The clock stands still: ids must still differ and keep their order.
    queue_ids = [await store(spool) for _ in range(100)]

    assert queue_ids == sorted(set(queue_ids))


async def test_spool_queue_ids_are_16_alphanumeric_characters(spool: Spool) -> None:
    queue_id = await store(spool)

    assert re.fullmatch(r"[0-9A-Za-z]{16}", queue_id)


async def test_spool_body_path_refuses_anything_but_a_queue_id(spool: Spool) -> None:
    with pytest.raises(ValueError, match="not a queue id"):
        spool.body_path("../../etc/passwd")


async def test_spool_read_body_reports_a_missing_file(spool: Spool) -> None:
    queue_id = await store(spool, body=FILE_BODY)
    spool.body_path(queue_id).unlink()

    with pytest.raises(SpoolError, match="missing from the spool"):
        await spool.read_body(queue_id)


# Free space


async def test_spool_full_raises_spool_full_error(spool_dir: Path) -> None:
    spool = Spool(spool_dir, min_free_bytes=2**62)
    await spool.open()

    with pytest.raises(SpoolFullError):
        await store(spool)
    await spool.close()


async def test_spool_full_leaves_nothing_behind(spool_dir: Path) -> None:
    spool = Spool(spool_dir, min_free_bytes=2**62)
    await spool.open()

    with pytest.raises(SpoolFullError):
        await store(spool)
    counts = await spool.counts_by_state()
    await spool.close()

    assert (
        files_in_spool(spool_dir),
        sum(counts.values()),
    ) == ([], 0)


async def test_spool_disk_full_while_writing_raises_and_cleans_up(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def write_until_the_disk_fills(descriptor: int, data: Any) -> int:
        if len(data) >= 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(descriptor, data)

    monkeypatch.setattr(os, "write", write_until_the_disk_fills)
    with pytest.raises(SpoolFullError):
        await store(spool, body=FILE_BODY)
    monkeypatch.undo()

    assert files_in_spool(spool.directory) == []


# Delivery outcomes


async def test_spool_partial_delivery_keeps_the_pending_recipient(spool: Spool) -> None:
    queue_id = await store(spool, recipients=["a@example.com", "b@example.com"])
    await spool.claim_due(limit=1)

    await spool.record_attempt(queue_id, delivered=["a@example.com"])
    message = await spool.get(queue_id)

    assert message is not None and message.recipients == ("b@example.com",)


@BODY_PLACES
async def test_spool_all_delivered_removes_row_and_body(
    spool: Spool, body: bytes
) -> None:
    queue_id = await store(
        spool, recipients=["a@example.com", "b@example.com"], body=body
    )
    await spool.claim_due(limit=1)
    await spool.record_attempt(queue_id, delivered=["a@example.com"])
    kept_while_pending = await spool.has_body(queue_id)

    outcome = await spool.record_attempt(queue_id, delivered=["b@example.com"])

    assert (
        kept_while_pending,
        outcome,
        await spool.get(queue_id),
        await spool.has_body(queue_id),
        files_in_spool(spool.directory),
    ) == (True, None, None, False, [])


@BODY_PLACES
async def test_spool_failed_recipient_fails_message_and_keeps_body(
    spool: Spool, body: bytes
) -> None:
    queue_id = await store(
        spool, recipients=["a@example.com", "gone@example.com"], body=body
    )
    await spool.claim_due(limit=1)

    outcome = await spool.record_attempt(
        queue_id,
        delivered=["a@example.com"],
        failed={"gone@example.com": "550 5.1.1 User unknown"},
    )

    assert outcome is not None and (
        outcome.state,
        outcome.last_error,
        await spool.read_body(queue_id),
    ) == (MessageState.FAILED, "gone@example.com: 550 5.1.1 User unknown", body)


async def test_spool_recipient_states_show_each_outcome(spool: Spool) -> None:
    recipients = ["a@example.com", "b@example.com", "c@example.com"]
    queue_id = await store(spool, recipients=recipients)
    await spool.claim_due(limit=1)

    await spool.record_attempt(
        queue_id, delivered=["a@example.com"], failed={"b@example.com": "550 no"}
    )

    assert await spool.recipient_states(queue_id) == {
        "a@example.com": (RecipientState.DELIVERED, None),
        "b@example.com": (RecipientState.FAILED, "550 no"),
        "c@example.com": (RecipientState.PENDING, None),
    }


async def test_spool_fail_fails_every_pending_recipient(spool: Spool) -> None:
    queue_id = await store(spool, recipients=["a@example.com", "b@example.com"])
    await spool.claim_due(limit=1)

    await spool.fail(queue_id, error="554 5.6.0 Message rejected")

    assert await spool.recipient_states(queue_id) == {
        "a@example.com": (RecipientState.FAILED, "554 5.6.0 Message rejected"),
        "b@example.com": (RecipientState.FAILED, "554 5.6.0 Message rejected"),
    }


async def test_spool_record_attempt_on_a_deleted_message_returns_none(
    spool: Spool,
) -> None:
    queue_id = await store(spool)
    await spool.claim_due(limit=1)
    await spool.delete(queue_id)

    assert await spool.record_attempt(queue_id, delivered=["admin@example.com"]) is None


# Claiming and the retry schedule


async def test_spool_claim_due_takes_the_longest_due_first(
    spool: Spool, clock: FakeClock
) -> None:
    queue_ids = []
    for _ in range(3):
        queue_ids.append(await store(spool))
        clock.now += 1

    claimed = await spool.claim_due(limit=2)

    assert [message.queue_id for message in claimed] == queue_ids[:2]


async def test_spool_claim_due_marks_messages_sending(spool: Spool) -> None:
    queue_id = await store(spool)

    await spool.claim_due(limit=1)
    message = await spool.get(queue_id)

    assert message is not None and message.state is MessageState.SENDING


async def test_spool_claim_due_never_hands_out_a_message_twice(spool: Spool) -> None:
    await store(spool)
    await spool.claim_due(limit=10)

    assert await spool.claim_due(limit=10) == []


async def test_spool_defer_sets_the_retry_schedule(
    spool: Spool, clock: FakeClock
) -> None:
    queue_id = await store(spool)
    await spool.claim_due(limit=1)
    clock.now += 5

    await spool.defer(queue_id, next_attempt_at=clock.now + 60, error="451 4.7.0 later")
    message = await spool.get(queue_id)

    assert message is not None and (
        message.state,
        message.attempts,
        message.queued_at,
        message.next_attempt_at,
        message.last_error,
    ) == (MessageState.DEFERRED, 1, START, START + 65, "451 4.7.0 later")


async def test_spool_defer_without_counting_the_attempt(
    spool: Spool, clock: FakeClock
) -> None:
    queue_id = await store(spool)
    await spool.claim_due(limit=1)

    await spool.defer(
        queue_id,
        next_attempt_at=clock.now + 1,
        error="shutting down",
        count_attempt=False,
    )
    message = await spool.get(queue_id)

    assert message is not None and message.attempts == 0


async def test_spool_deferred_message_is_claimed_only_when_due(
    spool: Spool, clock: FakeClock
) -> None:
    queue_id = await store(spool)
    await spool.claim_due(limit=1)
    await spool.defer(queue_id, next_attempt_at=START + 60, error="421 busy")

    early = await spool.claim_due(limit=1, now=START + 59)
    due = await spool.claim_due(limit=1, now=START + 60)

    assert ([m.queue_id for m in early], [m.queue_id for m in due]) == ([], [queue_id])


async def test_spool_next_due_at_ignores_held_messages(
    spool: Spool, clock: FakeClock
) -> None:
    held = await store(spool)
    clock.now += 10
    await store(spool)
    await spool.claim_due(limit=1)
    await spool.hold(held, error="535 5.7.3 Authentication unsuccessful")

    assert await spool.next_due_at() == START + 10


async def test_spool_next_due_at_is_none_for_an_empty_queue(spool: Spool) -> None:
    assert await spool.next_due_at() is None


# Hold, release, retry


async def test_spool_held_message_is_not_claimed(
    spool: Spool, clock: FakeClock
) -> None:
    queue_id = await store(spool)
    await spool.claim_due(limit=1)
    await spool.hold(queue_id, error="535 5.7.3 Authentication unsuccessful")

    assert await spool.claim_due(limit=1, now=clock.now + 86_400) == []


async def test_spool_release_held_makes_messages_due_again(
    spool: Spool, clock: FakeClock
) -> None:
    queue_id = await store(spool)
    await spool.claim_due(limit=1)
    await spool.hold(queue_id, error="535 5.7.3 Authentication unsuccessful")
    clock.now += 600

    released = await spool.release_held()
    claimed = await spool.claim_due(limit=1)

    assert (released, [message.queue_id for message in claimed]) == (1, [queue_id])


async def test_spool_retry_now_requeues_one_deferred_message(
    spool: Spool, clock: FakeClock
) -> None:
    first, second = await store(spool), await store(spool)
    await spool.claim_due(limit=2)
    for queue_id in (first, second):
        await spool.defer(queue_id, next_attempt_at=clock.now + 3600, error="421")

    await spool.retry_now(first)

    assert [message.queue_id for message in await spool.claim_due(limit=2)] == [first]


async def test_spool_retry_now_without_id_requeues_deferred_and_held(
    spool: Spool, clock: FakeClock
) -> None:
    deferred, held = await store(spool), await store(spool)
    await spool.claim_due(limit=2)
    await spool.defer(deferred, next_attempt_at=clock.now + 3600, error="421")
    await spool.hold(held, error="535")

    assert await spool.retry_now() == 2


# Operating the queue


async def test_spool_counts_by_state(spool: Spool, clock: FakeClock) -> None:
    queue_ids = [await store(spool) for _ in range(5)]
    await spool.claim_due(limit=4)
    await spool.defer(queue_ids[1], next_attempt_at=clock.now + 60, error="421")
    await spool.hold(queue_ids[2], error="535")
    await spool.fail(queue_ids[3], error="554")

    assert await spool.counts_by_state() == {
        MessageState.QUEUED: 1,
        MessageState.SENDING: 1,
        MessageState.DEFERRED: 1,
        MessageState.HELD: 1,
        MessageState.FAILED: 1,
        MessageState.DELIVERED: 0,
    }


async def test_spool_list_messages_filters_by_state(
    spool: Spool, clock: FakeClock
) -> None:
    held, _ = await store(spool), await store(spool)
    await spool.hold(held, error="535")

    listed = await spool.list_messages(state=MessageState.HELD)

    assert [message.queue_id for message in listed] == [held]


async def test_spool_list_messages_in_acceptance_order(
    spool: Spool, clock: FakeClock
) -> None:
    queue_ids = []
    for _ in range(5):
        queue_ids.append(await store(spool))
        clock.now += 1

    listed = await spool.list_messages(limit=3)

    assert [message.queue_id for message in listed] == queue_ids[:3]


@BODY_PLACES
async def test_spool_delete_removes_row_and_body(spool: Spool, body: bytes) -> None:
    queue_id = await store(spool, body=body)

    deleted = await spool.delete(queue_id)

    assert (
        deleted,
        await spool.get(queue_id),
        await spool.has_body(queue_id),
        files_in_spool(spool.directory),
    ) == (True, None, False, [])


async def test_spool_delete_of_unknown_id_returns_false(spool: Spool) -> None:
    assert await spool.delete("0000000000000000") is False


@BODY_PLACES
async def test_spool_purge_failed_removes_only_old_failures(
    spool: Spool, clock: FakeClock, body: bytes
) -> None:
    old, recent, queued = (
        await store(spool, body=body),
        await store(spool),
        await store(spool),
    )
    await spool.claim_due(limit=2)
    await spool.fail(old, error="554")
    clock.now += 7 * 86_400
    await spool.fail(recent, error="554")

    purged = await spool.purge_failed(older_than=clock.now - 86_400)
    remaining = [message.queue_id for message in await spool.list_messages()]

    assert (purged, remaining, await spool.has_body(old)) == (
        1,
        [recent, queued],
        False,
    )


# Permissions


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_spool_body_files_are_private_even_with_an_open_umask(
    spool_dir: Path,
) -> None:
    previous_umask = os.umask(0)
    try:
        spool = Spool(spool_dir)
        await spool.open()
        queue_id = await store(spool, body=FILE_BODY)
        await spool.close()
    finally:
        os.umask(previous_umask)

    assert file_mode(spool.body_path(queue_id)) == 0o600


async def test_spool_directories_are_private(spool: Spool) -> None:
    directories = [
        spool.directory,
        spool.directory / "messages",
        spool.directory / "tmp",
    ]

    assert [file_mode(directory) for directory in directories] == [0o700] * 3


async def test_spool_database_files_are_private(spool: Spool) -> None:
    await store(spool)

    database_files = sorted(spool.directory.glob("spool.db*"))

    assert {path.name: file_mode(path) for path in database_files} == {
        path.name: 0o600 for path in database_files
    }


# Looking at a spool that a running daemon owns


async def test_spool_read_only_open_lists_beside_the_owner(spool: Spool) -> None:
    queue_id = await store(spool)

    onlooker = Spool(spool.directory)
    await onlooker.open(read_only=True)
    listed = await onlooker.list_messages()
    await onlooker.close()

    assert [message.queue_id for message in listed] == [queue_id]


async def test_spool_read_only_open_leaves_claimed_messages_alone(
    spool: Spool,
) -> None:
    queue_id = await store(spool)
    await spool.claim_due(limit=1)

    onlooker = Spool(spool.directory)
    await onlooker.open(read_only=True)
    await onlooker.close()
    message = await spool.get(queue_id)

    assert message is not None and message.state is MessageState.SENDING


async def test_spool_read_only_open_refuses_to_store(spool: Spool) -> None:
    onlooker = Spool(spool.directory)
    await onlooker.open(read_only=True)

    with pytest.raises(SpoolError, match="read-only"):
        await store(onlooker)
    await onlooker.close()


async def test_spool_read_only_open_of_a_missing_spool_raises(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="no mail spool"):
        await Spool(tmp_path / "nowhere").open(read_only=True)


async def test_spool_store_after_close_raises_spool_error(spool: Spool) -> None:
    await spool.close()

    with pytest.raises(SpoolError, match="closed"):
        await store(spool)


# Cancellation


@BODY_PLACES
@pytest.mark.parametrize("cancel_after", [0.0, 0.0005, 0.001, 0.002, 0.005])
async def test_spool_cancelled_stores_leave_no_body_without_a_row(
    spool: Spool, cancel_after: float, body: bytes
) -> None:
    stores = [asyncio.create_task(store(spool, body=body)) for _ in range(40)]
    await asyncio.sleep(cancel_after)
    for task in stores[::2]:
        task.cancel()
    await asyncio.gather(*stores, return_exceptions=True)

    spooled = [message.queue_id for message in await spool.list_messages(limit=100)]
    bodies = [await spool.read_body(queue_id) for queue_id in spooled]
    connection = sqlite3.connect(spool.directory / "spool.db")
    inline_ids = sorted(
        row[0] for row in connection.execute("SELECT queue_id FROM bodies")
    )
    connection.close()

    as_files = len(body) > INLINE_BODY_BYTES
    assert (
        files_in_spool(spool.directory),
        inline_ids,
        bodies,
    ) == (
        sorted(f"messages/{queue_id}" for queue_id in spooled) if as_files else [],
        [] if as_files else sorted(spooled),
        [body] * len(spooled),
    )


# Bodies in the database: room to work, and room given back


async def _spool_near_the_floor(spool_dir: Path) -> Spool:
    """An open spool 8 MB above its floor: inside the headroom the database
    needs for itself."""
    usage = os.statvfs(spool_dir.parent)
    free = usage.f_bavail * usage.f_frsize
    spool = Spool(spool_dir, min_free_bytes=free - 8 * 1024 * 1024)
    await spool.open()
    return spool


async def test_spool_near_the_floor_keeps_small_bodies_as_files(
    spool_dir: Path,
) -> None:
    spool = await _spool_near_the_floor(spool_dir)
    queue_id = await store(spool, body=SMALL_BODY)
    body = await spool.read_body(queue_id)
    await spool.close()

    assert (files_in_spool(spool_dir), body) == ([f"messages/{queue_id}"], SMALL_BODY)


async def test_spool_near_the_floor_copies_its_log_back_sooner(
    spool_dir: Path,
) -> None:
    spool = await _spool_near_the_floor(spool_dir)
    log_sizes = []
    for _ in range(80):
        await store(spool, body=SMALL_BODY)
        log_sizes.append((spool_dir / "spool.db-wal").stat().st_size)
    await spool.close()
    # Far from the floor the log would grow to 4 MB before being copied back.
    assert max(log_sizes) < 1_500_000, max(log_sizes)


async def test_spool_stores_more_body_bytes_at_once_than_one_commit_takes(
    spool: Spool,
) -> None:
    # 100 x 60 KB = 6 MB waiting together: more than one commit's share.
    bodies = [bytes([65 + n % 26]) * 60_000 for n in range(100)]

    queue_ids = await asyncio.wait_for(
        asyncio.gather(*(store(spool, body=body) for body in bodies)), timeout=60
    )

    assert [await spool.read_body(queue_id) for queue_id in queue_ids] == bodies


async def test_spool_gives_free_pages_back_once_the_queue_drains(spool: Spool) -> None:
    queue_ids = [
        await store(spool, body=bytes([65 + n % 26]) * 60_000) for n in range(200)
    ]
    database = spool.directory / "spool.db"

    def database_bytes() -> int:
        connection = sqlite3.connect(database)
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        connection.close()
        return int(pages * page_size)

    full = database_bytes()
    await spool.claim_due(limit=200)
    for queue_id in queue_ids:
        await spool.record_attempt(queue_id, delivered=["admin@example.com"])
    drained = database_bytes()

    # Less than 1 MB may stay free: that much is reused rather than given back.
    assert (full > 12_000_000, drained < 1_500_000) == (True, True), (full, drained)


async def test_spool_new_database_has_16_kb_pages(spool: Spool) -> None:
    connection = sqlite3.connect(spool.directory / "spool.db")
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    connection.close()
    assert page_size == 16 * 1024


async def test_spool_database_without_auto_vacuum_is_converted_at_open(
    spool: Spool, clock: FakeClock
) -> None:
    queue_id = await store(spool)
    await spool.close()
    connection = sqlite3.connect(spool.directory / "spool.db")
    connection.execute("PRAGMA auto_vacuum = NONE")
    connection.execute("VACUUM")
    before = connection.execute("PRAGMA auto_vacuum").fetchone()[0]
    connection.close()

    restarted = Spool(spool.directory, clock=clock)
    await restarted.open()
    body = await restarted.read_body(queue_id)
    await restarted.close()
    connection = sqlite3.connect(spool.directory / "spool.db")
    after = connection.execute("PRAGMA auto_vacuum").fetchone()[0]
    connection.close()

    assert (before, after, body) == (0, 2, SMALL_BODY)


async def test_spool_outcomes_recorded_at_once_each_get_their_own_result(
    spool: Spool,
) -> None:
    queue_ids = [
        await store(spool, recipients=["a@example.com", "b@example.com"])
        for _ in range(30)
    ]
    await spool.claim_due(limit=30)

    # Even ones all delivered, odd ones with b refused: one commit takes many.
    outcomes = await asyncio.gather(
        *(
            spool.record_attempt(
                queue_id,
                delivered=["a@example.com"]
                if n % 2
                else ["a@example.com", "b@example.com"],
                failed={"b@example.com": "550 5.1.1 User unknown"} if n % 2 else {},
            )
            for n, queue_id in enumerate(queue_ids)
        )
    )

    assert (
        [
            None if outcome is None else (outcome.queue_id, outcome.state)
            for outcome in outcomes
        ],
        [await spool.has_body(queue_id) for queue_id in queue_ids],
    ) == (
        [
            (queue_id, MessageState.FAILED) if n % 2 else None
            for n, queue_id in enumerate(queue_ids)
        ],
        [n % 2 == 1 for n in range(30)],
    )
