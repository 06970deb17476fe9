"""Around every soak campaign: a work folder, the printed report, the exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from relay.sandbox.certs import SandboxPKI


class CampaignReport(Protocol):
    lost: Any

    def summary(self) -> str: ...


Campaign = Callable[[Path, SandboxPKI], Awaitable[CampaignReport]]


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--keep", type=Path, help="work in this new directory and keep it afterwards"
    )


async def _awaited(work: Awaitable[CampaignReport]) -> CampaignReport:
    return await work


def run_soak(arguments: argparse.Namespace, *, prefix: str, campaign: Campaign) -> int:
    """Run `campaign` in a fresh folder; print the report; 1 if anything was lost."""
    with contextlib.ExitStack() as stack:
        if arguments.keep:
            arguments.keep.mkdir(parents=True)
            directory = arguments.keep
        else:
            directory = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix))
            )
        pki = SandboxPKI.create(directory / "pki")
        report: CampaignReport = asyncio.run(
            _awaited(campaign(directory / "relay", pki))
        )
    print(report.summary())
    if arguments.json:
        figures = dataclasses.asdict(report)  # type: ignore[call-overload]
        arguments.json.write_text(json.dumps(figures, indent=2))
    return 1 if report.lost else 0
