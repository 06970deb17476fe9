"""Soak: kill -9 the relay daemon at random instants under load, count what arrived.

    .venv/bin/python -m bench.soak_crash --kills 300 --max-seconds 900

Starts the sandbox Exchange and `epp-mail-relay serve` on loopback, keeps legacy
SMTP clients sending messages with unique Message-IDs, kills the daemon with
SIGKILL after a random uptime, restarts it, and repeats. At the end it waits for
the queue to drain and counts the messages at the sandbox by Message-ID: lost
(acknowledged with 250, never delivered), duplicated, and delivered without a 250
(the kill came between the commit and the reply). Bounded by --kills and by
--max-seconds for the kill phase. Exits 1 if anything acknowledged was lost.
"""

from __future__ import annotations

import argparse
import sys

from bench.soak_common import add_output_arguments, run_soak
from tests.daemon_harness import run_crash_campaign


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=300)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--min-uptime", type=float, default=0.05)
    parser.add_argument("--max-uptime", type=float, default=0.8)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=6)
    add_output_arguments(parser)
    arguments = parser.parse_args()

    return run_soak(
        arguments,
        prefix="soak-crash-",
        campaign=lambda relay_directory, pki: run_crash_campaign(
            relay_directory,
            pki=pki,
            kills=arguments.kills,
            min_uptime=arguments.min_uptime,
            max_uptime=arguments.max_uptime,
            clients=arguments.clients,
            seed=arguments.seed,
            max_seconds=arguments.max_seconds,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
