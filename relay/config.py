"""The daemon configuration (TOML) and the Mail Settings (JSON, holds secrets).

Two files, because they have two owners: the operator writes the daemon
configuration once; the administrator changes the Mail Settings from the appliance
UI. Only the Mail Settings file holds secrets, so only it must be private (0600).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from relay.errors import ConfigError

AuthType = Literal["basic", "oauth"]
EmailType = Literal["native", "smtp"]
Encryption = Literal["starttls", "ssl"]
OAuthFlow = Literal["authorization_code", "client_credentials", "device_code"]

DEFAULT_LOG_FILE = Path("/var/eppfiles/epp_logger/epp_mail.log")
DEFAULT_DATABASE = Path("/var/eppfiles/epp_logger/epp_mail.db")
DEFAULT_STATE_DIR = Path("/var/lib/epp-mail-relay")
SECRET_FIELDS = frozenset({"password", "client_secret"})
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, kw_only=True)
class ListenConfig:
    addresses: tuple[str, ...] = ("127.0.0.1", "::1")
    port: int = 25
    allowed_networks: tuple[IpNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # The host name announced in the greeting and added to Received: headers.
    hostname: str = "localhost"
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 1000
    idle_timeout: float = 300.0
    # During DATA a client is idle when, over one idle_timeout, it sent fewer bytes
    # than this rate asks for: a slow trickle cannot hold a connection for good.
    min_data_rate: float = 256.0
    max_connections: int = 200
    # Optional AUTH for legacy clients that insist on it; see the README.
    auth_credentials_file: Path | None = None
    auth_required: bool = False


@dataclass(frozen=True, kw_only=True)
class PathsConfig:
    spool_dir: Path = DEFAULT_STATE_DIR / "spool"
    # Free space the spool leaves on its file system; below it new mail gets
    # 452 4.3.1, so that queued mail and SQLite always have room to finish.
    spool_min_free_bytes: int = 64 * 1024 * 1024
    settings_file: Path = DEFAULT_STATE_DIR / "mail-settings.json"
    token_cache: Path = DEFAULT_STATE_DIR / "token-cache.json"
    log_file: Path = DEFAULT_LOG_FILE
    database: Path = DEFAULT_DATABASE


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    initial_delay: float = 60.0
    multiplier: float = 2.0
    max_delay: float = 3600.0
    # Each delay is spread by up to this fraction so that a recovered upstream is
    # not hit by the whole queue in the same second.
    jitter: float = 0.2
    give_up_after: float = 5 * 24 * 3600.0
    failed_retention_days: float = 7.0


@dataclass(frozen=True, kw_only=True)
class TimeoutsConfig:
    connect: float = 30.0
    command: float = 60.0
    data: float = 600.0


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    minimum_version: Literal["1.2", "1.3"] = "1.2"
    # A PEM bundle to trust instead of the system store (a private CA, the sandbox).
    ca_file: Path | None = None


@dataclass(frozen=True, kw_only=True)
class DeliveryConfig:
    concurrency: int = 3
    poll_interval: float = 1.0
    # An upstream connection older than this is not reused: a new one picks up a
    # fresh access token and any change on the server side.
    connection_reuse_seconds: float = 300.0
    # Send the administrator e-mail a notice when a message fails for good.
    failure_notice: bool = False
    # While more clients are sending messages than there are workers, delivery
    # waits for them (a second at most at a time): accepting and delivering share
    # one core, and clients waiting for their 250 come first.
    give_way_to_clients: bool = True


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """Exchange Online's per-mailbox limits, kept so that the relay never meets them.

    Exchange answers a fourth connection with 432 4.3.2, a 31st message in a
    minute with 451 4.7.500 and the 10,001st recipient in a day with 554 5.2.0.
    """

    # Upstream sessions open at once per mailbox.
    max_sessions: int = 3
    # Messages (SMTP transactions) per `rate_period` seconds, spaced evenly.
    messages_per_minute: int = 30
    # The length of that minute; only tests and benchmarks shorten it.
    rate_period: float = 60.0
    # Recipients per rolling `recipient_period`; once spent, mail waits.
    daily_recipients: int = 10_000
    recipient_period: float = 86_400.0
    # Recipients per transaction; the rest go in further transactions.
    max_recipients_per_message: int = 500
    # The first pause after a throttling reply, doubled on each repeat up to max.
    throttle_backoff: float = 30.0
    throttle_backoff_max: float = 900.0


@dataclass(frozen=True, kw_only=True)
class SendAsConfig:
    """Sending as the authenticated mailbox, for services that use other addresses."""

    # MAIL FROM becomes the mailbox (Exchange: 550 5.7.60 otherwise).
    rewrite_sender: bool = False
    # From: becomes the mailbox too, the original kept in Reply-To: (Exchange:
    # 554 5.2.252 SendAsDenied otherwise).
    rewrite_from_header: bool = False


@dataclass(frozen=True, kw_only=True)
class LogsConfig:
    # The same failure (category, code, message) is written at most once per window;
    # repeats inside it only raise the row's repeat count.
    dedupe_window: float = 3600.0
    retention_days: float = 90.0
    max_rows: int = 10_000
    syslog: bool = True


@dataclass(frozen=True, kw_only=True)
class OAuthConfig:
    authority_host: str = "https://login.microsoftonline.com"
    # A PEM bundle to trust for the token endpoint (a private CA, the sandbox).
    ca_file: Path | None = None
    refresh_margin: float = 600.0
    keepalive_interval: float = 24 * 3600.0
    timeout: float = 30.0


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    """The admin HTTP server: /metrics, and the API the appliance's UI calls."""

    enabled: bool = True
    addresses: tuple[str, ...] = ("127.0.0.1",)
    port: int = 8025
    # Bearer token for everything but /metrics from loopback: mode 0600, created
    # with a random token when missing.
    token_file: Path = DEFAULT_STATE_DIR / "admin-token"


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    listen: ListenConfig = field(default_factory=ListenConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    oauth: OAuthConfig = field(default_factory=OAuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    send_as: SendAsConfig = field(default_factory=SendAsConfig)


@dataclass(frozen=True, kw_only=True)
class MailSettings:
    """What the administrator set on the Mail Settings page."""

    auth_type: AuthType = "basic"
    email_type: EmailType = "smtp"
    hostname: str = ""
    port: int = 587
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)
    encryption: Encryption = "starttls"
    admin_email: str = ""
    tenant_id: str = ""
    client_id: str = ""
    client_secret: str = dataclasses.field(default="", repr=False)
    redirect_uri: str = ""
    oauth_flow: OAuthFlow = "authorization_code"

    def snapshot(self) -> dict[str, Any]:
        """The settings in effect, as stored with each log row: never a secret."""
        snapshot: dict[str, Any] = {
            "auth_type": self.auth_type,
            "email_type": self.email_type,
            "hostname": self.hostname,
            "port": self.port,
            "username": self.username,
            "encryption": self.encryption,
        }
        if self.auth_type == "oauth":
            snapshot |= {
                "tenant_id": self.tenant_id,
                "client_id": self.client_id,
                "redirect_uri": self.redirect_uri,
                "oauth_flow": self.oauth_flow,
            }
        return snapshot

    def to_json_dict(self) -> dict[str, Any]:
        """Every field, secrets included, for writing the private settings file."""
        return dataclasses.asdict(self)


def load_daemon_config(path: Path) -> DaemonConfig:
    """Read and validate the daemon configuration; a problem names its key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(str(path), "configuration file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from exc
    return parse_daemon_config(raw, base_dir=path.parent)


def parse_daemon_config(raw: Mapping[str, Any], *, base_dir: Path) -> DaemonConfig:
    sections: dict[str, Any] = {}
    for section_field in dataclasses.fields(DaemonConfig):
        section_type = _SECTION_TYPES[section_field.name]
        values = raw.get(section_field.name, {})
        if not isinstance(values, Mapping):
            raise ConfigError(section_field.name, "must be a table")
        sections[section_field.name] = _build_section(
            section_type, section_field.name, values, base_dir=base_dir
        )

    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(unknown[0], "unknown section")

    config = DaemonConfig(**sections)
    _validate_daemon_config(config)
    return config


_SECTION_TYPES: dict[str, type] = {
    "listen": ListenConfig,
    "paths": PathsConfig,
    "retry": RetryConfig,
    "timeouts": TimeoutsConfig,
    "tls": TlsConfig,
    "delivery": DeliveryConfig,
    "logs": LogsConfig,
    "oauth": OAuthConfig,
    "admin": AdminConfig,
    "limits": LimitsConfig,
    "send_as": SendAsConfig,
}


def _build_section(
    section_type: type, section: str, values: Mapping[str, Any], *, base_dir: Path
) -> Any:
    known = {f.name: f for f in dataclasses.fields(section_type)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        qualified = f"{section}.{key}"
        if key not in known:
            raise ConfigError(qualified, "unknown key")
        kwargs[key] = _coerce(qualified, known[key], value, base_dir=base_dir)
    return section_type(**kwargs)


def _coerce(
    qualified: str, spec: dataclasses.Field[Any], value: Any, *, base_dir: Path
) -> Any:
    default = (
        spec.default
        if spec.default is not dataclasses.MISSING
        else spec.default_factory()  # type: ignore[operator]
    )
    type_text = str(spec.type)

    if "Path" in type_text:
        if value in ("", None) and "None" in type_text:
            return None
        if not isinstance(value, str):
            raise ConfigError(qualified, "must be a path string")
        path = Path(value)
        return path if path.is_absolute() else (base_dir / path)
    if qualified == "listen.allowed_networks":
        if not isinstance(value, list) or not value:
            raise ConfigError(qualified, "must be a non-empty list of networks")
        try:
            return tuple(ipaddress.ip_network(item, strict=False) for item in value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(qualified, f"not a network: {exc}") from exc
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(qualified, "must be a list of strings")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(qualified, "must be true or false")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(qualified, "must be a whole number")
        return value
    if isinstance(default, float):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(qualified, "must be a number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(qualified, "must be a string")
    return value


def _validate_daemon_config(config: DaemonConfig) -> None:
    listen = config.listen
    if not 0 <= listen.port <= 65535:
        raise ConfigError("listen.port", "must be between 0 and 65535")
    for address in listen.addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError as exc:
            raise ConfigError(
                "listen.addresses", f"not an IP address: {address}"
            ) from exc
    if listen.max_message_size < 1024:
        raise ConfigError("listen.max_message_size", "must be at least 1024 bytes")
    if listen.max_recipients < 1:
        raise ConfigError("listen.max_recipients", "must be at least 1")
    if listen.max_connections < 1:
        raise ConfigError("listen.max_connections", "must be at least 1")
    if listen.idle_timeout <= 0:
        raise ConfigError("listen.idle_timeout", "must be positive")
    if listen.min_data_rate < 0:
        raise ConfigError("listen.min_data_rate", "must not be negative")
    if config.delivery.poll_interval <= 0:
        raise ConfigError("delivery.poll_interval", "must be positive")
    if config.delivery.connection_reuse_seconds < 0:
        raise ConfigError("delivery.connection_reuse_seconds", "must not be negative")
    if listen.auth_required and listen.auth_credentials_file is None:
        # Without credentials nobody can authenticate: every MAIL would get 530.
        raise ConfigError(
            "listen.auth_required", "needs listen.auth_credentials_file to be set"
        )
    if config.paths.spool_min_free_bytes < 0:
        raise ConfigError("paths.spool_min_free_bytes", "must not be negative")
    if config.tls.minimum_version not in ("1.2", "1.3"):
        raise ConfigError("tls.minimum_version", 'must be "1.2" or "1.3"')
    if config.retry.initial_delay <= 0 or config.retry.multiplier < 1:
        raise ConfigError(
            "retry.initial_delay", "delay must be positive and multiplier at least 1"
        )
    if not 0 <= config.retry.jitter < 1:
        raise ConfigError("retry.jitter", "must be at least 0 and below 1")
    for name in ("connect", "command", "data"):
        if getattr(config.timeouts, name) <= 0:
            raise ConfigError(f"timeouts.{name}", "must be positive")
    if config.delivery.concurrency < 1:
        raise ConfigError("delivery.concurrency", "must be at least 1")
    _validate_limits(config.limits)
    if not config.oauth.authority_host.startswith("https://"):
        raise ConfigError("oauth.authority_host", "must be an https:// URL")
    if not 0 <= config.admin.port <= 65535:
        raise ConfigError("admin.port", "must be between 0 and 65535")
    for address in config.admin.addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError as exc:
            raise ConfigError(
                "admin.addresses", f"not an IP address: {address}"
            ) from exc


def _validate_limits(limits: LimitsConfig) -> None:
    for name in (
        "max_sessions",
        "messages_per_minute",
        "daily_recipients",
        "max_recipients_per_message",
    ):
        if getattr(limits, name) < 1:
            raise ConfigError(f"limits.{name}", "must be at least 1")
    for name in (
        "rate_period",
        "recipient_period",
        "throttle_backoff",
        "throttle_backoff_max",
    ):
        if getattr(limits, name) <= 0:
            raise ConfigError(f"limits.{name}", "must be positive")


# What a SIGHUP can change in a running relay. Everything else is bound at start
# (sockets, files, the worker count, the TLS context, the log sink's policy).
RELOADABLE_SECTIONS = ("retry", "timeouts")
RELOADABLE_KEYS = {"delivery": ("poll_interval",)}


def apply_reloadable(
    current: DaemonConfig, new: DaemonConfig
) -> tuple[DaemonConfig, tuple[str, ...], tuple[str, ...]]:
    """Take from `new` what a running relay can apply; name what needs a restart.

    Returns the configuration to run with, the changed sections it applies, and
    the changed sections that keep their old values until the next restart.
    """
    changes: dict[str, Any] = {
        name: getattr(new, name)
        for name in RELOADABLE_SECTIONS
        if getattr(new, name) != getattr(current, name)
    }
    for name, keys in RELOADABLE_KEYS.items():
        old_section = getattr(current, name)
        updates = {key: getattr(getattr(new, name), key) for key in keys}
        section = dataclasses.replace(old_section, **updates)
        if section != old_section:
            changes[name] = section

    merged = dataclasses.replace(current, **changes)
    needs_restart = tuple(
        section_field.name
        for section_field in dataclasses.fields(DaemonConfig)
        if getattr(merged, section_field.name) != getattr(new, section_field.name)
    )
    return merged, tuple(changes), needs_restart


def check_private_file(path: Path, *, key: str) -> None:
    """Refuse a secrets file that users other than its owner can read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise ConfigError(key, f"{path} does not exist") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            key,
            f"{path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
            "run: chmod 600 " + str(path),
        )


