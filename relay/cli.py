"""The `epp-mail-relay` command: thin wrappers that parse arguments and print."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from relay.config import DaemonConfig, load_daemon_config
from relay.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/epp-mail-relay/relay.toml")

AUTH_TYPE_LABELS = {"basic": "Basic", "oauth": "OAuth"}

EXIT_CONFIG = 2
EXIT_STARTUP = 3


def _load_config(path: Path) -> DaemonConfig:
    try:
        return load_daemon_config(path)
    except ConfigError as error:
        print(f"epp-mail-relay: configuration error: {error.message}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def command_serve(arguments: argparse.Namespace) -> int:
    from relay.app import RelayApp, StartupError
    from relay.logsink import configure_logging

    config = _load_config(arguments.config)
    configure_logging(level=arguments.log_level)
    try:
        app = RelayApp(config, config_path=arguments.config)
    except ConfigError as error:
        print(f"epp-mail-relay: configuration error: {error.message}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, sqlite3.Error) as error:
        # The log file, its database or a state file cannot be created or opened.
        print(f"epp-mail-relay: cannot start: {error}", file=sys.stderr)
        return EXIT_STARTUP
    try:
        asyncio.run(app.serve_forever())
    except StartupError as error:
        print(f"epp-mail-relay: cannot start: {error}", file=sys.stderr)
        return EXIT_STARTUP
    return 0


def command_demo(arguments: argparse.Namespace) -> int:
    from relay.demo import run_demo

    return asyncio.run(run_demo(keep=arguments.keep))


def command_logs(arguments: argparse.Namespace) -> int:
    config = _load_config(arguments.config)
    rows = read_log_rows(
        config.paths.database, limit=arguments.limit, category=arguments.category
    )
    print(format_log_table(rows))
    return 0


def read_log_rows(
    database: Path, *, limit: int = 50, category: str | None = None
) -> list[dict[str, object]]:
    """The Mail Server Logs rows, newest first, read straight from the table."""
    if not database.exists():
        return []
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    try:
        query = "SELECT * FROM mail_server_logs"
        parameters: list[object] = []
        if category:
            query += " WHERE category = ?"
            parameters.append(category)
        query += " ORDER BY id DESC LIMIT ?"
        parameters.append(limit)
        return [dict(row) for row in connection.execute(query, parameters)]
    except sqlite3.OperationalError:
        return []
    finally:
        connection.close()


def format_log_table(rows: Sequence[dict[str, object]], *, width: int = 70) -> str:
    """The Mail Server Logs tab as a terminal table."""
    headers = ("Authentication Type", "Status", "Log Message", "Registered at")
    lines = [
        (
            AUTH_TYPE_LABELS.get(str(row["auth_type"]), str(row["auth_type"])),
            str(row["status"]),
            _clip(str(row["log_message"]), width)
            + (
                f" (x{row['repeat_count']})"
                if int(str(row.get("repeat_count") or 1)) > 1
                else ""
            ),
            str(row["registered_at"]),
        )
        for row in rows
    ]
    widths = [
        max(len(header), *(len(line[index]) for line in lines))
        if lines
        else len(header)
        for index, header in enumerate(headers)
    ]
    rule = "-+-".join("-" * w for w in widths)
    out = [
        " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
        rule,
    ]
    out += [
        " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
        for line in lines
    ]
    if not lines:
        out.append("(no rows)")
    return "\n".join(out)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def command_queue(arguments: argparse.Namespace) -> int:
    from relay.spool import Spool

    config = _load_config(arguments.config)

    async def listing() -> list[dict[str, object]]:
        spool = Spool(config.paths.spool_dir)
        await spool.open(read_only=True)
        try:
            messages = await spool.list_messages(limit=arguments.limit)
        finally:
            await spool.close()
        return [
            {
                "queue_id": m.queue_id,
                "state": str(m.state),
                "from": m.mail_from,
                "recipients": list(m.recipients),
                "attempts": m.attempts,
                "last_error": m.last_error,
            }
            for m in messages
        ]

    for entry in asyncio.run(listing()):
        print(json.dumps(entry, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epp-mail-relay",
        description="Durable SMTP relay from legacy services to Exchange Online "
        "or any authenticated SMTP server.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the relay daemon")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(handler=command_serve)

    demo = commands.add_parser(
        "demo", help="relay a few messages through the loopback sandbox and show them"
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo's files")
    demo.set_defaults(handler=command_demo)

    logs = commands.add_parser("logs", help="show the Mail Server Logs rows")
    logs.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    logs.add_argument("--limit", type=int, default=50)
    logs.add_argument("--category")
    logs.set_defaults(handler=command_logs)

    queue = commands.add_parser("queue", help="list the queued messages")
    queue.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    queue.add_argument("--limit", type=int, default=100)
    queue.set_defaults(handler=command_queue)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    result: int = arguments.handler(arguments)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
