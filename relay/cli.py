"""The `epp-mail-relay` command: thin wrappers that parse arguments and print.

    serve                      run the daemon
    demo                       relay mail through the loopback sandbox
    doctor                     check the upstream step by step (no daemon needed)
    logs                       the Mail Server Logs tab, read from its database
    status                     queue, hold, last error, sign-in (admin API)
    settings show|set          the Mail Settings (admin API)
    test-email                 send the test e-mail (admin API)
    signin                     Sign In for OAuth (admin API)
    queue list|retry|delete|release   (admin API)

The admin API commands talk to the running daemon at the address in the
configuration's [admin] section, with the token from its token file.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.config import SECRET_FIELDS, DaemonConfig, load_daemon_config
from relay.errors import ConfigError
from relay.tokens import SIGN_IN_FAILED_TEXT

if TYPE_CHECKING:
    from relay.adminclient import AdminClient, ApiAnswer

DEFAULT_CONFIG = Path("/etc/epp-mail-relay/relay.toml")

AUTH_TYPE_LABELS = {"basic": "Basic", "oauth": "OAuth"}

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_UNREACHABLE = 4

# The Mail Settings in the order of the page, with its labels.
SETTING_LABELS = {
    "auth_type": "E-mail Authentication Type",
    "email_type": "E-mail Type",
    "hostname": "Hostname",
    "port": "SMTP Port",
    "username": "Username",
    "password_set": "Password",
    "encryption": "Encryption Type",
    "tenant_id": "Tenant ID",
    "client_id": "Application (Client) ID",
    "client_secret_set": "Client Secret Value",
    "redirect_uri": "Redirect URI",
    "oauth_flow": "Sign-in flow",
    "admin_email": "Administrator E-mail",
}
_OAUTH_ONLY = {
    "tenant_id",
    "client_id",
    "client_secret_set",
    "redirect_uri",
    "oauth_flow",
}
_BASIC_ONLY = {"password_set", "encryption"}


def _load_config(path: Path) -> DaemonConfig:
    try:
        return load_daemon_config(path)
    except ConfigError as error:
        print(f"epp-mail-relay: configuration error: {error.message}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def run_daemon(main: Coroutine[Any, Any, None]) -> None:
    """Run the daemon on uvloop when it is installed, else on asyncio's own loop.

    uvloop (the optional extra `fast`) costs about an eighth less CPU per relayed
    message. EPP_MAIL_RELAY_EVENT_LOOP=asyncio keeps the standard loop anyway.
    """
    if os.environ.get("EPP_MAIL_RELAY_EVENT_LOOP") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def command_serve(arguments: argparse.Namespace) -> int:
    from relay.app import RelayApp, StartupError
    from relay.logsink import configure_logging

    config = _load_config(arguments.config)
    configure_logging(level=arguments.log_level, once=True)
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
        run_daemon(app.serve_forever())
    except StartupError as error:
        print(f"epp-mail-relay: cannot start: {error}", file=sys.stderr)
        return EXIT_STARTUP
    return 0


def command_demo(arguments: argparse.Namespace) -> int:
    from relay.demo import run_demo

    return asyncio.run(run_demo(keep=arguments.keep))


def command_doctor(arguments: argparse.Namespace) -> int:
    from relay.doctor import run_doctor

    config = _load_config(arguments.config)
    exit_code: int = asyncio.run(
        run_doctor(config, timeout=arguments.timeout, out=sys.stdout)
    )
    return exit_code


# -- logs, straight from the table ---------------------------------------------------


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
    return _table(headers, lines, empty="(no rows)")


def _table(
    headers: Sequence[str], lines: Sequence[Sequence[str]], *, empty: str
) -> str:
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
        out.append(empty)
    return "\n".join(out)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# -- commands that talk to the daemon ----------------------------------------------

ApiCommand = Callable[["AdminClient", argparse.Namespace], Coroutine[Any, Any, int]]


def _with_daemon(command: ApiCommand) -> Callable[[argparse.Namespace], int]:
    """Run `command` against the daemon; configuration and reachability errors exit."""

    def run(arguments: argparse.Namespace) -> int:
        from relay.adminclient import AdminClient, AdminUnreachable

        config = _load_config(arguments.config)
        try:
            client = AdminClient.from_config(config, admin_url=arguments.admin_url)
        except ConfigError as error:
            print(
                f"epp-mail-relay: configuration error: {error.message}",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        try:
            return asyncio.run(command(client, arguments))
        except AdminUnreachable as error:
            print(f"epp-mail-relay: {error}", file=sys.stderr)
            return EXIT_UNREACHABLE

    return run


def _report(answer: ApiAnswer) -> int:
    """Print the API's message (and reason): stdout if it worked, else stderr."""
    if answer.ok:
        print(answer.message)
        return 0
    print(answer.message, file=sys.stderr)
    if answer.reason:
        field = answer.body.get("field")
        prefix = f"{field}: " if field else ""
        print(f"  {prefix}{answer.reason}", file=sys.stderr)
    return EXIT_FAILED


