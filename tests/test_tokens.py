"""Tests for relay.tokens, through real msal calls to the sandbox Entra on loopback.

An autouse guard replaces name resolution and socket connects for the duration of
every test: any attempt to reach something other than loopback is recorded and
refused, and the test fails at teardown. msal trying login.microsoftonline.com
(instance discovery) or the Azure metadata address (region discovery) would trip it.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import itertools
import json
import logging
import socket
import ssl
import stat
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest
import requests
import urllib3.exceptions
from hypothesis import assume, given
from hypothesis import strategies as st

from relay.config import MailSettings, OAuthConfig
from relay.errors import (
    Category,
    ConfigError,
    Disposition,
    OAuthError,
    TokenEndpointUnavailable,
)
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.entra import EXCHANGE_AUDIENCE, SandboxEntra
from relay.tokens import (
    EXCHANGE_APP_SCOPE,
    SIGN_IN_FAILED_TEXT,
    SIGN_IN_OK_TEXT,
    SignInResult,
    TokenManager,
    oauth_error_from_response,
    translate_request_error,
)

MAILBOX = "relay@contoso.test"
# Marker secret: tests search every output for it.
CLIENT_SECRET = "Marker-Client-Secret-h3Vq9ZrT5m"
REDIRECT_URI = "http://localhost/epp/oauth/callback"


# -- the loopback guard ---------------------------------------------------------------


@dataclass
class LoopbackGuard:
    """Records every attempt to resolve or connect to something not on loopback."""

    attempts: list[str] = field(default_factory=list)


def _is_loopback_host(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    text = str(host).strip("[]").split("%")[0]
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def loopback_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackGuard]:
    guard = LoopbackGuard()
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback_host(host):
            guard.attempts.append(f"getaddrinfo {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, "blocked by the loopback guard")
        return real_getaddrinfo(host, port, *args, **kwargs)

    def check_address(sock: socket.socket, address: Any) -> None:
        inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        if not (inet and _is_loopback_host(address[0])):
            guard.attempts.append(f"connect {address!r}")
            raise ConnectionRefusedError("blocked by the loopback guard")

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        check_address(sock, address)
        real_connect(sock, address)

    def guarded_connect_ex(sock: socket.socket, address: Any) -> int:
        check_address(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    yield guard
    assert guard.attempts == [], "something tried to leave loopback"


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def entra_pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPKI:
    return SandboxPKI.create(tmp_path_factory.mktemp("entra-pki"))


@pytest.fixture
async def entra(entra_pki: SandboxPKI) -> AsyncIterator[SandboxEntra]:
    server = SandboxEntra(
        server_ssl_context=entra_pki.server_context(),
        client_secret=CLIENT_SECRET,
        redirect_uris=(REDIRECT_URI,),
        mailbox=MAILBOX,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


ManagerFactory = Callable[..., TokenManager]


@pytest.fixture
def make_manager(
    entra: SandboxEntra, entra_pki: SandboxPKI, tmp_path: Path
) -> ManagerFactory:
    """TokenManagers for the sandbox; keyword arguments change settings or config."""

    def factory(
        *,
        cache_path: Path | None = None,
        oauth: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[OAuthError], None] | None = None,
        **setting_changes: Any,
    ) -> TokenManager:
        settings: dict[str, Any] = {
            "auth_type": "oauth",
            "hostname": "localhost",
            "username": MAILBOX,
            "tenant_id": entra.tenant_id,
            "client_id": entra.client_id,
            "client_secret": CLIENT_SECRET,
            "redirect_uri": REDIRECT_URI,
        }
        settings.update(setting_changes)
        config: dict[str, Any] = {
            "authority_host": entra.base_url,
            "ca_file": entra_pki.ca_file,
            "timeout": 5.0,
        }
        config.update(oauth or {})
        return TokenManager(
            settings=MailSettings(**settings),
            oauth_config=OAuthConfig(**config),
            cache_path=cache_path or tmp_path / "token-cache.json",
            clock=clock,
            on_error=on_error,
        )

    return factory


@dataclass
class AuthorizeAnswer:
    status: int
    location: str | None
    text: str


async def open_authorize_url(url: str, pki: SandboxPKI) -> AuthorizeAnswer:
    """Do what the administrator's browser does with the sign-in URL, minus the UI."""
    trust = ssl.create_default_context(cafile=str(pki.ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=trust, allow_redirects=False) as response,
    ):
        return AuthorizeAnswer(
            status=response.status,
            location=response.headers.get("Location"),
            text=await response.text(),
        )


