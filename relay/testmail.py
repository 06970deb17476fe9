"""The administrator's test e-mail: one short message sent now, outside the spool.

The Send test e-mail button must answer with what the upstream server said, so
the message goes over its own `UpstreamSession` with the settings in effect and
never through the queue (where a failure would only be retried later).
"""

from __future__ import annotations

import email.utils
import ssl
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from typing import Final

from relay.config import MailSettings, TimeoutsConfig
from relay.errors import ConfigError, RelayError
from relay.upstream import TokenProvider, UpstreamSession

TEST_EMAIL_SENT_TEXT: Final = "A test e-mail was sent to {address}"
NO_ADMIN_EMAIL_TEXT: Final = (
    "There is no e-mail defined for your Administrator Account. You must setup the "
    "e-mail address from System Administrators > Edit info"
)
TEST_EMAIL_FAILED_TEXT: Final = (
    "Failed to send the test e-mail! Please verify if the E-mail Server Settings "
    "are correct!"
)

_SUBJECT: Final = "epp-mail-relay test e-mail"


class NoAdminEmailError(ConfigError):
    """The Mail Settings name no administrator address to send the test to."""

    def __init__(self) -> None:
        super().__init__("admin_email", "no administrator e-mail address is set")


def sent_text(address: str) -> str:
    """The answer shown when the upstream server took the test e-mail."""
    return TEST_EMAIL_SENT_TEXT.format(address=address)


def build_test_message(
    settings: MailSettings, *, local_hostname: str
) -> tuple[str, str, bytes]:
    """The envelope sender, the recipient and the bytes of the test e-mail.

    The sender is the configured mailbox, because Exchange refuses any other
    (550 5.7.60); a Basic username that is not an address falls back to the
    administrator address.
    """
    recipient = settings.admin_email
    if not recipient:
        raise NoAdminEmailError
    sender = settings.username if "@" in settings.username else recipient

    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = _SUBJECT
    message["Date"] = email.utils.formatdate(localtime=False)
    message["Message-ID"] = email.utils.make_msgid(domain=local_hostname)
    message.set_content(
        "This is a test e-mail from epp-mail-relay.\n\n"
        f"It was sent to {settings.hostname}:{settings.port} with "
        f"{settings.auth_type} authentication as {settings.username}.\n"
    )
    ascii_only = sender.isascii() and recipient.isascii()
    policy = SMTP if ascii_only else SMTPUTF8
    return sender, recipient, message.as_bytes(policy=policy)


async def send_test_email(
    *,
    settings: MailSettings,
    timeouts: TimeoutsConfig,
    tls_context: ssl.SSLContext,
    local_hostname: str,
    token_provider: TokenProvider | None,
) -> str:
    """Send the test e-mail to the administrator; return the address it went to.

    Raises NoAdminEmailError when no address is set, and the RelayError of the
    first failure otherwise (a refused recipient included).
    """
    sender, recipient, body = build_test_message(
        settings, local_hostname=local_hostname
    )
    session = UpstreamSession(
        settings=settings,
        timeouts=timeouts,
        tls_context=tls_context,
        local_hostname=local_hostname,
        token_provider=token_provider,
    )

    try:
        await session.open()
        result = await session.send(
            mail_from=sender,
            recipients=[recipient],
            body=body,
            smtputf8=not (sender.isascii() and recipient.isascii()),
            body_8bit=False,
        )
    finally:
        await session.close()

    refusal: RelayError | None = next(
        iter((result.refused | result.deferred).values()), None
    )
    if refusal is not None:
        raise refusal
    return recipient
