"""The benchmark's upstream server: the sandbox Exchange on loopback, counting only.

STARTTLS and AUTH PLAIN/LOGIN as Exchange Online speaks them, with its limits
lifted (or set, for the pacing run). Two changes make it fit to sink thousands of
messages: it keeps counts instead of the messages, and it reads each body in
large blocks up to the terminator; the test sandbox reads bodies line by line,
which would make the sink the bottleneck of every run it takes part in.

Run by bench/run.py: `python bench/sink.py --directory DIR [limits]`. It writes
DIR/sink.json (port, CA file) once listening, then DIR/sink-status.json (counts)
every 50 ms until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

from relay.sandbox import exchange as sandbox
from relay.sandbox.certs import SandboxPKI

MAILBOX = "relay@contoso.test"
PASSWORD = "bench-password-not-secret"  # noqa: S105 (a loopback sink's fixed password)
_STATUS_INTERVAL = 0.05


class CountingExchange(sandbox.SandboxExchange):
    """The sandbox Exchange keeping counts, not messages."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.accepted = 0
        self.accepted_bytes = 0

    async def _accept_message(self, message: sandbox.ReceivedMessage) -> str:
        self.accepted += 1
        self.accepted_bytes += len(message.data)
        self.messages.clear()
        self.transcript.clear()
        return await super()._accept_message(message)


async def _read_body_in_blocks(self: Any) -> tuple[bytes, int]:
    """Read up to CRLF "." CRLF in blocks; a sink needs the size, not the bytes."""
    reader: asyncio.StreamReader = self._reader
    size = 0
    while True:
        try:
            block = await reader.readuntil(b"\r\n.\r\n")
        except asyncio.LimitOverrunError as exc:
            size += len(await reader.read(exc.consumed))
            continue
        except (asyncio.IncompleteReadError, OSError) as exc:
            raise sandbox._CloseConnection from exc
        return b"", size + len(block) - 3


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--directory", type=Path, required=True)
    parser.add_argument("--max-sessions-per-user", type=int, default=1000)
    parser.add_argument("--messages-per-minute", type=int, default=None)
    parser.add_argument("--rate-window", type=float, default=60.0)
    parser.add_argument("--max-message-size", type=int, default=64 * 1024 * 1024)
    arguments = parser.parse_args()

    sandbox._Session._receive_message_body = _read_body_in_blocks  # type: ignore[method-assign]
    directory: Path = arguments.directory
    pki = SandboxPKI.create(directory / "pki")
    server = CountingExchange(
        pki=pki,
        users={MAILBOX: PASSWORD},
        max_sessions_per_user=arguments.max_sessions_per_user,
        messages_per_minute=arguments.messages_per_minute,
        rate_window=arguments.rate_window,
        max_message_size=arguments.max_message_size,
        max_sessions=1000,
        max_recipients_per_message=1000,
    )
    await server.start()
    (directory / "sink.json").write_text(
        json.dumps({"port": server.port, "ca_file": str(pki.ca_file)})
    )

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    status_file = directory / "sink-status.json"
    temporary = directory / ".sink-status.tmp"
    while not stop.is_set():
        temporary.write_text(
            json.dumps(
                {
                    "accepted": server.accepted,
                    "accepted_bytes": server.accepted_bytes,
                    "replies_432": server.replies_sent[432],
                    "throttled": server.throttled_count,
                    "sender_limit_rejections": server.sender_limit_rejections,
                    "max_sessions": max(
                        server.max_concurrent_sessions_seen.values(), default=0
                    ),
                    "internal_errors": len(server.internal_errors),
                }
            )
        )
        os.replace(temporary, status_file)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=_STATUS_INTERVAL)
    await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
