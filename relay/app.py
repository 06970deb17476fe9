"""Assembles the daemon: configuration, log sink, spool, delivery and listener.

Also the daemon's side of the service manager: READY=1 once the spool is
recovered and every listener is bound, STATUS= and WATCHDOG=1 while it runs,
RELOADING=1 and READY=1 around a SIGHUP reload, STOPPING=1 at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

from relay.admin import AdminServer
from relay.config import (
    DaemonConfig,
    MailSettings,
    SettingsStore,
    apply_reloadable,
    load_daemon_config,
)
from relay.delivery import (
    DeliveryService,
    ModeSwitchingSink,
    PassThroughSink,
    SpoolingSink,
)
from relay.errors import ConfigError, OAuthError, RelayError, SpoolError
from relay.inbound import InboundServer, load_inbound_credentials, make_authenticator
from relay.logsink import REDACTOR, LogSink
from relay.metrics import RelayMetrics
from relay.service import RelayStatus, SystemdNotifier
from relay.spool import MessageState, Spool
from relay.testmail import NoAdminEmailError, send_test_email, sent_text
from relay.tokens import SignInResult, TokenSource
from relay.upstream import build_tls_context

log = structlog.get_logger(__name__)

# How often `systemctl status` gets a fresh queue line.
STATUS_INTERVAL_SECONDS = 10.0


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class RelayApp:
    """One running relay: start it, let it serve, stop it without losing mail."""

    def __init__(
        self, config: DaemonConfig, *, config_path: Path | None = None
    ) -> None:
        self.config = config
        # Where SIGHUP re-reads the configuration from; None: it is not re-read.
        self.config_path = config_path
        self.metrics = RelayMetrics()
        self.notifier = SystemdNotifier.from_environment()
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
        self.spool = Spool(
            config.paths.spool_dir, min_free_bytes=config.paths.spool_min_free_bytes
        )
        self.tls_context = build_tls_context(config.tls)
        recorder = self.metrics.counting_errors(self.sink)
        self._recorder = recorder
        self.tokens = TokenSource(
            settings=self.settings,
            oauth_config=config.oauth,
            cache_path=config.paths.token_cache,
            on_error=self._record_oauth_error,
        )
        self.metrics.watch_token_expiry(self._token_expires_at)
        self.delivery = DeliveryService(
            spool=self.spool,
            config=config,
            settings=self.settings,
            recorder=recorder,
            tls_context=self.tls_context,
            token_provider=self._access_token,
            metrics=self.metrics,
        )
        spooling = SpoolingSink(
            spool=self.spool, delivery=self.delivery, metrics=self.metrics
        )
        self.accepting = spooling
        passthrough = PassThroughSink(
            config=config,
            settings=self.settings,
            recorder=recorder,
            tls_context=self.tls_context,
            token_provider=self._access_token,
            # One mailbox, one set of limits, whichever mode sends.
            limits=self.delivery.limits,
        )
        self.passthrough = passthrough
        authenticator = None
        if config.listen.auth_credentials_file is not None:
            credentials = load_inbound_credentials(config.listen.auth_credentials_file)
            # Clients get AUTH wrong (a password typed as the user name, a raw
            # password instead of base64), and such lines are logged.
            for password in credentials.values():
                REDACTOR.add(password)
            authenticator = make_authenticator(credentials)
        self.inbound = InboundServer(
            config=config.listen,
            sink=ModeSwitchingSink(
                settings=self.settings, spooling=spooling, passthrough=passthrough
            ),
            authenticator=authenticator,
        )
        self.delivery.give_way_to(lambda: self.inbound.arriving.count)
        # Built here so that an unsafe token file stops the daemon as a config error.
        self.admin = (
            AdminServer(self, config=config.admin) if config.admin.enabled else None
        )
        self._stop = asyncio.Event()
        self._delivery_task: asyncio.Task[None] | None = None
        self._refresher_task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._reload_tasks: set[asyncio.Task[None]] = set()

    async def _access_token(self) -> str:
        """The upstream token provider; each secret it hands out is masked in logs."""
        token = await self.tokens.get_access_token()
        REDACTOR.add(token)
        for secret in self.tokens.manager().secrets():
            REDACTOR.add(secret)
        return token

    def _record_oauth_error(self, error: OAuthError) -> None:
        """A background refresh failed: one row, so the administrator sees it early."""
        self._recorder.record_error(error, settings=self.settings.current)

    async def begin_sign_in(self) -> str:
        """The authorization URL the administrator opens to sign in (Sign In).

        A failure (incomplete settings, an unknown tenant) is written as a row
        and raised again.
        """
        settings = self.settings.current
        try:
            return await self.tokens.manager().begin_sign_in()
        except RelayError as error:
            await asyncio.to_thread(
                self._recorder.record_error, error, settings=settings
            )
            raise

    async def complete_sign_in(self, redirect: str | Mapping[str, str]) -> SignInResult:
        """Finish a sign-in from its redirect; a held queue goes on at once.

        A failure is written as an oauth row and raised again for the caller to
        show SIGN_IN_FAILED_TEXT. A redirect that belongs to no pending sign-in
        writes no row: the callback is reachable without the admin token, and
        anyone could otherwise fill the Mail Server Logs tab.
        """
        settings = self.settings.current
        try:
            result = await self.tokens.manager().complete_sign_in(redirect)
        except RelayError as error:
            if not (isinstance(error, OAuthError) and error.error == "state_mismatch"):
                await asyncio.to_thread(
                    self._recorder.record_error, error, settings=settings
                )
            raise
        return await self._signed_in(result, settings)

    async def sign_in_with_device_code(
        self, *, on_prompt: Callable[[str], None]
    ) -> SignInResult:
        """Sign in with a device code (`on_prompt` gets Microsoft's instructions).

        Rows and the released hold as for `complete_sign_in`.
        """
        settings = self.settings.current
        try:
            result = await self.tokens.manager().sign_in_device_code(
                on_prompt=on_prompt
            )
        except RelayError as error:
            await asyncio.to_thread(
                self._recorder.record_error, error, settings=settings
            )
            raise
        return await self._signed_in(result, settings)

    async def sign_in_with_client_credentials(self) -> SignInResult:
        """Check that the app's own credentials get a token (no user signs in).

        Rows and the released hold as for `complete_sign_in`.
        """
        settings = self.settings.current
        try:
            await self._access_token()
        except RelayError as error:
            await asyncio.to_thread(
                self._recorder.record_error, error, settings=settings
            )
            raise
        result = SignInResult(
            mailbox=settings.username, matches_configured_username=True
        )
        return await self._signed_in(result, settings)

    async def _signed_in(
        self, result: SignInResult, settings: MailSettings
    ) -> SignInResult:
        """A sign-in worked: mask the new tokens, write the row, release the hold."""
        for secret in self.tokens.manager().secrets():
            REDACTOR.add(secret)
        message = result.message
        if not result.matches_configured_username:
            message += (
                f" Signed in as {result.mailbox}, not the configured username "
                f"{settings.username}."
            )
            log.warning(
                "signin_mailbox_mismatch",
                mailbox=result.mailbox,
                username=settings.username,
            )
        await asyncio.to_thread(
            self.sink.record_event,
            auth_type="oauth",
            status="success",
            message=message,
            settings=settings,
            category="oauth",
        )
        await self.delivery.release_hold()
        return result

    async def save_settings(self, settings: MailSettings) -> None:
        """Put new Mail Settings in effect (the admin page's Save), no restart.

        Delivery sees the new version at once; new settings release a held
        queue, because they may be the fix.
        """
        await asyncio.to_thread(self.settings.save, settings)
        self._register_secrets()
        self.delivery.wake()

    async def send_test_email(self) -> str:
        """Send the administrator's test e-mail now, outside the spool.

        Returns the address it went to. Raises NoAdminEmailError, or the
        RelayError of the failure after writing it as a row.
        """
        settings = self.settings.current
        token_provider = self._access_token if settings.auth_type == "oauth" else None
        try:
            address = await send_test_email(
                settings=settings,
                timeouts=self.config.timeouts,
                tls_context=self.tls_context,
                local_hostname=self.config.listen.hostname,
                token_provider=token_provider,
            )
        except NoAdminEmailError:
            raise
        except RelayError as error:
            await asyncio.to_thread(
                self._recorder.record_error, error, settings=settings
            )
            raise
        await asyncio.to_thread(
            self.sink.record_event,
            auth_type=settings.auth_type,
            status="success",
            message=sent_text(address),
            settings=settings,
            category="smtp",
        )
        return address

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
            # The addresses bound before the failing one must be let go too.
            await self.inbound.stop(grace=0)
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

        if self.admin is not None:
            try:
                await self.admin.start()
            except OSError as exc:
                await self.inbound.stop(grace=0)
                await self.spool.close()
                admin = self.config.admin
                where = f"port {admin.port} on {', '.join(admin.addresses)}"
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"admin {where} is already in use: choose another [admin] "
                        "port, or set [admin] enabled = false"
                    ) from exc
                raise StartupError(
                    f"cannot listen for admin on {where}: {exc}"
                ) from exc

        self._delivery_task = asyncio.create_task(
            self.delivery.run(self._stop), name="delivery"
        )
        self._refresher_task = asyncio.create_task(
            self.tokens.run_refresher(self._stop), name="token-refresher"
        )
        log.info("relay_started", port=self.inbound.port, pid=os.getpid())

    async def reload(self) -> None:
        """SIGHUP: re-read the configuration and Mail Settings, reopen the log file.

        Open SMTP sessions carry on. A configuration that does not load is
        ignored (the old one stays); parts that only a restart can change are
        named in the log.
        """
        async with self._reload_lock:
            self.notifier.reloading()
            applied, needs_restart = self._reload_daemon_config()
            try:
                self.settings.reload()
            except ConfigError as error:
                log.error("reload_failed", key=error.key, problem=error.problem)
            self._register_secrets()
            # A sign-in made by `epp-mail-relay signin` wrote the cache file.
            self.tokens.reload_cache()
            self.sink.reopen()
            self.delivery.wake()
            log.info(
                "relay_reloaded",
                config_applied=list(applied),
                config_needs_restart=list(needs_restart),
            )
            self.notifier.ready(status=await self._status_line())

    def _reload_daemon_config(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Apply what can change live from the configuration file."""
        if self.config_path is None:
            return (), ()
        try:
            new = load_daemon_config(self.config_path)
        except ConfigError as error:
            log.error("config_reload_failed", key=error.key, problem=error.problem)
            return (), ()

        self.config, applied, needs_restart = apply_reloadable(self.config, new)
        self.delivery.reconfigure(self.config)
        self.passthrough.reconfigure(self.config)
        self.tokens.reconfigure(self.config.oauth)
        if needs_restart:
            log.warning("config_needs_restart", sections=list(needs_restart))
        return applied, needs_restart

    async def status(self) -> RelayStatus:
        """Queue depth by state, hold and last error; refreshes the queue gauges."""
        # DELIVERED is always 0: the spool removes delivered messages.
        counts = {
            str(state): count
            for state, count in (await self.spool.counts_by_state()).items()
            if state is not MessageState.DELIVERED
        }
        held = self.delivery.held
        self.metrics.set_queue_depth(counts, held=held)
        error = self.delivery.last_error
        last_error = (
            REDACTOR.scrub(f"{error.category}: {error.message}") if error else None
        )
        return RelayStatus(queue=counts, held=held, last_error=last_error)

    def _token_expires_at(self) -> float | None:
        """When the OAuth access token runs out (Unix time), for /metrics."""
        status = self.tokens.status()
        return status.access_token_expires_at if status is not None else None

    async def _status_line(self) -> str | None:
        try:
            return (await self.status()).describe()
        except (SpoolError, RuntimeError) as exc:
            # The spool is closing: the line is only cosmetic.
            log.warning("status_unavailable", error=str(exc))
            return None

    def _healthy(self) -> bool:
        """Whether delivery still runs; the watchdog pings only while it does."""
        return self._delivery_task is not None and not self._delivery_task.done()

    async def _report_to_service_manager(self) -> None:
        """Watchdog pings and STATUS= lines for systemd, until cancelled."""
        await asyncio.gather(
            self.notifier.run_watchdog(healthy=self._healthy),
            self.notifier.run_status_updates(
                status=self.status, interval=STATUS_INTERVAL_SECONDS
            ),
        )

    def _reload_soon(self) -> None:
        task = asyncio.create_task(self.reload(), name="reload")
        # Held until done: the loop keeps only weak references to tasks.
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def stop(self) -> None:
        """Stop accepting, let delivery finish its current messages, close the spool."""
        if self.admin is not None:
            await self.admin.stop()
        await self.inbound.stop(grace=2.0)
        self._stop.set()
        for task in (self._delivery_task, self._refresher_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.spool.close()
        self.sink.close()
        log.info("relay_stopped")

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads; systemd hears each step."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        loop.add_signal_handler(signal.SIGINT, stopping.set)
        try:
            await self.start()
        except BaseException:
            _remove_signal_handlers(loop)
            raise
        # Only now: a reload needs an open spool, and SIGHUP before READY=1 has
        # no meaning to systemd.
        loop.add_signal_handler(signal.SIGHUP, self._reload_soon)
        # What start-up built lives as long as the daemon: keep the cyclic
        # garbage collector from walking it again at every full collection.
        gc.freeze()
        self.notifier.ready(status=await self._status_line())
        reporter = asyncio.create_task(
            self._report_to_service_manager(), name="service-manager"
        )
        try:
            await stopping.wait()
        finally:
            # A second signal during shutdown takes its default effect.
            _remove_signal_handlers(loop)
            self.notifier.stopping(status="shutting down")
            reporter.cancel()
            # Whatever ended the reporter, shutdown goes on.
            await asyncio.gather(reporter, return_exceptions=True)
            await self.stop()
            self.notifier.close()


def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(signum)
