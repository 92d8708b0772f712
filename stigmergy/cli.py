"""The ``stigmergy`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from stigmergy import __version__

#: ``stigmergy mock-api`` flags: (MockConfig field, type, help); unset flags keep MockConfig's defaults.
MOCK_API_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("rpm", int, "requests per minute (default unlimited)"),
    ("rpd", int, "requests per day (default unlimited)"),
    ("tpm", int, "input + output tokens per minute, OpenAI-style (default unlimited)"),
    ("itpm", int, "input tokens per minute, Anthropic-style (default unlimited)"),
    ("otpm", int, "output tokens per minute, Anthropic-style (default unlimited)"),
    ("output_tokens", int, "tokens per reply, capped by the request's max_tokens (default 16)"),
    ("p502", float, "probability of a 502 bad gateway (default 0)"),
    ("p529", float, "probability of overloaded: 529 Anthropic, 503 OpenAI (default 0)"),
    ("p_reset", float, "probability of a TCP connection reset (default 0)"),
    ("ttft", float, "median seconds to the first token (default 0)"),
    ("ttft_sigma", float, "lognormal spread of the time to first token (default 0: fixed)"),
    ("token_delay", float, "seconds per generated token (default 0)"),
    ("p_spike", float, "probability that a call is slow (default 0)"),
    ("spike_multiplier", float, "how much slower a slow call is (default 10)"),
    ("max_concurrency", int, "calls served at once; more are answered overloaded (default unlimited)"),
    ("seed", int, "seed of the fault and latency draws (default 0)"),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stigmergy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"stigmergy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="agents on one rate-limited mock API, without and with the field")
    demo.add_argument("--agents", type=int, default=20, help="how many agents (default 20)")
    demo.add_argument("--calls", type=int, default=3, help="calls per agent (default 3)")
    demo.add_argument("--rpm", type=int, default=20, help="the mock API's requests per minute (default 20)")
    demo.add_argument("--speed", type=float, default=8.0, help="how much faster time runs (default 8)")
    demo.add_argument("--seed", type=int, default=7, help="seed of the injected faults (default 7)")
    demo.add_argument("--plot", metavar="FILE.png", help="draw both runs over time (needs matplotlib)")
    mock = commands.add_parser(
        "mock-api", help="serve a mock OpenAI/Anthropic API with rate limits and faults"
    )
    mock.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    mock.add_argument("--port", type=int, default=8900, help="port to listen on, 0 for any (default 8900)")
    for name, kind, text in MOCK_API_FLAGS:
        metavar = "N" if kind is int else "X"
        mock.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, metavar=metavar, help=text)
    _add_proxy_commands(commands)
    args = parser.parse_args(argv)
    if args.command in ("proxy", "setup"):
        return _run_proxy_command(args)
    if args.command == "demo":
        from stigmergy.demo import DemoSettings, run_demo
        from stigmergy.errors import ConfigurationError

        try:
            demo_settings = DemoSettings(args.agents, args.calls, args.rpm, args.speed, seed=args.seed)
        except ConfigurationError as exc:
            print(f"stigmergy demo: {exc}", file=sys.stderr)
            return 2
        return run_demo(demo_settings, args.plot)
    if args.command == "mock-api":
        from stigmergy.mock_api import run_mock_api

        settings = {
            name: getattr(args, name) for name, _, _ in MOCK_API_FLAGS if getattr(args, name) is not None
        }
        return run_mock_api(settings, host=args.host, port=args.port)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _add_proxy_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``stigmergy proxy`` (every setting also a STIGMERGY_* variable) and ``stigmergy setup <tool>``."""
    from stigmergy.integrations.proxy_config import OPTIONS
    from stigmergy.integrations.proxy_setup import DEFAULT_URL, TOOLS

    proxy = commands.add_parser(
        "proxy",
        help="serve a transparent LLM API proxy that paces every request through the field",
        description="Flags override the STIGMERGY_* variable named after each flag "
        "(--max-in-flight: STIGMERGY_MAX_IN_FLIGHT); config errors exit with code 2.",
    )
    for option in OPTIONS:
        if option.switch:
            proxy.add_argument(option.flag, dest=option.name, action="store_true", help=option.help)
        else:
            proxy.add_argument(option.flag, dest=option.name, metavar="VALUE", help=option.help)
    setup = commands.add_parser("setup", help="print the settings that point a tool at the proxy")
    setup.add_argument("tool", choices=sorted(TOOLS), help="the tool to configure")
    setup.add_argument("--url", default=DEFAULT_URL, help=f"the proxy's address (default {DEFAULT_URL})")
    setup.add_argument("--agent", help="the agent name its requests carry (default: the tool's name)")
    setup.add_argument("--token", action="store_true", help="the proxy requires an access token")


def _run_proxy_command(args: argparse.Namespace) -> int:
    from stigmergy.errors import ConfigurationError
    from stigmergy.integrations.proxy_config import OPTIONS, config_from
    from stigmergy.integrations.proxy_setup import setup_text

    if args.command == "setup":
        print(setup_text(args.tool, url=args.url, agent=args.agent, token=args.token), end="")
        return 0
    try:
        config = config_from({o.name: getattr(args, o.name) for o in OPTIONS}, os.environ)
        from stigmergy.integrations.proxy_server import run_proxy
    except ConfigurationError as exc:
        print(f"stigmergy proxy: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"stigmergy proxy: pip install 'stigmergy-field[proxy]' ({exc})", file=sys.stderr)
        return 2
    return run_proxy(config)


if __name__ == "__main__":
    sys.exit(main())
