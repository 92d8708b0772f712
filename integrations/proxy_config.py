"""The proxy's settings: one dataclass, filled from flags, then ``STIGMERGY_*`` variables, then defaults.

Every setting has a flag (``--max-in-flight``) and an environment variable
(``STIGMERGY_MAX_IN_FLIGHT``); a flag wins over the variable. Values are checked
here, once, so a bad one stops ``stigmergy proxy`` with a message naming the flag
or variable (exit code 2) instead of failing on the first request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from stigmergy.errors import ConfigurationError
from stigmergy.ratelimits import PROVIDERS, Provider, detect_provider

LOG_LEVELS = ("debug", "info", "warning", "error")
LIMIT_NAMES = ("rpm", "rpd", "tpm", "itpm", "otpm")


@dataclass(frozen=True)
class ProxyConfig:
    """What ``stigmergy proxy`` does; see ``stigmergy proxy --help`` for each setting."""

    upstream: str
    provider: str | None = None  # None: detected from the upstream URL
    host: str = "127.0.0.1"
    port: int = 8765
    max_in_flight: int | None = None
    wake_threshold: float = 0.5
    max_retries: int = 8
    max_backoff: float = 60.0
    max_wait: float | None = None
    latency_target: float = 10.0
    agent_budget: float | None = None
    total_budget: float | None = None
    rpm: float | None = None
    rpd: float | None = None
    tpm: float | None = None
    itpm: float | None = None
    otpm: float | None = None
    redis: str | None = None
    access_token: str | None = field(default=None, repr=False)
    log_level: str = "info"
    insecure: bool = False
    max_body_bytes: int = 32 << 20
    upstream_timeout: float = 600.0
    default_max_tokens: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "upstream", _upstream(self.upstream))
        if self.provider is not None and self.provider not in PROVIDERS:
            raise ConfigurationError(f"provider {self.provider!r}: use one of {', '.join(PROVIDERS)}")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port must be in 0-65535, got {self.port}")
        _at_least("max_in_flight", self.max_in_flight, 1)
        _at_least("max_retries", self.max_retries, 0)
        _at_least("max_body_bytes", self.max_body_bytes, 1)
        _at_least("default_max_tokens", self.default_max_tokens, 1)
        for name in ("max_backoff", "latency_target", "upstream_timeout", "wake_threshold", "max_wait"):
            _positive(name, getattr(self, name))
        for name in ("agent_budget", "total_budget", *LIMIT_NAMES):
            _positive(name, getattr(self, name))
        if self.log_level not in LOG_LEVELS:
            raise ConfigurationError(f"log_level {self.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
        if self.redis is not None and urlsplit(self.redis).scheme not in ("redis", "rediss", "unix"):
            raise ConfigurationError("redis must be a redis://, rediss:// or unix:// URL")
        if self.access_token is not None and len(self.access_token) < 16:
            raise ConfigurationError("access_token must be at least 16 characters (it guards the API key)")

    @property
    def provider_name(self) -> Provider:
        """The provider set, or the one the upstream URL names."""
        return self.provider or detect_provider(self.upstream)  # type: ignore[return-value]

    @property
    def limits(self) -> dict[str, float]:
        """The limits to assume until the upstream's headers say otherwise."""
        return {name: value for name in LIMIT_NAMES if (value := getattr(self, name)) is not None}


def _upstream(url: str) -> str:
    """The upstream base URL without a trailing slash; only http(s), no credentials, query or fragment."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"upstream {url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"upstream {url!r}: give an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ConfigurationError(
            "upstream: no credentials, query or fragment in the URL; clients send their own keys"
        )
    if port == 0:
        raise ConfigurationError(f"upstream {url!r}: port 0 cannot be connected to")
    return url.rstrip("/")


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigurationError(f"{name} must be at least {low}, got {value}")


def _positive(name: str, value: float | None) -> None:
    if value is not None and not 0 < value < math.inf:
        raise ConfigurationError(f"{name} must be a positive number, got {value}")


# -- flags and environment variables ------------------------------------------------------------


def parse_switch(value: str) -> bool:
    """An on/off variable: 1/true/yes/on or 0/false/no/off."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


@dataclass(frozen=True, slots=True)
class Option:
    """One setting as the command line and the environment spell it."""

    name: str
    parse: Callable[[str], Any]
    help: str

    @property
    def switch(self) -> bool:
        """A flag without a value (``--insecure``)."""
        return self.parse is parse_switch

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "STIGMERGY_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("upstream", str, "the provider's base URL, e.g. https://api.anthropic.com (required)"),
    Option("provider", str, f"override detection from the URL: {', '.join(PROVIDERS)}"),
    Option("host", str, "address to listen on (default 127.0.0.1: this machine only)"),
    Option("port", int, "port to listen on, 0 for any free one (default 8765)"),
    Option("max_in_flight", int, "hard cap on requests in flight per channel (default none)"),
    Option("wake_threshold", float, "pressure at which a waiting request goes (default 0.5)"),
    Option("max_retries", int, "transparent retries before the first byte reaches the client (default 8)"),
    Option("max_backoff", float, "longest upstream back-off waited out in place, seconds (default 60)"),
    Option("max_wait", float, "longest wait in the gate before a 429, seconds (default: no limit)"),
    Option("latency_target", float, "time to first token above which admissions slow, s (default 10)"),
    Option("agent_budget", float, "tokens each agent may spend (default unlimited)"),
    Option("total_budget", float, "tokens all agents together may spend (default unlimited)"),
    Option("rpm", float, "requests per minute, when the upstream sends no rate-limit headers"),
    Option("rpd", float, "requests per day, when the upstream sends no rate-limit headers"),
    Option("tpm", float, "tokens per minute, when the upstream sends no rate-limit headers"),
    Option("itpm", float, "input tokens per minute, when the upstream sends no rate-limit headers"),
    Option("otpm", float, "output tokens per minute, when the upstream sends no rate-limit headers"),
    Option("redis", str, "share the field with other proxies: redis://host:port/db?key_prefix=name"),
    Option("access_token", str, "require x-stigmergy-token on every request (prefer the variable)"),
    Option("log_level", str, f"{', '.join(LOG_LEVELS)} (default info: one line per request)"),
    Option("insecure", parse_switch, "skip TLS verification of the upstream (self-signed certificates only)"),
    Option("max_body_bytes", int, "largest request body accepted (default 32 MiB)"),
    Option("upstream_timeout", float, "seconds to wait for the upstream's next byte (default 600)"),
    Option("default_max_tokens", int, "output estimate for requests without max_tokens (default 1024)"),
)


def config_from(flags: Mapping[str, str | bool | None], environ: Mapping[str, str]) -> ProxyConfig:
    """Flags (by setting name; None: not given) over ``STIGMERGY_*`` variables over the defaults."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        given = flags.get(option.name)
        if given is not None and given is not False:
            source, raw = option.flag, given
        elif option.env in environ:
            source, raw = option.env, environ[option.env]
        else:
            continue
        try:
            values[option.name] = raw if isinstance(raw, bool) else option.parse(raw)
        except ValueError as exc:
            raise ConfigurationError(f"{source}: {exc}") from None
    if "upstream" not in values:
        raise ConfigurationError(
            "--upstream (or STIGMERGY_UPSTREAM) is required, e.g. https://api.openai.com"
        )
    try:
        return ProxyConfig(**values)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc} (see stigmergy proxy --help)") from None
