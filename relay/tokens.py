"""OAuth 2.0 for Exchange Online: sign-in, the token cache on disk, fresh tokens.

`TokenManager` wraps msal. The administrator signs in once (authorization code
with PKCE, or a device code); msal's token cache then lives in one private file
that survives restarts, and `get_access_token` hands out an access token with at
least `refresh_margin` seconds left, refreshing it when needed. `run_refresher`
keeps the refresh token in use while the appliance is quiet, because Entra
expires a refresh token that goes unused for 90 days.

msal is synchronous, so every call into it runs in a worker thread, one at a
time, with a timeout. Its failures leave as `relay.errors` types: an error answer
from Entra becomes `OAuthError` carrying the AADSTS code and Microsoft's text; a
token endpoint that cannot be reached or answers 5xx becomes
`TokenEndpointUnavailable`, which defers mail instead of holding it.

msal is built so that it talks to the configured authority host only: no
instance discovery (which would ask login.microsoftonline.com), no regional
endpoint (which could ask the Azure metadata address), and an HTTP session that
ignores proxy variables and ~/.netrc from the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import msal
import requests
import requests.adapters
import structlog
import urllib3.exceptions
from msal.exceptions import MsalServiceError

from relay.config import MailSettings, OAuthConfig, SettingsStore, check_private_file
from relay.errors import (
    Category,
    ConfigError,
    Disposition,
    OAuthError,
    TokenEndpointUnavailable,
)

log = structlog.get_logger(__name__)

SIGN_IN_OK_TEXT = "Your email has been verified. Authorization complete!"
SIGN_IN_FAILED_TEXT = (
    "Email authorization failed! Please check the provided credentials and try again!"
)

# msal adds openid, profile and offline_access itself and refuses them if passed.
EXCHANGE_SMTP_SCOPE = "https://outlook.office.com/SMTP.Send"
# App-only tokens carry the application permissions granted (SMTP.SendAsApp).
EXCHANGE_APP_SCOPE = "https://outlook.office.com/.default"

# How long an authorization URL handed out by begin_sign_in stays usable.
SIGN_IN_LIFETIME = 15 * 60.0
REAUTHORIZE_HINT = "run epp-mail-relay signin"

# Answers that mean the refresh token (or the sign-in) is no longer good: only an
# administrator signing in again helps.
REAUTHORIZATION_CODES = frozenset(
    {
        50076,  # MFA required
        50079,  # MFA enrolment required
        50173,  # grant revoked (password reset, or a replaced refresh token)
        54005,  # authorization code already redeemed
        65001,  # consent not granted
        70000,  # code or grant not valid
        70008,  # code or refresh token expired through inactivity
        70043,  # Conditional Access sign-in frequency
        500112,  # redirect URI differs from the authorize request
        501481,  # PKCE verifier mismatch
        700082,  # refresh token expired after 90 days unused
        9002313,  # refresh token malformed or unknown
    }
)
# OAuth error values (RFC 6749 §5.2 and Entra's own) that say "try again later".
_TEMPORARY_ERRORS = frozenset({"temporarily_unavailable", "server_error"})

# A whole worker call may make a discovery request and a token request, each of
# which requests may retry once on connect: this bounds all of them together.
_CALL_TIMEOUT_FACTOR = 6
# The background refresher never refreshes more often than this, even when the
# token endpoint issues tokens that live shorter than the refresh margin.
_MINIMUM_REFRESH_GAP = 1.0

_TRACE_ID = re.compile(r"\s*Trace ID:", re.IGNORECASE)
_AADSTS_CODE = re.compile(r"AADSTS(\d+)")
_HTTP_STATUS = re.compile(r"HTTP Error: (\d{3})")

_T = TypeVar("_T")


@dataclass(frozen=True)
class SignInResult:
    """Who signed in, and whether it is the mailbox the settings name."""

    mailbox: str
    matches_configured_username: bool
    message: str = SIGN_IN_OK_TEXT


@dataclass(frozen=True)
class TokenStatus:
    """What the token cache holds, for the CLI and the status page.

    `signed_in` means tokens can be had without an administrator: a refresh token
    for the delegated flows, a client secret for client credentials.
    """

    signed_in: bool
    mailbox: str | None
    access_token_expires_at: float | None


@dataclass(frozen=True)
class _PendingSignIn:
    flow: dict[str, Any]
    started_at: float


@dataclass(frozen=True)
class _CachedAccessToken:
    entry: dict[str, Any]

    @property
    def secret(self) -> str:
        return str(self.entry["secret"])

    @property
    def expires_on(self) -> float:
        return float(self.entry["expires_on"])


class TokenManager:
    """Sign-in, cached tokens and background refresh for one Mail Settings snapshot.

    A change of tenant, client or secret needs a new TokenManager; the cache file
    carries over, and tokens of another client ID in it are simply not used.
    """

    def __init__(
        self,
        *,
        settings: MailSettings,
        oauth_config: OAuthConfig,
        cache_path: Path,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[OAuthError], None] | None = None,
    ) -> None:
        self._settings = settings
        self._oauth = oauth_config
        self._cache_path = cache_path
        self._clock = clock
        self._on_error = on_error

        authority_host = oauth_config.authority_host.rstrip("/")
        parts = urlsplit(authority_host)
        try:
            port = parts.port or 443
        except ValueError as exc:
            raise ConfigError("oauth.authority_host", "has an invalid port") from exc
        self._authority = f"{authority_host}/{settings.tenant_id}"
        self._endpoint_host = parts.hostname or ""
        self._endpoint_port = port
        # msal files every cache entry under the authority's lower-case host name.
        self._environment = self._endpoint_host.lower()

        _keep_msal_debug_output_quiet()
        self._cache = msal.SerializableTokenCache()
        self._cache_problem: str | None = None
        self._load_cache()

        self._app: Any = None
        self._msal_lock = threading.Lock()
        self._operation_lock = asyncio.Lock()
        self._state_changed = asyncio.Event()
        self._pending_sign_ins: dict[str, _PendingSignIn] = {}
        self._pending_device_code: str | None = None
        self._last_refresh_at: float | None = None
        self._background_retry_at: float | None = None

    # -- sign-in ----------------------------------------------------------------------

    async def begin_sign_in(self) -> str:
        """Start an authorization code sign-in; returns the URL the admin opens.

        The URL carries a PKCE challenge and a state value; the state is good for
        one `complete_sign_in` within SIGN_IN_LIFETIME seconds.
        """
        self._require_flow("authorization_code")
        if not self._settings.redirect_uri:
            raise ConfigError(
                "redirect_uri", "is required for the authorization code sign-in"
            )

        async with self._operation_lock:
            flow = await self._call_msal(self._initiate_auth_code_flow)

        now = self._clock()
        self._pending_sign_ins = {
            state: pending
            for state, pending in self._pending_sign_ins.items()
            if now - pending.started_at <= SIGN_IN_LIFETIME
        }
        self._pending_sign_ins[str(flow["state"])] = _PendingSignIn(flow, now)
        return str(flow["auth_uri"])

    async def complete_sign_in(
        self, redirect_url_or_params: str | Mapping[str, str]
    ) -> SignInResult:
        """Redeem the code from the redirect the admin was sent to.

        Takes the whole redirect URL as pasted, or its query parameters. On
        failure raises OAuthError (ConfigError for incomplete settings): show
        SIGN_IN_FAILED_TEXT, log the error's message.
        """
        params = _auth_response_params(redirect_url_or_params)
        state = params.get("state", "")
        pending = self._pending_sign_ins.pop(state, None)
        if pending is None:
            raise OAuthError(
                "The sign-in response does not belong to a pending sign-in: its "
                "state does not match, or it was already used. Start the sign-in "
                "again.",
                error="state_mismatch",
            )
        if self._clock() - pending.started_at > SIGN_IN_LIFETIME:
            raise OAuthError(
                f"The sign-in expired after {SIGN_IN_LIFETIME / 60:g} minutes. "
                "Start the sign-in again.",
                error="sign_in_expired",
            )

        async with self._operation_lock:
            result = await self._call_msal(
                lambda: self._redeem_auth_code(pending.flow, params)
            )
        self._signed_in()
        return result

    async def sign_in_device_code(
        self, *, on_prompt: Callable[[str], None]
    ) -> SignInResult:
        """Sign in with a device code; `on_prompt` gets the text with code and URL.

        Polls the token endpoint at the interval Entra asks for until the code is
        approved, declined or expired. Cancelling the task stops the polling.
        """
        self._require_flow("device_code")

        async with self._operation_lock:
            flow = await self._call_msal(self._initiate_device_flow)
        self._pending_device_code = str(flow["device_code"])
        try:
            on_prompt(str(flow["message"]))
            while True:
                async with self._operation_lock:
                    result = await self._call_msal(lambda: self._poll_device_flow(flow))
                if result is not None:
                    self._signed_in()
                    return result
                await asyncio.sleep(int(flow.get("interval", 5)))
        finally:
            self._pending_device_code = None

    # -- tokens ------------------------------------------------------------------------

    async def get_access_token(self) -> str:
        """An access token for Exchange with at least `refresh_margin` seconds left.

        Raises OAuthError (hold: sign in again or fix the settings) or
        TokenEndpointUnavailable (defer: try again later).
        """
        async with self._operation_lock:
            return await self._call_msal(lambda: self._acquire(force_refresh=False))

    async def invalidate_access_token(self) -> None:
        """Drop cached access tokens, after Exchange refused one with 535.

        The next `get_access_token` then asks Entra for a new one; if Exchange
        refuses that too, delivery holds the queue rather than asking again.
        """
        async with self._operation_lock:
            await self._call_msal(self._drop_access_tokens)
        self._state_changed.set()

    async def run_refresher(self, stop: asyncio.Event) -> None:
        """Refresh ahead of expiry, and at least every `keepalive_interval`.

        Runs until `stop` is set. Failures go to `on_error`; a temporary one is
        retried within a minute, one that needs an administrator hourly or after
        the next sign-in.
        """
        while not stop.is_set():
            self._state_changed.clear()
            due = self._next_refresh_due()
            if due is not None and self._background_retry_at is not None:
                due = max(due, self._background_retry_at)
            delay = None if due is None else due - self._clock()
            if delay is None:
                await self._wait(stop, self._oauth.keepalive_interval)
                continue
            if delay > 0:
                await self._wait(stop, delay)
                continue

            try:
                async with self._operation_lock:
                    await self._call_msal(lambda: self._acquire(force_refresh=True))
            except OAuthError as exc:
                self._background_retry_at = self._clock() + self._retry_delay(exc)
                self._report(exc)
            except ConfigError as exc:
                self._background_retry_at = self._clock() + self._retry_delay(None)
                self._report(OAuthError(exc.message, error="invalid_configuration"))
            else:
                self._background_retry_at = None

    def status(self) -> TokenStatus:
        """Whether tokens can be had, for which mailbox, until when the current one."""
        if self._settings.oauth_flow == "client_credentials":
            token = self._cached_access_token(None, EXCHANGE_APP_SCOPE)
            return TokenStatus(
                signed_in=bool(self._settings.client_secret),
                mailbox=self._settings.username or None,
                access_token_expires_at=token.expires_on if token else None,
            )

        account = self._cached_account()
        if account is None:
            return TokenStatus(
                signed_in=False, mailbox=None, access_token_expires_at=None
            )
        home_account_id = account.get("home_account_id")
        token = self._cached_access_token(home_account_id, EXCHANGE_SMTP_SCOPE)
        return TokenStatus(
            signed_in=self._cached_refresh_token(home_account_id) is not None,
            mailbox=str(account.get("username") or "") or None,
            access_token_expires_at=token.expires_on if token else None,
        )

    def secrets(self) -> list[str]:
        """Every secret this manager holds now, for the log redactor to mask."""
        found = [self._settings.client_secret]
        for credential_type in (
            msal.TokenCache.CredentialType.ACCESS_TOKEN,
            msal.TokenCache.CredentialType.REFRESH_TOKEN,
            msal.TokenCache.CredentialType.ID_TOKEN,
        ):
            found.extend(
                str(entry.get("secret", ""))
                for entry in self._cache.search(credential_type)
            )
        for pending in list(self._pending_sign_ins.values()):
            found.append(str(pending.flow.get("code_verifier", "")))
        if self._pending_device_code:
            found.append(self._pending_device_code)
        return [secret for secret in dict.fromkeys(found) if secret]

    # -- work done in the worker thread, holding the msal lock -------------------------

    def _initiate_auth_code_flow(self) -> dict[str, Any]:
        app = self._ensure_app()
        with warnings.catch_warnings():
            # msal recommends form_post; the admin pastes the redirect URL back,
            # so the code has to arrive in the query string.
            warnings.simplefilter("ignore", UserWarning)
            flow: dict[str, Any] = app.initiate_auth_code_flow(
                scopes=[EXCHANGE_SMTP_SCOPE],
                redirect_uri=self._settings.redirect_uri,
                response_mode="query",
            )
        return flow

    def _redeem_auth_code(
        self, flow: dict[str, Any], params: dict[str, str]
    ) -> SignInResult:
        app = self._ensure_app()
        try:
            result = app.acquire_token_by_auth_code_flow(flow, params)
        except (ValueError, RuntimeError) as exc:
            if isinstance(exc, requests.RequestException | json.JSONDecodeError):
                raise
            # msal's texts quote the state and nonce values; ours says enough.
            raise OAuthError(
                "The sign-in response does not match the sign-in request (state or "
                "nonce mismatch, or neither a code nor an error in it).",
                error="state_mismatch",
            ) from None
        if "error" in result:
            raise self._oauth_error(result, during_sign_in=True)

        return self._record_sign_in(app, result)

    def _initiate_device_flow(self) -> dict[str, Any]:
        app = self._ensure_app()
        flow: dict[str, Any] = app.initiate_device_flow(scopes=[EXCHANGE_SMTP_SCOPE])
        if "user_code" not in flow:
            raise self._oauth_error(flow, during_sign_in=True)
        return flow

    def _poll_device_flow(self, flow: dict[str, Any]) -> SignInResult | None:
        """One poll; None while the user has not approved yet."""
        app = self._ensure_app()
        result = app.acquire_token_by_device_flow(
            flow, exit_condition=lambda flow: True
        )
        if result.get("error") in ("authorization_pending", "slow_down"):
            if time.time() > float(flow.get("expires_at", 0)):
                raise OAuthError(
                    "The device code expired before it was approved. Start the "
                    "sign-in again.",
                    aadsts_code=70019,
                    error="expired_token",
                )
            return None
        if "error" in result:
            raise self._oauth_error(result, during_sign_in=True)

        return self._record_sign_in(app, result)

    def _record_sign_in(self, app: Any, result: Mapping[str, Any]) -> SignInResult:
        claims = result.get("id_token_claims") or {}
        mailbox = str(claims.get("preferred_username") or claims.get("upn") or "")

        # One appliance relays for one mailbox: forget whoever signed in before.
        for account in app.get_accounts():
            if str(account.get("username", "")).casefold() != mailbox.casefold():
                app.remove_account(account)
        self._last_refresh_at = self._clock()

        return SignInResult(
            mailbox=mailbox,
            matches_configured_username=(
                mailbox.casefold() == self._settings.username.casefold()
            ),
        )

    def _acquire(self, *, force_refresh: bool) -> str:
        app = self._ensure_app()
        if self._settings.oauth_flow == "client_credentials":
            return self._acquire_app_token(app, force_refresh=force_refresh)

        account = self._signed_in_account(app)
        if account is None:
            raise self._no_account_error()
        if not force_refresh:
            cached = self._cached_access_token(
                account.get("home_account_id"), EXCHANGE_SMTP_SCOPE
            )
            if cached is not None and self._fresh_enough(cached):
                return cached.secret

        # msal itself would reuse a token with five minutes left; the margin is
        # ours to choose, so the decision above is final and msal must refresh.
        result = app.acquire_token_silent_with_error(
            [EXCHANGE_SMTP_SCOPE], account, force_refresh=True
        )
        if result is None:
            raise OAuthError(
                "reauthorization required: the token cache holds no refresh token "
                f"for {account.get('username')}; {REAUTHORIZE_HINT}",
                error="no_refresh_token",
            )
        if "error" in result:
            raise self._oauth_error(result)

        self._last_refresh_at = self._clock()
        return str(result["access_token"])

    def _acquire_app_token(self, app: Any, *, force_refresh: bool) -> str:
        cached = self._cached_access_token(None, EXCHANGE_APP_SCOPE)
        if cached is not None:
            if not force_refresh and self._fresh_enough(cached):
                return cached.secret
            # acquire_token_for_client would hand this one back; it is too old.
            self._cache.remove_at(cached.entry)

        result = app.acquire_token_for_client(scopes=[EXCHANGE_APP_SCOPE])
        if "error" in result:
            raise self._oauth_error(result)

        self._last_refresh_at = self._clock()
        return str(result["access_token"])

    def _drop_access_tokens(self) -> None:
        query = {
            "client_id": self._settings.client_id,
            "environment": self._environment,
        }
        for entry in list(
            self._cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN, query=query)
        ):
            self._cache.remove_at(entry)

    def _ensure_app(self) -> Any:
        """The msal application, built on first use (it fetches discovery then)."""
        if self._app is not None:
            return self._app
        self._check_settings()
        # RFC 6761 §6.4: names under .invalid never resolve, so do not ask a
        # resolver (which might forward the question off the machine).
        host = self._endpoint_host.rstrip(".").lower()
        if host == "invalid" or host.endswith(".invalid"):
            raise TokenEndpointUnavailable(
                f"Could not resolve hostname {self._endpoint_host}",
                category=Category.DNS,
            )

        options: dict[str, Any] = {
            "authority": self._authority,
            "http_client": _TokenEndpointSession(
                ca_file=self._oauth.ca_file, timeout=self._oauth.timeout
            ),
            "token_cache": self._cache,
            # Instance discovery asks login.microsoftonline.com about the host.
            "instance_discovery": False,
            # False, not None: None lets MSAL_FORCE_REGION in the environment send
            # requests to a regional host name derived from the authority.
            "azure_region": False,
        }
        try:
            if self._settings.oauth_flow == "device_code":
                # Entra runs the device code flow for public clients only, and
                # their refresh tokens must be redeemed without the secret.
                app = msal.PublicClientApplication(self._settings.client_id, **options)
            else:
                app = msal.ConfidentialClientApplication(
                    self._settings.client_id,
                    client_credential=self._settings.client_secret,
                    **options,
                )
        except ValueError as exc:
            if isinstance(exc, requests.RequestException):
                raise
            raise self._discovery_error(exc) from exc

        self._app = app
        return app

    # -- cache -------------------------------------------------------------------------

    def _load_cache(self) -> None:
        try:
            check_private_file(self._cache_path, key="paths.token_cache")
        except ConfigError:
            if not self._cache_path.exists():
                return
            raise
        try:
            text = self._cache_path.read_text(encoding="utf-8")
            state = json.loads(text) if text.strip() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._cache_problem = f"{type(exc).__name__}: not a readable token cache"
            return
        if not isinstance(state, dict):
            self._cache_problem = "not a JSON object"
            return
        self._cache.deserialize(text)

    def _save_cache_if_changed(self) -> None:
        """Write the cache file atomically if msal changed anything (mode 0600)."""
        if not self._cache.has_state_changed:
            return
        text = self._cache.serialize()
        try:
            _write_private_file(self._cache_path, text)
        except OSError as exc:
            # serialize() cleared the flag; set it again so the next call retries.
            self._cache.has_state_changed = True
            raise OAuthError(
                f"Could not save the token cache {self._cache_path}: "
                f"{exc.strerror or type(exc).__name__}",
                error="token_cache_write_failed",
                disposition=Disposition.DEFER,
            ) from exc
        self._cache_problem = None

    def _cached_account(self) -> dict[str, Any] | None:
        accounts = [
            dict(account)
            for account in self._cache.search(
                msal.TokenCache.CredentialType.ACCOUNT,
                query={"environment": self._environment},
            )
        ]
        return _preferred_account(accounts, self._settings.username)

    def _signed_in_account(self, app: Any) -> dict[str, Any] | None:
        accounts = [dict(account) for account in app.get_accounts()]
        return _preferred_account(accounts, self._settings.username)

    def _cached_refresh_token(
        self, home_account_id: str | None
    ) -> dict[str, Any] | None:
        query = {
            "client_id": self._settings.client_id,
            "environment": self._environment,
            "home_account_id": home_account_id,
        }
        for entry in self._cache.search(
            msal.TokenCache.CredentialType.REFRESH_TOKEN, query=query
        ):
            return dict(entry)
        return None

    def _cached_access_token(
        self, home_account_id: str | None, scope: str
    ) -> _CachedAccessToken | None:
        query = {
            "client_id": self._settings.client_id,
            "environment": self._environment,
            "home_account_id": home_account_id,
        }
        entries = [
            dict(entry)
            for entry in self._cache.search(
                msal.TokenCache.CredentialType.ACCESS_TOKEN,
                target=[scope],
                query=query,
            )
        ]
        if not entries:
            return None
        return _CachedAccessToken(max(entries, key=lambda e: float(e["expires_on"])))

    def _fresh_enough(self, token: _CachedAccessToken) -> bool:
        return token.expires_on - self._clock() >= self._oauth.refresh_margin

    # -- background refresh ------------------------------------------------------------

    def _next_refresh_due(self) -> float | None:
        """When the refresher should next refresh; None when there is nothing to."""
        if self._settings.oauth_flow == "client_credentials":
            token = self._cached_access_token(None, EXCHANGE_APP_SCOPE)
            return (
                None if token is None else token.expires_on - self._oauth.refresh_margin
            )

        account = self._cached_account()
        if account is None:
            return None
        home_account_id = account.get("home_account_id")
        refresh_token = self._cached_refresh_token(home_account_id)
        if refresh_token is None:
            return None

        refreshed_at = max(
            float(refresh_token.get("last_modification_time") or 0),
            self._last_refresh_at or 0.0,
        )
        due = refreshed_at + self._oauth.keepalive_interval
        token = self._cached_access_token(home_account_id, EXCHANGE_SMTP_SCOPE)
        if token is not None:
            due = min(due, token.expires_on - self._oauth.refresh_margin)
        if self._last_refresh_at is not None:
            due = max(due, self._last_refresh_at + _MINIMUM_REFRESH_GAP)
        return due

    def _retry_delay(self, error: OAuthError | None) -> float:
        if error is not None and error.temporary:
            return min(60.0, max(1.0, self._oauth.refresh_margin / 10))
        return min(3600.0, self._oauth.keepalive_interval)

    async def _wait(self, stop: asyncio.Event, timeout: float) -> None:
        """Sleep until `timeout`, `stop`, or a sign-in or invalidation."""
        waiters = [
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(self._state_changed.wait()),
        ]
        try:
            await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _report(self, error: OAuthError) -> None:
        if self._on_error is not None:
            self._on_error(error)

    def _signed_in(self) -> None:
        self._background_retry_at = None
        self._state_changed.set()

    # -- plumbing ----------------------------------------------------------------------

    async def _call_msal(self, work: Callable[[], _T]) -> _T:
        """Run `work` in a worker thread under the msal lock, with a timeout."""
        limit = self._oauth.timeout * _CALL_TIMEOUT_FACTOR
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await asyncio.to_thread(self._run_locked, work)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise TokenEndpointUnavailable(
                f"Timed out after {limit:g} seconds waiting for the token endpoint "
                f"{self._endpoint_host}:{self._endpoint_port}",
                category=Category.TIMEOUT,
            ) from exc

    def _run_locked(self, work: Callable[[], _T]) -> _T:
        with self._msal_lock:
            try:
                result = self._translating_errors(work)
            except BaseException:
                # Keep what msal changed before it failed (a new token, say);
                # a failed save must not hide the error that got us here.
                with contextlib.suppress(OAuthError):
                    self._save_cache_if_changed()
                raise
            self._save_cache_if_changed()
            return result

    def _translating_errors(self, work: Callable[[], _T]) -> _T:
        """Run `work`; what requests and msal raise leaves as relay errors."""
        try:
            return work()
        except requests.RequestException as exc:
            raise translate_request_error(
                exc,
                host=self._endpoint_host,
                port=self._endpoint_port,
                timeout=self._oauth.timeout,
            ) from exc
        except MsalServiceError as exc:
            raise self._server_error(exc) from exc
        except json.JSONDecodeError as exc:
            raise TokenEndpointUnavailable(
                f"The token endpoint {self._endpoint_host}:{self._endpoint_port} "
                "answered with something that is not JSON",
                category=Category.CONNECTION,
            ) from exc

    def _server_error(self, exc: Exception) -> TokenEndpointUnavailable:
        match = _HTTP_STATUS.search(str(exc))
        status = match.group(1) if match else "an error"
        return TokenEndpointUnavailable(
            f"The token endpoint {self._endpoint_host}:{self._endpoint_port} "
            f"answered HTTP {status}",
            category=Category.CONNECTION,
        )

    def _discovery_error(self, exc: ValueError) -> OAuthError:
        """The authority refused discovery: usually a tenant ID Entra does not know."""
        text = " ".join(str(part) for part in _exception_chain(exc))
        match = re.search(r'"error_description":\s*"(AADSTS\d+:[^"]*)"', text)
        if match:
            return oauth_error_from_response(
                {"error": "invalid_tenant", "error_description": match.group(1)},
                redact=self.secrets(),
            )
        return OAuthError(
            f"Could not read the authority configuration of {self._authority}; "
            "check the tenant ID",
            error="invalid_authority",
        )

    def _oauth_error(
        self, result: Mapping[str, Any], *, during_sign_in: bool = False
    ) -> OAuthError:
        return oauth_error_from_response(
            result,
            during_sign_in=during_sign_in,
            redirect_uri=self._settings.redirect_uri or None,
            redact=self.secrets(),
        )

    def _no_account_error(self) -> OAuthError:
        if self._cache_problem is not None:
            reason = (
                f"the token cache {self._cache_path} could not be read "
                f"({self._cache_problem})"
            )
        else:
            reason = "no signed-in account"
        return OAuthError(
            f"reauthorization required: {reason}; {REAUTHORIZE_HINT}",
            error="no_account",
        )

    def _check_settings(self) -> None:
        settings = self._settings
        if not settings.tenant_id:
            raise ConfigError("tenant_id", "is required for OAuth")
        if any(character in settings.tenant_id for character in "/?#%\\ \t"):
            raise ConfigError("tenant_id", "must be a tenant ID (GUID) or domain name")
        if not settings.client_id:
            raise ConfigError("client_id", "is required for OAuth")
        if settings.oauth_flow != "device_code" and not settings.client_secret:
            raise ConfigError(
                "client_secret", f"is required for the {settings.oauth_flow} flow"
            )

    def _require_flow(self, flow: str) -> None:
        if self._settings.oauth_flow != flow:
            raise ConfigError(
                "oauth_flow",
                f'is "{self._settings.oauth_flow}"; this sign-in needs "{flow}"',
            )


class _TokenEndpointSession(requests.Session):
    """The HTTP session msal uses: our CA bundle, our timeout, nothing from the env.

    Proxy variables and ~/.netrc are ignored (trust_env off) so that the client
    secret goes to the configured authority host and nowhere else.
    """

    def __init__(self, *, ca_file: Path | None, timeout: float) -> None:
        super().__init__()
        self.trust_env = False
        self.verify = str(ca_file) if ca_file is not None else True
        self._timeout = timeout
        # One retry on connect, as msal's own session does; POSTs are not retried.
        self.mount("https://", requests.adapters.HTTPAdapter(max_retries=1))

    def request(
        self, method: str, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        return super().request(method, url, *args, **kwargs)


def translate_request_error(
    exc: requests.RequestException, *, host: str, port: int, timeout: float
) -> TokenEndpointUnavailable:
    """Map any requests exception from talking to the authority to ours."""
    where = f"{host}:{port}"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return TokenEndpointUnavailable(
            f"Connection timed out after {timeout:g} seconds while connecting to "
            f"{where}",
            category=Category.TIMEOUT,
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return TokenEndpointUnavailable(
            f"Timed out after {timeout:g} seconds waiting for the token endpoint "
            f"{where}",
            category=Category.TIMEOUT,
        )
    if isinstance(exc, requests.exceptions.SSLError):
        return TokenEndpointUnavailable(
            f"TLS handshake with the token endpoint {where} failed - "
            f"{_tls_failure_reason(exc)}",
            category=Category.TLS,
        )
    if any(
        isinstance(cause, urllib3.exceptions.NameResolutionError | socket.gaierror)
        for cause in _exception_chain(exc)
    ):
        return TokenEndpointUnavailable(
            f"Could not resolve hostname {host}", category=Category.DNS
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        return TokenEndpointUnavailable(
            f"Could not connect to the token endpoint {where}: "
            f"{_connection_failure_reason(exc)}",
            category=Category.CONNECTION,
        )
    return TokenEndpointUnavailable(
        f"The request to the token endpoint {where} failed ({type(exc).__name__})",
        category=Category.CONNECTION,
    )


def oauth_error_from_response(
    response: Mapping[str, Any],
    *,
    during_sign_in: bool = False,
    redirect_uri: str | None = None,
    redact: Iterable[str] = (),
) -> OAuthError:
    """Turn an error answer from Entra (token endpoint or redirect) into OAuthError.

    The message is Microsoft's description up to its "Trace ID" tail, on one
    line, opening with the AADSTS code; the trace and correlation IDs stay as
    attributes.
    """
    error = str(response.get("error") or "unknown_error")
    raw_description = str(response.get("error_description") or "")
    description = " ".join(_TRACE_ID.split(raw_description, maxsplit=1)[0].split())
    code = _aadsts_code(response.get("error_codes"), description)

    if not description:
        description = error
    if code is not None and not description.startswith(f"AADSTS{code}"):
        description = f"AADSTS{code}: {description}"
    message = description
    if code == 50011 and redirect_uri and redirect_uri not in message:
        message = f"{message} Redirect URI sent: {redirect_uri}"
    if code in REAUTHORIZATION_CODES and not during_sign_in:
        message = f"{message} Reauthorization required: {REAUTHORIZE_HINT}."
    for secret in redact:
        if len(secret) >= 8:
            message = message.replace(secret, "[redacted]")

    return OAuthError(
        message,
        aadsts_code=code,
        error=error,
        trace_id=_optional_text(response.get("trace_id")),
        correlation_id=_optional_text(response.get("correlation_id")),
        disposition=Disposition.DEFER if error in _TEMPORARY_ERRORS else None,
    )


def _aadsts_code(error_codes: Any, description: str) -> int | None:
    if isinstance(error_codes, list) and error_codes:
        try:
            return int(error_codes[0])
        except (TypeError, ValueError):
            pass
    # An error redirect from the authorize page has no error_codes field.
    match = _AADSTS_CODE.search(description)
    return int(match.group(1)) if match else None


def _optional_text(value: Any) -> str | None:
    return str(value) if value else None


def _auth_response_params(value: str | Mapping[str, str]) -> dict[str, str]:
    """The query parameters of a pasted redirect URL, or of a bare query string."""
    if isinstance(value, Mapping):
        return {str(key): str(item) for key, item in value.items()}
    text = value.strip()
    if "://" in text or text.startswith("/"):
        parts = urlsplit(text)
        text = parts.query or parts.fragment
    return dict(parse_qsl(text.lstrip("?#"), keep_blank_values=True))


def _preferred_account(
    accounts: list[dict[str, Any]], username: str
) -> dict[str, Any] | None:
    for account in accounts:
        if str(account.get("username", "")).casefold() == username.casefold():
            return account
    return accounts[0] if accounts else None


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it wraps: causes, contexts, urllib3 reasons, args."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending and len(seen) < 32:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        nested = [
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),
        ]
        nested.extend(current.args)
        pending.extend(item for item in nested if isinstance(item, BaseException))


def _tls_failure_reason(exc: BaseException) -> str:
    for cause in _exception_chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = cause.verify_message or "certificate verify failed"
            return f"peer certificate validation error ({detail})"
    return "TLS error"


def _connection_failure_reason(exc: BaseException) -> str:
    for cause in _exception_chain(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
    return "connection failed"


def _write_private_file(path: Path, text: str) -> None:
    """Replace `path` atomically: temp file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8", closefd=False) as handle:
            handle.write(text)
            handle.flush()
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _keep_msal_debug_output_quiet() -> None:
    """Keep msal's DEBUG records (which quote auth codes and PKCE verifiers) out.

    Raises the "msal" logger to INFO at least, never lowering what is set.
    """
    msal_logger = logging.getLogger("msal")
    msal_logger.setLevel(max(logging.INFO, msal_logger.getEffectiveLevel()))


