"""The admin HTTP server: the token file, the auth middleware, the base routes."""

from __future__ import annotations

import stat
from pathlib import Path
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from relay.admin import create_admin_app, load_or_create_token, loopback_public
from relay.errors import ConfigError
from relay.sandbox.exchange import SandboxExchange
from tests.conftest import RelayFactory, RunningRelay, basic_settings

TOKEN = "test-admin-token-4f2a9c"


def admin_url(relay: RunningRelay, path: str) -> str:
    assert relay.app.admin is not None
    return f"http://127.0.0.1:{relay.app.admin.port}{path}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_admin_token_file_is_created_private_and_random(tmp_path: Path) -> None:
    path = tmp_path / "state" / "admin-token"
    first = load_or_create_token(path)
    again = load_or_create_token(path)
    other = load_or_create_token(tmp_path / "other-token")
    assert (
        stat.S_IMODE(path.stat().st_mode),
        len(first) >= 40,
        again == first,
        other != first,
    ) == (0o600, True, True, True)


def test_admin_refuses_a_token_file_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN)
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="readable by other users"):
        load_or_create_token(path)


def test_admin_refuses_an_empty_token_file(tmp_path: Path) -> None:
    path = tmp_path / "admin-token"
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        load_or_create_token(path)


async def test_admin_api_requires_the_bearer_token(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    token = (relay.directory / "admin-token").read_text().strip()
    url = admin_url(relay, "/api/status")
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as missing:
            missing_status = missing.status
            challenge = missing.headers.get("WWW-Authenticate")
        async with session.get(url, headers=bearer("wrong")) as wrong:
            wrong_status = wrong.status
        async with session.get(url, headers=bearer(token)) as right:
            right_status = right.status
    assert (missing_status, challenge, wrong_status, right_status) == (
        401,
        'Bearer realm="epp-mail-relay"',
        401,
        200,
    )


async def test_admin_status_reports_queue_depth_and_hold(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    token = (relay.directory / "admin-token").read_text().strip()
    async with (
        aiohttp.ClientSession() as session,
        session.get(admin_url(relay, "/api/status"), headers=bearer(token)) as response,
    ):
        body = await response.json()
    assert body == {
        "queue": {"queued": 0, "sending": 0, "deferred": 0, "held": 0, "failed": 0},
        "held": False,
        "hold_reason": None,
        "last_error": None,
        "summary": "0 queued, 0 sending, 0 deferred, 0 held, 0 failed",
        "auth_type": "basic",
        "sign_in": {
            "required": False,
            "signed_in": None,
            "mailbox": None,
            "access_token_expires_at": None,
        },
    }


async def test_admin_metrics_is_open_to_loopback_peers(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    async with (
        aiohttp.ClientSession() as session,
        session.get(admin_url(relay, "/metrics")) as response,
    ):
        status, content_type = response.status, response.content_type
    assert (status, content_type) == (200, "text/plain")


async def test_admin_metrics_from_another_address_needs_the_token(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    application = create_admin_app(relay.app, token=TOKEN)
    # Tests reach only loopback, so the remote peer is given to aiohttp directly.
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("192.0.2.10", 40000) if name == "peername" else default
    )
    probe = make_mocked_request("GET", "/metrics", app=application)
    request = make_mocked_request(
        "GET",
        "/metrics",
        app=application,
        transport=transport,
        match_info=await application.router.resolve(probe),
    )

    async def must_not_run(request: web.Request) -> web.StreamResponse:
        raise AssertionError("the handler ran without a token")

    middleware = application.middlewares[0]
    with pytest.raises(web.HTTPUnauthorized):
        await middleware(request, must_not_run)


async def test_admin_new_routes_are_protected_by_default(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))

    async def added(request: web.Request) -> web.Response:
        return web.Response(text="added")

    @loopback_public
    async def added_public(request: web.Request) -> web.Response:
        return web.Response(text="public")

    application = create_admin_app(relay.app, token=TOKEN)
    application.router.add_get("/added", added)
    application.router.add_get("/added-public", added_public)
    async with TestClient(TestServer(application, host="127.0.0.1")) as client:
        protected = (await client.get("/added")).status
        public = (await client.get("/added-public")).status
        unknown = (await client.get("/no-such-page")).status
    assert (protected, public, unknown) == (401, 200, 401)


async def test_admin_binds_only_loopback_by_default(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    assert relay.app.admin is not None
    runner = relay.app.admin._runner
    assert runner is not None
    assert {address[0] for address in runner.addresses} == {"127.0.0.1"}


async def test_admin_disabled_means_no_admin_port(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(
        basic_settings(exchange.port), overrides={"admin": {"enabled": False}}
    )
    assert relay.app.admin is None


async def test_admin_page_is_served_without_a_token_under_a_strict_policy(
    exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    async with (
        aiohttp.ClientSession() as session,
        session.get(admin_url(relay, "/")) as page,
        session.get(admin_url(relay, "/static/app.js")) as script,
    ):
        policy = page.headers["Content-Security-Policy"]
        statuses = (page.status, page.content_type, script.content_type)
    assert (
        statuses,
        "default-src 'none'" in policy,
        "script-src 'self'" in policy,
    ) == (
        (200, "text/html", "text/javascript"),
        True,
        True,
    )


@pytest.mark.parametrize(
    "path", ["/static/admin.py", "/static/..%2Fadmin.py", "/static/index.html"]
)
async def test_admin_static_route_serves_only_the_page_files(
    exchange: SandboxExchange, start_relay: RelayFactory, path: str
) -> None:
    relay = await start_relay(basic_settings(exchange.port))
    async with (
        aiohttp.ClientSession() as session,
        session.get(admin_url(relay, path)) as response,
    ):
        status = response.status
    assert status == 404
