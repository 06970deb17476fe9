"""SMTP DATA transparency (RFC 5321 section 4.5.2) on streams of large blocks.

Both directions work on blocks of any size and any split, so that a message is
never walked line by line in Python:

- `DataUnstuffer` turns what a client sends after DATA into the message: it ends
  the message at the first CRLF "." CRLF, removes the leading dot of every line,
  and turns each bare CR or LF into CRLF, so that one DATA can never carry two
  messages to the next server.
- `DotStuffer` does the reverse for a stored message going upstream: a dot is
  added to every line that starts with one.

Only CRLF ends a line for both rules: "\\n.\\r\\n" and "\\r.\\r" end nothing and
their dot stays (the SMTP smuggling defence). The results are exactly those of
splitting the stream at CRLF and handling it one line at a time, which the tests
check against such a reference.
"""

from __future__ import annotations

import re

TERMINATOR = b"\r\n.\r\n"
CRLF = b"\r\n"
# A line that starts with a dot: a stuffing dot, or the terminator's.
DOT_LINE = b"\r\n."
# Bytes of the terminator that a block may end inside of; they wait for the next.
_HELD_BACK = len(TERMINATOR) - 1
_LINE_BREAKS = re.compile(rb"\r\n|\r|\n")
_CR = 13


class DataUnstuffer:
    """Turns the DATA byte stream into message bytes, one block at a time."""

    def __init__(self) -> None:
        # The message starts at the beginning of a line, as if a CRLF came before.
        self._at_line_start = True
        self._carry = b""
        self._consumed = 0
        self.done = False

    @property
    def raw_size(self) -> int:
        """Octets of message data taken so far, stuffing dots included.

        Once `done`, the size of the message as the client sent it, without the
        terminating "." CRLF: what a size limit is measured against.
        """
        return self._consumed - 3 if self.done else self._consumed

    def feed(self, block: bytes) -> tuple[bytes, int]:
        """Take the next bytes of the stream.

        Returns the message bytes they complete and how many of `block` belong to
        the message; any rest came after the terminator (a pipelined command).
        """
        if self.done:
            return b"", 0

        prefix = CRLF if self._at_line_start else b""
        carried = len(self._carry)
        data = prefix + self._carry + block
        # One scan finds the first line that starts with a dot: the terminator
        # is such a line, so when it is the first, there is no dot to remove.
        dot_line = data.find(DOT_LINE)
        end = -1 if dot_line < 0 else data.find(TERMINATOR, dot_line)
        if end >= 0:
            region = data[: end + len(CRLF)]
            used = end + len(TERMINATOR) - len(prefix) - carried
            self._carry = b""
            self.done = True
        else:
            # A terminator may begin in the last bytes; a CR may pair with an LF
            # in the next block. Both wait.
            cut = len(data) - _HELD_BACK
            if cut > 0 and data[cut - 1] == _CR:
                cut -= 1
            if cut <= len(prefix):
                self._carry = data[len(prefix) :]
                self._consumed += len(block)
                return b"", len(block)
            region = data[:cut]
            self._carry = data[cut:]
            used = len(block)
            self._at_line_start = region.endswith(CRLF)

        self._consumed += used
        dots = 0 <= dot_line <= len(region) - len(DOT_LINE)
        return unstuff(region, dots=dots)[len(prefix) :], used


def unstuff(region: bytes, *, dots: bool = True) -> bytes:
    """Remove each line's leading dot, then make every line ending CRLF.

    `region` is whole: it starts at a line start (or mid-line with nothing to
    undo) and does not end between a CR and an LF. `dots=False` says that no line
    in it starts with a dot, which spares a scan.
    """
    # Only a dot after a real CRLF is a stuffing dot; the bare breaks become CRLF
    # afterwards, so a dot after a bare LF is kept as the client sent it.
    text = region.replace(DOT_LINE, CRLF) if dots else region
    if _crlf_only(text):
        return text
    return _LINE_BREAKS.sub(CRLF, text)


def _crlf_only(text: bytes) -> bool:
    """Whether every CR and every LF in `text` is part of a CRLF pair.

    A pair takes one of each, so that holds exactly when the CRs and LFs
    together number twice the pairs (two scans, where counting each is three).
    """
    line_break_bytes = len(text) - len(text.translate(None, b"\r\n"))
    return line_break_bytes == 2 * text.count(CRLF)


class DotStuffer:
    """Adds the transparency dot to lines of a CRLF-only message, block by block."""

    def __init__(self) -> None:
        # The last two bytes sent: whether the next byte starts a line.
        self._tail = CRLF

    def stuff(self, block: bytes) -> bytes:
        """The bytes to send for the next block of the message."""
        if not block:
            return b""
        tail = self._tail
        self._tail = block[-2:] if len(block) >= 2 else tail[-1:] + block
        # A dot line lies inside the block or across its seam with the last one;
        # without one the block goes as it is, uncopied.
        if DOT_LINE not in tail + block[:2] and block.find(DOT_LINE) < 0:
            return block
        data = (tail + block).replace(DOT_LINE, b"\r\n..")
        return data[len(tail) :]

    def finish(self) -> bytes:
        """The end of the data: a CRLF if the message lacked one, then "." CRLF."""
        return (b"" if self._tail == CRLF else CRLF) + b".\r\n"
