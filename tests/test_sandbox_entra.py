"""Tests for relay.sandbox.entra, spoken to directly over HTTPS on loopback.

These pin down the Entra behaviour the relay's tests rely on, without msal in
between, so that a bug in the relay and the same bug in the sandbox cannot cancel
each other out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest

from relay.sandbox.certs import SandboxPKI
from relay.sandbox.entra import (
    DEVICE_CODE_GRANT,
    EXCHANGE_REJECTION_REPLY,
    SandboxEntra,
)

MAILBOX = "relay@contoso.test"
CLIENT_SECRET = "Marker-Client-Secret-h3Vq9ZrT5m"
REDIRECT_URI = "http://localhost/epp/oauth/callback"
SMTP_SCOPES = "https://outlook.office.com/SMTP.Send offline_access openid profile"


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def entra_pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPKI:
    return SandboxPKI.create(tmp_path_factory.mktemp("entra-pki"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def entra(entra_pki: SandboxPKI, clock: FakeClock) -> AsyncIterator[SandboxEntra]:
    async with SandboxEntra(
        server_ssl_context=entra_pki.server_context(),
        client_secret=CLIENT_SECRET,
        redirect_uris=(REDIRECT_URI,),
        mailbox=MAILBOX,
        device_code_approval_delay=None,
        clock=clock,
    ) as server:
        yield server


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.text)
        return body


class Client:
    """A bare HTTPS client for the sandbox that trusts only the sandbox CA."""

    def __init__(self, entra: SandboxEntra, pki: SandboxPKI) -> None:
        self.entra = entra
        self.trust = ssl.create_default_context(cafile=str(pki.ca_file))

    async def get(self, path: str, **params: str) -> Answer:
        url = f"{self.entra.base_url}{path}"
        if params:
            url = f"{url}?{urlencode(params)}"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, ssl=self.trust, allow_redirects=False) as response,
        ):
            return Answer(
                response.status, dict(response.headers), await response.text()
            )

    async def token(
        self, form: dict[str, str], *, timeout: float | None = None
    ) -> Answer:
        url = f"{self.entra.authority}/oauth2/v2.0/token"
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.post(url, data=form, ssl=self.trust) as response,
        ):
            return Answer(
                response.status, dict(response.headers), await response.text()
            )

    async def authorize(self, **changes: str) -> tuple[Answer, str]:
        """Ask for a code with a fresh PKCE pair; returns the answer and verifier."""
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        params = {
            "client_id": self.entra.client_id,
            "response_type": "code",
            "redirect_uri": REDIRECT_URI,
            "scope": SMTP_SCOPES,
            "state": "state-1",
            "nonce": "nonce-hash-1",
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
        }
        params.update(changes)
        answer = await self.get(
            f"/{self.entra.tenant_id}/oauth2/v2.0/authorize", **params
        )
        return answer, verifier

    async def code(self) -> tuple[str, str]:
        answer, verifier = await self.authorize()
        query = parse_qs(urlsplit(answer.headers["Location"]).query)
        return query["code"][0], verifier

    async def redeem(self, code: str, verifier: str, **changes: str) -> Answer:
        form = {
            "grant_type": "authorization_code",
            "client_id": self.entra.client_id,
            "client_secret": CLIENT_SECRET,
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": REDIRECT_URI,
            "scope": SMTP_SCOPES,
            "client_info": "1",
        }
        form.update(changes)
        return await self.token(form)

    async def tokens(self) -> dict[str, Any]:
        return (await self.redeem(*await self.code())).json()

    async def refresh(self, refresh_token: str, **changes: str) -> Answer:
        form = {
            "grant_type": "refresh_token",
            "client_id": self.entra.client_id,
            "client_secret": CLIENT_SECRET,
            "refresh_token": refresh_token,
            "scope": SMTP_SCOPES,
        }
        form.update(changes)
        return await self.token(form)


@pytest.fixture
def client(entra: SandboxEntra, entra_pki: SandboxPKI) -> Client:
    return Client(entra, entra_pki)


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return claims


# -- binding ---------------------------------------------------------------------------


# Binding to all interfaces is what the sandbox must refuse.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104


@pytest.mark.parametrize(
    "host", [ALL_INTERFACES, "192.0.2.10", "localhost.example", "::"]
)
def test_sandbox_entra_refuses_a_non_loopback_bind(
    host: str, entra_pki: SandboxPKI
) -> None:
    with pytest.raises(ValueError, match="loopback"):
        SandboxEntra(
            server_ssl_context=entra_pki.server_context(),
            client_secret=CLIENT_SECRET,
            host=host,
        )


async def test_sandbox_entra_listens_on_ipv6_loopback(entra_pki: SandboxPKI) -> None:
    async with SandboxEntra(
        server_ssl_context=entra_pki.server_context(),
        client_secret=CLIENT_SECRET,
        host="::1",
    ) as server:
        answer = await Client(server, entra_pki).get(
            f"/{server.tenant_id}/v2.0/.well-known/openid-configuration"
        )

    assert (server.base_url.startswith("https://[::1]:"), answer.status) == (True, 200)


# -- discovery ---------------------------------------------------------------------------


async def test_sandbox_entra_discovery_points_only_at_itself(
    client: Client, entra: SandboxEntra
) -> None:
    answer = await client.get(
        f"/{entra.tenant_id}/v2.0/.well-known/openid-configuration"
    )
    urls = [value for value in answer.json().values() if isinstance(value, str)]
    urls = [url for url in urls if "://" in url]

    assert [url for url in urls if not url.startswith(entra.base_url)] == []


async def test_sandbox_entra_discovery_of_an_unknown_tenant_is_aadsts90002(
    client: Client,
) -> None:
    answer = await client.get("/nowhere.test/v2.0/.well-known/openid-configuration")

    assert (answer.status, answer.json()["error_codes"]) == (400, [90002])


# -- authorize ---------------------------------------------------------------------------


async def test_sandbox_entra_authorize_redirects_with_code_and_state(
    client: Client,
) -> None:
    answer, _ = await client.authorize()
    query = parse_qs(urlsplit(answer.headers["Location"]).query)

    assert (answer.status, query["state"], "code" in query) == (302, ["state-1"], True)


async def test_sandbox_entra_redirect_uri_must_match_exactly(
    client: Client, entra: SandboxEntra
) -> None:
    sent = REDIRECT_URI.upper()

    answer, _ = await client.authorize(redirect_uri=sent)

    assert (
        answer.status,
        "Location" in answer.headers,
        "AADSTS50011" in answer.text,
        entra.received_redirect_uris,
    ) == (400, False, True, [sent])


async def test_sandbox_entra_injected_authorize_error_redirects_with_state(
    client: Client, entra: SandboxEntra
) -> None:
    entra.inject_error(65001, endpoint="authorize")

    answer, _ = await client.authorize()
    query = parse_qs(urlsplit(answer.headers["Location"]).query)

    assert (query["error"], query["state"], query["error_description"][0][:13]) == (
        ["invalid_grant"],
        ["state-1"],
        "AADSTS65001: ",
    )


# -- authorization code grant -------------------------------------------------------------


async def test_sandbox_entra_pkce_wrong_verifier_is_rejected(client: Client) -> None:
    code, _ = await client.code()

    answer = await client.redeem(code, secrets.token_urlsafe(48))

    assert (answer.status, answer.json()["error_codes"]) == (400, [501481])


async def test_sandbox_entra_pkce_right_verifier_is_accepted(client: Client) -> None:
    code, verifier = await client.code()

    answer = await client.redeem(code, verifier)

    assert answer.status == 200


async def test_sandbox_entra_code_is_single_use_and_replay_revokes(
    client: Client, entra: SandboxEntra
) -> None:
    code, verifier = await client.code()
    first = (await client.redeem(code, verifier)).json()

    replay = await client.redeem(code, verifier)

    assert (
        replay.json()["error_codes"],
        entra.validate_access_token(MAILBOX, first["access_token"]),
    ) == ([54005], EXCHANGE_REJECTION_REPLY)


async def test_sandbox_entra_code_redeemed_with_another_redirect_uri_fails(
    client: Client, entra: SandboxEntra
) -> None:
    entra.redirect_uris = (REDIRECT_URI, "http://localhost/other")
    code, verifier = await client.code()

    answer = await client.redeem(code, verifier, redirect_uri="http://localhost/other")

    assert answer.json()["error_codes"] == [500112]


async def test_sandbox_entra_id_token_and_client_info_are_what_msal_reads(
    client: Client, entra: SandboxEntra
) -> None:
    body = await client.tokens()
    claims = jwt_claims(body["id_token"])
    client_info = json.loads(base64.urlsafe_b64decode(body["client_info"] + "=="))

    assert (
        claims["preferred_username"],
        claims["nonce"],
        claims["aud"],
        claims["tid"],
        client_info,
    ) == (
        MAILBOX,
        "nonce-hash-1",
        entra.client_id,
        entra.tenant_id,
        {"uid": claims["oid"], "utid": entra.tenant_id},
    )


async def test_sandbox_entra_access_token_is_long_and_for_exchange(
    client: Client,
) -> None:
    body = await client.tokens()
    claims = jwt_claims(body["access_token"])

    assert (
        len(body["access_token"]) >= 1500,
        claims["aud"],
        claims["scp"],
        claims["upn"],
        body["scope"],
    ) == (
        True,
        "https://outlook.office.com",
        "SMTP.Send",
        MAILBOX,
        "https://outlook.office.com/SMTP.Send",
    )


# -- refresh ---------------------------------------------------------------------------------


async def test_sandbox_entra_refresh_rotates_and_retires_the_old_token(
    client: Client, entra: SandboxEntra
) -> None:
    old = (await client.tokens())["refresh_token"]
    new = (await client.refresh(old)).json()["refresh_token"]

    reuse = await client.refresh(old)

    assert (new != old, reuse.json()["error_codes"], entra.counters["refreshes"]) == (
        True,
        [50173],
        1,
    )


async def test_sandbox_entra_unused_refresh_token_expires_with_aadsts700082(
    client: Client, entra: SandboxEntra, clock: FakeClock
) -> None:
    refresh_token = (await client.tokens())["refresh_token"]
    clock.now += entra.refresh_token_lifetime + 1

    answer = await client.refresh(refresh_token)

    assert answer.json()["error_codes"] == [700082]


async def test_sandbox_entra_sign_in_frequency_gives_aadsts70043(
    client: Client, entra: SandboxEntra, clock: FakeClock
) -> None:
    entra.sign_in_frequency = 3600.0
    refresh_token = (await client.tokens())["refresh_token"]
    clock.now += 3601

    answer = await client.refresh(refresh_token)

    assert answer.json()["error_codes"] == [70043]


async def test_sandbox_entra_refresh_for_graph_gives_a_graph_token(
    client: Client, entra: SandboxEntra
) -> None:
    refresh_token = (await client.tokens())["refresh_token"]

    body = (
        await client.refresh(refresh_token, scope="Mail.Send offline_access")
    ).json()

    assert entra.validate_access_token(MAILBOX, body["access_token"]) == (
        EXCHANGE_REJECTION_REPLY
    )


# -- client authentication and errors ----------------------------------------------------


async def test_sandbox_entra_wrong_secret_is_401_aadsts7000215(client: Client) -> None:
    code, verifier = await client.code()

    answer = await client.redeem(code, verifier, client_secret="secret-id-not-value")

    assert (answer.status, answer.json()["error"], answer.json()["error_codes"]) == (
        401,
        "invalid_client",
        [7000215],
    )


async def test_sandbox_entra_error_body_has_microsofts_shape(
    client: Client, entra: SandboxEntra
) -> None:
    refresh_token = (await client.tokens())["refresh_token"]
    entra.inject_error(700082, grant_type="refresh_token")

    answer = await client.refresh(refresh_token)
    body = answer.json()
    description = body["error_description"]

    assert (
        answer.status,
        sorted(body),
        description.startswith("AADSTS700082: "),
        f" Trace ID: {body['trace_id']} Correlation ID: {body['correlation_id']}"
        f" Timestamp: {body['timestamp']}" in description,
    ) == (
        400,
        [
            "correlation_id",
            "error",
            "error_codes",
            "error_description",
            "error_uri",
            "timestamp",
            "trace_id",
        ],
        True,
        True,
    )


async def test_sandbox_entra_mfa_error_carries_a_suberror(
    client: Client, entra: SandboxEntra
) -> None:
    refresh_token = (await client.tokens())["refresh_token"]
    entra.inject_error(50076)

    body = (await client.refresh(refresh_token)).json()

    assert (body["error"], body["suberror"]) == ("invalid_grant", "basic_action")


async def test_sandbox_entra_injected_error_counts_down(
    client: Client, entra: SandboxEntra
) -> None:
    refresh_token = (await client.tokens())["refresh_token"]
    entra.inject_error(7000222, grant_type="refresh_token", times=1)

    first = await client.refresh(refresh_token)
    second = await client.refresh(refresh_token)

    assert (first.status, second.status) == (401, 200)


async def test_sandbox_entra_unknown_code_is_still_microsofts_shape(
    client: Client, entra: SandboxEntra
) -> None:
    entra.inject_error(4242424)

    body = (await client.token({"grant_type": "client_credentials"})).json()

    assert (body["error_codes"], body["error_description"][:15]) == (
        [4242424],
        "AADSTS4242424: ",
    )


async def test_sandbox_entra_http_status_fault(
    client: Client, entra: SandboxEntra
) -> None:
    entra.inject_http_status(503, times=1)

    answer = await client.token({"grant_type": "client_credentials"})

    assert answer.status == 503


async def test_sandbox_entra_silence_never_answers(
    client: Client, entra: SandboxEntra
) -> None:
    entra.set_silent(True)

    with pytest.raises(TimeoutError):
        await client.token({"grant_type": "client_credentials"}, timeout=0.5)


# -- client credentials and device code --------------------------------------------------


async def test_sandbox_entra_app_only_token_is_limited_to_allowed_mailboxes(
    client: Client, entra: SandboxEntra
) -> None:
    body = (
        await client.token(
            {
                "grant_type": "client_credentials",
                "client_id": entra.client_id,
                "client_secret": CLIENT_SECRET,
                "scope": "https://outlook.office.com/.default",
            }
        )
    ).json()

    assert (
        entra.validate_access_token(MAILBOX, body["access_token"]),
        entra.validate_access_token("other@contoso.test", body["access_token"]),
    ) == (None, EXCHANGE_REJECTION_REPLY)


async def test_sandbox_entra_client_credentials_need_a_default_scope(
    client: Client, entra: SandboxEntra
) -> None:
    answer = await client.token(
        {
            "grant_type": "client_credentials",
            "client_id": entra.client_id,
            "client_secret": CLIENT_SECRET,
            "scope": "https://outlook.office.com/SMTP.SendAsApp",
        }
    )

    assert answer.json()["error_codes"] == [1002012]


async def test_sandbox_entra_device_code_pends_until_approved(
    client: Client, entra: SandboxEntra
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{entra.authority}/oauth2/v2.0/devicecode",
            data={"client_id": entra.client_id, "scope": SMTP_SCOPES},
            ssl=client.trust,
        ) as response,
    ):
        flow = await response.json()
    poll = {
        "grant_type": DEVICE_CODE_GRANT,
        "client_id": entra.client_id,
        "device_code": flow["device_code"],
    }

    pending = (await client.token(poll)).json()
    entra.approve_device_code(flow["user_code"])
    approved = (await client.token(poll)).json()

    assert (
        pending["error"],
        pending["error_codes"],
        entra.validate_access_token(MAILBOX, approved["access_token"]),
    ) == ("authorization_pending", [70016], None)


# -- the validator ----------------------------------------------------------------------------


async def test_sandbox_entra_validator_rejects_another_mailbox(client: Client) -> None:
    token = (await client.tokens())["access_token"]

    assert client.entra.validate_access_token("other@contoso.test", token) == (
        EXCHANGE_REJECTION_REPLY
    )


async def test_sandbox_entra_validator_rejects_an_expired_token(
    client: Client, clock: FakeClock
) -> None:
    token = (await client.tokens())["access_token"]
    clock.now += client.entra.access_token_lifetime + 1

    assert (
        client.entra.validate_access_token(MAILBOX, token) == EXCHANGE_REJECTION_REPLY
    )


def test_sandbox_entra_validator_rejects_a_token_it_never_issued(
    entra_pki: SandboxPKI,
) -> None:
    entra = SandboxEntra(
        server_ssl_context=entra_pki.server_context(), client_secret="x"
    )

    assert entra.validate_access_token(MAILBOX, "eyJ0eXAi.forged.token") == (
        EXCHANGE_REJECTION_REPLY
    )


async def test_sandbox_entra_validator_accepts_mailbox_case_insensitively(
    client: Client,
) -> None:
    token = (await client.tokens())["access_token"]

    assert client.entra.validate_access_token(MAILBOX.upper(), token) is None


# -- nothing secret in what it shows -----------------------------------------------------


async def test_sandbox_entra_records_hold_no_secrets(
    client: Client, entra: SandboxEntra
) -> None:
    body = await client.tokens()
    entra.inject_error(7000215)
    await client.refresh(body["refresh_token"])
    shown = repr(entra) + repr(entra.counters) + repr(entra.issued_access_tokens)
    shown += repr(entra.last_error) + repr(vars(entra).get("_access_tokens"))

    secrets_issued = [CLIENT_SECRET, body["access_token"], body["refresh_token"]]
    assert [secret[:12] for secret in secrets_issued if secret in shown] == []
