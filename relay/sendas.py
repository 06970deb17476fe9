"""Sending as the authenticated mailbox, for services that write other addresses.

Exchange Online lets a mailbox send only as itself unless it holds Send As rights:
another envelope sender is refused at MAIL FROM (550 5.7.60), and another From:
after DATA (554 5.2.252 SendAsDenied, or 554 5.2.0 ...SendAsDeniedException).
Legacy services often write "noreply@appliance.local" or "root@host". With the
option on, the relay sends as the mailbox instead; the original From: moves to
Reply-To:, so replies still reach whoever the service meant.
"""

from __future__ import annotations

import re
from email.utils import getaddresses

_HEADER_END = b"\r\n\r\n"
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def envelope_sender(mail_from: str, *, mailbox: str) -> str:
    """The MAIL FROM to use: the mailbox, but a bounce keeps its null sender.

    RFC 5321 section 4.5.5: a null reverse-path is what keeps a bounce from
    bouncing in turn; giving it an address would invite a loop.
    """
    return mailbox if mail_from else mail_from


def rewrite_from_header(head: bytes, *, mailbox: str) -> bytes:
    """Put the mailbox in From: and keep the original From: as Reply-To:.

    `head` is the start of the message; only its header section changes. A
    Reply-To: already present is kept (the service chose it), a Sender: naming
    someone else is dropped (Exchange checks it as well), and a From: that is
    already the mailbox, or a header section that does not end within `head`,
    leaves `head` as it is.
    """
    end = head.find(_HEADER_END)
    if end < 0:
        return head
    fields = _split_fields(head[: end + 2])
    names = [_field_name(field) for field in fields]
    if b"from" not in names:
        return head

    from_index = names.index(b"from")
    original = fields[from_index]
    value = original.split(b":", 1)[1]
    text = _unfold(value).decode("utf-8", "surrogateescape")
    addresses = [address for _, address in getaddresses([text]) if address]
    if len(addresses) == 1 and addresses[0].casefold() == mailbox.casefold():
        return head

    display_name = text[: text.rfind("<")].strip() if "<" in text else ""
    new_from = f"{display_name} <{mailbox}>" if display_name else mailbox
    rewritten: list[bytes] = []
    for index, field in enumerate(fields):
        if names[index] == b"sender":
            continue
        if index != from_index:
            rewritten.append(field)
            continue
        rewritten.append(
            b"From: " + new_from.encode("utf-8", "surrogateescape") + b"\r\n"
        )
        if b"reply-to" not in names:
            rewritten.append(b"Reply-To:" + value)
    return b"".join(rewritten) + head[end + 2 :]


def _split_fields(section: bytes) -> list[bytes]:
    """Header fields, each with its folded lines and final CRLF (RFC 5322 2.2)."""
    fields: list[bytes] = []
    for line in section.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _field_name(field: bytes) -> bytes:
    matched = _FIELD_NAME.match(field)
    return matched.group(1).lower() if matched else b""


def _unfold(value: bytes) -> bytes:
    return re.sub(rb"\r\n(?=[ \t])", b"", value).strip()
