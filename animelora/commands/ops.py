"""`animelora serve`: run the project's Prefect deployments.

The command line sits above the orchestration layer, so it imports `deployments` directly;
it does so only when the command runs, because that pulls in Prefect, which every other
command (and every ``--help``) should not pay for.
"""
from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        print(f"error: --limit must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    from deployments import serve

    return serve.main(limit=args.limit)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the train-lora and dataset-refresh deployments against PREFECT_API_URL",
        description="Serve train-lora/{phase1.5,phase2a,phase2a-l2,phase2b} and "
        "dataset-refresh/nightly until stopped. Starts no Prefect server: set PREFECT_API_URL.",
    )
    parser.add_argument("--limit", type=int, default=None, help="max concurrent flow runs")
    parser.set_defaults(func=_serve)
