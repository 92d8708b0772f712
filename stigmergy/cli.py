"""The ``stigmergy`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stigmergy import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stigmergy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"stigmergy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="watch agents share one rate-limited channel through the field")
    demo.add_argument("--agents", type=int, default=8, help="how many agents (default 8)")
    demo.add_argument("--seconds", type=float, default=30.0, help="simulated seconds (default 30)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from stigmergy.demo import run_demo

        return run_demo(agents=args.agents, seconds=args.seconds)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
