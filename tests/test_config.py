"""The daemon configuration and the Mail Settings: every bad value names its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.config import (
    check_private_file,
    load_daemon_config,
    parse_daemon_config,
    parse_mail_settings,
)
from relay.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "config" / "relay.toml"


def test_config_example_file_loads_with_the_documented_defaults() -> None:
    config = load_daemon_config(EXAMPLE)
    assert (
        config.listen.port,
        config.listen.addresses,
        config.retry.initial_delay,
    ) == (
        25,
        ("127.0.0.1", "::1"),
        60.0,
    )


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"listen": {"port": "twenty-five"}}, "listen.port"),
        ({"listen": {"port": 70000}}, "listen.port"),
        ({"listen": {"idle_timeout": -1}}, "listen.idle_timeout"),
        ({"listen": {"max_connections": 0}}, "listen.max_connections"),
        ({"listen": {"addresses": ["localhost"]}}, "listen.addresses"),
        ({"listen": {"allowed_networks": ["not-a-net"]}}, "listen.allowed_networks"),
        ({"delivery": {"poll_interval": 0}}, "delivery.poll_interval"),
        ({"delivery": {"concurrency": 0}}, "delivery.concurrency"),
        ({"tls": {"minimum_version": "1.1"}}, "tls.minimum_version"),
        ({"oauth": {"authority_host": "http://login.example"}}, "oauth.authority_host"),
        ({"listen": {"no_such_key": 1}}, "listen.no_such_key"),
        ({"nonsense": {}}, "nonsense"),
    ],
)
def test_config_bad_value_names_its_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_daemon_config(raw, base_dir=Path("/"))
    assert refused.value.key == key


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hostname", "smtp.example.com\r\nRCPT TO:<x@y>"),
        ("username", "user\nname"),
        ("auth_type", "kerberos"),
        ("port", "587"),
        ("hostname", "x" * 3000),
        ("redirect_uri", "http://relay.example.com/callback"),
    ],
)
def test_config_bad_mail_setting_names_its_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_mail_settings({"auth_type": "oauth", field: value})
    assert refused.value.key == field


def test_config_snapshot_never_holds_a_secret() -> None:
    settings = parse_mail_settings(
        {
            "auth_type": "oauth",
            "password": "Marker-Snapshot-Pw-1",
            "client_secret": "Marker-Snapshot-Secret-2",
        }
    )
    text = repr(settings.snapshot()) + repr(settings)
    assert ("Marker-Snapshot" in text) is False


def test_config_private_file_check_refuses_group_readable(tmp_path: Path) -> None:
    path = tmp_path / "mail-settings.json"
    path.write_text("{}")
    path.chmod(0o640)
    with pytest.raises(ConfigError) as refused:
        check_private_file(path, key="paths.settings_file")
    assert "chmod 600" in refused.value.message
