"""Helpers for the admin server's tests: an API client and the OAuth sandboxes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from relay.config import MailSettings
from relay.sandbox.certs import SandboxPKI
from relay.sandbox.entra import SandboxEntra
from relay.sandbox.exchange import SandboxExchange
from tests.conftest import MAILBOX, RunningRelay

CLIENT_SECRET = "Marker-Client-Secret-Admin-3Jq8Vn"
# Registered in the sandbox Entra besides the relay's own callback: an address
# nobody serves, as when the appliance's own UI receives the redirect.
ELSEWHERE_REDIRECT_URI = "https://appliance.contoso.test/epp/oauth/callback"


@dataclass
class Answer:
    status: int
    body: Any
    text: str
    headers: dict[str, str]


class AdminClient:
    """Calls a running relay's admin API, with the bearer token unless told not to."""

    def __init__(self, relay: RunningRelay) -> None:
        assert relay.app.admin is not None
        self.base_url = relay.app.admin.url
        self.token = (relay.directory / "admin-token").read_text().strip()

    def url(self, path: str) -> str:
        return self.base_url + path

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        authenticated: bool = True,
        session: aiohttp.ClientSession | None = None,
    ) -> Answer:
        all_headers = dict(headers or {})
        if authenticated:
            all_headers["Authorization"] = f"Bearer {self.token}"
        owned = session is None
        client = session or aiohttp.ClientSession()
        try:
            async with client.request(
                method,
                self.url(path),
                json=json,
                data=data,
                headers=all_headers,
                allow_redirects=False,
            ) as response:
                text = await response.text()
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
                return Answer(response.status, body, text, dict(response.headers))
        finally:
            if owned:
                await client.close()


async def start_entra(pki: SandboxPKI) -> SandboxEntra:
    entra = SandboxEntra(
        server_ssl_context=pki.server_context(),
        client_secret=CLIENT_SECRET,
        redirect_uris=(ELSEWHERE_REDIRECT_URI,),
        mailbox=MAILBOX,
    )
    await entra.start()
    return entra


async def start_oauth_exchange(pki: SandboxPKI, entra: SandboxEntra) -> SandboxExchange:
    exchange = SandboxExchange(pki=pki, token_validator=entra.validate_access_token)
    await exchange.start()
    return exchange


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
        "redirect_uri": ELSEWHERE_REDIRECT_URI,
    }
    values.update(changes)
    return MailSettings(**values)


def oauth_overrides(entra: SandboxEntra, pki: SandboxPKI) -> dict[str, dict[str, Any]]:
    return {
        "oauth": {
            "authority_host": entra.base_url,
            "ca_file": str(pki.ca_file),
            "timeout": 5.0,
        }
    }


def callback_uri(relay: RunningRelay) -> str:
    """The relay's own redirect URI target, as the page suggests it."""
    assert relay.app.admin is not None
    return f"{relay.app.admin.url}/oauth/callback"


def toml_text(raw: dict[str, dict[str, Any]]) -> str:
    """A daemon configuration dictionary written as TOML."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, list):
            return "[" + ", ".join(value(v) for v in item) + "]"
        return '"' + str(item).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value(item)}" for key, item in values.items()]
    return "\n".join(lines) + "\n"