async def redirect_after_sign_in(manager: TokenManager, pki: SandboxPKI) -> str:
    answer = await open_authorize_url(await manager.begin_sign_in(), pki)
    assert answer.status == 302 and answer.location is not None, answer.text
    return answer.location


async def sign_in(manager: TokenManager, pki: SandboxPKI) -> SignInResult:
    return await manager.complete_sign_in(await redirect_after_sign_in(manager, pki))


@pytest.fixture
async def signed_in(
    make_manager: ManagerFactory, entra_pki: SandboxPKI
) -> TokenManager:
    manager = make_manager()
    await sign_in(manager, entra_pki)
    return manager


async def raised_by(awaitable: Awaitable[Any]) -> BaseException:
    try:
        await awaitable
    except BaseException as exc:
        return exc
    raise AssertionError("nothing was raised")


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def description_sent(entra: SandboxEntra) -> str:
    assert entra.last_error is not None
    return str(entra.last_error["error_description"]).split(" Trace ID")[0]


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# -- the guard itself -------------------------------------------------------------------


def test_tokens_loopback_guard_refuses_outside_hosts(
    loopback_guard: LoopbackGuard,
) -> None:
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("login.microsoftonline.com", 443)
    blocked = list(loopback_guard.attempts)
    loopback_guard.attempts.clear()

    assert blocked == ["getaddrinfo 'login.microsoftonline.com'"]


# -- sign-in ----------------------------------------------------------------------------


async def test_tokens_sign_in_then_exchange_accepts_the_token(
    signed_in: TokenManager, entra: SandboxEntra
) -> None:
    token = await signed_in.get_access_token()

    assert entra.validate_access_token(MAILBOX, token) is None


async def test_tokens_sign_in_reports_the_mailbox_and_ui_text(
    make_manager: ManagerFactory, entra_pki: SandboxPKI
) -> None:
    result = await sign_in(make_manager(), entra_pki)

    assert result == SignInResult(
        mailbox=MAILBOX, matches_configured_username=True, message=SIGN_IN_OK_TEXT
    )


async def test_tokens_sign_in_flags_a_different_mailbox(
    make_manager: ManagerFactory, entra: SandboxEntra, entra_pki: SandboxPKI
) -> None:
    entra.mailbox = "someone.else@contoso.test"

    result = await sign_in(make_manager(), entra_pki)

    assert result.matches_configured_username is False


async def test_tokens_access_token_is_for_exchange_smtp_send(
    signed_in: TokenManager, entra: SandboxEntra
) -> None:
    token = await signed_in.get_access_token()
    record = entra.issued_access_tokens[-1]

    assert (len(token) >= 1500, record.audience, record.scopes, record.mailbox) == (
        True,
        EXCHANGE_AUDIENCE,
        frozenset({"SMTP.Send"}),
        MAILBOX,
    )


async def test_tokens_sign_in_url_carries_pkce_and_exact_redirect_uri(
    make_manager: ManagerFactory,
) -> None:
    url = await make_manager().begin_sign_in()
    query = parse_qs(urlsplit(url).query)

    assert (query["code_challenge_method"], query["redirect_uri"]) == (
        ["S256"],
        [REDIRECT_URI],
    )


