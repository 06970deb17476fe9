"""`epp-mail-relay doctor`: each injected fault is named at the step it breaks."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.cli import main
from relay.config import (
    MailSettings,
    TimeoutsConfig,
    TlsConfig,
    parse_daemon_config,
    write_mail_settings,
)
from relay.doctor import Doctor, DoctorReport, run_doctor
from relay.errors import RelayError
from relay.sandbox.certs import CertificateKind, SandboxPKI
from relay.sandbox.entra import SandboxEntra
from relay.sandbox.exchange import SandboxExchange
from relay.tokens import TokenManager
from relay.upstream import UpstreamSession, build_tls_context
from tests.admin_support import (
    oauth_overrides,
    oauth_settings,
    start_oauth_exchange,
    toml_text,
)
from tests.conftest import MAILBOX, PASSWORD, basic_settings, relay_config_dict
from tests.test_tokens import open_authorize_url

TIMEOUTS = TimeoutsConfig(connect=1.0, command=2.0, data=5.0)


def doctor_for(settings: MailSettings, pki: SandboxPKI, **options: Any) -> Doctor:
    return Doctor(
        settings=settings,
        timeouts=TIMEOUTS,
        tls_context=build_tls_context(TlsConfig(ca_file=pki.ca_file)),
        local_hostname="relay.test",
        **options,
    )


async def diagnose(settings: MailSettings, pki: SandboxPKI) -> DoctorReport:
    return await doctor_for(settings, pki).run()


async def open_session_error(settings: MailSettings, pki: SandboxPKI) -> RelayError:
    """The error delivery would log for these settings (what the doctor must match)."""
    session = UpstreamSession(
        settings=settings,
        timeouts=TIMEOUTS,
        tls_context=build_tls_context(TlsConfig(ca_file=pki.ca_file)),
        local_hostname="relay.test",
    )
    try:
        await session.open()
    except RelayError as error:
        return error
    finally:
        await session.close()
    raise AssertionError("the session opened")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def bare_exchange(pki: SandboxPKI) -> AsyncIterator[SandboxExchange]:
    """A server that offers no STARTTLS."""
    server = SandboxExchange(pki=pki, users={MAILBOX: PASSWORD}, offer_starttls=False)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def implicit_exchange(pki: SandboxPKI) -> AsyncIterator[SandboxExchange]:
    server = SandboxExchange(
        pki=pki,
        users={MAILBOX: PASSWORD},
        mode="implicit",
        certificate=CertificateKind.UNTRUSTED,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _summary(report: DoctorReport) -> tuple[str | None, str | None, str | None]:
    error = report.error
    return (
        report.failed_step,
        str(error.category) if error else None,
        error.message if error else None,
    )


async def test_doctor_passes_every_step_and_sends_no_mail(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    report = await diagnose(basic_settings(exchange.port), pki)
    assert (
        report.error,
        [step.name for step in report.steps],
        all(step.ok for step in report.steps),
        exchange.messages,
    ) == (
        None,
        [
            "Settings",
            "DNS",
            "TCP connect",
            "Greeting",
            "EHLO",
            "TLS (STARTTLS)",
            "EHLO after TLS",
            "AUTH",
        ],
        True,
        [],
    )


async def test_doctor_names_dns_for_a_name_under_invalid(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    report = await diagnose(
        basic_settings(exchange.port, hostname="smtp.contoso.invalid"), pki
    )
    assert _summary(report) == (
        "DNS",
        "dns",
        "Could not resolve hostname smtp.contoso.invalid",
    )


async def test_doctor_names_the_greeting_for_a_silent_server(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    exchange.silent_at("greeting")
    report = await diagnose(basic_settings(exchange.port), pki)
    assert _summary(report) == (
        "Greeting",
        "timeout",
        f"Connection timed out after 1 seconds while connecting to "
        f"localhost:{exchange.port}",
    )


async def test_doctor_names_tls_for_an_untrusted_certificate(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    exchange.certificate = CertificateKind.UNTRUSTED
    report = await diagnose(basic_settings(exchange.port), pki)
    assert _summary(report) == (
        "TLS (STARTTLS)",
        "tls",
        "TLS handshake failed - peer certificate validation error",
    )


async def test_doctor_names_tls_when_starttls_is_not_offered(
    bare_exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    report = await diagnose(basic_settings(bare_exchange.port), pki)
    assert _summary(report) == (
        "TLS (STARTTLS)",
        "tls",
        f"STARTTLS is not offered by localhost:{bare_exchange.port}; credentials "
        "are never sent without TLS",
    )


async def test_doctor_names_auth_for_a_535(
    exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    report = await diagnose(basic_settings(exchange.port), pki)
    assert _summary(report) == (
        "AUTH",
        "smtp",
        "535 5.7.3 Authentication unsuccessful [SANDBOX]",
    )


async def test_doctor_names_tcp_connect_for_a_closed_port(pki: SandboxPKI) -> None:
    port = _free_port()
    report = await diagnose(basic_settings(port), pki)
    assert _summary(report) == (
        "TCP connect",
        "connection",
        f"Connection refused by localhost:{port}",
    )


async def test_doctor_names_implicit_tls_for_an_untrusted_certificate(
    implicit_exchange: SandboxExchange, pki: SandboxPKI
) -> None:
    settings = basic_settings(implicit_exchange.port, encryption="ssl")
    report = await diagnose(settings, pki)
    assert _summary(report)[:2] == ("TLS (implicit)", "tls")


FAULTS = ["invalid", "silent", "untrusted", "auth"]


@pytest.mark.parametrize("fault", FAULTS)
async def test_doctor_message_is_the_one_the_logs_would_show(
    exchange: SandboxExchange, pki: SandboxPKI, fault: str
) -> None:
    settings = basic_settings(exchange.port)
    if fault == "invalid":
        settings = dataclasses.replace(settings, hostname="mail.contoso.invalid")
    elif fault == "silent":
        exchange.silent_at("greeting")
    elif fault == "untrusted":
        exchange.certificate = CertificateKind.UNTRUSTED
    else:
        exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    report = await diagnose(settings, pki)
    logged = await open_session_error(settings, pki)
    assert report.error is not None
    assert (report.error.category, report.error.message) == (
        logged.category,
        logged.message,
    )


def _token_manager(
    settings: MailSettings, entra: SandboxEntra, pki: SandboxPKI, tmp_path: Path
) -> TokenManager:
    config = parse_daemon_config(oauth_overrides(entra, pki), base_dir=tmp_path)
    return TokenManager(
        settings=settings,
        oauth_config=config.oauth,
        cache_path=tmp_path / "token-cache.json",
    )


async def test_doctor_checks_the_token_then_xoauth2(
    entra: SandboxEntra, pki: SandboxPKI, tmp_path: Path
) -> None:
    oauth_exchange = await start_oauth_exchange(pki, entra)
    try:
        settings = oauth_settings(oauth_exchange, entra)
        manager = _token_manager(settings, entra, pki, tmp_path)
        answer = await open_authorize_url(await manager.begin_sign_in(), pki)
        assert answer.location is not None
        await manager.complete_sign_in(answer.location)
        report = await doctor_for(
            settings, pki, token_provider=manager.get_access_token
        ).run()
    finally:
        await oauth_exchange.stop()
    assert (report.error, [step.name for step in report.steps][-2:]) == (
        None,
        ["Token", "AUTH"],
    )


async def test_doctor_names_the_token_step_before_sign_in(
    entra: SandboxEntra, pki: SandboxPKI, tmp_path: Path
) -> None:
    oauth_exchange = await start_oauth_exchange(pki, entra)
    try:
        settings = oauth_settings(oauth_exchange, entra)
        manager = _token_manager(settings, entra, pki, tmp_path)
        report = await doctor_for(
            settings, pki, token_provider=manager.get_access_token
        ).run()
    finally:
        await oauth_exchange.stop()
    assert _summary(report)[:2] == ("Token", "oauth")


def _write_config(tmp_path: Path, pki: SandboxPKI, settings: MailSettings) -> Path:
    raw = relay_config_dict(tmp_path, ca_file=pki.ca_file)
    config_path = tmp_path / "relay.toml"
    config_path.write_text(toml_text(raw))
    config = parse_daemon_config(raw, base_dir=tmp_path)
    write_mail_settings(config.paths.settings_file, settings)
    return config_path


async def test_doctor_command_prints_each_step_and_the_log_message(
    exchange: SandboxExchange, pki: SandboxPKI, tmp_path: Path
) -> None:
    exchange.inject("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]")
    config_path = _write_config(tmp_path, pki, basic_settings(exchange.port))
    raw = relay_config_dict(tmp_path, ca_file=pki.ca_file)
    out = io.StringIO()
    code = await run_doctor(parse_daemon_config(raw, base_dir=tmp_path), out=out)
    lines = out.getvalue().splitlines()
    assert (
        code,
        any(line.startswith("  [ok  ] DNS") for line in lines),
        any(line.startswith("  [FAIL] AUTH") for line in lines),
        "  Message:  535 5.7.3 Authentication unsuccessful [SANDBOX]" in lines,
        "  Category: smtp" in lines,
        config_path.exists(),
    ) == (1, True, True, True, True, True)


async def test_doctor_cli_runs_standalone_from_the_config_files(
    exchange: SandboxExchange,
    pki: SandboxPKI,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config_path = _write_config(tmp_path, pki, basic_settings(exchange.port))
    code = await asyncio.to_thread(
        main, ["doctor", "--config", str(config_path), "--timeout", "5"]
    )
    output = capsys.readouterr().out
    assert (code, "Every step worked." in output, PASSWORD in output) == (
        0,
        True,
        False,
    )
