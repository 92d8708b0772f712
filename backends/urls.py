"""Pick a backend by URL, so deployments switch backends in configuration, not code."""

from __future__ import annotations

from urllib.parse import urlsplit

from stigmergy.backends.memory import InMemoryFieldBackend
from stigmergy.backends.protocol import FieldBackend
from stigmergy.errors import ConfigurationError


def backend_from_url(url: str) -> FieldBackend:
    """``memory://`` gives the embedded backend; other schemes arrive with their backends."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return InMemoryFieldBackend()
    raise ConfigurationError(
        f"no backend for {scheme or url!r} URLs; use memory:// (redis:// arrives with the Redis backend)"
    )
