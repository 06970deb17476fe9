"""The relay's error hierarchy and the classification of every failure.

Every failure the relay meets is translated, at the edge where it happens, into one
of these types. Each carries the category shown in the Mail Server Logs tab, a code
(an SMTP reply code with its enhanced status code, or an AADSTS code), a message in
the administrator's language, and a disposition that tells delivery what to do.

    RelayError
    ├── UpstreamError                     (talking to the upstream SMTP server)
    │   ├── UpstreamDnsError              + ConnectionError   category dns
    │   ├── UpstreamTimeoutError          + TimeoutError      category timeout
    │   ├── UpstreamConnectionError       + ConnectionError   category connection
    │   ├── UpstreamTlsError              + ConnectionError   category tls
    │   └── SmtpReplyError                                    category smtp
    ├── OAuthError                                            category oauth
    │   └── TokenEndpointUnavailable      + ConnectionError   category dns / timeout
    ├── ConfigError                       + ValueError        category config
    ├── LimitReachedError                                     category limit
    └── SpoolError                        + OSError           category spool
        └── SpoolFullError

No message, code or attribute ever holds a password, token or AUTH payload: the
constructors take only what an administrator may see.
"""

from __future__ import annotations

import datetime
import enum
import re
from dataclasses import dataclass


class Category(enum.StrEnum):
    """Where a failure happened, as the Mail Server Logs tab groups it."""

    DNS = "dns"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    TLS = "tls"
    SMTP = "smtp"
    OAUTH = "oauth"
    CONFIG = "config"
    SPOOL = "spool"
    # A sending limit of the mailbox (the daily recipient budget) holds the mail.
    LIMIT = "limit"


class Disposition(enum.StrEnum):
    """What delivery does with a message after this failure."""

    # Try again later, following the retry schedule.
    DEFER = "defer"
    # Stop sending everything until the settings change or the operator releases it:
    # retrying with bad credentials only locks the mailbox and floods the logs.
    HOLD = "hold"
    # This recipient is refused for good; the message's other recipients go on.
    FAIL_RECIPIENT = "fail_recipient"
    # The whole message is refused for good.
    FAIL_MESSAGE = "fail_message"
    # The mailbox is over a rate or concurrency limit: pause the whole mailbox,
    # then try again without counting it against the message's retries or life.
    THROTTLE = "throttle"


class Stage(enum.StrEnum):
    """The step of an upstream SMTP session in which a reply arrived."""

    CONNECT = "connect"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class RelayError(Exception):
    """Root of every error the relay reports."""

    category: Category = Category.CONNECTION
    disposition: Disposition = Disposition.DEFER

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        disposition: Disposition | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        if disposition is not None:
            self.disposition = disposition

    @property
    def temporary(self) -> bool:
        return self.disposition in (Disposition.DEFER, Disposition.THROTTLE)

    def fingerprint(self) -> tuple[str, str, str]:
        """Identity of this failure for de-duplicating log rows."""
        return (str(self.category), self.code or "", self.message)


class UpstreamError(RelayError):
    """A failure while talking to the upstream SMTP server."""


class UpstreamDnsError(UpstreamError, ConnectionError):
    category = Category.DNS

    def __init__(self, hostname: str) -> None:
        super().__init__(f"Could not resolve hostname {hostname}")
        self.hostname = hostname


class UpstreamTimeoutError(UpstreamError, TimeoutError):
    category = Category.TIMEOUT

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @classmethod
    def while_connecting(
        cls, *, hostname: str, port: int, seconds: float
    ) -> UpstreamTimeoutError:
        return cls(
            f"Connection timed out after {seconds:g} seconds while connecting to "
            f"{hostname}:{port}"
        )

    @classmethod
    def waiting_for_reply(
        cls, *, hostname: str, port: int, seconds: float, stage: Stage
    ) -> UpstreamTimeoutError:
        return cls(
            f"Timed out after {seconds:g} seconds waiting for the {stage.upper()} "
            f"reply from {hostname}:{port}"
        )


class UpstreamConnectionError(UpstreamError, ConnectionError):
    category = Category.CONNECTION


class UpstreamTlsError(UpstreamError, ConnectionError):
    category = Category.TLS


class SmtpReplyError(UpstreamError):
    """The upstream answered with a reply that is not a success."""

    category = Category.SMTP

    def __init__(
        self,
        reply_code: int,
        reply_text: str,
        *,
        stage: Stage,
        recipient: str | None = None,
    ) -> None:
        reply_text = " ".join(reply_text.split())
        enhanced = parse_enhanced_code(reply_text)
        message = f"{reply_code} {reply_text}".strip()
        if recipient is not None:
            message = f"{message} (recipient {recipient})"
        super().__init__(
            message,
            code=f"{reply_code} {enhanced}" if enhanced else str(reply_code),
            disposition=classify_reply(reply_code, reply_text, stage=stage),
        )
        self.reply_code = reply_code
        self.enhanced_code = enhanced
        self.reply_text = reply_text
        self.stage = stage
        self.recipient = recipient


