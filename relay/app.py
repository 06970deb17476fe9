"""Assembles the daemon: configuration, log sink, spool, delivery and listener."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal

import structlog

from relay.config import DaemonConfig, SettingsStore
from relay.delivery import (
    DeliveryService,
    ModeSwitchingSink,
    PassThroughSink,
    SpoolingSink,
)
from relay.errors import ConfigError, SpoolError
from relay.inbound import InboundServer, load_inbound_credentials, make_authenticator
from relay.logsink import REDACTOR, LogSink
from relay.spool import Spool
from relay.upstream import build_tls_context

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class RelayApp:
    """One running relay: start it, let it serve, stop it without losing mail."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.settings = SettingsStore(config.paths.settings_file)
        self._register_secrets()
        self.sink = LogSink(
            log_file=config.paths.log_file,
            database=config.paths.database,
            dedupe_window=config.logs.dedupe_window,
            retention_days=config.logs.retention_days,
            max_rows=config.logs.max_rows,
            syslog=config.logs.syslog,
        )
        self.spool = Spool(config.paths.spool_dir)
        self.tls_context = build_tls_context(config.tls)
        self.delivery = DeliveryService(
            spool=self.spool,
            config=config,
            settings=self.settings,
            recorder=self.sink,
            tls_context=self.tls_context,
        )
        spooling = SpoolingSink(spool=self.spool, delivery=self.delivery)
        self.accepting = spooling
        passthrough = PassThroughSink(
            config=config,
            settings=self.settings,
            recorder=self.sink,
            tls_context=self.tls_context,
        )
        authenticator = None
        if config.listen.auth_credentials_file is not None:
            authenticator = make_authenticator(
                load_inbound_credentials(config.listen.auth_credentials_file)
            )
        self.inbound = InboundServer(
            config=config.listen,
            sink=ModeSwitchingSink(
                settings=self.settings, spooling=spooling, passthrough=passthrough
            ),
            authenticator=authenticator,
        )
        self._stop = asyncio.Event()
        self._delivery_task: asyncio.Task[None] | None = None

    def _register_secrets(self) -> None:
        current = self.settings.current
        for secret in (current.password, current.client_secret):
            REDACTOR.add(secret)

    async def start(self) -> None:
        """Recover the spool, then bind the listeners; raises StartupError."""
        try:
            recovered = await self.spool.open()
        except (OSError, SpoolError) as exc:
            raise StartupError(
                f"spool directory {self.config.paths.spool_dir} is not usable: {exc}"
            ) from exc
        if recovered:
            log.info("spool_recovered", messages=recovered)

        try:
            await self.inbound.start()
        except OSError as exc:
            await self.spool.close()
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {self.config.listen.port} is already in use on "
                    f"{', '.join(self.config.listen.addresses)}: is another mail "
                    "server running?"
                ) from exc
            if exc.errno == errno.EACCES:
                raise StartupError(
                    f"not allowed to bind port {self.config.listen.port}: run as root "
                    "or grant CAP_NET_BIND_SERVICE"
                ) from exc
            raise StartupError(f"cannot listen: {exc}") from exc

        self._delivery_task = asyncio.create_task(
            self.delivery.run(self._stop), name="delivery"
        )
        log.info("relay_started", port=self.inbound.port, pid=os.getpid())

    async def reload(self) -> None:
        """SIGHUP: re-read the Mail Settings and reopen the log file."""
        try:
            self.settings.reload()
        except ConfigError as error:
            log.error("reload_failed", key=error.key, problem=error.problem)
        self._register_secrets()
        self.sink.reopen()
        self.delivery.wake()
        log.info("relay_reloaded")

    async def stop(self) -> None:
        """Stop accepting, let delivery finish its current messages, close the spool."""
        await self.inbound.stop(grace=2.0)
        self._stop.set()
        if self._delivery_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._delivery_task
        await self.spool.close()
        self.sink.close()
        log.info("relay_stopped")

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        loop.add_signal_handler(signal.SIGINT, stopping.set)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(self.reload())
        )
        await self.start()
        try:
            await stopping.wait()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            await self.stop()
