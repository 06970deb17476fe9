"""An Entra-ID-like identity provider over HTTPS on loopback, for the demo and tests.

`SandboxEntra` serves, under `/{tenant}/`, what msal reaches for: the OpenID
discovery document (`v2.0/.well-known/openid-configuration`), the authorize page
(`oauth2/v2.0/authorize`), the device authorization endpoint
(`oauth2/v2.0/devicecode`) and the token endpoint (`oauth2/v2.0/token`) with the
authorization_code (PKCE), refresh_token, client_credentials and device_code
grants. Every endpoint it advertises points back at itself, so a client built on
its discovery document never needs another host.

It answers the way Entra ID does where the relay can tell the difference: error
bodies in Microsoft's JSON shape with the AADSTS code inside the description,
HTTP 401 for `invalid_client`, an error page (not a redirect) for a redirect URI
that is not registered, single-use authorization codes, access tokens of 1,500+
characters for the Exchange audience. It is stricter than Entra in one place:
a refresh token is invalid once it has been exchanged (Entra leaves it valid until
it expires), so a client that loses a rotated refresh token is caught at once;
`single_use_refresh_tokens = False` gives Entra's behaviour.

Nothing here imports the relay: a bug shared by the peer and the product would
hide itself. Secrets it issues (codes, tokens) are kept only as SHA-256 digests.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import html
import ipaddress
import json
import secrets
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

from aiohttp import web

EXCHANGE_AUDIENCE = "https://outlook.office.com"
GRAPH_AUDIENCE = "https://graph.microsoft.com"
KNOWN_RESOURCES = frozenset({EXCHANGE_AUDIENCE, GRAPH_AUDIENCE})
# Scopes that ask for an id token or a refresh token rather than for a resource.
OPENID_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})
# What Exchange answers to XOAUTH2 with a token it will not take.
EXCHANGE_REJECTION_REPLY = "535 5.7.3 Authentication unsuccessful [SANDBOX]"

DEFAULT_TENANT_ID = "8d3c6f0e-5b1a-4c2e-9f7d-2a6b1c0d4e53"
DEFAULT_CLIENT_ID = "4f1b7c2a-9e3d-4a6b-8c5f-1d2e3f4a5b6c"
DEFAULT_MAILBOX = "relay@contoso.test"

Endpoint = Literal["authorize", "token", "devicecode"]
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass(frozen=True)
class AadstsError:
    """One Entra error: its AADSTS number, OAuth error, HTTP status and text."""

    code: int
    error: str
    status: int
    # A str.format template; unknown fields come out empty.
    text: str
    suberror: str | None = None


def _catalog(*entries: AadstsError) -> dict[int, AadstsError]:
    return {entry.code: entry for entry in entries}


# Texts follow Microsoft's published wording closely enough for a reader to
# recognise them; the relay must classify by the number, never by the text.
AADSTS_ERRORS = _catalog(
    AadstsError(
        28000,
        "invalid_scope",
        400,
        "Provided value for the input parameter scope is not valid because it "
        "contains more than one resource. Scope {scope} is not valid.",
    ),
    AadstsError(
        50011,
        "invalid_request",
        400,
        "The redirect URI '{redirect_uri}' specified in the request does not match "
        "the redirect URIs configured for the application '{client_id}'. Make sure "
        "the redirect URI sent in the request matches one added to your application "
        "in the Azure portal.",
    ),
    AadstsError(
        50076,
        "invalid_grant",
        400,
        "Due to a configuration change made by your administrator, or because you "
        "moved to a new location, you must use multi-factor authentication to "
        "access '{resource}'.",
        suberror="basic_action",
    ),
    AadstsError(
        50079,
        "invalid_grant",
        400,
        "Due to a configuration change made by your administrator, or because you "
        "moved to a new location, you must enroll in multi-factor authentication "
        "to access '{resource}'.",
        suberror="basic_action",
    ),
    AadstsError(
        50173,
        "invalid_grant",
        400,
        "The provided grant has expired due to it being revoked, a fresh auth token "
        "is needed. The user might have changed or reset their password. The grant "
        "was issued on '{issued}' and the TokensValidFrom date (before which tokens "
        "are not valid) for this user is '{now}'.",
    ),
    AadstsError(
        54005,
        "invalid_grant",
        400,
        "OAuth2 Authorization code was already redeemed, please retry with a new "
        "valid code or use an existing refresh token.",
    ),
    AadstsError(
        65001,
        "invalid_grant",
        400,
        "The user or administrator has not consented to use the application with "
        "ID '{client_id}' named '{app_name}'. Send an interactive authorization "
        "request for this user and resource.",
        suberror="consent_required",
    ),
    AadstsError(
        70000,
        "invalid_grant",
        400,
        "The provided value for the '{parameter}' parameter is not valid.",
    ),
    AadstsError(
        70008,
        "invalid_grant",
        400,
        "The provided authorization code or refresh token has expired due to "
        "inactivity. Send a new interactive authorization request for this user "
        "and resource.",
    ),
    AadstsError(
        70016,
        "authorization_pending",
        400,
        "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
    ),
    AadstsError(70019, "expired_token", 400, "Verification code expired."),
    AadstsError(
        70043,
        "invalid_grant",
        400,
        "The refresh token has expired or is invalid due to sign-in frequency "
        "checks by conditional access. The token was issued on {issued} and the "
        "maximum allowed lifetime for this request is {max_lifetime}.",
    ),
    AadstsError(
        90002,
        "invalid_request",
        400,
        "Tenant '{tenant}' not found. Check to make sure you have the correct "
        "tenant ID and are signing into the correct cloud.",
    ),
    AadstsError(
        500011,
        "invalid_resource",
        400,
        "The resource principal named {resource} was not found in the tenant named "
        "{tenant}. This can happen if the application has not been installed by the "
        "administrator of the tenant or consented to by any user in the tenant.",
    ),
    AadstsError(
        500112,
        "invalid_grant",
        400,
        "The reply address '{redirect_uri}' does not match the reply address "
        "'{original_redirect_uri}' provided when requesting Authorization code.",
    ),
    AadstsError(
        501481,
        "invalid_grant",
        400,
        "The Code_Verifier does not match the code_challenge supplied in the "
        "authorization request.",
    ),
    AadstsError(
        700016,
        "unauthorized_client",
        400,
        "Application with identifier '{client_id}' was not found in the directory "
        "'{tenant}'. This can happen if the application has not been installed by "
        "the administrator of the tenant or consented to by any user in the tenant.",
    ),
    AadstsError(
        700025,
        "invalid_client",
        401,
        "Client is public so neither 'client_assertion' nor 'client_secret' should "
        "be presented.",
    ),
    AadstsError(
        700082,
        "invalid_grant",
        400,
        "The refresh token has expired due to inactivity. The token was issued on "
        "{issued} and was inactive for {inactive}.",
    ),
    AadstsError(
        900144,
        "invalid_request",
        400,
        "The request body must contain the following parameter: '{parameter}'.",
    ),
    AadstsError(
        1002012,
        "invalid_scope",
        400,
        "The provided value for scope {scope} is not valid. Client credential flows "
        "must have a scope value with /.default suffixed to the resource identifier "
        "(application ID URI).",
    ),
    AadstsError(
        7000215,
        "invalid_client",
        401,
        "Invalid client secret provided. Ensure the secret being sent in the request "
        "is the client secret value, not the client secret ID, for a secret added to "
        "app '{client_id}'.",
    ),
    AadstsError(
        7000218,
        "invalid_client",
        401,
        "The request body must contain the following parameter: 'client_assertion' "
        "or 'client_secret'.",
    ),
    AadstsError(
        7000222,
        "invalid_client",
        401,
        "The provided client secret keys for app '{client_id}' are expired. Create "
        "new keys for your app, or consider using certificate credentials for added "
        "security.",
    ),
    AadstsError(
        9002313,
        "invalid_grant",
        400,
        "Invalid request. Request is malformed or invalid.",
    ),
)


def describe_error(code: int) -> AadstsError:
    """The catalog entry for `code`; an unknown code gets a generic invalid_grant."""
    known = AADSTS_ERRORS.get(code)
    if known is not None:
        return known
    return AadstsError(
        code,
        "invalid_grant",
        400,
        "The sandbox was told to fail this request with an error code it does not "
        "describe.",
    )


@dataclass(frozen=True)
class IssuedAccessToken:
    """What the sandbox remembers about an access token; never the token itself."""

    audience: str
    # Delegated permissions (the `scp` claim), e.g. {"SMTP.Send"}.
    scopes: frozenset[str]
    # Application permissions (the `roles` claim), e.g. {"SMTP.SendAsApp"}.
    roles: frozenset[str]
    # The signed-in mailbox; None for an app-only token.
    mailbox: str | None
    client_id: str
    grant_type: str
    issued_at: float
    expires_at: float

    @property
    def app_only(self) -> bool:
        return self.mailbox is None


@dataclass
class _RefreshToken:
    mailbox: str
    client_id: str
    public_client: bool
    issued_at: float
    # When the user last signed in interactively; sign-in frequency counts from it.
    session_started_at: float
    used: bool = False
    revoked: bool = False


@dataclass
class _AuthorizationCode:
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    mailbox: str
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str
    issued_at: float
    redeemed: bool = False
    # Digests of what was issued for it, revoked if the code is replayed
    # (RFC 6749 §4.1.2).
    issued_token_digests: list[str] = field(default_factory=list)


@dataclass
class _DeviceCode:
    user_code: str
    client_id: str
    scopes: tuple[str, ...]
    issued_at: float
    expires_at: float
    approve_at: float | None
    approved: bool = False
    redeemed: bool = False


@dataclass
class _Fault:
    endpoint: Endpoint
    grant_type: str | None
    remaining: int | None
    code: int | None = None
    status: int | None = None

    def matches(self, endpoint: Endpoint, grant_type: str | None) -> bool:
        if self.endpoint != endpoint:
            return False
        return self.grant_type is None or self.grant_type == grant_type


class _Refusal(Exception):
    """Raised inside a handler to answer with one AADSTS error."""

    def __init__(self, code: int, *, error: str | None = None, **details: str) -> None:
        super().__init__(f"AADSTS{code}")
        self.code = code
        self.error = error
        self.details = details


class _Details(dict[str, str]):
    """Template fields for error texts: a field nobody supplied comes out empty."""

    def __missing__(self, key: str) -> str:
        return ""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_json(value: Mapping[str, Any]) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


def _with_query(uri: str, params: Mapping[str, str]) -> str:
    """`uri` with `params` added to whatever query string it already carries."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _format_lifetime(seconds: float) -> str:
    """Entra's d.hh:mm:ss form of a duration."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}.{hours:02d}:{minutes:02d}:{secs:02d}"


class SandboxEntra:
    """An Entra ID tenant with one app registration and one user, on loopback.

    The user (`mailbox`) consents to everything automatically: the authorize page
    redirects straight back with a code, and device codes are approved after
    `device_code_approval_delay` seconds (None: only by `approve_device_code()`).
    Lifetimes and the fault switches are plain attributes and methods, settable
    while the server runs.
    """

    def __init__(
        self,
        *,
        server_ssl_context: ssl.SSLContext,
        host: str = "127.0.0.1",
        port: int = 0,
        tenant_id: str = DEFAULT_TENANT_ID,
        tenant_domains: Iterable[str] = ("contoso.test",),
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str,
        redirect_uris: Iterable[str] = ("http://localhost/oauth/callback",),
        mailbox: str = DEFAULT_MAILBOX,
        app_only_mailboxes: Iterable[str] | None = None,
        app_display_name: str = "EPP Mail Relay",
        access_token_lifetime: float = 3600.0,
        refresh_token_lifetime: float = 90 * 86400.0,
        authorization_code_lifetime: float = 600.0,
        device_code_lifetime: float = 900.0,
        device_code_interval: int = 1,
        device_code_approval_delay: float | None = 0.2,
        sign_in_frequency: float | None = None,
        single_use_refresh_tokens: bool = True,
        allow_public_client: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not _is_loopback(host):
            raise ValueError(
                f"SandboxEntra binds to loopback only; {host!r} is not a loopback "
                "address"
            )
        self.host = host
        self._requested_port = port
        self._server_ssl_context = server_ssl_context
        self.tenant_id = tenant_id
        self.tenant_domains = frozenset(domain.lower() for domain in tenant_domains)
        self.client_id = client_id
        self._client_secret = client_secret
        self.redirect_uris = tuple(redirect_uris)
        self.mailbox = mailbox
        self.app_only_mailboxes = frozenset(
            address.casefold() for address in (app_only_mailboxes or (mailbox,))
        )
        self.app_display_name = app_display_name
        self.access_token_lifetime = access_token_lifetime
        self.refresh_token_lifetime = refresh_token_lifetime
        self.authorization_code_lifetime = authorization_code_lifetime
        self.device_code_lifetime = device_code_lifetime
        self.device_code_interval = device_code_interval
        self.device_code_approval_delay = device_code_approval_delay
        # Conditional Access sign-in frequency: refresh tokens of a session older
        # than this fail with AADSTS70043.
        self.sign_in_frequency = sign_in_frequency
        self.single_use_refresh_tokens = single_use_refresh_tokens
        self.allow_public_client = allow_public_client
        self.client_secret_expired = False
        # Application permissions granted to the app, per resource.
        self.app_roles: dict[str, frozenset[str]] = {
            EXCHANGE_AUDIENCE: frozenset({"SMTP.SendAsApp"})
        }
        self._clock = clock

        # Counters and records a test may read; none of them holds a secret.
        self.counters: Counter[str] = Counter()
        self.received_redirect_uris: list[str] = []
        self.issued_access_tokens: list[IssuedAccessToken] = []
        self.last_error: dict[str, Any] | None = None

        self._access_tokens: dict[str, IssuedAccessToken] = {}
        self._revoked_access_tokens: set[str] = set()
        self._refresh_tokens: dict[str, _RefreshToken] = {}
        self._codes: dict[str, _AuthorizationCode] = {}
        self._device_codes: dict[str, _DeviceCode] = {}
        self._faults: list[_Fault] = []
        self._silent = False
        self._silence_released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    def __repr__(self) -> str:
        return (
            f"SandboxEntra(base_url={self.base_url if self._port else None!r}, "
            f"tenant_id={self.tenant_id!r}, client_id={self.client_id!r})"
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the loopback address with TLS."""
        if self._runner is not None:
            return

        app = web.Application()
        app.router.add_get(
            "/{tenant}/v2.0/.well-known/openid-configuration", self._discovery
        )
        app.router.add_get("/{tenant}/oauth2/v2.0/authorize", self._authorize)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        app.router.add_post("/{tenant}/oauth2/v2.0/devicecode", self._devicecode)
        app.router.add_get("/devicelogin", self._devicelogin)
        # No access log: the authorize query string is nobody's business.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(
            runner,
            self.host,
            self._requested_port,
            ssl_context=self._server_ssl_context,
        )
        await site.start()

        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Release any request held by `set_silent` and close the listener."""
        self._silence_released.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SandboxEntra:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("SandboxEntra is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """The authority host, e.g. https://127.0.0.1:8443, for OAuthConfig."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{self.tenant_id}"

    # -- switches for tests ------------------------------------------------------------

    def inject_error(
        self,
        code: int,
        *,
        grant_type: str | None = None,
        endpoint: Endpoint = "token",
        times: int | None = 1,
    ) -> None:
        """Answer the next `times` matching requests (None: all) with AADSTS `code`.

        At the token endpoint it is a JSON error body; at the authorize endpoint a
        redirect carrying `error` and `error_description`, except for 50011, which
        Entra shows as a page because it cannot trust the redirect URI.
        """
        self._faults.append(
            _Fault(endpoint=endpoint, grant_type=grant_type, remaining=times, code=code)
        )

    def inject_http_status(
        self,
        status: int,
        *,
        endpoint: Endpoint = "token",
        grant_type: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer matching requests with a bare HTTP `status` (e.g. 503)."""
        self._faults.append(
            _Fault(
                endpoint=endpoint, grant_type=grant_type, remaining=times, status=status
            )
        )

    def set_silent(self, silent: bool = True) -> None:
        """Accept token and device-code requests but never answer them (timeouts)."""
        if silent and not self._silent:
            self._silence_released = asyncio.Event()
        if not silent:
            self._silence_released.set()
        self._silent = silent

    def clear_faults(self) -> None:
        """Forget every injected error and status, and stop being silent."""
        self._faults.clear()
        self.set_silent(False)

    def approve_device_code(self, user_code: str | None = None) -> None:
        """Approve the device code with `user_code`, or every pending one."""
        for device in self._device_codes.values():
            if user_code is None or device.user_code == user_code:
                device.approved = True

    def revoke_refresh_tokens(self) -> None:
        """Revoke every refresh token, as a password reset does."""
        for record in self._refresh_tokens.values():
            record.revoked = True

    def revoke_access_tokens(self) -> None:
        """Make every access token issued so far unacceptable to Exchange."""
        self._revoked_access_tokens.update(self._access_tokens)

    # -- what Exchange asks ----------------------------------------------------------

    def validate_access_token(self, username: str, token: str) -> str | None:
        """None if Exchange would take `token` for `username`, else its 535 reply.

        Accepted: issued here, unexpired, not revoked, for the Exchange audience,
        and either delegated SMTP.Send for this very mailbox or app-only
        SMTP.SendAsApp for a mailbox in `app_only_mailboxes`.
        """
        digest = _digest(token)
        record = self._access_tokens.get(digest)
        accepted = (
            record is not None
            and digest not in self._revoked_access_tokens
            and self._clock() < record.expires_at
            and record.audience == EXCHANGE_AUDIENCE
            and self._grants_mailbox(record, username)
        )

        self.counters[
            "validations.accepted" if accepted else "validations.rejected"
        ] += 1
        return None if accepted else EXCHANGE_REJECTION_REPLY

    def _grants_mailbox(self, record: IssuedAccessToken, username: str) -> bool:
        if record.mailbox is not None:
            return (
                "SMTP.Send" in record.scopes
                and username.casefold() == record.mailbox.casefold()
            )
        return (
            "SMTP.SendAsApp" in record.roles
            and username.casefold() in self.app_only_mailboxes
        )

    def tokens_issued(self, grant_type: str) -> int:
        """How many access tokens were issued through `grant_type`."""
        return self.counters[f"tokens_issued.{grant_type}"]

    # -- handlers ----------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        self.counters["requests.discovery"] += 1
        tenant = request.match_info["tenant"]
        if not self._knows_tenant(tenant):
            return self._error_json(
                _Refusal(90002, tenant=tenant), request.headers.get("client-request-id")
            )

        root = f"{self.base_url}/{tenant}"
        issuer = f"{self.base_url}/{self.tenant_id}/v2.0"
        return web.json_response(
            {
                "token_endpoint": f"{root}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{root}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": [
                    "code",
                    "id_token",
                    "code id_token",
                    "id_token token",
                ],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": issuer,
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": f"{self.base_url}/oidc/userinfo",
                "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
                "claims_supported": [
                    "sub",
                    "iss",
                    "aud",
                    "exp",
                    "iat",
                    "nonce",
                    "preferred_username",
                    "name",
                    "tid",
                    "ver",
                    "oid",
                ],
            }
        )

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        self.counters["requests.authorize"] += 1
        query = {key: request.query.getone(key) for key in request.query}
        tenant = request.match_info["tenant"]
        client_id = query.get("client_id", "")
        redirect_uri = query.get("redirect_uri")
        if redirect_uri is not None:
            self.received_redirect_uris.append(redirect_uri)
        correlation_id = query.get("client-request-id")

        # Entra cannot trust where to send an error until the tenant, the app and
        # the redirect URI are known, so these failures are pages, not redirects.
        if not self._knows_tenant(tenant):
            return self._error_page(_Refusal(90002, tenant=tenant), correlation_id)
        if client_id != self.client_id:
            return self._error_page(
                _Refusal(700016, client_id=client_id, tenant=tenant), correlation_id
            )
        if not redirect_uri:
            return self._error_page(
                _Refusal(900144, parameter="redirect_uri"), correlation_id
            )
        if redirect_uri not in self.redirect_uris:
            return self._error_page(
                _Refusal(50011, redirect_uri=redirect_uri, client_id=client_id),
                correlation_id,
            )

        fault = self._take_fault("authorize", None)
        if fault is not None and fault.status is not None:
            return web.Response(status=fault.status, text="Service unavailable")
        if fault is not None and fault.code is not None:
            refusal = _Refusal(
                fault.code,
                redirect_uri=redirect_uri,
                client_id=client_id,
                tenant=tenant,
            )
            if fault.code == 50011:
                return self._error_page(refusal, correlation_id)
            return self._error_redirect(refusal, redirect_uri, query.get("state"))
        if query.get("response_type") != "code":
            return self._error_redirect(
                _Refusal(900144, parameter="response_type", error="invalid_request"),
                redirect_uri,
                query.get("state"),
            )

        code = secrets.token_urlsafe(384)
        self._codes[_digest(code)] = _AuthorizationCode(
            client_id=client_id,
            redirect_uri=redirect_uri,
            scopes=tuple(query.get("scope", "").split()),
            mailbox=self.mailbox,
            nonce=query.get("nonce"),
            code_challenge=query.get("code_challenge"),
            code_challenge_method=query.get("code_challenge_method", "plain"),
            issued_at=self._clock(),
        )
        params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        params["session_state"] = str(uuid.uuid4())
        return _redirect(_with_query(redirect_uri, params))

    async def _devicecode(self, request: web.Request) -> web.Response:
        self.counters["requests.devicecode"] += 1
        if self._silent:
            return await self._hang()
        fields = await self._form(request)
        correlation_id = request.headers.get("client-request-id")
        fault = self._take_fault("devicecode", None)
        if fault is not None and fault.status is not None:
            return web.Response(status=fault.status, text="Service unavailable")

        try:
            if fault is not None and fault.code is not None:
                raise _Refusal(fault.code, client_id=fields.get("client_id", ""))
            self._check_tenant_and_client(request.match_info["tenant"], fields)
            scope = fields.get("scope")
            if not scope:
                raise _Refusal(900144, parameter="scope")
        except _Refusal as refusal:
            return self._error_json(refusal, correlation_id)

        device_code = secrets.token_urlsafe(96)
        user_code = "".join(
            secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(9)
        )
        now = self._clock()
        delay = self.device_code_approval_delay
        self._device_codes[_digest(device_code)] = _DeviceCode(
            user_code=user_code,
            client_id=self.client_id,
            scopes=tuple(scope.split()),
            issued_at=now,
            expires_at=now + self.device_code_lifetime,
            approve_at=None if delay is None else now + delay,
        )
        verification_uri = f"{self.base_url}/devicelogin"
        return web.json_response(
            {
                "user_code": user_code,
                "device_code": device_code,
                "verification_uri": verification_uri,
                "expires_in": int(self.device_code_lifetime),
                "interval": self.device_code_interval,
                "message": (
                    f"To sign in, use a web browser to open the page "
                    f"{verification_uri} and enter the code {user_code} to "
                    "authenticate."
                ),
            }
        )

    async def _devicelogin(self, request: web.Request) -> web.Response:
        """Approve the code in ?code=..., standing in for the user's browser."""
        user_code = request.query.get("code")
        if user_code:
            self.approve_device_code(user_code)
        return web.Response(
            text="<html><body><p>You have signed in.</p></body></html>",
            content_type="text/html",
        )

    async def _token(self, request: web.Request) -> web.Response:
        self.counters["requests.token"] += 1
        if self._silent:
            return await self._hang()
        fields = await self._form(request)
        grant_type = fields.get("grant_type")
        correlation_id = request.headers.get("client-request-id")
        fault = self._take_fault("token", grant_type)
        if fault is not None and fault.status is not None:
            return web.Response(status=fault.status, text="Service unavailable")

        try:
            if fault is not None and fault.code is not None:
                raise _Refusal(
                    fault.code,
                    client_id=fields.get("client_id", ""),
                    redirect_uri=fields.get("redirect_uri", ""),
                    scope=fields.get("scope", ""),
                )
            body = self._grant(
                request.match_info["tenant"],
                fields,
                request.headers.get("Authorization"),
            )
        except _Refusal as refusal:
            return self._error_json(refusal, correlation_id)

        return web.json_response(
            body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"}
        )

    # -- the grants --------------------------------------------------------------------

    def _grant(
        self, tenant: str, fields: dict[str, str], authorization: str | None
    ) -> dict[str, Any]:
        credentials = self._client_credentials(fields, authorization)
        self._check_tenant_and_client(tenant, {"client_id": credentials[0]})
        grant_type = fields.get("grant_type")
        if not grant_type:
            raise _Refusal(900144, parameter="grant_type")
        public_client = self._authenticate_client(credentials, grant_type=grant_type)

        if grant_type == "authorization_code":
            return self._redeem_code(fields, public_client=public_client)
        if grant_type == "refresh_token":
            return self._redeem_refresh_token(fields, public_client=public_client)
        if grant_type == "client_credentials":
            return self._issue_app_token(fields)
        if grant_type == DEVICE_CODE_GRANT:
            return self._redeem_device_code(fields, public_client=public_client)
        raise _Refusal(70000, parameter="grant_type", error="unsupported_grant_type")

    def _redeem_code(
        self, fields: dict[str, str], *, public_client: bool
    ) -> dict[str, Any]:
        code = fields.get("code")
        if not code:
            raise _Refusal(900144, parameter="code")
        record = self._codes.get(_digest(code))
        if record is None:
            raise _Refusal(70000, parameter="code")
        if record.redeemed:
            for digest in record.issued_token_digests:
                self._revoke_digest(digest)
            raise _Refusal(54005)
        if self._clock() > record.issued_at + self.authorization_code_lifetime:
            raise _Refusal(70008)
        redirect_uri = fields.get("redirect_uri", "")
        if redirect_uri not in self.redirect_uris:
            raise _Refusal(50011, redirect_uri=redirect_uri, client_id=self.client_id)
        if redirect_uri != record.redirect_uri:
            raise _Refusal(
                500112,
                redirect_uri=redirect_uri,
                original_redirect_uri=record.redirect_uri,
            )
        if record.code_challenge is not None:
            verifier = fields.get("code_verifier")
            if not verifier:
                raise _Refusal(900144, parameter="code_verifier")
            if not _pkce_matches(
                verifier, record.code_challenge, record.code_challenge_method
            ):
                raise _Refusal(501481)

        record.redeemed = True
        scopes = fields.get("scope", "").split() or list(record.scopes)
        body, digests = self._issue_user_tokens(
            grant_type="authorization_code",
            mailbox=record.mailbox,
            scopes=scopes,
            nonce=record.nonce,
            client_info=fields.get("client_info") == "1",
            public_client=public_client,
            session_started_at=self._clock(),
        )
        record.issued_token_digests.extend(digests)
        return body

    def _redeem_refresh_token(
        self, fields: dict[str, str], *, public_client: bool
    ) -> dict[str, Any]:
        token = fields.get("refresh_token")
        if not token:
            raise _Refusal(900144, parameter="refresh_token")
        scope = fields.get("scope")
        if not scope:
            raise _Refusal(900144, parameter="scope")
        record = self._refresh_tokens.get(_digest(token))
        if record is None:
            raise _Refusal(9002313)
        now = self._clock()
        if record.revoked or (record.used and self.single_use_refresh_tokens):
            raise _Refusal(
                50173, issued=_timestamp(record.issued_at), now=_timestamp(now)
            )
        if now > record.issued_at + self.refresh_token_lifetime:
            raise _Refusal(
                700082,
                issued=_timestamp(record.issued_at),
                inactive=_format_lifetime(self.refresh_token_lifetime),
            )
        if (
            self.sign_in_frequency is not None
            and now > record.session_started_at + self.sign_in_frequency
        ):
            raise _Refusal(
                70043,
                issued=_timestamp(record.session_started_at),
                max_lifetime=_format_lifetime(self.sign_in_frequency),
            )
        if record.public_client and not public_client:
            raise _Refusal(700025)
        if not record.public_client and public_client:
            raise _Refusal(7000218)

        record.used = True
        self.counters["refreshes"] += 1
        body, _ = self._issue_user_tokens(
            grant_type="refresh_token",
            mailbox=record.mailbox,
            scopes=scope.split(),
            nonce=None,
            client_info=fields.get("client_info") == "1",
            public_client=record.public_client,
            session_started_at=record.session_started_at,
        )
        return body

    def _redeem_device_code(
        self, fields: dict[str, str], *, public_client: bool
    ) -> dict[str, Any]:
        device_code = fields.get("device_code")
        if not device_code:
            raise _Refusal(900144, parameter="device_code")
        record = self._device_codes.get(_digest(device_code))
        if record is None:
            raise _Refusal(
                70000, parameter="device_code", error="bad_verification_code"
            )
        now = self._clock()
        if record.redeemed:
            raise _Refusal(54005)
        if now > record.expires_at:
            raise _Refusal(70019)
        if record.approve_at is not None and now >= record.approve_at:
            record.approved = True
        if not record.approved:
            raise _Refusal(70016)

        record.redeemed = True
        body, _ = self._issue_user_tokens(
            grant_type=DEVICE_CODE_GRANT,
            mailbox=self.mailbox,
            scopes=list(record.scopes),
            nonce=None,
            client_info=fields.get("client_info") == "1",
            public_client=public_client,
            session_started_at=now,
        )
        return body

    def _issue_app_token(self, fields: dict[str, str]) -> dict[str, Any]:
        scope = fields.get("scope")
        if not scope:
            raise _Refusal(900144, parameter="scope")
        scopes = scope.split()
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            raise _Refusal(1002012, scope=scope)
        resource = scopes[0].removesuffix("/.default")
        if resource not in KNOWN_RESOURCES:
            raise _Refusal(500011, resource=resource, tenant=self.tenant_id)

        token, _ = self._mint_access_token(
            audience=resource,
            scopes=frozenset(),
            roles=self.app_roles.get(resource, frozenset()),
            mailbox=None,
            grant_type="client_credentials",
        )
        lifetime = int(self.access_token_lifetime)
        return {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }

    def _issue_user_tokens(
        self,
        *,
        grant_type: str,
        mailbox: str,
        scopes: list[str],
        nonce: str | None,
        client_info: bool,
        public_client: bool,
        session_started_at: float,
    ) -> tuple[dict[str, Any], list[str]]:
        resource, permissions = self._resource_permissions(scopes)
        access_token, access_digest = self._mint_access_token(
            audience=resource,
            scopes=permissions,
            roles=frozenset(),
            mailbox=mailbox,
            grant_type=grant_type,
        )
        digests = [access_digest]
        lifetime = int(self.access_token_lifetime)
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(f"{resource}/{name}" for name in sorted(permissions)),
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access_token,
        }

        if "offline_access" in scopes:
            refresh_token = secrets.token_urlsafe(640)
            refresh_digest = _digest(refresh_token)
            self._refresh_tokens[refresh_digest] = _RefreshToken(
                mailbox=mailbox,
                client_id=self.client_id,
                public_client=public_client,
                issued_at=self._clock(),
                session_started_at=session_started_at,
            )
            body["refresh_token"] = refresh_token
            digests.append(refresh_digest)
        if "openid" in scopes:
            body["id_token"] = self._mint_id_token(mailbox, nonce)
        if client_info:
            body["client_info"] = _b64url_json(
                {"uid": self._object_id(mailbox), "utid": self.tenant_id}
            )
        return body, digests

    def _resource_permissions(self, scopes: list[str]) -> tuple[str, frozenset[str]]:
        """The one resource the scopes name and the permissions asked of it."""
        per_resource: dict[str, set[str]] = {}
        for scope in scopes:
            if scope in OPENID_SCOPES:
                continue
            if "://" in scope:
                resource, _, permission = scope.rpartition("/")
            else:
                # A bare permission name means Microsoft Graph, as in Entra.
                resource, permission = GRAPH_AUDIENCE, scope
            per_resource.setdefault(resource, set()).add(permission)

        if not per_resource:
            return GRAPH_AUDIENCE, frozenset({"User.Read"})
        if len(per_resource) > 1:
            raise _Refusal(28000, scope=" ".join(scopes))
        ((resource, permissions),) = per_resource.items()
        if resource not in KNOWN_RESOURCES:
            raise _Refusal(500011, resource=resource, tenant=self.tenant_id)
        if ".default" in permissions:
            permissions = (
                {"SMTP.Send"} if resource == EXCHANGE_AUDIENCE else {"User.Read"}
            )
        return resource, frozenset(permissions)

    # -- token minting -----------------------------------------------------------------

    def _mint_access_token(
        self,
        *,
        audience: str,
        scopes: frozenset[str],
        roles: frozenset[str],
        mailbox: str | None,
        grant_type: str,
    ) -> tuple[str, str]:
        now = self._clock()
        expires_at = now + self.access_token_lifetime
        key_id = _b64url(secrets.token_bytes(20))
        header = {"typ": "JWT", "nonce": _b64url(secrets.token_bytes(32))}
        header |= {"alg": "RS256", "x5t": key_id, "kid": key_id}
        subject = self._object_id(mailbox) if mailbox else self._service_principal_id
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": f"{self.base_url}/{self.tenant_id}/",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(expires_at),
            "aio": _b64url(secrets.token_bytes(240)),
            "app_displayname": self.app_display_name,
            "appid": self.client_id,
            "appidacr": "1",
            "idp": f"{self.base_url}/{self.tenant_id}/",
            "idtyp": "app" if mailbox is None else "user",
            "ipaddr": "127.0.0.1",
            "oid": subject,
            "rh": _b64url(secrets.token_bytes(48)),
            "sub": _b64url(
                hashlib.sha256(f"{subject}{self.client_id}".encode()).digest()
            ),
            "tid": self.tenant_id,
            "uti": _b64url(secrets.token_bytes(16)),
            "ver": "1.0",
            "wids": ["b79fbf4d-3ef9-4689-8143-76b194e85509"],
            "xms_ftd": _b64url(secrets.token_bytes(48)),
            "xms_idrel": "7 16",
        }
        if mailbox is not None:
            claims |= {
                "acct": 0,
                "acr": "1",
                "amr": ["pwd", "mfa"],
                "family_name": "Relay",
                "given_name": "Mail",
                "name": f"Mail Relay ({mailbox})",
                "puid": secrets.token_hex(8).upper(),
                "scp": " ".join(sorted(scopes)),
                "sid": str(uuid.uuid4()),
                "unique_name": mailbox,
                "upn": mailbox,
            }
        else:
            claims["roles"] = sorted(roles)
        token = ".".join(
            (
                _b64url_json(header),
                _b64url_json(claims),
                _b64url(secrets.token_bytes(256)),
            )
        )

        digest = _digest(token)
        record = IssuedAccessToken(
            audience=audience,
            scopes=scopes,
            roles=roles,
            mailbox=mailbox,
            client_id=self.client_id,
            grant_type=grant_type,
            issued_at=now,
            expires_at=expires_at,
        )
        self._access_tokens[digest] = record
        self.issued_access_tokens.append(record)
        self.counters[f"tokens_issued.{grant_type}"] += 1
        return token, digest

    def _mint_id_token(self, mailbox: str, nonce: str | None) -> str:
        # msal reads these claims without checking the signature; it needs sub,
        # oid, tid and preferred_username to build the account, and the nonce it
        # sent to the authorize page (the hash it sent, not its own secret value).
        now = int(self._clock())
        object_id = self._object_id(mailbox)
        claims: dict[str, Any] = {
            "aud": self.client_id,
            "iss": f"{self.base_url}/{self.tenant_id}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "name": f"Mail Relay ({mailbox})",
            "oid": object_id,
            "preferred_username": mailbox,
            "rh": _b64url(secrets.token_bytes(32)),
            "sid": str(uuid.uuid4()),
            "sub": _b64url(
                hashlib.sha256(f"{object_id}{self.client_id}".encode()).digest()
            ),
            "tid": self.tenant_id,
            "uti": _b64url(secrets.token_bytes(16)),
            "ver": "2.0",
        }
        if nonce is not None:
            claims["nonce"] = nonce
        header = {"typ": "JWT", "alg": "RS256", "kid": "sandbox"}
        return ".".join(
            (
                _b64url_json(header),
                _b64url_json(claims),
                _b64url(secrets.token_bytes(256)),
            )
        )

    def _object_id(self, mailbox: str) -> str:
        return str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"{self.tenant_id}/{mailbox.casefold()}")
        )

    @property
    def _service_principal_id(self) -> str:
        return str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"{self.tenant_id}/app/{self.client_id}")
        )

    def _revoke_digest(self, digest: str) -> None:
        if digest in self._access_tokens:
            self._revoked_access_tokens.add(digest)
        refresh = self._refresh_tokens.get(digest)
        if refresh is not None:
            refresh.revoked = True

    # -- checks ------------------------------------------------------------------------

    def _knows_tenant(self, tenant: str) -> bool:
        return tenant.lower() in {self.tenant_id.lower(), *self.tenant_domains}

    def _check_tenant_and_client(self, tenant: str, fields: Mapping[str, str]) -> None:
        if not self._knows_tenant(tenant):
            raise _Refusal(90002, tenant=tenant)
        client_id = fields.get("client_id", "")
        if client_id != self.client_id:
            raise _Refusal(700016, client_id=client_id, tenant=tenant)

    @staticmethod
    def _client_credentials(
        fields: dict[str, str], authorization: str | None
    ) -> tuple[str, str | None]:
        """The client ID and secret, from HTTP Basic (RFC 6749 §2.3.1) or the body."""
        if authorization and authorization.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(authorization[6:], validate=True).decode()
            except ValueError:
                decoded = ""
            client_id, _, secret = decoded.partition(":")
            return unquote_plus(client_id), unquote_plus(secret)
        return fields.get("client_id", ""), fields.get("client_secret")

    def _authenticate_client(
        self, credentials: tuple[str, str | None], *, grant_type: str
    ) -> bool:
        """Check the client secret; True when the client is acting as a public one."""
        client_id, secret = credentials
        if secret is None:
            if grant_type == "client_credentials" or not self.allow_public_client:
                raise _Refusal(7000218)
            return True
        if not hmac.compare_digest(secret.encode(), self._client_secret.encode()):
            raise _Refusal(7000215, client_id=client_id)
        if self.client_secret_expired:
            raise _Refusal(7000222, client_id=client_id)
        return False

    def _take_fault(self, endpoint: Endpoint, grant_type: str | None) -> _Fault | None:
        for fault in self._faults:
            if not fault.matches(endpoint, grant_type):
                continue
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
            return fault
        return None

    # -- responses ---------------------------------------------------------------------

    async def _form(self, request: web.Request) -> dict[str, str]:
        form = await request.post()
        return {key: str(form.getone(key)) for key in form}

    async def _hang(self) -> web.Response:
        """Hold the request until silence ends or the server stops."""
        self.counters["requests.unanswered"] += 1
        await self._silence_released.wait()
        return web.Response(status=503, text="Service unavailable")

    def _error_body(
        self, refusal: _Refusal, correlation_id: str | None
    ) -> dict[str, Any]:
        entry = describe_error(refusal.code)
        details = _Details(
            client_id=self.client_id,
            tenant=self.tenant_id,
            resource=EXCHANGE_AUDIENCE,
            app_name=self.app_display_name,
            issued=_timestamp(self._clock()),
            now=_timestamp(self._clock()),
            inactive=_format_lifetime(self.refresh_token_lifetime),
            parameter="scope",
        )
        details.update({key: value for key, value in refusal.details.items() if value})
        trace_id = str(uuid.uuid4())
        correlation_id = correlation_id or str(uuid.uuid4())
        timestamp = _timestamp(self._clock(), fractional=False)
        description = (
            f"AADSTS{entry.code}: {entry.text.format_map(details)} "
            f"Trace ID: {trace_id} Correlation ID: {correlation_id} "
            f"Timestamp: {timestamp}"
        )

        body: dict[str, Any] = {
            "error": refusal.error or entry.error,
            "error_description": description,
            "error_codes": [entry.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"{self.base_url}/error?code={entry.code}",
        }
        if entry.suberror is not None:
            body["suberror"] = entry.suberror
        self.counters[f"errors.AADSTS{entry.code}"] += 1
        self.last_error = body
        return body

    def _error_json(
        self, refusal: _Refusal, correlation_id: str | None
    ) -> web.Response:
        body = self._error_body(refusal, correlation_id)
        status = describe_error(refusal.code).status
        return web.json_response(body, status=status)

    def _error_page(
        self, refusal: _Refusal, correlation_id: str | None
    ) -> web.Response:
        body = self._error_body(refusal, correlation_id)
        page = (
            "<!DOCTYPE html><html><head><title>Sign in to your account</title>"
            "</head><body><h1>Sorry, but we're having trouble signing you in.</h1>"
            f'<p id="error">{html.escape(body["error_description"])}</p>'
            "</body></html>"
        )
        return web.Response(status=400, text=page, content_type="text/html")

    def _error_redirect(
        self, refusal: _Refusal, redirect_uri: str, state: str | None
    ) -> web.Response:
        body = self._error_body(refusal, None)
        params = {
            "error": body["error"],
            "error_description": body["error_description"],
            "error_uri": body["error_uri"],
        }
        if state is not None:
            params["state"] = state
        return _redirect(_with_query(redirect_uri, params))


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})


def _pkce_matches(verifier: str, challenge: str, method: str) -> bool:
    """RFC 7636 §4.6: S256 compares the hashed verifier, plain the verifier itself."""
    if method == "S256":
        computed = _b64url(hashlib.sha256(verifier.encode("ascii", "replace")).digest())
        return hmac.compare_digest(computed, challenge)
    if method == "plain":
        return hmac.compare_digest(verifier, challenge)
    return False


def _timestamp(epoch: float, *, fractional: bool = True) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    if fractional:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
