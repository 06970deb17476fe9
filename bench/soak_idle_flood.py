"""Soak: hold thousands of idle SMTP connections open, measure the daemon's memory.

    .venv/bin/python -m bench.soak_idle_flood --connections 1000 2000 4000

For each count, starts `epp-mail-relay serve` with max_connections set to it,
opens that many idle connections (each reads the 220 greeting), checks that one
more is refused with 421 4.7.0, then closes them all and sends one message to
prove the relay still works. Reports the daemon's resident memory (VmRSS) before
and during the flood and its peak (VmHWM) from /proc. Bounded by the counts given
(each at most 15,000: the test and the daemon each need a descriptor per
connection).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from relay.sandbox.certs import SandboxPKI
from relay.sandbox.exchange import SandboxExchange
from tests.conftest import MAILBOX, PASSWORD, send_mail_async
from tests.daemon_harness import (
    DaemonProcess,
    FloodFigures,
    idle_flood,
    write_daemon_files,
)

MAX_CONNECTIONS = 15_000


async def measure(
    directory: Path, pki: SandboxPKI, count: int
) -> tuple[FloodFigures, int]:
    """Flood a fresh daemon with `count` idle connections; then send one message."""
    async with SandboxExchange(pki=pki, users={MAILBOX: PASSWORD}) as exchange:
        config_path, port = write_daemon_files(
            directory,
            pki=pki,
            exchange_port=exchange.port,
            overrides={"listen": {"max_connections": count, "idle_timeout": 120.0}},
        )
        daemon = DaemonProcess(config_path, port, directory / "output.txt")
        await daemon.start()
        try:
            figures = await asyncio.to_thread(idle_flood, daemon, count)
            code, _ = await send_mail_async(port)
            await exchange.wait_for_messages(1, timeout=15)
        finally:
            await daemon.kill(signal.SIGTERM)
            daemon.ensure_stopped()
    return figures, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()
    if max(arguments.connections) > MAX_CONNECTIONS:
        parser.error(f"at most {MAX_CONNECTIONS} connections")

    # The test side holds one descriptor per connection as well.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(arguments.connections) + 1000)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="soak-flood-") as scratch:
        directory = Path(scratch)
        pki = SandboxPKI.create(directory / "pki")
        for count in arguments.connections:
            figures, code = asyncio.run(
                measure(directory / f"relay-{count}", pki, count)
            )
            print(f"{figures.summary()}; a message afterwards: {code}")
            results.append(
                {
                    **dataclasses.asdict(figures),
                    "refused": figures.refused.decode(errors="replace").strip(),
                    "per_connection_kib": figures.per_connection_kib,
                    "after_flood_reply": code,
                }
            )
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