async def status_command(client: AdminClient, arguments: argparse.Namespace) -> int:
    answer = await client.call("GET", "/api/status")
    if not answer.ok:
        return _report(answer)
    body = answer.body
    if arguments.json:
        print(json.dumps(body, indent=2))
        return 0
    sign_in = body.get("sign_in") or {}
    print(f"Queue:        {body['summary']}")
    print(
        f"Held:         {'yes: ' + str(body['hold_reason']) if body['held'] else 'no'}"
    )
    print(f"Last error:   {body['last_error'] or '-'}")
    auth = AUTH_TYPE_LABELS.get(body["auth_type"], body["auth_type"])
    if body["auth_type"] != "oauth":
        print(f"Auth:         {auth}")
    elif sign_in.get("signed_in"):
        expiry = sign_in.get("access_token_expires_at") or "no access token yet"
        print(f"Auth:         {auth}, signed in as {sign_in.get('mailbox') or '-'}")
        print(f"Token until:  {expiry}")
    else:
        print(f"Auth:         {auth}: E-mail Authorization Required (run: signin)")
    return 0


async def settings_show_command(
    client: AdminClient, arguments: argparse.Namespace
) -> int:
    answer = await client.call("GET", "/api/settings")
    if not answer.ok:
        return _report(answer)
    settings = answer.body["settings"]
    if arguments.json:
        print(json.dumps(settings, indent=2))
        return 0
    oauth = settings.get("auth_type") == "oauth"
    for key, label in SETTING_LABELS.items():
        if (key in _OAUTH_ONLY and not oauth) or (key in _BASIC_ONLY and oauth):
            continue
        value = settings.get(key)
        if key.endswith("_set"):
            text = "(set)" if value else "(not set)"
        else:
            text = "" if value is None else str(value)
        print(f"{label + ':':28} {text}")
    return 0


