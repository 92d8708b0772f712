"""Pick a backend by URL, so deployments switch backends in configuration, not code."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from stigmergy.backends.memory import InMemoryFieldBackend
from stigmergy.backends.protocol import FieldBackend
from stigmergy.errors import ConfigurationError

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster")


def backend_from_url(url: str, **options: Any) -> FieldBackend:
    """``memory://`` (embedded) or ``redis://host:port/db?key_prefix=name`` (also ``rediss://``,
    ``unix://``, ``redis+cluster://``); ``options`` go to the backend's constructor."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return InMemoryFieldBackend(**options)
    if scheme in REDIS_SCHEMES:
        from stigmergy.backends.redis_backend import RedisFieldBackend

        return RedisFieldBackend.from_url(url, **options)
    raise ConfigurationError(
        f"no backend for {url!r}: use memory:// or redis://host:port/db?key_prefix=name "
        f"(schemes: memory, {', '.join(REDIS_SCHEMES)})"
    )