def load_mail_settings(path: Path) -> MailSettings:
    """Read the private Mail Settings file; a missing file means nothing is set."""
    if not path.exists():
        return MailSettings()
    check_private_file(path, key="paths.settings_file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError("paths.settings_file", f"not valid JSON: {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("paths.settings_file", "must hold a JSON object")
    return parse_mail_settings(raw)


def parse_mail_settings(raw: Mapping[str, Any]) -> MailSettings:
    """Validate Mail Settings from the file or the admin API; errors name the field."""
    known = {f.name: f for f in dataclasses.fields(MailSettings)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(key, "unknown field")
        default = known[key].default
        if isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(key, "must be a whole number")
        elif not isinstance(value, str):
            raise ConfigError(key, "must be a string")
        elif len(value) > 2048:
            raise ConfigError(key, "is too long (2048 characters at most)")
        elif any(ch in value for ch in "\r\n\x00"):
            raise ConfigError(key, "must not contain line breaks or NUL characters")
        elif key not in SECRET_FIELDS and any(
            ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value
        ):
            raise ConfigError(key, "must not contain control characters")
        values[key] = (
            value.strip()
            if isinstance(value, str) and key not in SECRET_FIELDS
            else value
        )

    settings = MailSettings(**values)
    _validate_mail_settings(settings)
    return settings


def _validate_mail_settings(settings: MailSettings) -> None:
    if settings.auth_type not in ("basic", "oauth"):
        raise ConfigError("auth_type", 'must be "basic" or "oauth"')
    if settings.email_type not in ("native", "smtp"):
        raise ConfigError("email_type", 'must be "native" or "smtp"')
    if settings.encryption not in ("starttls", "ssl"):
        raise ConfigError("encryption", 'must be "starttls" or "ssl"')
    if settings.oauth_flow not in (
        "authorization_code",
        "client_credentials",
        "device_code",
    ):
        raise ConfigError(
            "oauth_flow",
            'must be "authorization_code", "client_credentials" or "device_code"',
        )
    if not 1 <= settings.port <= 65535:
        raise ConfigError("port", "must be between 1 and 65535")
    if settings.hostname and not _looks_like_hostname(settings.hostname):
        raise ConfigError("hostname", "is not a valid host name")
    if settings.admin_email and not _looks_like_address(settings.admin_email):
        raise ConfigError("admin_email", "is not an e-mail address")
    # The tenant becomes a path segment of the authority URL.
    if any(character in settings.tenant_id for character in "/?#%\\ \t"):
        raise ConfigError("tenant_id", "must be a tenant ID (GUID) or domain name")
    if settings.redirect_uri:
        _validate_redirect_uri(settings.redirect_uri)
    if settings.auth_type == "oauth" and settings.email_type != "smtp":
        raise ConfigError("email_type", 'must be "smtp" for OAuth')


def _looks_like_hostname(hostname: str) -> bool:
    try:
        ipaddress.ip_address(hostname.strip("[]"))
        return True
    except ValueError:
        pass
    labels = hostname.rstrip(".").split(".")
    return len(hostname) <= 253 and all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(ch.isalnum() or ch == "-" for ch in label)
        for label in labels
    )


def _looks_like_address(address: str) -> bool:
    """A mailbox address as SMTP carries it: local@domain, no spaces or brackets."""
    local, at, domain = address.rpartition("@")
    return (
        bool(at and local and domain)
        and len(address) <= 254
        and not any(ch.isspace() or ch in '<>()[],;:"' for ch in address)
        and _looks_like_hostname(domain)
    )


def _validate_redirect_uri(uri: str) -> None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        # A port that is not a number raises only when it is read.
        _ = parts.port
    except ValueError as exc:
        raise ConfigError("redirect_uri", "is not a valid URL") from exc
    # RFC 6749 section 3.1.2: a redirection endpoint has no fragment.
    if parts.fragment or "#" in uri:
        raise ConfigError("redirect_uri", "must not contain a fragment (#)")
    if parts.username is not None or not host:
        raise ConfigError("redirect_uri", "must name a host and no user name")
    loopback = host in ("localhost", "127.0.0.1", "::1")
    if parts.scheme == "https" or (parts.scheme == "http" and loopback):
        return
    raise ConfigError(
        "redirect_uri", "must be an https:// URL (plain http only for localhost)"
    )


def write_mail_settings(path: Path, settings: MailSettings) -> None:
    """Replace the private settings file atomically: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, json.dumps(settings.to_json_dict(), indent=2).encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class SettingsStore:
    """The Mail Settings in effect, re-read when their file changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.version = 0
        self._stamp: tuple[int, int, int] | None = None
        self.current = MailSettings()
        self.reload()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return None
        return (status.st_ino, status.st_mtime_ns, status.st_size)

    def reload(self) -> MailSettings:
        """Read the file again; raises ConfigError and keeps the old settings.

        Every successful read counts as a change: an administrator who saves the
        same settings after fixing the mailbox on the server side means "try again".
        """
        stamp = self._file_stamp()
        settings = load_mail_settings(self.path)
        self._stamp = stamp
        self.current = settings
        self.version += 1
        return settings

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed on disk since the last read."""
        if self._file_stamp() == self._stamp:
            return False
        self.reload()
        return True

    def save(self, settings: MailSettings) -> None:
        """Write new settings (atomically) and put them in effect."""
        write_mail_settings(self.path, settings)
        self._stamp = self._file_stamp()
        self.current = settings
        self.version += 1