class OAuthError(RelayError):
    """Entra ID refused to issue a token, or the sign-in failed."""

    category = Category.OAUTH
    disposition = Disposition.HOLD

    def __init__(
        self,
        message: str,
        *,
        aadsts_code: int | None = None,
        error: str | None = None,
        trace_id: str | None = None,
        correlation_id: str | None = None,
        disposition: Disposition | None = None,
    ) -> None:
        super().__init__(
            message,
            code=f"AADSTS{aadsts_code}" if aadsts_code is not None else error,
            disposition=disposition,
        )
        self.aadsts_code = aadsts_code
        self.error = error
        self.trace_id = trace_id
        self.correlation_id = correlation_id


class TokenEndpointUnavailable(OAuthError, ConnectionError):
    """The token endpoint could not be reached: temporary, never an auth failure."""

    disposition = Disposition.DEFER

    def __init__(self, message: str, *, category: Category) -> None:
        super().__init__(message)
        self.category = category


class ConfigError(RelayError, ValueError):
    """A setting is missing or wrong; names the key and the problem."""

    category = Category.CONFIG
    disposition = Disposition.HOLD

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}", code=key)
        self.key = key
        self.problem = problem


class LimitReachedError(RelayError):
    """A sending limit of the mailbox holds its mail until the limit frees up."""

    category = Category.LIMIT
    disposition = Disposition.THROTTLE

    @classmethod
    def recipient_budget(
        cls, *, mailbox: str, limit: int, until: float
    ) -> LimitReachedError:
        stamp = datetime.datetime.fromtimestamp(until, datetime.UTC)
        return cls(
            f"The daily limit of {limit:,} recipients for {mailbox} is reached; "
            f"mail is held, not bounced, until about {stamp:%Y-%m-%d %H:%M} UTC",
            code="recipient_budget",
        )


class SpoolError(RelayError, OSError):
    category = Category.SPOOL


class SpoolFullError(SpoolError):
    """The spool's file system is below its free-space floor."""


_ENHANCED_CODE = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


def parse_enhanced_code(reply_text: str) -> str | None:
    """The RFC 3463 enhanced status code that opens a reply text, if any."""
    match = _ENHANCED_CODE.match(reply_text)
    return ".".join(match.groups()) if match else None


@dataclass(frozen=True)
class _HoldRule:
    reply_code: int | None
    enhanced_code: str | None
    text_fragment: str | None = None


# Replies that mean the mailbox or tenant setup is wrong or exhausted. Retrying
# cannot help, and bouncing would lose mail that will go through once it is fixed.
_HOLD_RULES = (
    _HoldRule(535, None),
    _HoldRule(530, "5.7.57"),
    _HoldRule(550, "5.7.30"),
    _HoldRule(550, "5.7.708"),
    _HoldRule(550, "5.7.750"),
    _HoldRule(554, "5.2.0", "SubmissionQuotaExceeded"),
    _HoldRule(554, "5.2.2", "QuotaExceeded"),
)


def is_throttling(reply_code: int, enhanced: str | None) -> bool:
    """Whether a reply says the mailbox sends too much or on too many connections.

    Exchange Online answers a fourth connection with 432 4.3.2 and a message over
    the per-minute rate with 451 4.7.500 (the 4.7.5xx family is its throttling).
    """
    if reply_code == 432:
        return True
    return 400 <= reply_code < 500 and (enhanced or "").startswith("4.7.5")


def classify_reply(reply_code: int, reply_text: str, *, stage: Stage) -> Disposition:
    """Decide what a non-success upstream reply means for delivery.

    The reply code and the enhanced status code decide first; the text only
    separates the quota replies that share `554 5.2.x` with per-message refusals.
    """
    enhanced = parse_enhanced_code(reply_text)

    for rule in _HOLD_RULES:
        if rule.reply_code is not None and rule.reply_code != reply_code:
            continue
        if rule.enhanced_code is not None and rule.enhanced_code != enhanced:
            continue
        if rule.text_fragment is not None and rule.text_fragment not in reply_text:
            continue
        return Disposition.HOLD

    if is_throttling(reply_code, enhanced):
        return Disposition.THROTTLE
    if 400 <= reply_code < 500 or reply_code < 200 or reply_code >= 600:
        return Disposition.DEFER
    # A 5xx before the envelope starts is about the session, not this message.
    if stage in (Stage.CONNECT, Stage.EHLO, Stage.STARTTLS, Stage.AUTH):
        return Disposition.HOLD
    if stage is Stage.RCPT:
        return Disposition.FAIL_RECIPIENT
    return Disposition.FAIL_MESSAGE
