"""Soak: take the upstream down again and again under load; nothing may be lost.

    .venv/bin/python -m bench.soak_outage --outages 40

Starts the sandbox Exchange and `epp-mail-relay serve` on loopback and keeps legacy
SMTP clients sending. Every few seconds the sandbox goes away: alternately it
refuses connections (stopped) or answers every greeting and MAIL with 421, for a random
0.5 to 3 seconds. At the end it waits for the queue to drain and reports lost and
duplicated messages and the number of error rows written. Bounded by --outages
(each up to about 5 seconds) and --drain-stall. Exits 1 if anything was lost.
"""

from __future__ import annotations

import argparse
import sys

from bench.soak_common import add_output_arguments, run_soak
from tests.daemon_harness import run_outage_campaign


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outages", type=int, default=40)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument(
        "--drain-stall",
        type=float,
        default=20.0,
        help="give up draining after this many seconds without a delivery",
    )
    add_output_arguments(parser)
    arguments = parser.parse_args()

    return run_soak(
        arguments,
        prefix="soak-outage-",
        campaign=lambda relay_directory, pki: run_outage_campaign(
            relay_directory,
            pki=pki,
            outages=arguments.outages,
            clients=arguments.clients,
            seed=arguments.seed,
            drain_stall_seconds=arguments.drain_stall,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
