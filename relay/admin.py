"""The admin HTTP server: the Mail Settings page, its JSON API, metrics, status.

A small aiohttp application bound to loopback ([admin] in the configuration).

    GET    /                         the Mail Settings page (static files, public)
    GET    /static/{name}            its script and style sheet (public)
    POST   /api/session              log in with the admin token: session cookie
    GET    /api/session              the session's CSRF token
    DELETE /api/session              log out
    GET    /api/status               queue by state, hold, last error, sign-in
    GET    /api/settings             Mail Settings; secrets only as "..._set"
    POST   /api/settings             save (fields left out keep their value)
    POST   /api/test-email           send the test e-mail now, not via the spool
    POST   /api/signin               start Sign In (authorization URL, device code)
    GET    /api/signin               the state of the last Sign In
    POST   /api/signin/complete      finish Sign In from a pasted redirect URL
    GET    /oauth/callback           redirect URI target: finishes Sign In (public)
    GET    /api/logs                 Mail Server Logs rows, newest first, paged
    GET    /api/queue                queued messages
    POST   /api/queue/retry          retry every deferred or held message now
    POST   /api/queue/release        release a held queue
    POST   /api/queue/{id}/retry     retry one message now
    DELETE /api/queue/{id}           delete one message
    GET    /metrics                  Prometheus; open to loopback peers

Authentication. The admin token is kept in ``admin.token_file`` (mode 0600,
created with a random value on first start); whoever can read that file is the
administrator. Programs (the CLI, the appliance's back end) send it on every
call as ``Authorization: Bearer <token>``; a browser cannot be made to add that
header by another site, so bearer calls need nothing more.

The page instead presents the token once (POST /api/session) and gets a session
cookie (HttpOnly, SameSite=Strict, 12 hours at most, 30 minutes idle) plus a
CSRF token for that session. A state-changing call authenticated by the cookie
must carry the CSRF token in ``X-CSRF-Token`` and, when the browser sends an
Origin, come from this server's own origin; otherwise it gets 403. The CSRF
token is only ever returned in a JSON body, which another origin cannot read.

Requests whose Host header is neither an IP address nor ``localhost`` get 421,
so a web page that re-points its own DNS name at 127.0.0.1 (DNS rebinding)
cannot talk to the server as a same-origin page.

Public routes: the static page files (they hold no data), the login, and the
OAuth redirect target, which the browser reaches from Microsoft's sign-in page
without any credential of ours; it is protected by the single-use ``state`` of a
sign-in started by an authenticated administrator. /metrics is open to loopback
peers (`loopback_public`). Everything else, new routes included, needs a token
or a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import importlib.resources
import ipaddress
import json
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.config import (
    SECRET_FIELDS,
    AdminConfig,
    MailSettings,
    check_private_file,
    parse_mail_settings,
)
from relay.errors import Category, ConfigError, OAuthError, RelayError
from relay.logsink import REDACTOR
from relay.spool import MessageState, QueuedMessage
from relay.testmail import (
    NO_ADMIN_EMAIL_TEXT,
    TEST_EMAIL_FAILED_TEXT,
    NoAdminEmailError,
    sent_text,
)
from relay.tokens import SIGN_IN_FAILED_TEXT, SIGN_IN_OK_TEXT, SignInResult

if TYPE_CHECKING:
    from relay.app import RelayApp

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SETTINGS_SAVED_TEXT: Final = "Changes have been saved!"
COMMAND_FAILED_TEXT: Final = "Cannot execute command! An error occurred!"
OAUTH_DEFAULT_HOSTNAME: Final = "smtp.office365.com"
CALLBACK_PATH: Final = "/oauth/callback"
SESSION_COOKIE: Final = "epp_admin_session"
CSRF_HEADER: Final = "X-CSRF-Token"

RELAY_APP: Final[web.AppKey[RelayApp]] = web.AppKey("relay_app")
ADMIN_TOKEN: Final = web.AppKey("admin_token", str)

_ACCESS: Final = "_relay_admin_access"
_PUBLIC: Final = "public"
_LOOPBACK_PUBLIC: Final = "loopback_public"
_TOKEN_BYTES: Final = 32
_SHUTDOWN_SECONDS: Final = 2.0
# Request bodies are a few settings at most; anything bigger is refused (413).
_MAX_BODY_BYTES: Final = 64 * 1024
_MAX_REDIRECT_URL_CHARACTERS: Final = 16 * 1024
_SESSION_IDLE_SECONDS: Final = 30 * 60.0
_SESSION_MAX_SECONDS: Final = 12 * 3600.0
_MAX_SESSIONS: Final = 32
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_LOG_ROWS: Final = 500
_MAX_OFFSET: Final = 1_000_000
_MAX_QUEUE_LISTING: Final = 1000
_QUEUE_ID: Final = re.compile(r"[0-9A-Za-z]{1,64}")
# How long POST /api/signin waits for Entra's device code before answering.
_DEVICE_PROMPT_WAIT_FACTOR: Final = 2

# Nothing but our own files: no inline script, no other origin, no framing.
_CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
_STATIC_FILES: Final = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}


def loopback_public(handler: Handler) -> Handler:
    """Let loopback peers call `handler` without the bearer token."""
    setattr(handler, _ACCESS, _LOOPBACK_PUBLIC)
    return handler


def public(handler: Handler) -> Handler:
    """Let anyone call `handler`: it must hold no data and change nothing by itself."""
    setattr(handler, _ACCESS, _PUBLIC)
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

    return read_token(path)


def read_token(path: Path) -> str:
    """The admin token from an existing private file (the CLI never creates one).

    Raises ConfigError when the file is missing, readable by others, or empty.
    """
    check_private_file(path, key="admin.token_file")
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError("admin.token_file", f"{path} is empty")
    REDACTOR.add(token)
    return token


# -- sessions of the page ---------------------------------------------------------


@dataclass
class AdminSession:
    """One logged-in page: its cookie value's partner, the CSRF token."""

    csrf_token: str
    created_at: float
    last_used_at: float


