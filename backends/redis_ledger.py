"""A task ledger in Redis: many scheduler processes, on many machines, share one task set.

Every operation is one Lua script over keys that share a hash tag (Redis Cluster
safe), and leases are measured on the server's clock, so workers whose clocks
disagree still agree on who holds a task. Outcomes go to a stream that every
worker follows with a blocking read: a dependency completed on one machine frees
its dependents on the others within a round trip.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stigmergy.errors import BackendUnavailableError, ConfigurationError, DuplicateTaskError
from stigmergy.ledger import Claim, LedgerEntry

KEY_SUFFIXES = ("specs", "state", "claims", "attempts", "log", "takeovers")

_PUBLISH = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  if old == ARGV[2] then return 0 end
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[5], '*', 'k', 'spec', 'id', ARGV[1], 'p', ARGV[2])
return 1
"""

# Claims are "expiry_ms|worker"; an unreleased claim whose lease ran out is a dead attempt.
_CLAIM = """
local id, worker, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local final = redis.call('HGET', KEYS[2], id)
if final then return {'final', final} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = redis.call('HGET', KEYS[3], id)
local previous = ''
if held then
  local bar = string.find(held, '|', 1, true)
  local expiry, owner = tonumber(string.sub(held, 1, bar - 1)), string.sub(held, bar + 1)
  if owner ~= worker then
    if expiry > now then return {'busy', tostring(expiry - now)} end
    previous = owner
    redis.call('HSET', KEYS[6], id, owner)
  end
end
redis.call('HSET', KEYS[3], id, tostring(now + lease) .. '|' .. worker)
local attempt = redis.call('HINCRBY', KEYS[4], id, 1)
return {'granted', tostring(attempt), previous}
"""

_OWNED = """
local held = redis.call('HGET', KEYS[3], ARGV[1])
if not held then return 0 end
local bar = string.find(held, '|', 1, true)
if string.sub(held, bar + 1) ~= ARGV[2] then return 0 end
"""

_RENEW = (
    _OWNED
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[3], ARGV[1], tostring(now + tonumber(ARGV[3])) .. '|' .. ARGV[2])
return 1
"""
)

_RELEASE = (
    _OWNED
    + """
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""
)

_FINISH = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. '\\n' .. ARGV[4])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[5], '*', 'k', ARGV[3], 'id', ARGV[1], 'p', ARGV[4])
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


class RedisTaskLedger:
    """Shared task state under ``stigmergy:{name}:*`` on a ``redis.asyncio`` (or cluster) client.

    Every scheduler given a ledger with the same ``name`` works on the same task
    set. ``block`` is how long (seconds) one read of the outcome stream waits.
    """

    def __init__(self, client: Any, name: str = "tasks", *, block: float = 1.0) -> None:
        if not name or any(c in name for c in "{}"):
            raise ConfigurationError(f"name must be non-empty and free of braces, got {name!r}")
        self._client = client
        self._keys = [f"stigmergy:{{{name}}}:{suffix}" for suffix in KEY_SUFFIXES]
        self._block_ms = max(1, int(block * 1000))
        self._scripts = {
            name: client.register_script(code)
            for name, code in (
                ("publish", _PUBLISH),
                ("claim", _CLAIM),
                ("renew", _RENEW),
                ("release", _RELEASE),
                ("finish", _FINISH),
            )
        }

    @classmethod
    def from_url(cls, url: str, name: str = "tasks", **options: Any) -> RedisTaskLedger:
        """``redis://host:port/db`` (also ``rediss://``, ``unix://``)."""
        from redis.asyncio import Redis

        return cls(Redis.from_url(url), name, **options)

    async def _run(self, script: str, *args: Any) -> Any:
        try:
            return await self._scripts[script](keys=self._keys, args=list(args))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BackendUnavailableError(
                f"the task ledger's Redis is unreachable ({exc}); check that the server is running "
                "and that every worker uses the same URL"
            ) from exc

    async def publish(self, task_id: str, spec: dict[str, Any]) -> bool:
        result = int(await self._run("publish", task_id, _dumps(spec)))
        if result < 0:
            raise DuplicateTaskError(
                f"task {task_id!r} is already in the shared task set with a different spec; "
                "every worker must add the same tasks under the same ids"
            )
        return result == 1

    async def claim(self, task_id: str, worker: str, lease: float) -> Claim:
        reply = [_text(v) for v in await self._run("claim", task_id, worker, max(1, int(lease * 1000)))]
        if reply[0] == "final":
            status, _, payload = reply[1].partition("\n")
            return Claim("final", status=status, payload=json.loads(payload))
        if reply[0] == "busy":
            return Claim("busy", retry_after=int(reply[1]) / 1000)
        return Claim("granted", attempt=int(reply[1]), taken_over_from=reply[2] or None)

    async def renew(self, task_id: str, worker: str, lease: float) -> bool:
        return bool(await self._run("renew", task_id, worker, max(1, int(lease * 1000))))

    async def release(self, task_id: str, worker: str) -> None:
        await self._run("release", task_id, worker)

    async def finish(self, task_id: str, worker: str, status: str, payload: Any) -> bool:
        return bool(await self._run("finish", task_id, worker, status, _dumps(payload)))

    async def watch(self) -> AsyncIterator[LedgerEntry]:
        last = "0"
        log = self._keys[4]
        while True:
            try:
                reply = await self._client.xread({log: last}, count=1000, block=self._block_ms)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                raise BackendUnavailableError(f"the task ledger's Redis is unreachable ({exc})") from exc
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    last = _text(entry_id)
                    data = {_text(k): _text(v) for k, v in fields.items()}
                    yield LedgerEntry(data["k"], data["id"], json.loads(data["p"]))  # type: ignore[arg-type]

    async def takeovers(self) -> dict[str, str]:
        found = await self._client.hgetall(self._keys[5])
        return {_text(k): _text(v) for k, v in found.items()}

    async def clear(self) -> None:
        """Delete the whole task set (every worker must have stopped)."""
        await self._client.delete(*self._keys)

    async def aclose(self) -> None:
        await self._client.aclose()