async def test_tokens_pkce_wrong_verifier_is_rejected_by_sandbox(
    make_manager: ManagerFactory, entra: SandboxEntra, entra_pki: SandboxPKI
) -> None:
    redirect = await redirect_after_sign_in(make_manager(), entra_pki)
    code = parse_qs(urlsplit(redirect).query)["code"][0]
    form = {
        "grant_type": "authorization_code",
        "client_id": entra.client_id,
        "client_secret": CLIENT_SECRET,
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": "not-the-verifier-" + "x" * 40,
        "scope": "https://outlook.office.com/SMTP.Send offline_access openid",
    }
    trust = ssl.create_default_context(cafile=str(entra_pki.ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{entra.authority}/oauth2/v2.0/token", data=form, ssl=trust
        ) as response,
    ):
        body = await response.json()

    assert (response.status, body["error_codes"]) == (400, [501481])


async def test_tokens_state_mismatch_is_rejected(
    make_manager: ManagerFactory, entra_pki: SandboxPKI
) -> None:
    manager = make_manager()
    redirect = await redirect_after_sign_in(manager, entra_pki)

    error = await raised_by(
        manager.complete_sign_in(with_query(redirect, state="forged-state"))
    )

    assert isinstance(error, OAuthError) and error.error == "state_mismatch"


async def test_tokens_sign_in_response_is_single_use(
    make_manager: ManagerFactory, entra_pki: SandboxPKI
) -> None:
    manager = make_manager()
    redirect = await redirect_after_sign_in(manager, entra_pki)
    await manager.complete_sign_in(redirect)

    error = await raised_by(manager.complete_sign_in(redirect))

    assert isinstance(error, OAuthError) and error.error == "state_mismatch"


async def test_tokens_sign_in_expires_after_fifteen_minutes(
    make_manager: ManagerFactory, entra_pki: SandboxPKI
) -> None:
    now = [time.time()]
    manager = make_manager(clock=lambda: now[0])
    redirect = await redirect_after_sign_in(manager, entra_pki)
    now[0] += 15 * 60 + 1

    error = await raised_by(manager.complete_sign_in(redirect))

    assert isinstance(error, OAuthError) and error.error == "sign_in_expired"


async def test_tokens_sign_in_accepts_query_parameters(
    make_manager: ManagerFactory, entra_pki: SandboxPKI
) -> None:
    manager = make_manager()
    redirect = await redirect_after_sign_in(manager, entra_pki)
    params = {
        key: values[0] for key, values in parse_qs(urlsplit(redirect).query).items()
    }

    result = await manager.complete_sign_in(params)

    assert result.mailbox == MAILBOX


async def test_tokens_redirect_mismatch_page_names_the_exact_uri(
    make_manager: ManagerFactory, entra: SandboxEntra, entra_pki: SandboxPKI
) -> None:
    unregistered = REDIRECT_URI + "/"
    url = await make_manager(redirect_uri=unregistered).begin_sign_in()

    answer = await open_authorize_url(url, entra_pki)
    page = html.unescape(answer.text)

    assert (
        answer.status,
        "AADSTS50011" in page,
        f"'{unregistered}'" in page,
        entra.received_redirect_uris[-1],
    ) == (400, True, True, unregistered)


async def test_tokens_redirect_mismatch_error_carries_the_uri_sent(
    make_manager: ManagerFactory, entra: SandboxEntra, entra_pki: SandboxPKI
) -> None:
    manager = make_manager()
    redirect = await redirect_after_sign_in(manager, entra_pki)
    entra.inject_error(50011, grant_type="authorization_code")

    error = await raised_by(manager.complete_sign_in(redirect))

    assert isinstance(error, OAuthError)
    assert (error.aadsts_code, f"'{REDIRECT_URI}'" in error.message) == (50011, True)


async def test_tokens_consent_error_redirect_becomes_oauth_error(
    make_manager: ManagerFactory, entra: SandboxEntra, entra_pki: SandboxPKI
) -> None:
    manager = make_manager()
    entra.inject_error(65001, endpoint="authorize")
    redirect = await redirect_after_sign_in(manager, entra_pki)

    error = await raised_by(manager.complete_sign_in(redirect))

    assert isinstance(error, OAuthError) and error.aadsts_code == 65001