class TokenSource:
    """The TokenManager for the Mail Settings in effect, and its background refresh.

    A change of the settings (a new secret, tenant or client) builds a new manager
    on the same cache file; the refresher always runs for the current one.
    """

    def __init__(
        self,
        *,
        settings: SettingsStore,
        oauth_config: OAuthConfig,
        cache_path: Path,
        on_error: Callable[[OAuthError], None] | None = None,
    ) -> None:
        self._settings = settings
        self._oauth_config = oauth_config
        self._cache_path = cache_path
        self._on_error = on_error
        self._manager: TokenManager | None = None
        self._manager_version = -1

    def manager(self) -> TokenManager:
        """The manager for the current settings, built anew when they changed."""
        if self._manager is None or self._manager_version != self._settings.version:
            self._manager = TokenManager(
                settings=self._settings.current,
                oauth_config=self._oauth_config,
                cache_path=self._cache_path,
                on_error=self._on_error,
            )
            self._manager_version = self._settings.version
        return self._manager

    def reconfigure(self, oauth_config: OAuthConfig) -> None:
        self._oauth_config = oauth_config
        self._manager = None

    def reload_cache(self) -> None:
        """Forget the in-memory cache: another process (a CLI sign-in) wrote it."""
        self._manager = None

    async def get_access_token(self) -> str:
        return await self.manager().get_access_token()

    def status(self) -> TokenStatus | None:
        if self._settings.current.auth_type != "oauth":
            return None
        try:
            return self.manager().status()
        except (OAuthError, ConfigError):
            return None

    async def run_refresher(self, stop: asyncio.Event) -> None:
        """Keep the current manager's tokens fresh while OAuth is in use."""
        while not stop.is_set():
            if self._settings.current.auth_type != "oauth":
                await _wait_for(stop, 5.0)
                continue
            try:
                manager = self.manager()
            except (OAuthError, ConfigError) as error:
                log.warning("token_source_unusable", error=error.message)
                await _wait_for(stop, 60.0)
                continue
            version = self._settings.version
            manager_stop = asyncio.Event()
            refresher = asyncio.create_task(manager.run_refresher(manager_stop))
            while not stop.is_set() and version == self._settings.version:
                if manager is not self._manager:
                    break
                await _wait_for(stop, 1.0)
            manager_stop.set()
            await asyncio.gather(refresher, return_exceptions=True)


async def _wait_for(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
