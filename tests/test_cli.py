"""The `epp-mail-relay` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from relay.cli import format_log_table


def test_cli_demo_relays_mail_and_exits_0() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "relay.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    tail = completed.stdout
    assert (
        completed.returncode,
        "AUTH XOAUTH2" in tail,
        "Your email has been verified. Authorization complete!" in tail,
        "535 5.7.3 Authentication unsuccessful" in tail,
    ) == (0, True, True, True), completed.stderr[-2000:]


def test_cli_log_table_has_the_ui_columns() -> None:
    table = format_log_table(
        [
            {
                "auth_type": "oauth",
                "status": "error",
                "log_message": "AADSTS700082: The refresh token has expired",
                "registered_at": "2026-12-04T10:00:00.000Z",
                "repeat_count": 3,
            }
        ]
    )
    header, _, row = table.splitlines()
    assert (header.split(" | ")[0], row.startswith("OAuth"), "(x3)" in row) == (
        "Authentication Type",
        True,
        True,
    )