async def test_tokens_wrong_client_secret_fails_sign_in_with_aadsts7000215(
    make_manager: ManagerFactory, entra_pki: SandboxPKI
) -> None:
    manager = make_manager(client_secret="the-secret-ID-not-its-value")
    redirect = await redirect_after_sign_in(manager, entra_pki)

    error = await raised_by(manager.complete_sign_in(redirect))

    assert isinstance(error, OAuthError)
    assert error.message.startswith("AADSTS7000215: Invalid client secret provided.")


def test_tokens_ui_texts_are_the_appliance_texts() -> None:
    assert (SIGN_IN_OK_TEXT, SIGN_IN_FAILED_TEXT) == (
        "Your email has been verified. Authorization complete!",
        "Email authorization failed! Please check the provided credentials and try "
        "again!",
    )


async def test_tokens_device_code_sign_in_then_refresh_as_public_client(
    make_manager: ManagerFactory, entra: SandboxEntra
) -> None:
    manager = make_manager(oauth_flow="device_code", client_secret="")
    prompts: list[str] = []
    result = await manager.sign_in_device_code(on_prompt=prompts.append)
    await manager.invalidate_access_token()

    token = await manager.get_access_token()

    assert (
        result.mailbox,
        "/devicelogin" in prompts[0],
        entra.validate_access_token(MAILBOX, token),
    ) == (MAILBOX, True, None)


async def test_tokens_unknown_tenant_is_aadsts90002(
    make_manager: ManagerFactory,
) -> None:
    error = await raised_by(make_manager(tenant_id="nowhere.test").begin_sign_in())

    assert isinstance(error, OAuthError) and error.aadsts_code == 90002


# -- getting tokens ------------------------------------------------------------------------


async def test_tokens_never_signed_in_requires_reauthorization(
    make_manager: ManagerFactory,
) -> None:
    error = await raised_by(make_manager().get_access_token())

    assert isinstance(error, OAuthError)
    assert error.message == (
        "reauthorization required: no signed-in account; run epp-mail-relay signin"
    )


async def test_tokens_restart_reuses_the_cache_without_signing_in(
    signed_in: TokenManager, make_manager: ManagerFactory, entra: SandboxEntra
) -> None:
    # Rotate the refresh token once, so the new process must read the rotated one.
    await signed_in.invalidate_access_token()
    await signed_in.get_access_token()
    restarted = make_manager()
    await restarted.invalidate_access_token()

    token = await restarted.get_access_token()

    assert entra.validate_access_token(MAILBOX, token) is None


async def test_tokens_invalidate_forces_a_refresh(
    signed_in: TokenManager, entra: SandboxEntra
) -> None:
    first = await signed_in.get_access_token()
    await signed_in.invalidate_access_token()

    second = await signed_in.get_access_token()

    assert (second != first, entra.counters["refreshes"]) == (True, 1)


async def test_tokens_fresh_token_comes_from_the_cache(
    signed_in: TokenManager, entra: SandboxEntra
) -> None:
    first = await signed_in.get_access_token()
    requests_before = entra.counters["requests.token"]

    second = await signed_in.get_access_token()

    assert (second, entra.counters["requests.token"]) == (first, requests_before)


async def test_tokens_short_lifetimes_refresh_ahead_of_expiry(
    make_manager: ManagerFactory,
    entra: SandboxEntra,
    entra_pki: SandboxPKI,
    tmp_path: Path,
) -> None:
    entra.access_token_lifetime = 4.0
    manager = make_manager(oauth={"refresh_margin": 2.0})
    await sign_in(manager, entra_pki)
    rejected: list[str] = []
    seen: list[tuple[int, int]] = []

    deadline = time.monotonic() + 9.0
    while time.monotonic() < deadline:
        token = await manager.get_access_token()
        reply = entra.validate_access_token(MAILBOX, token)
        if reply is not None:
            rejected.append(reply)
        cache = json.loads((tmp_path / "token-cache.json").read_text())
        for entry in cache["AccessToken"].values():
            lifetime = (int(entry["cached_at"]), int(entry["expires_on"]))
            if lifetime not in seen:
                seen.append(lifetime)
        await asyncio.sleep(0.2)

    late = [new for old, new in itertools.pairwise(seen) if new[0] >= old[1]]
    assert (rejected, len(seen) >= 3, late) == ([], True, [])