async def settings_set_command(
    client: AdminClient, arguments: argparse.Namespace
) -> int:
    try:
        changes = parse_assignments(arguments.assignments, read_secret=_read_secret)
    except ValueError as error:
        print(f"epp-mail-relay: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return _report(await client.call("POST", "/api/settings", json=changes))


def parse_assignments(
    assignments: Sequence[str], *, read_secret: Callable[[str], str]
) -> dict[str, Any]:
    """`key=value` words as settings changes; a bare secret name is asked for.

    Secrets are never taken from the command line, where `ps` shows them.
    """
    changes: dict[str, Any] = {}
    for assignment in assignments:
        key, equals, value = assignment.partition("=")
        key = key.strip()
        if key in SECRET_FIELDS:
            if equals:
                raise ValueError(
                    f"give {key} without a value ({key}) to be asked for it; "
                    "a secret on the command line is visible to other users"
                )
            changes[key] = read_secret(key)
            continue
        if not equals:
            raise ValueError(f"expected key=value, got {assignment!r}")
        # A port goes as a number; anything else as typed, for the daemon to judge.
        changes[key] = int(value) if key == "port" and value.isdigit() else value
    return changes


def _read_secret(name: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(f"{name}: ")
    return sys.stdin.readline().rstrip("\r\n")


async def test_email_command(client: AdminClient, arguments: argparse.Namespace) -> int:
    return _report(await client.call("POST", "/api/test-email"))


async def signin_command(client: AdminClient, arguments: argparse.Namespace) -> int:
    from relay.adminclient import (
        SIGN_IN_POLL_SECONDS,
        is_daemon_callback,
        loopback_redirect,
        receive_redirect,
    )

    started = await client.call("POST", "/api/signin")
    if not started.ok:
        return _report(started)
    flow = started.body.get("flow")
    if flow == "client_credentials":
        return _report(started)
    if flow == "device_code":
        print(started.body.get("prompt") or "", flush=True)
        return await _wait_for_sign_in(client, arguments.timeout, SIGN_IN_POLL_SECONDS)

    url = str(started.body["authorization_url"])
    print("Open this address in a browser and sign in with the mailbox:")
    print(f"  {url}", flush=True)
    settings = (await client.call("GET", "/api/settings")).body.get("settings", {})
    redirect = loopback_redirect(str(settings.get("redirect_uri", "")))

    if redirect is not None and is_daemon_callback(redirect, client.base_url):
        print("The relay receives the redirect itself; waiting for it...", flush=True)
        return await _wait_for_sign_in(client, arguments.timeout, SIGN_IN_POLL_SECONDS)
    if redirect is not None:
        print(
            f"Waiting for the browser on http://{redirect.host}:{redirect.port}"
            f"{redirect.path} ...",
            flush=True,
        )

        async def complete(redirect_url: str) -> ApiAnswer:
            return await client.call(
                "POST", "/api/signin/complete", json={"redirect_url": redirect_url}
            )

        try:
            answer = await receive_redirect(
                redirect, complete=complete, timeout=arguments.timeout
            )
        except TimeoutError:
            print("No browser came back in time; run signin again.", file=sys.stderr)
            return EXIT_FAILED
        except OSError as error:
            print(
                f"Cannot listen on {redirect.host}:{redirect.port} ({error.strerror});"
                " paste the address instead.",
                file=sys.stderr,
            )
        else:
            return _report(answer)

    print("After signing in, paste the whole address the browser was sent to:")
    pasted = await asyncio.to_thread(sys.stdin.readline)
    return _report(
        await client.call(
            "POST", "/api/signin/complete", json={"redirect_url": pasted.strip()}
        )
    )


async def _wait_for_sign_in(client: AdminClient, timeout: float, every: float) -> int:
    """Poll GET /api/signin until the sign-in is no longer pending."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        answer = await client.call("GET", "/api/signin")
        if not answer.ok:
            return _report(answer)
        state = answer.body.get("state")
        if state == "complete":
            print(answer.message)
            return 0
        if state != "pending":
            print(answer.body.get("message") or SIGN_IN_FAILED_TEXT, file=sys.stderr)
            if answer.reason:
                print(f"  {answer.reason}", file=sys.stderr)
            return EXIT_FAILED
        await asyncio.sleep(every)
    print("The sign-in did not finish in time; run signin again.", file=sys.stderr)
    return EXIT_FAILED


async def queue_list_command(client: AdminClient, arguments: argparse.Namespace) -> int:
    path = f"/api/queue?limit={arguments.limit}"
    if arguments.state:
        path += f"&state={arguments.state}"
    answer = await client.call("GET", path)
    if not answer.ok:
        return _report(answer)
    messages = answer.body["messages"]
    if arguments.json:
        for message in messages:
            print(json.dumps(message, ensure_ascii=False))
        return 0
    headers = ("Queue ID", "State", "From", "Recipients", "Tries", "Next try", "Error")
    lines = [
        (
            str(m["queue_id"]),
            str(m["state"]),
            _clip(str(m["from"]) or "<>", 30),
            _clip(", ".join(m["recipients"]), 40),
            str(m["attempts"]),
            str(m["next_attempt_at"] or "-"),
            _clip(str(m["last_error"] or "-"), 50),
        )
        for m in messages
    ]
    print(_table(headers, lines, empty="(queue empty)"))
    return 0


async def queue_retry_command(
    client: AdminClient, arguments: argparse.Namespace
) -> int:
    path = (
        f"/api/queue/{arguments.queue_id}/retry"
        if arguments.queue_id
        else "/api/queue/retry"
    )
    return _report(await client.call("POST", path))


async def queue_delete_command(
    client: AdminClient, arguments: argparse.Namespace
) -> int:
    return _report(await client.call("DELETE", f"/api/queue/{arguments.queue_id}"))


async def queue_release_command(
    client: AdminClient, arguments: argparse.Namespace
) -> int:
    return _report(await client.call("POST", "/api/queue/release"))


# -- the parser --------------------------------------------------------------------


def _daemon_options(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """--config and --admin-url; `nested` ones keep what their parent parsed."""
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS if nested else DEFAULT_CONFIG,
    )
    parser.add_argument(
        "--admin-url",
        default=argparse.SUPPRESS if nested else None,
        help="the daemon's admin server (default: from the [admin] section)",
    )


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

    doctor = commands.add_parser(
        "doctor",
        help="check DNS, TCP, TLS, EHLO and AUTH against the configured server",
    )
    doctor.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    doctor.add_argument(
        "--timeout",
        type=float,
        help="seconds for each step (default: the configuration's timeouts)",
    )
    doctor.set_defaults(handler=command_doctor)

    logs = commands.add_parser("logs", help="show the Mail Server Logs rows")
    logs.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    logs.add_argument("--limit", type=int, default=50)
    logs.add_argument("--category")
    logs.set_defaults(handler=command_logs)

    status = commands.add_parser("status", help="queue, hold, last error, sign-in")
    _daemon_options(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_with_daemon(status_command))

    settings = commands.add_parser("settings", help="show or change the Mail Settings")
    settings_actions = settings.add_subparsers(dest="action", required=True)
    show = settings_actions.add_parser("show", help="the Mail Settings, no secrets")
    _daemon_options(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_with_daemon(settings_show_command))
    change = settings_actions.add_parser(
        "set",
        help="change settings: key=value ...; a secret name alone (password, "
        "client_secret) is asked for",
    )
    _daemon_options(change)
    change.add_argument("assignments", nargs="+", metavar="key=value")
    change.set_defaults(handler=_with_daemon(settings_set_command))

    test_email = commands.add_parser(
        "test-email", help="send a test e-mail to the administrator address now"
    )
    _daemon_options(test_email)
    test_email.set_defaults(handler=_with_daemon(test_email_command))

    signin = commands.add_parser("signin", help="Sign In (OAuth) for the mailbox")
    _daemon_options(signin)
    signin.add_argument(
        "--timeout",
        type=float,
        default=15 * 60.0,
        help="seconds to wait for the browser or the device code approval",
    )
    signin.set_defaults(handler=_with_daemon(signin_command))

    queue = commands.add_parser("queue", help="list and operate the queue")
    # `queue` alone lists, as it always did.
    _daemon_options(queue)
    _queue_list_options(queue)
    queue_actions = queue.add_subparsers(dest="action")
    listing = queue_actions.add_parser("list", help="queued messages (default)")
    _daemon_options(listing, nested=True)
    _queue_list_options(listing, nested=True)
    retry = queue_actions.add_parser(
        "retry", help="try one message (or every deferred or held one) now"
    )
    _daemon_options(retry, nested=True)
    retry.add_argument("queue_id", nargs="?")
    retry.set_defaults(handler=_with_daemon(queue_retry_command))
    delete = queue_actions.add_parser("delete", help="delete one message")
    _daemon_options(delete, nested=True)
    delete.add_argument("queue_id")
    delete.set_defaults(handler=_with_daemon(queue_delete_command))
    release = queue_actions.add_parser("release", help="release a held queue")
    _daemon_options(release, nested=True)
    release.set_defaults(handler=_with_daemon(queue_release_command))
    return parser


def _queue_list_options(
    parser: argparse.ArgumentParser, *, nested: bool = False
) -> None:
    parser.add_argument(
        "--limit", type=int, default=argparse.SUPPRESS if nested else 100
    )
    parser.add_argument(
        "--state",
        choices=("queued", "sending", "deferred", "held", "failed"),
        default=argparse.SUPPRESS if nested else None,
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if nested else False,
        help="one JSON object a line",
    )
    parser.set_defaults(handler=_with_daemon(queue_list_command))


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    result: int = arguments.handler(arguments)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
