"""Talking to the service manager: the sd_notify(3) protocol, spoken directly.

systemd passes a datagram socket in ``NOTIFY_SOCKET`` (a file system path, or an
abstract socket name written with a leading ``@``) and, when ``WatchdogSec=`` is
set, the watchdog interval in ``WATCHDOG_USEC``. Each message is one datagram of
newline-separated ``KEY=VALUE`` assignments:

    READY=1       the listeners are bound and the spool is recovered
    STATUS=...    one line shown by ``systemctl status``
    WATCHDOG=1    the event loop is alive; must arrive within WATCHDOG_USEC
    RELOADING=1   a SIGHUP reload began; READY=1 follows when it is done
    STOPPING=1    an orderly shutdown began

Without ``NOTIFY_SOCKET`` (a terminal, the tests, another supervisor) every call is
a no-op; a notification that cannot be sent is logged and never raised, because
the relay must keep relaying when the manager is gone.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import structlog

log = structlog.get_logger(__name__)

# STATUS= is shown on one line of `systemctl status`; a longer text only wraps.
_STATUS_MAX_CHARACTERS: Final = 200
_SEND_TIMEOUT_SECONDS: Final = 1.0


@dataclass(frozen=True, kw_only=True)
class RelayStatus:
    """What the relay reports about itself: queue depth by state, the last error."""

    queue: Mapping[str, int] = field(default_factory=dict)
    held: bool = False
    last_error: str | None = None

    def describe(self) -> str:
        """One line for STATUS=: queue depth by state, then the last error."""
        depth = ", ".join(
            f"{self.queue.get(state, 0)} {state}"
            for state in ("queued", "sending", "deferred", "held", "failed")
        )
        text = f"{depth}; queue held" if self.held else depth
        text += f"; last error: {self.last_error}" if self.last_error else ""
        return " ".join(text.split())[:_STATUS_MAX_CHARACTERS]


class SystemdNotifier:
    """Sends sd_notify(3) messages to the service manager, if there is one."""

    def __init__(
        self, address: str | None, *, watchdog_interval: float | None = None
    ) -> None:
        self._address = _socket_address(address) if address else None
        self.watchdog_interval = watchdog_interval
        self._socket: socket.socket | None = None

    @classmethod
    def from_environment(
        cls, environment: Mapping[str, str] | None = None
    ) -> SystemdNotifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID as systemd sets them."""
        environment = os.environ if environment is None else environment
        return cls(
            environment.get("NOTIFY_SOCKET") or None,
            watchdog_interval=_watchdog_interval(environment),
        )

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening."""
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; False if it could not go."""
        if self._address is None:
            return False

        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                # A full manager queue must not stall the event loop for long.
                self._socket.settimeout(_SEND_TIMEOUT_SECONDS)
            self._socket.sendto(message, self._address)
        except OSError as exc:
            log.warning("service_notify_failed", error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup (or a reload) is complete."""
        return self.send("READY=1", *_status_line(status))

    def reloading(self) -> bool:
        """RELOADING=1, stamped with CLOCK_MONOTONIC as newer managers require."""
        stamp = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={stamp}")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown began; the manager waits for the exit."""
        return self.send("STOPPING=1", *_status_line(status))

    def status(self, text: str) -> bool:
        """STATUS=: the line `systemctl status` shows."""
        return self.send(*_status_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the process is alive and well."""
        return self.send("WATCHDOG=1")

    async def run_watchdog(self, *, healthy: Callable[[], bool]) -> None:
        """Ping at half the watchdog interval while `healthy()`; runs until cancelled.

        The pings come from the event loop itself, so a blocked loop misses them and
        the manager restarts the process. When `healthy()` turns false the pings
        stop too, for the same outcome.
        """
        if self._address is None or self.watchdog_interval is None:
            return

        interval = self.watchdog_interval / 2
        while True:
            if healthy():
                self.watchdog()
            else:
                log.error("service_watchdog_withheld", reason="relay unhealthy")
            await asyncio.sleep(interval)

    async def run_status_updates(
        self, *, status: Callable[[], Awaitable[RelayStatus]], interval: float
    ) -> None:
        """Send STATUS= every `interval` seconds; runs until cancelled."""
        if self._address is None:
            return

        while True:
            await asyncio.sleep(interval)
            try:
                current = await status()
            except Exception as exc:
                # A status line must never stop the relay, whatever went wrong.
                log.warning("service_status_unavailable", error=str(exc))
                continue
            self.status(current.describe())

    def close(self) -> None:
        """Release the socket; a later send opens a new one."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(address: str) -> str:
    # sd_notify(3): "@name" means the abstract namespace, which Python spells with
    # a leading NUL byte.
    return "\0" + address[1:] if address.startswith("@") else address


def _watchdog_interval(environment: Mapping[str, str]) -> float | None:
    """Seconds from WATCHDOG_USEC, if the watchdog is meant for this process."""
    microseconds = environment.get("WATCHDOG_USEC", "")
    if not microseconds.isdigit() or int(microseconds) == 0:
        return None
    # sd_watchdog_enabled(3): WATCHDOG_PID names the process the watchdog is for;
    # a child that inherited the environment must stay quiet.
    pid = environment.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(microseconds) / 1_000_000


def _status_line(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    return ("STATUS=" + " ".join(text.split())[:_STATUS_MAX_CHARACTERS],)
