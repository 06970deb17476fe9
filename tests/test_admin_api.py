"""The admin JSON API: Mail Settings, test e-mail, Sign In, logs, queue, sessions.

Every call goes over HTTP to a relay started on loopback, which talks to the
sandbox Exchange and the sandbox Entra ID.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from relay.errors import SmtpReplyError, Stage, UpstreamDnsError
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.entra import SandboxEntra
from relay.sandbox.exchange import SandboxExchange
from relay.tokens import SIGN_IN_FAILED_TEXT, SIGN_IN_OK_TEXT
from tests.admin_support import (
    CLIENT_SECRET,
    ELSEWHERE_REDIRECT_URI,
    AdminClient,
    callback_uri,
    oauth_overrides,
    oauth_settings,
)
from tests.conftest import (
    PASSWORD,
    RelayFactory,
    RunningRelay,
    basic_settings,
    send_mail_async,
    wait_for,
)
from tests.test_tokens import open_authorize_url

SAVED = "Changes have been saved!"
SAVE_FAILED = "Cannot execute command! An error occurred!"
SENT = "A test e-mail was sent to admin@contoso.test"
NO_ADMIN_EMAIL = (
    "There is no e-mail defined for your Administrator Account. You must setup "
    "the e-mail address from System Administrators > Edit info"
)
TEST_FAILED = (
    "Failed to send the test e-mail! Please verify if the E-mail Server Settings "
    "are correct!"
)


async def basic_relay(
    exchange: SandboxExchange, start_relay: RelayFactory, **changes: Any
) -> tuple[RunningRelay, AdminClient]:
    relay = await start_relay(basic_settings(exchange.port, **changes))
    return relay, AdminClient(relay)


async def oauth_relay(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    **changes: Any,
) -> tuple[RunningRelay, AdminClient]:
    relay = await start_relay(
        oauth_settings(oauth_exchange, entra, **changes),
        overrides=oauth_overrides(entra, pki),
    )
    return relay, AdminClient(relay)


# -- authentication ---------------------------------------------------------------

PROTECTED = [
    ("GET", "/api/status"),
    ("GET", "/api/settings"),
    ("POST", "/api/settings"),
    ("POST", "/api/test-email"),
    ("POST", "/api/signin"),
    ("GET", "/api/signin"),
    ("POST", "/api/signin/complete"),
    ("GET", "/api/logs"),
    ("GET", "/api/queue"),
    ("POST", "/api/queue/retry"),
    ("POST", "/api/queue/release"),
    ("POST", "/api/queue/ABC123/retry"),
    ("DELETE", "/api/queue/ABC123"),
    ("GET", "/api/session"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_admin_api_refuses_unauthenticated_calls(
    exchange: SandboxExchange, start_relay: RelayFactory, method: str, path: str
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call(method, path, json={}, authenticated=False)
    assert answer.status == 401


async def test_admin_api_refuses_a_foreign_host_header(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call(
        "GET", "/api/status", headers={"Host": "rebound.attacker.example"}
    )
    assert answer.status == 421


async def test_admin_api_session_login_sets_a_strict_http_only_cookie(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call(
        "POST", "/api/session", json={"token": admin.token}, authenticated=False
    )
    cookie = answer.headers["Set-Cookie"]
    assert (
        answer.status,
        len(answer.body["csrf_token"]) >= 40,
        "HttpOnly" in cookie,
        "SameSite=Strict" in cookie,
        admin.token in cookie,
    ) == (200, True, True, True, False)


async def test_admin_api_session_refuses_a_wrong_token(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call(
        "POST", "/api/session", json={"token": "wrong"}, authenticated=False
    )
    assert (answer.status, "Set-Cookie" in answer.headers) == (401, False)


async def _logged_in_session(admin: AdminClient) -> tuple[aiohttp.ClientSession, str]:
    # unsafe=True: the cookie jar keeps cookies of IP-address hosts too.
    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    answer = await admin.call(
        "POST",
        "/api/session",
        json={"token": admin.token},
        authenticated=False,
        session=session,
    )
    return session, answer.body["csrf_token"]


async def test_admin_api_session_cookie_needs_the_csrf_token_to_change_anything(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    session, csrf = await _logged_in_session(admin)
    async with session:
        read = await admin.call(
            "GET", "/api/settings", authenticated=False, session=session
        )
        without = await admin.call(
            "POST",
            "/api/settings",
            json={"hostname": "localhost"},
            authenticated=False,
            session=session,
        )
        wrong = await admin.call(
            "POST",
            "/api/settings",
            json={"hostname": "localhost"},
            headers={"X-CSRF-Token": "not-it"},
            authenticated=False,
            session=session,
        )
        right = await admin.call(
            "POST",
            "/api/settings",
            json={"hostname": "localhost"},
            headers={"X-CSRF-Token": csrf},
            authenticated=False,
            session=session,
        )
    assert (read.status, without.status, wrong.status, right.status) == (
        200,
        403,
        403,
        200,
    )


async def test_admin_api_session_refuses_a_cross_origin_request(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    session, csrf = await _logged_in_session(admin)
    async with session:
        answer = await admin.call(
            "POST",
            "/api/settings",
            json={"hostname": "localhost"},
            headers={"X-CSRF-Token": csrf, "Origin": "https://attacker.example"},
            authenticated=False,
            session=session,
        )
    assert answer.status == 403


async def test_admin_api_session_logout_ends_the_session(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    session, csrf = await _logged_in_session(admin)
    async with session:
        cookie = next(iter(session.cookie_jar))
        await admin.call(
            "DELETE",
            "/api/session",
            headers={"X-CSRF-Token": csrf},
            authenticated=False,
            session=session,
        )
    # The cookie is sent again by hand, as a copy kept by someone would be.
    after = await admin.call(
        "GET",
        "/api/session",
        headers={"Cookie": f"{cookie.key}={cookie.value}"},
        authenticated=False,
    )
    assert after.status == 401


# -- Mail Settings ----------------------------------------------------------------


async def test_admin_api_settings_read_never_returns_a_secret(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call("GET", "/api/settings")
    settings = answer.body["settings"]
    assert (
        "password" in settings,
        settings["password_set"],
        settings["client_secret_set"],
        PASSWORD in answer.text,
    ) == (False, True, False, False)


async def test_admin_api_settings_save_answers_changes_saved_and_applies_them(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call(
        "POST", "/api/settings", json={"admin_email": "ops@contoso.test"}
    )
    assert (answer.status, answer.body, relay.app.settings.current.admin_email) == (
        200,
        {"message": SAVED},
        "ops@contoso.test",
    )


async def test_admin_api_settings_save_keeps_secrets_left_out_or_null(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    await admin.call("POST", "/api/settings", json={"username": "relay@contoso.test"})
    await admin.call("POST", "/api/settings", json={"password": None})
    assert relay.app.settings.current.password == PASSWORD


async def test_admin_api_settings_save_replaces_a_secret_that_is_sent(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    await admin.call("POST", "/api/settings", json={"password": "New-Password-1"})
    assert relay.app.settings.current.password == "New-Password-1"


BAD_SETTINGS = [
    pytest.param({"port": "587"}, "port", "must be a whole number", id="port-string"),
    pytest.param({"port": True}, "port", "must be a whole number", id="port-bool"),
    pytest.param({"port": 70000}, "port", "must be between 1 and 65535", id="port"),
    pytest.param({"hostname": 25}, "hostname", "must be a string", id="host-type"),
    pytest.param(
        {"hostname": "smtp.office365.com\r\nRCPT TO:<x@y>"},
        "hostname",
        "must not contain line breaks or NUL characters",
        id="host-crlf",
    ),
    pytest.param(
        {"username": "relay@contoso.test\r\nMAIL FROM:<x@y>"},
        "username",
        "must not contain line breaks or NUL characters",
        id="user-crlf",
    ),
    pytest.param(
        {"username": "relay\t@contoso.test"},
        "username",
        "must not contain control characters",
        id="user-tab",
    ),
    pytest.param(
        {"hostname": "a" * 3000},
        "hostname",
        "is too long (2048 characters at most)",
        id="host-oversize",
    ),
    pytest.param(
        {"hostname": "smtp office365.com"},
        "hostname",
        "is not a valid host name",
        id="host-space",
    ),
    pytest.param(
        {"auth_type": "ntlm"}, "auth_type", 'must be "basic" or "oauth"', id="auth"
    ),
    pytest.param(
        {"encryption": "none"},
        "encryption",
        'must be "starttls" or "ssl"',
        id="encryption",
    ),
    pytest.param(
        {"redirect_uri": "http://appliance.contoso.test/oauth/callback"},
        "redirect_uri",
        "must be an https:// URL (plain http only for localhost)",
        id="redirect-http",
    ),
    pytest.param(
        {"redirect_uri": "https://appliance.contoso.test/cb#fragment"},
        "redirect_uri",
        "must not contain a fragment (#)",
        id="redirect-fragment",
    ),
    pytest.param(
        {"admin_email": "not an address"},
        "admin_email",
        "is not an e-mail address",
        id="admin-email",
    ),
    pytest.param(
        {"tenant_id": "../common"},
        "tenant_id",
        "must be a tenant ID (GUID) or domain name",
        id="tenant",
    ),
    pytest.param(
        {"auth_type": "oauth", "email_type": "native"},
        "email_type",
        'must be "smtp" for OAuth',
        id="oauth-native",
    ),
    pytest.param(
        {"password_set": True}, "password_set", "unknown field", id="unknown-field"
    ),
]


@pytest.mark.parametrize(("changes", "field", "reason"), BAD_SETTINGS)
async def test_admin_api_settings_save_refuses_bad_input_naming_the_field(
    exchange: SandboxExchange,
    start_relay: RelayFactory,
    changes: dict[str, Any],
    field: str,
    reason: str,
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    before = relay.app.settings.current
    answer = await admin.call("POST", "/api/settings", json=changes)
    assert (answer.status, answer.body, relay.app.settings.current) == (
        400,
        {"message": SAVE_FAILED, "field": field, "reason": reason},
        before,
    )


BAD_BODIES = [
    pytest.param(b"[1, 2]", "application/json", 400, id="array"),
    pytest.param(b"{not json", "application/json", 400, id="not-json"),
    pytest.param(b"[" * 50_000, "application/json", 400, id="deeply-nested"),
    pytest.param(b"\xff\xfe{}", "application/json", 400, id="not-utf8"),
    pytest.param(b"hostname=x", "application/x-www-form-urlencoded", 415, id="form"),
    pytest.param(
        b'{"hostname": "' + b"a" * 100_000 + b'"}',
        "application/json",
        413,
        id="oversize",
    ),
]


@pytest.mark.parametrize(("body", "content_type", "status"), BAD_BODIES)
async def test_admin_api_settings_save_refuses_a_body_that_is_not_a_json_object(
    exchange: SandboxExchange,
    start_relay: RelayFactory,
    body: bytes,
    content_type: str,
    status: int,
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call(
        "POST", "/api/settings", data=body, headers={"Content-Type": content_type}
    )
    assert (answer.status, answer.body["message"]) == (status, SAVE_FAILED)


async def test_admin_api_settings_save_releases_a_held_queue(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    await send_mail_async(relay.port)
    await wait_for(lambda: relay.app.delivery.held)

    exchange.clear_faults()
    await admin.call("POST", "/api/settings", json={"password": PASSWORD})
    received = await exchange.wait_for_messages(1, timeout=15)
    assert (len(received), relay.app.delivery.held) == (1, False)


async def test_admin_api_settings_save_defaults_the_oauth_hostname(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay, hostname="")
    await admin.call("POST", "/api/settings", json={"auth_type": "oauth"})
    assert relay.app.settings.current.hostname == "smtp.office365.com"


# -- test e-mail -------------------------------------------------------------------


async def test_admin_api_test_email_is_sent_to_the_administrator_at_once(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call("POST", "/api/test-email")
    queued = sum((await relay.app.spool.counts_by_state()).values())
    assert (answer.status, answer.body, exchange.messages[0].rcpt_tos, queued) == (
        200,
        {"message": SENT},
        ["admin@contoso.test"],
        0,
    )


async def test_admin_api_test_email_without_an_administrator_address_says_where_to_set_it(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin = await basic_relay(exchange, start_relay, admin_email="")
    answer = await admin.call("POST", "/api/test-email")
    assert (answer.status, answer.body["message"], exchange.messages) == (
        400,
        NO_ADMIN_EMAIL,
        [],
    )


async def test_admin_api_test_email_failure_answers_the_failed_text_and_writes_a_row(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    answer = await admin.call("POST", "/api/test-email")
    rows = [(row["status"], row["code"]) for row in relay.rows()]
    assert (answer.status, answer.body["message"], answer.body["reason"], rows) == (
        502,
        TEST_FAILED,
        "535 5.7.3 Authentication unsuccessful [SANDBOX]",
        [("error", "535 5.7.3")],
    )


async def test_admin_api_test_email_success_writes_a_success_row(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    await admin.call("POST", "/api/test-email")
    assert [(row["status"], row["log_message"]) for row in relay.rows()] == [
        ("success", SENT)
    ]


# -- Sign In ------------------------------------------------------------------------


async def test_admin_api_signin_returns_the_authorization_url(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    _, admin = await oauth_relay(oauth_exchange, entra, pki, start_relay)
    answer = await admin.call("POST", "/api/signin")
    assert (
        answer.status,
        answer.body["flow"],
        answer.body["authorization_url"].startswith(entra.base_url),
    ) == (200, "authorization_code", True)


async def test_admin_api_oauth_callback_completes_sign_in_without_a_token(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay, admin = await oauth_relay(oauth_exchange, entra, pki, start_relay)
    entra.redirect_uris = (callback_uri(relay),)
    await admin.call(
        "POST", "/api/settings", json={"redirect_uri": callback_uri(relay)}
    )
    started = await admin.call("POST", "/api/signin")
    sent_to = await open_authorize_url(started.body["authorization_url"], pki)
    assert sent_to.location is not None

    async with (
        aiohttp.ClientSession() as browser,
        browser.get(sent_to.location) as page,
    ):
        status, text = page.status, await page.text()
    state = await admin.call("GET", "/api/status")
    assert (status, SIGN_IN_OK_TEXT in text, state.body["sign_in"]["signed_in"]) == (
        200,
        True,
        True,
    )


async def test_admin_api_oauth_callback_refuses_a_state_it_did_not_hand_out(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    _, admin = await oauth_relay(oauth_exchange, entra, pki, start_relay)
    await admin.call("POST", "/api/signin")
    answer = await admin.call(
        "GET", "/oauth/callback?code=forged&state=forged", authenticated=False
    )
    assert (answer.status, SIGN_IN_FAILED_TEXT in answer.text) == (400, True)


async def test_admin_api_oauth_callback_with_a_foreign_state_writes_no_row(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay, admin = await oauth_relay(oauth_exchange, entra, pki, start_relay)
    for _ in range(3):
        await admin.call(
            "GET", "/oauth/callback?code=forged&state=forged", authenticated=False
        )
    assert relay.rows() == []


async def test_admin_api_signin_complete_takes_the_pasted_redirect_url(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay, admin = await oauth_relay(oauth_exchange, entra, pki, start_relay)
    started = await admin.call("POST", "/api/signin")
    sent_to = await open_authorize_url(started.body["authorization_url"], pki)
    answer = await admin.call(
        "POST", "/api/signin/complete", json={"redirect_url": sent_to.location}
    )
    await send_mail_async(relay.port)
    received = await oauth_exchange.wait_for_messages(1, timeout=15)
    assert (answer.status, answer.body, received[0].auth_mechanism) == (
        200,
        {"message": SIGN_IN_OK_TEXT},
        "XOAUTH2",
    )


async def test_admin_api_signin_complete_failure_answers_the_failed_text(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    relay, admin = await oauth_relay(oauth_exchange, entra, pki, start_relay)
    entra.inject_error(7000215, grant_type="authorization_code")
    started = await admin.call("POST", "/api/signin")
    sent_to = await open_authorize_url(started.body["authorization_url"], pki)
    answer = await admin.call(
        "POST", "/api/signin/complete", json={"redirect_url": sent_to.location}
    )
    assert (
        answer.status,
        answer.body["message"],
        answer.body["reason"].startswith("AADSTS7000215"),
        [row["code"] for row in relay.rows()],
    ) == (400, SIGN_IN_FAILED_TEXT, True, ["AADSTS7000215"])


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="missing"),
        pytest.param({"redirect_url": 5}, id="number"),
        pytest.param({"redirect_url": "https://x/?code=a\r\nb&state=c"}, id="crlf"),
        pytest.param({"redirect_url": "https://x/?" + "a" * 20_000}, id="oversize"),
    ],
)
async def test_admin_api_signin_complete_refuses_bad_input(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
    body: dict[str, Any],
) -> None:
    _, admin = await oauth_relay(oauth_exchange, entra, pki, start_relay)
    answer = await admin.call("POST", "/api/signin/complete", json=body)
    assert (answer.status, answer.body["message"], answer.body["field"]) == (
        400,
        SIGN_IN_FAILED_TEXT,
        "redirect_url",
    )


async def test_admin_api_signin_for_basic_settings_is_refused(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call("POST", "/api/signin")
    assert (answer.status, answer.body["message"]) == (400, SIGN_IN_FAILED_TEXT)


async def test_admin_api_signin_with_client_credentials_answers_at_once(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    _, admin = await oauth_relay(
        oauth_exchange, entra, pki, start_relay, oauth_flow="client_credentials"
    )
    answer = await admin.call("POST", "/api/signin")
    assert (answer.status, answer.body["state"], answer.body["message"]) == (
        200,
        "complete",
        SIGN_IN_OK_TEXT,
    )


async def test_admin_api_signin_with_a_device_code_gives_the_prompt_then_completes(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    _, admin = await oauth_relay(
        oauth_exchange, entra, pki, start_relay, oauth_flow="device_code"
    )
    started = await admin.call("POST", "/api/signin")
    state = started.body
    for _ in range(100):
        state = (await admin.call("GET", "/api/signin")).body
        if state["state"] != "pending":
            break
        await asyncio.sleep(0.1)
    assert (
        started.body["state"],
        "code" in started.body["prompt"],
        state["state"],
        state["message"],
    ) == ("pending", True, "complete", SIGN_IN_OK_TEXT)


async def test_admin_api_status_says_authorization_required_until_signed_in(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    _, admin = await oauth_relay(oauth_exchange, entra, pki, start_relay)
    before = (await admin.call("GET", "/api/status")).body["sign_in"]
    started = await admin.call("POST", "/api/signin")
    sent_to = await open_authorize_url(started.body["authorization_url"], pki)
    await admin.call(
        "POST", "/api/signin/complete", json={"redirect_url": sent_to.location}
    )
    after = (await admin.call("GET", "/api/status")).body["sign_in"]
    assert (
        before["required"],
        after["required"],
        after["mailbox"],
        after["access_token_expires_at"] is not None,
    ) == (True, False, "relay@contoso.test", True)


async def test_admin_api_signin_rows_and_answers_never_hold_the_client_secret(
    oauth_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    _, admin = await oauth_relay(oauth_exchange, entra, pki, start_relay)
    texts = [(await admin.call("GET", "/api/settings")).text]
    started = await admin.call("POST", "/api/signin")
    sent_to = await open_authorize_url(started.body["authorization_url"], pki)
    texts.append(
        (
            await admin.call(
                "POST", "/api/signin/complete", json={"redirect_url": sent_to.location}
            )
        ).text
    )
    texts.append((await admin.call("GET", "/api/logs")).text)
    texts.append((await admin.call("GET", "/api/status")).text)
    assert [text for text in texts if CLIENT_SECRET in text] == []


# -- Mail Server Logs ---------------------------------------------------------------


def _write_rows(relay: RunningRelay, count: int) -> None:
    settings = relay.app.settings.current
    for number in range(count):
        relay.app.sink.record_error(
            SmtpReplyError(
                451, f"4.3.0 Temporary failure number {number}", stage=Stage.MAIL
            ),
            settings=settings,
        )


async def test_admin_api_logs_are_newest_first_with_the_settings_snapshot(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    _write_rows(relay, 3)
    answer = await admin.call("GET", "/api/logs")
    rows = answer.body["rows"]
    assert (
        [row["log_message"][-1] for row in rows],
        rows[0]["settings_snapshot"]["hostname"],
        PASSWORD in answer.text,
    ) == (["2", "1", "0"], "localhost", False)


async def test_admin_api_logs_are_paged(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    _write_rows(relay, 5)
    first = (await admin.call("GET", "/api/logs?limit=2")).body
    last = (await admin.call("GET", "/api/logs?limit=2&offset=4")).body
    assert (
        len(first["rows"]),
        first["has_more"],
        len(last["rows"]),
        last["has_more"],
    ) == (
        2,
        True,
        1,
        False,
    )


async def test_admin_api_logs_filter_by_category_and_time(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    _write_rows(relay, 2)
    relay.app.sink.record_error(
        UpstreamDnsError("smtp.contoso.invalid"), settings=relay.app.settings.current
    )
    later = quote((datetime.now(UTC) + timedelta(hours=1)).isoformat())
    earlier = quote((datetime.now(UTC) - timedelta(hours=1)).isoformat())
    dns = (await admin.call("GET", "/api/logs?category=dns")).body["rows"]
    everything = (await admin.call("GET", "/api/logs")).body["rows"]
    future = (await admin.call("GET", f"/api/logs?since={later}")).body["rows"]
    window = await admin.call("GET", f"/api/logs?since={earlier}&until={later}")
    assert (
        [row["category"] for row in dns],
        len(everything),
        future,
        len(window.body["rows"]),
    ) == (["dns"], 3, [], 3)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("category=bogus", "category"),
        ("since=yesterday", "since"),
        ("until=2026-13-40", "until"),
    ],
)
async def test_admin_api_logs_refuse_bad_parameters(
    exchange: SandboxExchange, start_relay: RelayFactory, query: str, field: str
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call("GET", f"/api/logs?{query}")
    assert (answer.status, answer.body["message"], answer.body["field"]) == (
        400,
        SAVE_FAILED,
        field,
    )


# -- the queue ---------------------------------------------------------------------


async def _deferred_message(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> tuple[RunningRelay, AdminClient, str]:
    """A relay with one message deferred for a minute by a 451 reply."""
    relay = await start_relay(
        basic_settings(exchange.port),
        overrides={"retry": {"initial_delay": 60.0, "max_delay": 120.0}},
    )
    exchange.inject("mail", "451 4.3.0 Try again later", times=1)
    await send_mail_async(relay.port)
    await wait_for(
        lambda: any(row["code"] == "451 4.3.0" for row in relay.rows()), timeout=15
    )
    messages = await relay.app.spool.list_messages()
    return relay, AdminClient(relay), messages[0].queue_id


async def test_admin_api_queue_lists_messages_with_their_state(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin, queue_id = await _deferred_message(exchange, start_relay)
    answer = await admin.call("GET", "/api/queue?state=deferred")
    listed = answer.body["messages"]
    assert (
        [(m["queue_id"], m["state"]) for m in listed],
        answer.body["counts"]["deferred"],
    ) == ([(queue_id, "deferred")], 1)


async def test_admin_api_queue_retry_sends_a_deferred_message_now(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin, queue_id = await _deferred_message(exchange, start_relay)
    answer = await admin.call("POST", f"/api/queue/{queue_id}/retry")
    received = await exchange.wait_for_messages(1, timeout=15)
    assert (answer.status, len(received)) == (200, 1)


async def test_admin_api_queue_retry_all_sends_every_deferred_message(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin, _ = await _deferred_message(exchange, start_relay)
    answer = await admin.call("POST", "/api/queue/retry")
    received = await exchange.wait_for_messages(1, timeout=15)
    assert (answer.status, answer.body["count"], len(received)) == (200, 1, 1)


async def test_admin_api_queue_delete_removes_a_message(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin, queue_id = await _deferred_message(exchange, start_relay)
    answer = await admin.call("DELETE", f"/api/queue/{queue_id}")
    assert (answer.status, await relay.app.spool.list_messages()) == (200, [])


async def test_admin_api_queue_release_sends_held_mail(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    await send_mail_async(relay.port)
    await wait_for(lambda: relay.app.delivery.held)
    held = (await admin.call("GET", "/api/status")).body

    exchange.clear_faults()
    answer = await admin.call("POST", "/api/queue/release")
    await exchange.wait_for_messages(1, timeout=15)
    assert (held["held"], held["hold_reason"], answer.body["count"]) == (
        True,
        "535 5.7.3 Authentication unsuccessful [SANDBOX]",
        1,
    )


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/api/queue/NoSuchMessage1/retry", 404),
        ("DELETE", "/api/queue/NoSuchMessage1", 404),
        ("POST", "/api/queue/bad%2Fid;x/retry", 400),
        ("DELETE", "/api/queue/" + "A" * 65, 400),
    ],
)
async def test_admin_api_queue_refuses_unknown_or_malformed_ids(
    exchange: SandboxExchange,
    start_relay: RelayFactory,
    method: str,
    path: str,
    status: int,
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call(method, path)
    assert (answer.status, answer.body["field"]) == (status, "queue_id")


@pytest.mark.parametrize("query", ["state=lost", "limit=0", "limit=100000"])
async def test_admin_api_queue_listing_refuses_bad_parameters(
    exchange: SandboxExchange, start_relay: RelayFactory, query: str
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call("GET", f"/api/queue?{query}")
    assert answer.status == 400


# -- status --------------------------------------------------------------------------


async def test_admin_api_status_reports_last_error_and_sign_in_fields(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    await send_mail_async(relay.port)
    await wait_for(lambda: relay.app.delivery.held)
    body = (await admin.call("GET", "/api/status")).body
    assert (
        body["queue"]["held"],
        body["last_error"],
        body["auth_type"],
        body["sign_in"]["required"],
    ) == (1, "smtp: 535 5.7.3 Authentication unsuccessful [SANDBOX]", "basic", False)


async def test_admin_api_answers_are_never_cached_or_framed(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    _, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call("GET", "/api/settings")
    assert (
        answer.headers["Cache-Control"],
        answer.headers["X-Frame-Options"],
        answer.headers["Referrer-Policy"],
    ) == ("no-store", "DENY", "no-referrer")


def test_admin_api_settings_view_is_json_without_secrets() -> None:
    from relay.admin import settings_view

    settings = dataclasses.replace(
        basic_settings(587), client_secret="Marker-Client-Secret-View"
    )
    text = json.dumps(settings_view(settings))
    assert (PASSWORD in text, "Marker-Client-Secret-View" in text) == (False, False)


async def test_admin_api_elsewhere_redirect_uri_is_accepted(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay, admin = await basic_relay(exchange, start_relay)
    answer = await admin.call(
        "POST", "/api/settings", json={"redirect_uri": ELSEWHERE_REDIRECT_URI}
    )
    assert (answer.status, relay.app.settings.current.redirect_uri) == (
        200,
        ELSEWHERE_REDIRECT_URI,
    )