@pytest.mark.parametrize(
    ("code", "reauthorize"),
    [
        (700082, True),
        (70043, True),
        (7000215, False),
        (7000222, False),
        (65001, True),
        (50076, True),
        (50079, True),
        (900144, False),
        (4242424, False),
    ],
)
async def test_tokens_injected_aadsts_errors_keep_code_and_description(
    signed_in: TokenManager, entra: SandboxEntra, code: int, reauthorize: bool
) -> None:
    await signed_in.invalidate_access_token()
    entra.inject_error(code, grant_type="refresh_token")

    error = await raised_by(signed_in.get_access_token())

    assert isinstance(error, OAuthError) and not isinstance(
        error, TokenEndpointUnavailable
    )
    assert (
        error.aadsts_code,
        error.message.startswith(description_sent(entra)),
        "Trace ID" in error.message,
        "Reauthorization required" in error.message,
        error.disposition,
        error.trace_id == entra.last_error["trace_id"],  # type: ignore[index]
    ) == (code, True, False, reauthorize, Disposition.HOLD, True)


async def test_tokens_expired_refresh_token_needs_reauthorization(
    signed_in: TokenManager, entra: SandboxEntra
) -> None:
    entra.refresh_token_lifetime = 1.0
    await asyncio.sleep(1.2)
    await signed_in.invalidate_access_token()

    error = await raised_by(signed_in.get_access_token())

    assert isinstance(error, OAuthError) and error.aadsts_code == 700082


async def test_tokens_http_503_defers(
    signed_in: TokenManager, entra: SandboxEntra
) -> None:
    await signed_in.invalidate_access_token()
    entra.inject_http_status(503)

    error = await raised_by(signed_in.get_access_token())

    assert isinstance(error, TokenEndpointUnavailable)
    assert (error.category, error.disposition, error.message.endswith("HTTP 503")) == (
        Category.CONNECTION,
        Disposition.DEFER,
        True,
    )


async def test_tokens_silent_token_endpoint_times_out(
    make_manager: ManagerFactory, entra: SandboxEntra, entra_pki: SandboxPKI
) -> None:
    manager = make_manager(oauth={"timeout": 1.0})
    await sign_in(manager, entra_pki)
    await manager.invalidate_access_token()
    entra.set_silent(True)

    error = await raised_by(manager.get_access_token())

    assert isinstance(error, TokenEndpointUnavailable)
    assert (error.category, error.disposition) == (Category.TIMEOUT, Disposition.DEFER)


