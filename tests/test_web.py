"""The Mail Settings page in a real browser: headless Chromium driven by Playwright.

The distribution's chromium (/usr/bin/chromium) is used, never a downloaded one.
It runs headless with everything that could reach beyond this machine switched
off, a host resolver that answers nothing but localhost, and every request to a
host other than loopback aborted. The sandbox Entra's certificate comes from a
throw-away CA that chromium does not trust, so this test browser (and only it)
is started with --ignore-certificate-errors.

Without chromium or Playwright the test is skipped, unless EPP_REQUIRE_BROWSER=1
(as in CI), when it fails instead. With EPP_WEB_SCREENSHOT_DIR set, the page is
saved there as mail-settings.png and mail-server-logs.png (docs/ holds copies).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from relay.sandbox.certs import SandboxPKI
from relay.sandbox.entra import SandboxEntra
from relay.sandbox.exchange import SandboxExchange
from relay.tokens import SIGN_IN_OK_TEXT
from tests.admin_support import (
    CLIENT_SECRET,
    AdminClient,
    callback_uri,
    oauth_overrides,
)
from tests.conftest import MAILBOX, RelayFactory, basic_settings

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_PASSWORD = "Marker-Browser-Password-7Hs2Kd"
SAVED = "Changes have been saved!"
SENT = "A test e-mail was sent to admin@contoso.test"
# Headless, and nothing that calls out: no sync, no updates, no field trials, no
# QUIC, no name resolved but localhost and the loopback address.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-pings",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    # The sandbox Entra's CA is not in chromium's store; for this browser only.
    "--ignore-certificate-errors",
]
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def _playwright_or_skip() -> Any:
    required = os.environ.get("EPP_REQUIRE_BROWSER") == "1"
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        if required:
            pytest.fail("EPP_REQUIRE_BROWSER=1 but Playwright is not installed")
        pytest.skip("Playwright is not installed")
    if not CHROMIUM.exists():
        if required:
            pytest.fail(f"EPP_REQUIRE_BROWSER=1 but {CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    return async_playwright


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    """A page of a fresh headless chromium whose requests stay on loopback."""
    async_playwright = _playwright_or_skip()
    # Outside pytest's temp tree: the profile may keep what was typed.
    profile = Path(tempfile.mkdtemp(prefix="epp-chromium-"))
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(profile),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1100, "height": 1000},
                ignore_https_errors=True,
            )
            await context.route("**/*", _loopback_only)
            context.set_default_timeout(20_000)
            try:
                yield context.pages[0] if context.pages else await context.new_page()
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


async def _loopback_only(route: Any) -> None:
    host = urlsplit(route.request.url).hostname or ""
    if host in LOOPBACK_HOSTS:
        await route.continue_()
    else:
        await route.abort()


@pytest.fixture
async def dual_exchange(
    pki: SandboxPKI, entra: SandboxEntra
) -> AsyncIterator[SandboxExchange]:
    """An Exchange that takes both the Basic password and Entra's tokens."""
    server = SandboxExchange(
        pki=pki,
        users={MAILBOX: BROWSER_PASSWORD},
        token_validator=entra.validate_access_token,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _screenshot_path(name: str) -> Path | None:
    directory = os.environ.get("EPP_WEB_SCREENSHOT_DIR")
    return Path(directory) / name if directory else None


async def test_web_page_saves_tests_signs_in_and_shows_a_log_snapshot(
    page: Any,
    dual_exchange: SandboxExchange,
    entra: SandboxEntra,
    pki: SandboxPKI,
    start_relay: RelayFactory,
) -> None:
    from playwright.async_api import expect

    relay = await start_relay(
        basic_settings(dual_exchange.port, password=""),
        overrides=oauth_overrides(entra, pki),
    )
    admin = AdminClient(relay)
    entra.redirect_uris = (callback_uri(relay),)
    message = page.locator("#message")

    # Log in with the admin token.
    await page.goto(admin.url("/"))
    await page.get_by_label("Admin token").fill(admin.token)
    await page.get_by_role("button", name="Open Mail Settings").click()

    # Basic: type the password, Save, send a test e-mail through the sandbox.
    await page.get_by_label("Password", exact=True).fill(BROWSER_PASSWORD)
    await page.get_by_role("button", name="Save").click()
    await expect(message).to_have_text(SAVED)
    await page.get_by_role("button", name="Send test e-mail").click()
    await expect(message).to_have_text(SENT)

    # OAuth: the field sets switch, the notice appears; fill in and Save.
    await page.get_by_label("E-mail Authentication Type").select_option("oauth")
    notice_while_not_signed_in = await page.locator("#auth-required").is_visible()
    password_hidden = not await page.get_by_label("Password", exact=True).is_visible()
    provider = await page.get_by_label("E-mail Provider").input_value()
    await page.get_by_label("Tenant ID").fill(entra.tenant_id)
    await page.get_by_label("Application (Client) ID").fill(entra.client_id)
    await page.get_by_label("Client Secret Value").fill(CLIENT_SECRET)
    await page.get_by_label("Redirect URI").fill(callback_uri(relay))
    await page.get_by_role("button", name="Save").click()
    await expect(message).to_have_text(SAVED)

    # Sign In: off to the sandbox Entra and back to the relay's /oauth/callback.
    await page.get_by_role("button", name="Sign In").click()
    await expect(page.locator("#sign-in-result")).to_have_text(SIGN_IN_OK_TEXT)
    await page.get_by_role("link", name="Back to Mail Settings").click()
    await expect(page.locator("#auth-required")).to_be_hidden()
    await page.get_by_role("button", name="Send test e-mail").click()
    await expect(message).to_have_text(SENT)
    if (path := _screenshot_path("mail-settings.png")) is not None:
        await page.screenshot(path=str(path), full_page=True)

    # Mail Server Logs with the keyboard: arrow to the tab, Enter on a row.
    await page.get_by_role("tab", name="Mail Settings").focus()
    await page.keyboard.press("ArrowRight")
    logs_tab = page.get_by_role("tab", name="Mail Server Logs")
    await expect(logs_tab).to_have_attribute("aria-selected", "true")
    await page.locator("#logs-body tr").first.focus()
    await page.keyboard.press("Enter")
    snapshot = page.locator("#snapshot")
    await expect(snapshot).to_be_visible()
    snapshot_text = await page.locator("#snapshot-list").inner_text()
    if (path := _screenshot_path("mail-server-logs.png")) is not None:
        await page.screenshot(path=str(path), full_page=True)
    html = await page.content()

    assert (
        notice_while_not_signed_in,
        password_hidden,
        provider,
        "Tenant ID" in snapshot_text and entra.tenant_id in snapshot_text,
        [m.auth_mechanism for m in dual_exchange.messages],
        BROWSER_PASSWORD in html,
        CLIENT_SECRET in html,
    ) == (True, True, "Microsoft", True, ["PLAIN", "XOAUTH2"], False, False)


async def test_web_page_shows_the_field_and_reason_of_a_refused_save(
    page: Any, dual_exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    from playwright.async_api import expect

    relay = await start_relay(basic_settings(dual_exchange.port))
    admin = AdminClient(relay)
    await page.goto(admin.url("/"))
    await page.get_by_label("Admin token").fill(admin.token)
    await page.keyboard.press("Enter")

    hostname = page.get_by_label("Hostname")
    await hostname.fill("smtp office365.com")
    await page.get_by_role("button", name="Save").click()
    await expect(page.locator("#message")).to_have_text(
        "Cannot execute command! An error occurred!"
    )
    assert (
        await hostname.get_attribute("aria-invalid"),
        await page.locator("#error-hostname").inner_text(),
        await page.evaluate("document.activeElement.id"),
    ) == ("true", "is not a valid host name", "hostname")


async def test_web_page_asks_for_the_token_before_showing_anything(
    page: Any, dual_exchange: SandboxExchange, start_relay: RelayFactory
) -> None:
    from playwright.async_api import expect

    relay = await start_relay(basic_settings(dual_exchange.port))
    admin = AdminClient(relay)
    await page.goto(admin.url("/"))
    await page.get_by_label("Admin token").fill("not-the-token")
    await page.keyboard.press("Enter")
    await expect(page.locator("#login-message")).to_have_text(
        "The admin token is not valid."
    )
    assert await page.locator("#app").is_hidden()
