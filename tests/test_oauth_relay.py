"""OAuth end to end: Sign In, XOAUTH2 relaying, refresh, AADSTS rows, outages.

Real msal calls go to the sandbox Entra over HTTPS, and the sandbox Exchange accepts
only unexpired tokens that Entra issued for Exchange's SMTP.Send scope.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from relay.config import MailSettings
from relay.errors import OAuthError
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.entra import SandboxEntra
from relay.sandbox.exchange import SandboxExchange
from relay.tokens import SIGN_IN_OK_TEXT
from tests.conftest import (
    MAILBOX,
    RelayFactory,
    RunningRelay,
    read_rows,
    send_mail_async,
    wait_for,
)
from tests.test_tokens import open_authorize_url

CLIENT_SECRET = "Marker-Client-Secret-Relay-8Kd2Wq"
REDIRECT_URI = "http://localhost/epp/oauth/callback"


@pytest.fixture
async def entra(pki: SandboxPKI) -> AsyncIterator[SandboxEntra]:
    server = SandboxEntra(
        server_ssl_context=pki.server_context(),
        client_secret=CLIENT_SECRET,
        redirect_uris=(REDIRECT_URI,),
        mailbox=MAILBOX,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def oauth_exchange(
    pki: SandboxPKI, entra: SandboxEntra
) -> AsyncIterator[SandboxExchange]:
    server = SandboxExchange(pki=pki, token_validator=entra.validate_access_token)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def oauth_settings(
    exchange: SandboxExchange, entra: SandboxEntra, **changes: Any
) -> MailSettings:
    values: dict[str, Any] = {
        "auth_type": "oauth",
        "email_type": "smtp",
        "hostname": "localhost",
        "port": exchange.port,
        "username": MAILBOX,
        "encryption": "starttls",
        "admin_email": "admin@contoso.test",
        "tenant_id": entra.tenant_id,
        "client_id": entra.client_id,
        "client_secret": CLIENT_SECRET,
        "redirect_uri": REDIRECT_URI,
    }
    values.update(changes)
    return MailSettings(**values)


def oauth_overrides(
    entra: SandboxEntra, pki: SandboxPKI, **oauth: Any
) -> dict[str, dict[str, Any]]:
    section = {
        "authority_host": entra.base_url,
        "ca_file": str(pki.ca_file),
        "timeout": 5.0,
    }
    section.update(oauth)
    return {"oauth": section}


async def sign_in(relay: RunningRelay, pki: SandboxPKI) -> str:
    """Sign In as the administrator would: open the URL, come back with the code."""
    answer = await open_authorize_url(await relay.app.begin_sign_in(), pki)
    assert answer.status == 302 and answer.location is not None, answer.text
    result = await relay.app.complete_sign_in(answer.location)
    return result.message


async def test_oauth_sign_in_relays_with_xoauth2_and_survives_a_restart(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    settings = oauth_settings(oauth_exchange, entra)
    overrides = oauth_overrides(entra, pki)
    relay = await start_relay(settings, overrides=overrides)
    message = await sign_in(relay, pki)
    await send_mail_async(relay.port)
    await oauth_exchange.wait_for_messages(1, timeout=15)
    await relay.stop()

    restarted = await start_relay(
        settings, overrides=overrides, directory=relay.directory
    )
    await send_mail_async(restarted.port)
    await oauth_exchange.wait_for_messages(2, timeout=15)
    mechanisms = [m.auth_mechanism for m in oauth_exchange.messages]
    assert (message, mechanisms, entra.tokens_issued("authorization_code")) == (
        SIGN_IN_OK_TEXT,
        ["XOAUTH2", "XOAUTH2"],
        1,
    )


async def test_oauth_sign_in_writes_a_success_row(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra), overrides=oauth_overrides(entra, pki)
    )
    await sign_in(relay, pki)
    assert [(r["auth_type"], r["status"], r["log_message"]) for r in relay.rows()] == [
        ("oauth", "success", SIGN_IN_OK_TEXT)
    ]


def _cache_access_tokens(path: Path) -> list[tuple[str, float]]:
    """(digest, expires_on) of each access token in the cache file."""
    if not path.exists():
        return []
    try:
        cache = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []
    return [
        (
            hashlib.sha256(entry["secret"].encode()).hexdigest(),
            float(entry["expires_on"]),
        )
        for entry in cache.get("AccessToken", {}).values()
    ]


async def test_oauth_steady_traffic_with_short_tokens_never_fails_auth(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    # Connections are not reused for long, so messages authenticate again and again.
    entra.access_token_lifetime = 6.0
    overrides = oauth_overrides(entra, pki, refresh_margin=3.0)
    overrides["delivery"] = {"connection_reuse_seconds": 0.2}
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra), overrides=overrides
    )
    await sign_in(relay, pki)
    cache_file = relay.app.config.paths.token_cache

    replies: list[int] = []
    seen_tokens: set[str] = set()
    least_time_left = float("inf")
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        code, _ = await send_mail_async(relay.port)
        replies.append(code)
        for digest, expires_on in _cache_access_tokens(cache_file):
            seen_tokens.add(digest)
            least_time_left = min(least_time_left, expires_on - time.time())
        await asyncio.sleep(0.25)

    assert (
        set(replies),
        oauth_exchange.auth_failures,
        oauth_exchange.sessions_authenticated >= 30,
        len(seen_tokens) >= 10,
        least_time_left > 0,
    ) == ({250}, 0, True, True, True)


REAUTHORIZE_CODES = [700082, 70043, 65001, 50076, 50079]
CONFIG_CODES = [7000215, 7000222, 900144, 9999999]


async def _held_with_row(relay: RunningRelay, code: int) -> dict[str, Any]:
    await wait_for(lambda: any(r["code"] == f"AADSTS{code}" for r in relay.rows()))
    await wait_for(lambda: relay.app.delivery.held)
    return next(r for r in relay.rows() if r["code"] == f"AADSTS{code}")


@pytest.mark.parametrize("code", REAUTHORIZE_CODES + CONFIG_CODES)
async def test_oauth_aadsts_error_is_a_row_and_mail_waits_for_the_fix(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    code: int,
) -> None:
    # A token that is always inside the refresh margin: every use asks Entra.
    entra.access_token_lifetime = 60.0
    settings = oauth_settings(oauth_exchange, entra)
    relay = await start_relay(settings, overrides=oauth_overrides(entra, pki))
    await sign_in(relay, pki)
    entra.inject_error(code, grant_type="refresh_token", times=None)

    reply, _ = await send_mail_async(relay.port)
    row = await _held_with_row(relay, code)
    queued = sum((await relay.app.spool.counts_by_state()).values())

    entra.clear_faults()
    if code in REAUTHORIZE_CODES:
        await sign_in(relay, pki)
    else:
        relay.app.settings.save(settings)  # the administrator saves a new secret
    await oauth_exchange.wait_for_messages(1, timeout=20)
    assert (
        reply,
        row["category"],
        row["log_message"].startswith(f"AADSTS{code}"),
        queued,
    ) == (
        250,
        "oauth",
        True,
        1,
    )


async def test_oauth_redirect_mismatch_row_shows_the_exact_redirect_uri(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra), overrides=oauth_overrides(entra, pki)
    )
    entra.inject_error(50011, grant_type="authorization_code")
    with pytest.raises(OAuthError):
        await sign_in(relay, pki)
    row = next(r for r in relay.rows() if r["code"] == "AADSTS50011")
    assert REDIRECT_URI in row["log_message"]


async def test_oauth_silent_token_endpoint_defers_and_never_gives_a_5xx(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    entra.access_token_lifetime = 60.0
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra),
        overrides=oauth_overrides(entra, pki, timeout=1.0),
    )
    await sign_in(relay, pki)
    entra.set_silent(True)

    reply, _ = await send_mail_async(relay.port)
    await wait_for(lambda: any(r["category"] == "timeout" for r in relay.rows()))
    held = relay.app.delivery.held
    entra.set_silent(False)
    await oauth_exchange.wait_for_messages(1, timeout=20)
    assert (reply, held) == (250, False)


async def test_oauth_client_credentials_relays_without_sign_in(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra, oauth_flow="client_credentials"),
        overrides=oauth_overrides(entra, pki),
    )
    await send_mail_async(relay.port)
    received = await oauth_exchange.wait_for_messages(1, timeout=15)
    assert (received[0].auth_mechanism, entra.tokens_issued("client_credentials")) == (
        "XOAUTH2",
        1,
    )


async def test_oauth_device_code_sign_in_relays(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra, oauth_flow="device_code"),
        overrides=oauth_overrides(entra, pki),
    )
    prompts: list[str] = []
    await relay.app.tokens.manager().sign_in_device_code(on_prompt=prompts.append)
    await send_mail_async(relay.port)
    received = await oauth_exchange.wait_for_messages(1, timeout=15)
    assert (len(prompts), received[0].auth_mechanism) == (1, "XOAUTH2")


async def test_oauth_secrets_appear_in_no_output(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    capfd: pytest.CaptureFixture[str],
) -> None:
    entra.access_token_lifetime = 60.0
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra), overrides=oauth_overrides(entra, pki)
    )
    url = await relay.app.begin_sign_in()
    manager = relay.app.tokens.manager()
    verifier = next(iter(manager._pending_sign_ins.values())).flow["code_verifier"]
    answer = await open_authorize_url(url, pki)
    assert answer.location is not None
    code = parse_qs(urlsplit(answer.location).query)["code"][0]
    await relay.app.complete_sign_in(answer.location)
    await send_mail_async(relay.port)
    await oauth_exchange.wait_for_messages(1, timeout=15)
    # Then failures of every kind, so that error paths are searched too.
    entra.inject_error(7000215, grant_type="refresh_token", times=None)
    await send_mail_async(relay.port)
    await wait_for(lambda: relay.app.delivery.held)

    cache = json.loads(relay.app.config.paths.token_cache.read_text())
    tokens = [
        e["secret"]
        for kind in ("AccessToken", "RefreshToken")
        for e in cache.get(kind, {}).values()
    ]
    secrets = [CLIENT_SECRET, code, verifier, *tokens]
    secrets += [base64.b64encode(s.encode()).decode() for s in secrets]
    outputs = [
        relay.log_file.read_text(),
        json.dumps(read_rows(relay.app.config.paths.database)),
        "".join(capfd.readouterr()),
    ]
    outputs += [
        path.read_bytes().decode("latin-1")
        for path in (relay.directory / "spool").rglob("*")
        if path.is_file()
    ]
    leaks = [s[:12] for s in secrets for text in outputs if s in text]
    assert (len(tokens) >= 2, leaks) == (True, [])