async def test_tokens_refused_connection_defers(
    make_manager: ManagerFactory,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    manager = make_manager(oauth={"authority_host": f"https://127.0.0.1:{closed_port}"})

    error = await raised_by(manager.begin_sign_in())

    assert isinstance(error, TokenEndpointUnavailable)
    assert error.category is Category.CONNECTION


async def test_tokens_invalid_host_is_dns_without_asking_a_resolver(
    make_manager: ManagerFactory, loopback_guard: LoopbackGuard
) -> None:
    manager = make_manager(oauth={"authority_host": "https://login.sandbox.invalid"})

    error = await raised_by(manager.get_access_token())

    assert isinstance(error, TokenEndpointUnavailable)
    assert (error.category, error.message, loopback_guard.attempts) == (
        Category.DNS,
        "Could not resolve hostname login.sandbox.invalid",
        [],
    )


async def test_tokens_client_credentials_token_is_app_only_and_accepted(
    make_manager: ManagerFactory, entra: SandboxEntra
) -> None:
    manager = make_manager(oauth_flow="client_credentials", redirect_uri="")

    token = await manager.get_access_token()
    record = entra.issued_access_tokens[-1]

    assert (
        record.app_only,
        record.roles,
        entra.validate_access_token(MAILBOX, token),
    ) == (
        True,
        frozenset({"SMTP.SendAsApp"}),
        None,
    )


async def test_tokens_client_credentials_refreshes_within_the_margin(
    make_manager: ManagerFactory, entra: SandboxEntra
) -> None:
    entra.access_token_lifetime = 3.0
    manager = make_manager(
        oauth_flow="client_credentials", redirect_uri="", oauth={"refresh_margin": 2.5}
    )
    first = await manager.get_access_token()
    await asyncio.sleep(0.6)

    second = await manager.get_access_token()

    assert (second != first, entra.tokens_issued("client_credentials")) == (True, 2)


async def test_tokens_msal_region_variables_send_nothing_elsewhere(
    make_manager: ManagerFactory,
    entra: SandboxEntra,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With azure_region left at None these would make msal build a regional host
    # name; the loopback guard fails the test if anything tries to reach it.
    monkeypatch.setenv("MSAL_FORCE_REGION", "westeurope")
    monkeypatch.setenv("REGION_NAME", "westeurope")
    manager = make_manager(oauth_flow="client_credentials", redirect_uri="")

    token = await manager.get_access_token()

    assert entra.validate_access_token(MAILBOX, token) is None


async def test_tokens_no_host_but_the_sandbox_is_contacted(
    make_manager: ManagerFactory,
    entra: SandboxEntra,
    entra_pki: SandboxPKI,
    loopback_guard: LoopbackGuard,
    tmp_path: Path,
) -> None:
    delegated = make_manager()
    await sign_in(delegated, entra_pki)
    await delegated.invalidate_access_token()
    await delegated.get_access_token()
    app_only = make_manager(
        oauth_flow="client_credentials", cache_path=tmp_path / "app-cache.json"
    )
    await app_only.get_access_token()

    assert loopback_guard.attempts == []


# -- status, cache file, secrets -------------------------------------------------------


async def test_tokens_status_after_sign_in(signed_in: TokenManager) -> None:
    await signed_in.get_access_token()

    status = signed_in.status()

    assert (
        status.signed_in,
        status.mailbox,
        status.access_token_expires_at is not None,
    ) == (
        True,
        MAILBOX,
        True,
    )


def test_tokens_status_before_sign_in(make_manager: ManagerFactory) -> None:
    status = make_manager().status()

    assert (status.signed_in, status.mailbox) == (False, None)


async def test_tokens_cache_file_is_private(
    signed_in: TokenManager, tmp_path: Path
) -> None:
    mode = stat.S_IMODE((tmp_path / "token-cache.json").stat().st_mode)

    assert mode == 0o600


def test_tokens_cache_file_readable_by_others_is_refused(
    make_manager: ManagerFactory, tmp_path: Path
) -> None:
    cache_path = tmp_path / "token-cache.json"
    cache_path.write_text("{}")
    cache_path.chmod(0o644)

    with pytest.raises(ConfigError) as raised:
        make_manager(cache_path=cache_path)

    assert raised.value.key == "paths.token_cache"


async def test_tokens_unreadable_cache_asks_for_a_new_sign_in(
    make_manager: ManagerFactory, tmp_path: Path
) -> None:
    cache_path = tmp_path / "token-cache.json"
    cache_path.write_text("{not json")
    cache_path.chmod(0o600)

    error = await raised_by(make_manager(cache_path=cache_path).get_access_token())

    assert isinstance(error, OAuthError)
    assert error.message.startswith(
        f"reauthorization required: the token cache {cache_path} could not be read"
    )


async def test_tokens_sign_in_replaces_an_unreadable_cache(
    make_manager: ManagerFactory, entra_pki: SandboxPKI, tmp_path: Path
) -> None:
    cache_path = tmp_path / "token-cache.json"
    cache_path.write_text("{not json")
    cache_path.chmod(0o600)
    manager = make_manager(cache_path=cache_path)
    await sign_in(manager, entra_pki)

    restarted = make_manager(cache_path=cache_path)

    assert restarted.status().mailbox == MAILBOX


async def test_tokens_secrets_lists_client_secret_and_cached_tokens(
    signed_in: TokenManager, tmp_path: Path
) -> None:
    cache = json.loads((tmp_path / "token-cache.json").read_text())
    cached = {
        entry["secret"]
        for kind in ("AccessToken", "RefreshToken", "IdToken")
        for entry in cache[kind].values()
    }

    assert set(signed_in.secrets()) == cached | {CLIENT_SECRET}


def _exception_texts(error: BaseException) -> str:
    return "".join(traceback.format_exception(error)) + repr(error)


async def test_tokens_secrets_appear_in_no_error_or_log(
    make_manager: ManagerFactory,
    entra: SandboxEntra,
    entra_pki: SandboxPKI,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    manager = make_manager(oauth={"timeout": 1.0})
    secrets: set[str] = {CLIENT_SECRET}
    errors: list[BaseException] = []

    async def next_redirect() -> str:
        url = await manager.begin_sign_in()
        secrets.update(manager.secrets())  # the PKCE verifiers of pending sign-ins
        redirect = (await open_authorize_url(url, entra_pki)).location
        assert redirect is not None
        secrets.add(parse_qs(urlsplit(redirect).query)["code"][0])
        return redirect

    await manager.begin_sign_in()  # a sign-in left pending, with its own verifier
    redirect = await next_redirect()
    forged = with_query(redirect, state="forged")
    errors.append(await raised_by(manager.complete_sign_in(forged)))
    entra.inject_error(7000215, grant_type="authorization_code")
    errors.append(await raised_by(manager.complete_sign_in(redirect)))
    await manager.complete_sign_in(await next_redirect())
    await manager.invalidate_access_token()
    await manager.get_access_token()  # a refresh, so a rotated refresh token too
    secrets.update(manager.secrets())
    # msal replays a 5xx for 5 s and a 400 for 60 s to the same refresh token
    # without asking again, so the faults come in this order.
    for fault in ("silence", "503", "700082"):
        await manager.invalidate_access_token()
        if fault == "silence":
            entra.set_silent(True)
        elif fault == "503":
            entra.inject_http_status(503, times=1)
        else:
            entra.inject_error(700082, grant_type="refresh_token")
        errors.append(await raised_by(manager.get_access_token()))
        entra.clear_faults()
    outputs = [caplog.text, repr(entra), repr(entra.counters), repr(entra.last_error)]
    outputs += [_exception_texts(error) for error in errors]

    leaks = [secret[:12] for secret in secrets for text in outputs if secret in text]
    assert (len(errors), len(secrets) >= 7, leaks) == (5, True, [])


# -- background refresh ---------------------------------------------------------------


async def test_tokens_refresher_refreshes_an_idle_mailbox(
    make_manager: ManagerFactory, entra: SandboxEntra, entra_pki: SandboxPKI
) -> None:
    manager = make_manager(oauth={"keepalive_interval": 0.5})
    await sign_in(manager, entra_pki)
    stop = asyncio.Event()
    refresher = asyncio.create_task(manager.run_refresher(stop))

    await wait_until(lambda: entra.counters["refreshes"] >= 2)
    stop.set()
    await refresher

    assert refresher.done() and refresher.exception() is None


async def test_tokens_refresher_refreshes_ahead_of_expiry(
    make_manager: ManagerFactory, entra: SandboxEntra, entra_pki: SandboxPKI
) -> None:
    entra.access_token_lifetime = 3.0
    manager = make_manager(oauth={"refresh_margin": 1.5})
    await sign_in(manager, entra_pki)
    stop = asyncio.Event()
    refresher = asyncio.create_task(manager.run_refresher(stop))

    await wait_until(lambda: entra.counters["refreshes"] >= 1, timeout=5.0)
    stop.set()
    await refresher
    token = await manager.get_access_token()

    assert entra.validate_access_token(MAILBOX, token) is None


async def test_tokens_refresher_reports_failures(
    make_manager: ManagerFactory, entra: SandboxEntra, entra_pki: SandboxPKI
) -> None:
    reported: list[OAuthError] = []
    manager = make_manager(oauth={"keepalive_interval": 0.5}, on_error=reported.append)
    await sign_in(manager, entra_pki)
    entra.inject_error(700082, grant_type="refresh_token", times=None)
    stop = asyncio.Event()
    refresher = asyncio.create_task(manager.run_refresher(stop))

    await wait_until(lambda: bool(reported))
    stop.set()
    await refresher

    assert reported[0].aadsts_code == 700082


# -- the translations ------------------------------------------------------------------


def _instances_of_every_request_exception() -> list[requests.RequestException]:
    found: list[requests.RequestException] = []
    for value in vars(requests.exceptions).values():
        if isinstance(value, type) and issubclass(value, requests.RequestException):
            try:
                found.append(value("failure"))
            except TypeError:
                found.append(value("failure", "", 0))
    return found


@pytest.mark.parametrize(
    "exc", _instances_of_every_request_exception(), ids=lambda exc: type(exc).__name__
)
def test_tokens_every_request_exception_is_translated(
    exc: requests.RequestException,
) -> None:
    error = translate_request_error(exc, host="login.test", port=443, timeout=30.0)

    assert isinstance(error, TokenEndpointUnavailable) and error.temporary


def _dns_failure() -> requests.ConnectionError:
    lookup = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    reason = urllib3.exceptions.NameResolutionError("login.test", None, lookup)  # type: ignore[arg-type]
    return requests.ConnectionError(
        urllib3.exceptions.MaxRetryError(None, "/", reason)  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("exc", "category"),
    [
        (_dns_failure(), Category.DNS),
        (requests.exceptions.ConnectTimeout("slow"), Category.TIMEOUT),
        (requests.exceptions.ReadTimeout("slow"), Category.TIMEOUT),
        (requests.exceptions.SSLError("bad certificate"), Category.TLS),
        (
            requests.ConnectionError(ConnectionRefusedError(111, "Refused")),
            Category.CONNECTION,
        ),
    ],
    ids=["dns", "connect-timeout", "read-timeout", "tls", "refused"],
)
def test_tokens_request_exceptions_get_their_category(
    exc: requests.RequestException, category: Category
) -> None:
    error = translate_request_error(exc, host="login.test", port=443, timeout=30.0)

    assert error.category is category


@given(
    code=st.integers(min_value=1, max_value=99_999_999),
    text=st.text(st.sampled_from("abc XYZ.,'-:\r\n\t"), max_size=80),
    separator=st.sampled_from([" ", "\r\n", "\n"]),
)
def test_tokens_error_message_is_one_line_without_trace_tail(
    code: int, text: str, separator: str
) -> None:
    assume("trace id" not in text.lower())
    description = (
        f"AADSTS{code}: {text}{separator}Trace ID: 1{separator}Correlation ID: 2"
        f"{separator}Timestamp: 2024-01-01 00:00:00Z"
    )

    error = oauth_error_from_response(
        {
            "error": "invalid_grant",
            "error_description": description,
            "error_codes": [code],
        }
    )

    assert (
        error.message.startswith(f"AADSTS{code}"),
        "Trace ID" in error.message,
        "\n" in error.message or "\r" in error.message,
    ) == (True, False, False)


def test_tokens_error_message_masks_a_secret_echoed_by_the_server() -> None:
    error = oauth_error_from_response(
        {
            "error": "invalid_client",
            "error_description": f"AADSTS1: got {CLIENT_SECRET}",
        },
        redact=[CLIENT_SECRET],
    )

    assert CLIENT_SECRET not in error.message


def test_tokens_temporarily_unavailable_defers() -> None:
    error = oauth_error_from_response(
        {"error": "temporarily_unavailable", "error_description": "AADSTS90033: busy"}
    )

    assert error.disposition is Disposition.DEFER


def test_tokens_app_scope_is_exchange_default() -> None:
    assert EXCHANGE_APP_SCOPE == "https://outlook.office.com/.default"
