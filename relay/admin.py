"""The admin HTTP server: metrics for Prometheus, status for the appliance.

A small aiohttp application bound to loopback ([admin] in the configuration).
Routes:

    GET /metrics      Prometheus text format; open to loopback peers, token otherwise
    GET /api/status   queue depth by state, hold, last error (JSON); token

Authentication is one bearer token kept in ``admin.token_file`` (mode 0600,
created with a random value on first start): ``Authorization: Bearer <token>``.
/metrics needs no token from a loopback peer, because a Prometheus agent on the
host should not need a secret to read numbers that hold none; a peer on any other
address (an operator who bound the server elsewhere) must present the token.

New routes are protected by default; `loopback_public` marks a handler that a
loopback peer may call without the token.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.config import AdminConfig, check_private_file
from relay.errors import ConfigError
from relay.logsink import REDACTOR

if TYPE_CHECKING:
    from relay.app import RelayApp

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RELAY_APP: Final[web.AppKey[RelayApp]] = web.AppKey("relay_app")
ADMIN_TOKEN: Final = web.AppKey("admin_token", str)

_LOOPBACK_PUBLIC: Final = "_relay_loopback_public"
_TOKEN_BYTES: Final = 32
_SHUTDOWN_SECONDS: Final = 2.0


def loopback_public(handler: Handler) -> Handler:
    """Let loopback peers call `handler` without the bearer token."""
    setattr(handler, _LOOPBACK_PUBLIC, True)
    return handler


def load_or_create_token(path: Path) -> str:
    """The admin bearer token from `path`, created (0600, random) when missing.

    Raises ConfigError when the file can be read by other users or is empty.
    """
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        try:
            descriptor = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except FileExistsError:
            # Another process created it first; use theirs.
            return load_or_create_token(path)
        try:
            os.write(descriptor, (token + "\n").encode("ascii"))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        REDACTOR.add(token)
        return token

    check_private_file(path, key="admin.token_file")
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError("admin.token_file", f"{path} is empty")
    REDACTOR.add(token)
    return token


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse requests without the bearer token, except public routes on loopback."""
    route_handler = request.match_info.route.handler
    if getattr(route_handler, _LOOPBACK_PUBLIC, False) and _is_loopback(request.remote):
        return await handler(request)

    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    expected = request.app[ADMIN_TOKEN]
    # compare_digest: the time taken must not tell how much of the token matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        supplied.strip().encode(), expected.encode()
    ):
        raise web.HTTPUnauthorized(
            text="A valid admin token is required.\n",
            headers={"WWW-Authenticate": 'Bearer realm="epp-mail-relay"'},
        )
    return await handler(request)


@loopback_public
async def metrics_page(request: web.Request) -> web.Response:
    """GET /metrics: every metric of the relay, with the queue counted just now."""
    relay_app = request.app[RELAY_APP]
    await relay_app.status()
    return web.Response(
        body=generate_latest(relay_app.metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


async def status_page(request: web.Request) -> web.Response:
    """GET /api/status: the STATUS= line's facts as JSON."""
    status = await request.app[RELAY_APP].status()
    return web.json_response(
        {
            "queue": dict(status.queue),
            "held": status.held,
            "last_error": status.last_error,
            "summary": status.describe(),
        }
    )


def create_admin_app(
    relay_app: RelayApp, *, token: str | None = None
) -> web.Application:
    """The admin aiohttp application for `relay_app`.

    `token` defaults to the one in the configured token file (created if missing).
    """
    if token is None:
        token = load_or_create_token(relay_app.config.admin.token_file)

    application = web.Application(middlewares=[require_token])
    application[RELAY_APP] = relay_app
    application[ADMIN_TOKEN] = token
    application.router.add_get("/metrics", metrics_page)
    application.router.add_get("/api/status", status_page)
    return application


class AdminServer:
    """The admin application listening on the configured loopback addresses."""

    def __init__(self, relay_app: RelayApp, *, config: AdminConfig) -> None:
        self._config = config
        # Read now, so that a bad token file stops the daemon before it binds.
        self.application = create_admin_app(
            relay_app, token=load_or_create_token(config.token_file)
        )
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Bind every address; port 0 picks one free port shared by all of them.

        Raises OSError (EADDRINUSE, EACCES) as the socket layer reports it.
        """
        # No access log: a scrape every few seconds would bury the journal. A short
        # shutdown timeout: systemd's stop timeout is the relay's, not aiohttp's.
        runner = web.AppRunner(
            self.application, access_log=None, shutdown_timeout=_SHUTDOWN_SECONDS
        )
        await runner.setup()
        port = self._config.port
        try:
            for address in self._config.addresses:
                site = web.TCPSite(runner, address, port, reuse_address=True)
                await site.start()
                if port == 0:
                    port = _bound_port(runner)
        except BaseException:
            await runner.cleanup()
            raise

        self._runner = runner
        self.port = port

    async def stop(self) -> None:
        """Close the listeners and finish the requests in flight."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


def _is_loopback(remote: str | None) -> bool:
    if remote is None:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback
