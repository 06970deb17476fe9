"""The CLI's side of the admin API: calls to the running daemon, and Sign In.

The daemon's address comes from the [admin] section of its configuration and
the bearer token from its token file, so whoever may read that file (root, the
relay's user) may run these commands. No proxy from the environment is used:
the calls go to loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from relay.admin import CALLBACK_PATH, read_token
from relay.config import DaemonConfig
from relay.errors import ConfigError
from relay.tokens import SIGN_IN_FAILED_TEXT, SIGN_IN_LIFETIME

# Long enough for a test e-mail over a slow upstream (connect, TLS, AUTH, DATA).
REQUEST_TIMEOUT_SECONDS: Final = 180.0
SIGN_IN_POLL_SECONDS: Final = 1.0
LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})


class AdminUnreachable(ConnectionError):
    """The daemon's admin server does not answer."""


@dataclass(frozen=True)
class ApiAnswer:
    """One answer of the admin API: the HTTP status and the JSON body."""

    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def message(self) -> str:
        return str(self.body.get("message") or f"HTTP {self.status}")

    @property
    def reason(self) -> str | None:
        reason = self.body.get("reason")
        return str(reason) if reason else None


def admin_base_url(config: DaemonConfig) -> str:
    """http://ADDRESS:PORT of the admin server the configuration describes."""
    admin = config.admin
    if not admin.enabled:
        raise ConfigError("admin.enabled", "is false: the daemon has no admin API")
    if admin.port == 0:
        raise ConfigError(
            "admin.port", "is 0 (chosen at start); give the address with --admin-url"
        )
    host = admin.addresses[0]
    # A wildcard bind is reached on loopback.
    if host in ("0.0.0.0", "::"):  # noqa: S104 - compared, never bound
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{admin.port}"


class AdminClient:
    """Calls one daemon's admin API with its bearer token."""

    def __init__(
        self, base_url: str, token: str, *, timeout: float = REQUEST_TIMEOUT_SECONDS
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout

    @classmethod
    def from_config(
        cls, config: DaemonConfig, *, admin_url: str | None = None
    ) -> AdminClient:
        """The client for the daemon that `config` describes; raises ConfigError."""
        base_url = admin_url or admin_base_url(config)
        return cls(base_url, read_token(config.admin.token_file))

    async def call(self, method: str, path: str, *, json: Any = None) -> ApiAnswer:
        """One API call; raises AdminUnreachable when nobody answers."""
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(
                    method, self.base_url + path, json=json, headers=headers
                ) as response,
            ):
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = {"message": (await response.text()).strip()}
                if not isinstance(body, dict):
                    body = {"message": str(body)}
                return ApiAnswer(response.status, body)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise AdminUnreachable(
                f"the relay's admin server at {self.base_url} does not answer "
                f"({type(exc).__name__}): is the daemon running?"
            ) from exc


# -- Sign In -----------------------------------------------------------------------


@dataclass(frozen=True)
class LoopbackRedirect:
    """A redirect URI this machine can receive on: http, a loopback host."""

    host: str
    port: int
    path: str


def loopback_redirect(redirect_uri: str) -> LoopbackRedirect | None:
    """Where to listen for the redirect, or None when it goes elsewhere."""
    try:
        parts = urlsplit(redirect_uri)
        port = parts.port or 80
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if parts.scheme != "http" or host not in LOOPBACK_NAMES:
        return None
    return LoopbackRedirect(host=host, port=port, path=parts.path or "/")


def is_daemon_callback(redirect: LoopbackRedirect, base_url: str) -> bool:
    """Whether the redirect goes to the daemon's own /oauth/callback."""
    parts = urlsplit(base_url)
    daemon_host = (parts.hostname or "").lower()
    same_host = daemon_host == redirect.host or (
        _is_loopback_name(daemon_host) and _is_loopback_name(redirect.host)
    )
    return same_host and parts.port == redirect.port and redirect.path == CALLBACK_PATH


def _is_loopback_name(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def receive_redirect(
    redirect: LoopbackRedirect,
    *,
    complete: Callable[[str], Any],
    timeout: float = SIGN_IN_LIFETIME,
) -> ApiAnswer:
    """Listen on exactly the redirect URI's host and port for the browser.

    The first request to the redirect path is handed to `complete` (the whole
    URL, as the browser had it); its answer is shown to the browser and
    returned. Raises TimeoutError when no browser comes, OSError when the
    address cannot be bound.
    """
    outcome: asyncio.Future[ApiAnswer] = asyncio.get_running_loop().create_future()

    async def handle(request: web.Request) -> web.Response:
        if request.path != redirect.path or outcome.done():
            raise web.HTTPNotFound()
        host = f"[{redirect.host}]" if ":" in redirect.host else redirect.host
        url = f"http://{host}:{redirect.port}{request.path_qs}"
        answer: ApiAnswer = await complete(url)
        if not outcome.done():
            outcome.set_result(answer)
        return _browser_page(answer)

    application = web.Application()
    application.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(application, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, redirect.host, redirect.port)
        await site.start()
        async with asyncio.timeout(timeout):
            return await outcome
    finally:
        # Give the browser its page before the listener goes away.
        with contextlib.suppress(Exception):
            await asyncio.sleep(0.2)
        await runner.cleanup()


def _browser_page(answer: ApiAnswer) -> web.Response:
    message = answer.message if answer.body else SIGN_IN_FAILED_TEXT
    detail = f"<p>{html.escape(answer.reason)}</p>" if answer.reason else ""
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>Sign In</title></head><body>"
        f"<h1>E-mail Authorization</h1><p>{html.escape(message)}</p>{detail}"
        "<p>You can close this window.</p></body></html>"
    )
    return web.Response(
        text=page,
        content_type="text/html",
        headers={"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"},
    )