class SessionStore:
    """The page's sessions, in memory: a restart logs every page out."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: dict[str, AdminSession] = {}

    def create(self) -> tuple[str, AdminSession]:
        """A new session; the oldest is dropped when there are too many."""
        self._expire()
        while len(self._sessions) >= _MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda key: self._sessions[key].created_at)
            del self._sessions[oldest]
        now = self._clock()
        session_id = secrets.token_urlsafe(_TOKEN_BYTES)
        session = AdminSession(
            csrf_token=secrets.token_urlsafe(_TOKEN_BYTES),
            created_at=now,
            last_used_at=now,
        )
        self._sessions[session_id] = session
        return session_id, session

    def find(self, session_id: str | None) -> AdminSession | None:
        """The live session for a cookie value, its idle clock restarted."""
        if not session_id:
            return None
        self._expire()
        session = self._sessions.get(session_id)
        if session is not None:
            session.last_used_at = self._clock()
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def _expire(self) -> None:
        now = self._clock()
        for session_id, session in list(self._sessions.items()):
            if (
                now - session.last_used_at > _SESSION_IDLE_SECONDS
                or now - session.created_at > _SESSION_MAX_SECONDS
            ):
                del self._sessions[session_id]


SESSIONS: Final = web.AppKey("admin_sessions", SessionStore)
# The page session a request came with; absent for bearer-token calls.
REQUEST_SESSION: Final = web.RequestKey("admin_session", AdminSession)


# -- the state of Sign In -----------------------------------------------------------


@dataclass
class SignInTracker:
    """What the last Sign In did, for the page and the CLI to poll."""

    state: str = "idle"
    flow: str | None = None
    message: str | None = None
    reason: str | None = None
    prompt: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def pending(self, flow: str, *, prompt: str | None = None) -> None:
        self.state, self.flow, self.prompt = "pending", flow, prompt
        self.message = self.reason = None

    def succeeded(self, result: SignInResult) -> None:
        self.state, self.message, self.reason = "complete", result.message, None
        self.prompt = None

    def failed(self, error: RelayError) -> None:
        self.state, self.message = "failed", SIGN_IN_FAILED_TEXT
        self.reason = REDACTOR.scrub(error.message)
        self.prompt = None

    def cancel_task(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.task = None

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "flow": self.flow,
            "message": self.message,
            "reason": self.reason,
            "prompt": self.prompt,
        }


SIGN_IN: Final = web.AppKey("sign_in", SignInTracker)


# -- errors as the API answers them ------------------------------------------------


class ApiError(Exception):
    """An answer other than success, with the text the administrator sees."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        reason: str | None = None,
        category: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.reason = reason
        self.category = category

    def response(self) -> web.Response:
        body: dict[str, Any] = {"message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.reason is not None:
            body["reason"] = self.reason
        if self.category is not None:
            body["category"] = self.category
        return web.json_response(body, status=self.status)


def _invalid(field: str | None, reason: str, *, status: int = 400) -> ApiError:
    return ApiError(status, COMMAND_FAILED_TEXT, field=field, reason=reason)


# -- middleware --------------------------------------------------------------------


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admit a request by route access, bearer token, or session plus CSRF token.

    Also refuses foreign Host headers and turns ApiError into its JSON answer.
    """
    if not _host_is_allowed(request.headers.get("Host")):
        raise web.HTTPMisdirectedRequest(
            text="Reach the admin server by IP address or localhost.\n"
        )

    access = getattr(request.match_info.route.handler, _ACCESS, None)
    admitted = access == _PUBLIC or (
        access == _LOOPBACK_PUBLIC and _is_loopback(request.remote)
    )
    if not admitted and not _has_bearer_token(request):
        session = request.app[SESSIONS].find(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise web.HTTPUnauthorized(
                text="A valid admin token is required.\n",
                headers={"WWW-Authenticate": 'Bearer realm="epp-mail-relay"'},
            )
        request[REQUEST_SESSION] = session

    try:
        session = request.get(REQUEST_SESSION)
        if session is not None and request.method not in _SAFE_METHODS:
            _check_csrf(request, session)
        return await handler(request)
    except ApiError as error:
        return error.response()


def _has_bearer_token(request: web.Request) -> bool:
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    expected = request.app[ADMIN_TOKEN]
    # compare_digest: the time taken must not tell how much of the token matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        supplied.strip().encode(), expected.encode()
    )


def _check_csrf(request: web.Request, session: AdminSession) -> None:
    """A cookie alone never changes anything: the page's own header must come too."""
    supplied = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(supplied.encode(), session.csrf_token.encode()):
        raise ApiError(403, COMMAND_FAILED_TEXT, reason="the CSRF token is missing")
    if not _same_origin(request):
        raise ApiError(403, COMMAND_FAILED_TEXT, reason="the request is cross-origin")


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


async def _add_security_headers(
    request: web.Request, response: web.StreamResponse
) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", _CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    # The callback URL carries the authorization code: never pass it on.
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("Cache-Control", "no-store")


# -- the page ----------------------------------------------------------------------


@public
async def index_page(request: web.Request) -> web.Response:
    """GET /: the Mail Settings page (it asks for the admin token itself)."""
    return _static_response("index.html")


@public
async def static_file(request: web.Request) -> web.Response:
    """GET /static/{name}: the page's script and style sheet."""
    name = request.match_info["name"]
    if name not in _STATIC_FILES or name == "index.html":
        raise web.HTTPNotFound()
    return _static_response(name)


def _static_response(name: str) -> web.Response:
    data = importlib.resources.files("relay").joinpath("web", name).read_bytes()
    return web.Response(body=data, content_type=_STATIC_FILES[name], charset="utf-8")


# -- sessions ----------------------------------------------------------------------


@public
async def create_session(request: web.Request) -> web.Response:
    """POST /api/session {"token": ...}: a session cookie and its CSRF token."""
    if not _same_origin(request):
        raise ApiError(403, COMMAND_FAILED_TEXT, reason="the request is cross-origin")
    body = await _json_object(request)
    token = body.get("token")
    if not isinstance(token, str) or not hmac.compare_digest(
        token.strip().encode(), request.app[ADMIN_TOKEN].encode()
    ):
        raise ApiError(401, "The admin token is not valid.")

    session_id, session = request.app[SESSIONS].create()
    response = web.json_response({"csrf_token": session.csrf_token})
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=int(_SESSION_MAX_SECONDS),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


async def read_session(request: web.Request) -> web.Response:
    """GET /api/session: the CSRF token of the page's session (after a reload)."""
    session = request.get(REQUEST_SESSION)
    if session is None:
        raise ApiError(400, COMMAND_FAILED_TEXT, reason="no page session in use")
    return web.json_response({"csrf_token": session.csrf_token})


async def delete_session(request: web.Request) -> web.Response:
    """DELETE /api/session: log the page out."""
    request.app[SESSIONS].drop(request.cookies.get(SESSION_COOKIE))
    response = web.json_response({"message": "Logged out."})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


# -- status and metrics -----------------------------------------------------------


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
    """GET /api/status: queue by state, hold, last error, sign-in and token expiry."""
    relay_app = request.app[RELAY_APP]
    status = await relay_app.status()
    hold_reason = relay_app.delivery.hold_reason
    return web.json_response(
        {
            "queue": dict(status.queue),
            "held": status.held,
            "hold_reason": (
                REDACTOR.scrub(hold_reason.message) if hold_reason else None
            ),
            "last_error": status.last_error,
            "summary": status.describe(),
            "auth_type": relay_app.settings.current.auth_type,
            "sign_in": _sign_in_status(relay_app),
        }
    )


def _sign_in_status(relay_app: RelayApp) -> dict[str, Any]:
    settings = relay_app.settings.current
    if settings.auth_type != "oauth":
        return {
            "required": False,
            "signed_in": None,
            "mailbox": None,
            "access_token_expires_at": None,
        }
    token_status = relay_app.tokens.status()
    signed_in = token_status is not None and token_status.signed_in
    expires_at = token_status.access_token_expires_at if token_status else None
    return {
        "required": not signed_in,
        "signed_in": signed_in,
        "mailbox": token_status.mailbox if token_status else None,
        "access_token_expires_at": _iso_time(expires_at),
    }


# -- Mail Settings ------------------------------------------------------------------


def settings_view(settings: MailSettings) -> dict[str, Any]:
    """The settings as the page and the CLI see them: secrets only as set or not."""
    values = settings.to_json_dict()
    for name in sorted(SECRET_FIELDS):
        del values[name]
        values[f"{name}_set"] = bool(getattr(settings, name))
    return values


async def read_settings(request: web.Request) -> web.Response:
    """GET /api/settings: every setting but the secrets, and our callback URL."""
    settings = request.app[RELAY_APP].settings.current
    return web.json_response(
        {
            "settings": settings_view(settings),
            "callback_uri": f"{request.scheme}://{request.host}{CALLBACK_PATH}",
        }
    )


async def save_settings(request: web.Request) -> web.Response:
    """POST /api/settings: validate and save; new settings release a held queue.

    Fields left out keep their stored value, and so does a secret sent as null:
    the page never has the secrets to send back.
    """
    relay_app = request.app[RELAY_APP]
    body = await _json_object(request, message=COMMAND_FAILED_TEXT)

    try:
        settings = merge_settings(relay_app.settings.current, body)
    except ConfigError as error:
        raise ApiError(
            400, COMMAND_FAILED_TEXT, field=error.key, reason=error.problem
        ) from error
    await relay_app.save_settings(settings)
    log.info("settings_saved", **settings.snapshot())
    return web.json_response({"message": SETTINGS_SAVED_TEXT})


def merge_settings(current: MailSettings, changes: dict[str, Any]) -> MailSettings:
    """The settings after a save of `changes`; raises ConfigError naming a field."""
    merged = current.to_json_dict()
    for key, value in changes.items():
        if key in SECRET_FIELDS and value is None:
            continue
        merged[key] = value
    if merged.get("auth_type") == "oauth" and merged.get("hostname") == "":
        merged["hostname"] = OAUTH_DEFAULT_HOSTNAME
    return parse_mail_settings(merged)


# -- test e-mail -------------------------------------------------------------------


async def send_test_email(request: web.Request) -> web.Response:
    """POST /api/test-email: send it now with the settings in effect."""
    relay_app = request.app[RELAY_APP]
    if not relay_app.settings.current.admin_email:
        raise ApiError(400, NO_ADMIN_EMAIL_TEXT, field="admin_email")
    try:
        address = await relay_app.send_test_email()
    except NoAdminEmailError as error:
        raise ApiError(400, NO_ADMIN_EMAIL_TEXT, field="admin_email") from error
    except RelayError as error:
        # The upstream (or Entra) refused or could not be reached: a bad gateway.
        raise ApiError(
            502,
            TEST_EMAIL_FAILED_TEXT,
            reason=REDACTOR.scrub(error.message),
            category=str(error.category),
        ) from error
    return web.json_response({"message": sent_text(address)})


# -- Sign In -----------------------------------------------------------------------


async def start_sign_in(request: web.Request) -> web.Response:
    """POST /api/signin: start the sign-in the settings' OAuth flow calls for.

    authorization_code: the URL to open. device_code: Microsoft's prompt, then
    poll GET /api/signin. client_credentials: the result at once.
    """
    relay_app = request.app[RELAY_APP]
    tracker = request.app[SIGN_IN]
    settings = relay_app.settings.current
    if settings.auth_type != "oauth":
        raise ApiError(
            400,
            SIGN_IN_FAILED_TEXT,
            field="auth_type",
            reason="Sign In is for the OAuth authentication type",
        )
    tracker.cancel_task()
    flow = settings.oauth_flow

    if flow == "authorization_code":
        try:
            url = await relay_app.begin_sign_in()
        except RelayError as error:
            tracker.failed(error)
            raise _sign_in_failure(error) from error
        tracker.pending(flow)
        return web.json_response({"flow": flow, "authorization_url": url})

    if flow == "device_code":
        return await _start_device_code(request, relay_app, tracker)

    tracker.pending(flow)
    try:
        result = await relay_app.sign_in_with_client_credentials()
    except RelayError as error:
        tracker.failed(error)
        raise _sign_in_failure(error) from error
    tracker.succeeded(result)
    return web.json_response({"flow": flow, **tracker.as_json()})


async def _start_device_code(
    request: web.Request, relay_app: RelayApp, tracker: SignInTracker
) -> web.Response:
    """Run the device code sign-in in the background; answer with its prompt."""
    prompted = asyncio.Event()

    def on_prompt(text: str) -> None:
        tracker.prompt = text
        prompted.set()

    tracker.pending("device_code")
    tracker.task = asyncio.create_task(
        _track(tracker, relay_app.sign_in_with_device_code(on_prompt=on_prompt)),
        name="device-code-sign-in",
    )
    wait = relay_app.config.oauth.timeout * _DEVICE_PROMPT_WAIT_FACTOR
    prompt_waiter = asyncio.create_task(prompted.wait())
    try:
        await asyncio.wait(
            {prompt_waiter, tracker.task}, timeout=wait, return_when="FIRST_COMPLETED"
        )
    finally:
        prompt_waiter.cancel()
    if tracker.state == "failed":
        raise ApiError(400, SIGN_IN_FAILED_TEXT, reason=tracker.reason)
    if tracker.prompt is None:
        tracker.cancel_task()
        raise ApiError(
            504,
            SIGN_IN_FAILED_TEXT,
            reason="Entra ID did not hand out a device code in time",
        )
    return web.json_response(tracker.as_json())


async def _track(
    tracker: SignInTracker, sign_in: Coroutine[Any, Any, SignInResult]
) -> None:
    try:
        result = await sign_in
    except RelayError as error:
        tracker.failed(error)
        return
    tracker.succeeded(result)


async def sign_in_state(request: web.Request) -> web.Response:
    """GET /api/signin: pending, complete or failed, with the text to show."""
    return web.json_response(request.app[SIGN_IN].as_json())


async def complete_sign_in(request: web.Request) -> web.Response:
    """POST /api/signin/complete {"redirect_url": ...}: the URL the browser got."""
    body = await _json_object(request, message=SIGN_IN_FAILED_TEXT)
    redirect_url = body.get("redirect_url")
    if not isinstance(redirect_url, str) or not redirect_url.strip():
        raise ApiError(
            400, SIGN_IN_FAILED_TEXT, field="redirect_url", reason="must be a string"
        )
    if len(redirect_url) > _MAX_REDIRECT_URL_CHARACTERS or any(
        ord(ch) < 0x20 or ord(ch) == 0x7F for ch in redirect_url
    ):
        raise ApiError(
            400,
            SIGN_IN_FAILED_TEXT,
            field="redirect_url",
            reason="is too long or holds control characters",
        )
    result = await _complete(request, redirect_url)
    return web.json_response({"message": result.message})


@public
async def oauth_callback(request: web.Request) -> web.Response:
    """GET /oauth/callback: Microsoft sends the browser here after Sign In.

    No credential of ours comes with it; the single-use state of a sign-in that
    an administrator started is what makes the code count.
    """
    params = {key: request.query.getone(key) for key in request.query}
    try:
        result = await _complete(request, params, anonymous=True)
    except ApiError as error:
        return _result_page(error.message, detail=error.reason, status=error.status)
    return _result_page(result.message)


async def _complete(
    request: web.Request, redirect: str | dict[str, str], *, anonymous: bool = False
) -> SignInResult:
    relay_app = request.app[RELAY_APP]
    tracker = request.app[SIGN_IN]
    try:
        result = await relay_app.complete_sign_in(redirect)
    except RelayError as error:
        # Anyone may call the callback: one without a pending state must not
        # end what the administrator's own sign-in shows.
        stray = (
            anonymous
            and isinstance(error, OAuthError)
            and error.error == "state_mismatch"
        )
        if not stray:
            tracker.failed(error)
        raise _sign_in_failure(error) from error
    tracker.succeeded(result)
    return result


def _sign_in_failure(error: RelayError) -> ApiError:
    return ApiError(
        400,
        SIGN_IN_FAILED_TEXT,
        reason=REDACTOR.scrub(error.message),
        category=str(error.category),
    )


def _result_page(
    message: str, *, detail: str | None = None, status: int = 200
) -> web.Response:
    ok = message.startswith(SIGN_IN_OK_TEXT)
    detail_html = (
        f'<p class="detail">{html.escape(detail)}</p>' if detail is not None else ""
    )
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign In - Mail Settings</title>
<link rel="stylesheet" href="/static/style.css">
</head>
<body>
<main class="result">
<h1>E-mail Authorization</h1>
<p id="sign-in-result" class="{"notice-ok" if ok else "notice-error"}" role="status">\
{html.escape(message)}</p>
{detail_html}
<p><a href="/">Back to Mail Settings</a></p>
</main>
</body>
</html>
"""
    return web.Response(text=page, content_type="text/html", status=status)


# -- Mail Server Logs --------------------------------------------------------------


async def list_logs(request: web.Request) -> web.Response:
    """GET /api/logs?limit=&offset=&category=&since=&until=: rows, newest first."""
    query = request.query
    limit = _int_parameter(query, "limit", default=50, low=1, high=_MAX_LOG_ROWS)
    offset = _int_parameter(query, "offset", default=0, low=0, high=_MAX_OFFSET)
    category = query.get("category") or None
    if category is not None and category not in {str(c) for c in Category}:
        raise _invalid(
            "category", "must be one of " + ", ".join(str(c) for c in Category)
        )
    since = _time_parameter(query, "since")
    until = _time_parameter(query, "until")

    # One row more than asked tells whether there is a next page.
    rows = await asyncio.to_thread(
        request.app[RELAY_APP].sink.list_rows,
        limit=limit + 1,
        offset=offset,
        category=category,
        since=since,
        until=until,
    )
    return web.json_response(
        {
            "rows": rows[:limit],
            "limit": limit,
            "offset": offset,
            "has_more": len(rows) > limit,
        }
    )


# -- the queue ---------------------------------------------------------------------


async def list_queue(request: web.Request) -> web.Response:
    """GET /api/queue?state=&limit=: messages in the order they were accepted."""
    query = request.query
    limit = _int_parameter(query, "limit", default=100, low=1, high=_MAX_QUEUE_LISTING)
    state_text = query.get("state") or None
    state: MessageState | None = None
    if state_text is not None:
        try:
            state = MessageState(state_text)
        except ValueError as exc:
            raise _invalid(
                "state", "must be one of " + ", ".join(str(s) for s in MessageState)
            ) from exc
    spool = request.app[RELAY_APP].spool
    messages = await spool.list_messages(state=state, limit=limit)
    counts = await spool.counts_by_state()
    return web.json_response(
        {
            "messages": [_message_view(message) for message in messages],
            "counts": {str(key): value for key, value in counts.items()},
        }
    )


async def retry_message(request: web.Request) -> web.Response:
    """POST /api/queue/{queue_id}/retry: a deferred or held message, now."""
    relay_app = request.app[RELAY_APP]
    queue_id = _queue_id(request)
    count = await relay_app.spool.retry_now(queue_id)
    if count == 0:
        raise ApiError(
            404,
            COMMAND_FAILED_TEXT,
            field="queue_id",
            reason=f"no deferred or held message {queue_id}",
        )
    relay_app.delivery.wake()
    return web.json_response({"message": f"Message {queue_id} is queued again."})


async def retry_all(request: web.Request) -> web.Response:
    """POST /api/queue/retry: every deferred or held message, now."""
    relay_app = request.app[RELAY_APP]
    count = await relay_app.spool.retry_now(None)
    relay_app.delivery.wake()
    return web.json_response(
        {"message": f"{count} messages are queued again.", "count": count}
    )


async def release_queue(request: web.Request) -> web.Response:
    """POST /api/queue/release: end the hold; held messages go out now."""
    released = await request.app[RELAY_APP].delivery.release_hold()
    return web.json_response(
        {"message": f"{released} held messages released.", "count": released}
    )


async def delete_message(request: web.Request) -> web.Response:
    """DELETE /api/queue/{queue_id}: remove a message that is not being sent."""
    spool = request.app[RELAY_APP].spool
    queue_id = _queue_id(request)
    message = await spool.get(queue_id)
    if message is None:
        raise ApiError(
            404, COMMAND_FAILED_TEXT, field="queue_id", reason=f"no message {queue_id}"
        )
    if message.state is MessageState.SENDING:
        raise ApiError(
            409,
            COMMAND_FAILED_TEXT,
            field="queue_id",
            reason=f"message {queue_id} is being sent; try again in a moment",
        )
    await spool.delete(queue_id)
    return web.json_response({"message": f"Message {queue_id} deleted."})


def _message_view(message: QueuedMessage) -> dict[str, Any]:
    return {
        "queue_id": message.queue_id,
        "state": str(message.state),
        "from": message.mail_from,
        "recipients": list(message.recipients),
        "attempts": message.attempts,
        "size": message.size,
        "queued_at": _iso_time(message.queued_at),
        "next_attempt_at": _iso_time(message.next_attempt_at),
        "last_error": (
            REDACTOR.scrub(message.last_error) if message.last_error else None
        ),
    }


def _queue_id(request: web.Request) -> str:
    queue_id = request.match_info["queue_id"]
    if not _QUEUE_ID.fullmatch(queue_id):
        raise _invalid("queue_id", "is not a queue ID")
    return queue_id


# -- request parsing ---------------------------------------------------------------


async def _json_object(
    request: web.Request, *, message: str = COMMAND_FAILED_TEXT
) -> dict[str, Any]:
    """The request body as a JSON object; anything else is a 4xx naming why."""
    if request.content_type != "application/json":
        raise ApiError(415, message, reason="the body must be application/json")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(
            413, message, reason=f"the body is larger than {_MAX_BODY_BYTES} bytes"
        ) from exc
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ApiError(400, message, reason="the body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise ApiError(400, message, reason="the body must be a JSON object")
    return body


def _int_parameter(query: Any, name: str, *, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise _invalid(name, f"must be a whole number from {low} to {high}")
    return int(text)


def _time_parameter(query: Any, name: str) -> datetime | None:
    text = query.get(name)
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _invalid(
            name, "must be a time in ISO 8601, e.g. 2026-12-04T10:00:00Z"
        ) from exc
    # A time without a zone is taken as UTC, the zone of every row.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _iso_time(moment: float | None) -> str | None:
    if moment is None:
        return None
    stamp = datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z")


def _host_is_allowed(host: str | None) -> bool:
    """Whether a Host header names this server by address or as localhost."""
    if host is None:
        return True
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# -- assembling --------------------------------------------------------------------


def create_admin_app(
    relay_app: RelayApp, *, token: str | None = None
) -> web.Application:
    """The admin aiohttp application for `relay_app`.

    `token` defaults to the one in the configured token file (created if missing).
    """
    if token is None:
        token = load_or_create_token(relay_app.config.admin.token_file)

    application = web.Application(
        middlewares=[require_token], client_max_size=_MAX_BODY_BYTES
    )
    application[RELAY_APP] = relay_app
    application[ADMIN_TOKEN] = token
    application[SESSIONS] = SessionStore()
    application[SIGN_IN] = SignInTracker()
    application.on_response_prepare.append(_add_security_headers)
    application.on_shutdown.append(_stop_sign_in)

    router = application.router
    router.add_get("/", index_page)
    router.add_get("/static/{name}", static_file)
    router.add_get("/metrics", metrics_page)
    router.add_post("/api/session", create_session)
    router.add_get("/api/session", read_session)
    router.add_delete("/api/session", delete_session)
    router.add_get("/api/status", status_page)
    router.add_get("/api/settings", read_settings)
    router.add_post("/api/settings", save_settings)
    router.add_post("/api/test-email", send_test_email)
    router.add_post("/api/signin", start_sign_in)
    router.add_get("/api/signin", sign_in_state)
    router.add_post("/api/signin/complete", complete_sign_in)
    router.add_get(CALLBACK_PATH, oauth_callback)
    router.add_get("/api/logs", list_logs)
    router.add_get("/api/queue", list_queue)
    router.add_post("/api/queue/retry", retry_all)
    router.add_post("/api/queue/release", release_queue)
    router.add_post("/api/queue/{queue_id}/retry", retry_message)
    router.add_delete("/api/queue/{queue_id}", delete_message)
    return application


async def _stop_sign_in(application: web.Application) -> None:
    tracker = application[SIGN_IN]
    task = tracker.task
    tracker.cancel_task()
    if task is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await task


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

    @property
    def url(self) -> str:
        """The base URL on the first configured address, once started."""
        host = self._config.addresses[0]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind every address; port 0 picks one free port shared by all of them.

        Raises OSError (EADDRINUSE, EACCES) as the socket layer reports it.
        """
        # No access log: a scrape every few seconds would bury the journal, and
        # the callback's query string holds an authorization code. A short
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
