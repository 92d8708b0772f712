"""The Redis backend: one field shared by many processes on many machines.

Every mutation and every pressure read is one Lua script (``redis_field.lua``), so
it is atomic without locks and costs one round trip. Time is the Redis server's
``TIME`` inside the script: processes with skewed clocks agree. Sums of exponential
and step signals are decayed accumulators in one hash, with a net sum per agent, so
one agent's reading is two fields and every agent's one field each, whatever the
field's size; every signal is indexed by expiry (a deposit's signals of one type as
one entry) and retired, from storage and from the sums, when it evaporates. A batch
is prepared here (records, sums per field) so that the script does little per signal. All keys of a
field share one hash tag, ``stigmergy:{<key_prefix>}:...``, and every script declares
them, so a field works on Redis Cluster. Keys expire after ``idle_ttl`` seconds
without writes, so an abandoned field frees itself.

Needs the ``redis`` extra: ``pip install 'stigmergy-field[redis]'``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from stigmergy.backends.protocol import DepositBatch, PressureQuery, SignalFilter, StoredSignal
from stigmergy.clock import Clock
from stigmergy.decay import (
    DecayPolicy,
    DecayStrategy,
    ExponentialDecay,
    LinearDecay,
    StepDecay,
    StochasticDecay,
)
from stigmergy.errors import BackendError, BackendUnavailableError, ConfigurationError
from stigmergy.signal import Signal

try:
    from redis import exceptions as redis_errors
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the Redis backend needs the redis package: pip install 'stigmergy-field[redis]'"
    ) from exc

# In the order of KEYS in redis_field.lua, which says what each holds.
_KEY_NAMES = [
    "sig",
    "exp",
    "acc",
    "count",
    "gen",
    "seq",
    "evap",
    "types",
    "agents",
    "index",
    "order",
    "vec",
    "vecs",
]
_BATCHED = 16  # a deposit's signals of one type are indexed for expiry as one batch from this many
_BATCH_MAX = 1024  # and at most this many per batch: retiring some rewrites the rest of its entry
_SEP = "\x1f"  # between the parts of a record or sum field: names are printable, JSON escapes it
_RS = "\x1e"  # between the records of a deposit
_LAYOUT = 3  # of records and sums in redis_field.lua: a field written with another is refused
_UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


def _load_scripts() -> dict[str, str]:
    source = resources.files("stigmergy.backends").joinpath("redis_field.lua").read_text()
    prelude, *bodies = source.split("\n--@@ ")
    scripts = {}
    for body in bodies:
        name, _, code = body.partition("\n")
        scripts[name.strip()] = f"{prelude}\n{code}"
    return scripts


_SCRIPTS = _load_scripts()


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _spec(strategy: DecayStrategy) -> tuple[str, float]:
    """How the Lua scripts decay a type: (kind, parameter)."""
    if isinstance(strategy, ExponentialDecay):
        return "e", math.log(2.0) / strategy.half_life_seconds
    if isinstance(strategy, StepDecay):
        return "s", strategy.ttl_seconds
    if isinstance(strategy, LinearDecay):
        return "l", strategy.rate_per_second
    if isinstance(strategy, StochasticDecay):
        return "x", math.log(2.0) / strategy.half_life_seconds
    raise ConfigurationError(
        f"the Redis backend computes decay inside Redis and supports ExponentialDecay, StepDecay, "
        f"LinearDecay and StochasticDecay; {strategy!r} can only run on the in-memory backend"
    )


def _describe(policy: DecayPolicy) -> str:
    """A canonical text of the policy and storage layout: every process sharing a field must
    present the same one."""

    def one(strategy: DecayStrategy) -> list[Any]:
        kind, param = _spec(strategy)
        noise = strategy.noise_factor if isinstance(strategy, StochasticDecay) else 0.0
        return [kind, param, noise]

    return json.dumps(
        {
            "layout": _LAYOUT,
            "threshold": policy.evaporation_threshold,
            "default": one(policy.default),
            "by_type": {name: one(s) for name, s in sorted(policy.by_type.items())},
        },
        sort_keys=True,
    )


class _BatchSums:
    """A batch's changes to the sum fields of redis_field.lua (0: every signal, 1: untargeted ones,
    n: an agent's net), gathered per field so that the script reads and writes each field once."""

    def __init__(self) -> None:
        # (type, region) -> [sum 0, its count, sum 1, its count]; (type, region, agent) -> [net, count]
        self._public: dict[tuple[str, str | None], list[float]] = {}
        self._nets: dict[tuple[str, str | None, str], list[float]] = {}

    def add(
        self, signal_type: str, agent: str, target: str | None, region: str | None, intensity: float
    ) -> None:
        public = self._public.get((signal_type, region))
        if public is None:
            public = self._public[signal_type, region] = [0.0, 0, 0.0, 0]
        public[0] += intensity
        public[1] += 1
        if target is None:
            public[2] += intensity
            public[3] += 1
            key, amount = (signal_type, region, agent), -intensity
        elif target != agent:
            key, amount = (signal_type, region, target), intensity
        else:
            return
        net = self._nets.get(key)
        if net is None:
            self._nets[key] = [amount, 1]
        else:
            net[0] += amount
            net[1] += 1

    def groups(self, rates: dict[str, float]) -> list[list[Any]]:
        """Per type: [type, rate, field, amount, count, ...], as the deposit script reads them; a
        signal with a region counts in region '' too."""
        fields: dict[str, dict[str, list[float]]] = {name: {} for name in rates}

        def merge(name: str, field: str, amount: float, count: float) -> None:
            entry = fields[name].get(field)
            if entry is None:
                fields[name][field] = [amount, count]
            else:
                entry[0] += amount
                entry[1] += count

        for (name, region), (sum0, count0, sum1, count1) in self._public.items():
            for place in ("", region) if region else ("",):
                merge(name, f"0{_SEP}{name}{_SEP}{place}", sum0, count0)
                if count1:
                    merge(name, f"1{_SEP}{name}{_SEP}{place}", sum1, count1)
        for (name, region, agent), (amount, count) in self._nets.items():
            for place in ("", region) if region else ("",):
                merge(name, f"n{_SEP}{name}{_SEP}{place}{_SEP}{agent}", amount, count)
        out = []
        for name, rate in rates.items():
            group: list[Any] = [name, rate]
            for field, (amount, count) in fields[name].items():
                group += (field, amount, count)
            out.append(group)
        return out


class RedisFieldBackend:
    """A field stored in Redis, shared by every process that uses the same ``key_prefix``.

    ``client`` is a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``.
    ``clock`` replaces the server's clock (tests only: it must be shared by every
    process using the field).
    """

    def __init__(
        self,
        client: Any,
        key_prefix: str = "stigmergy",
        *,
        clock: Clock | None = None,
        idle_ttl: float = 7 * 24 * 3600.0,
        description: str = "Redis",
        owns_client: bool = False,
    ) -> None:
        if not key_prefix or any(c in key_prefix for c in "{}"):
            raise ConfigurationError(f"key_prefix must be non-empty and free of braces, got {key_prefix!r}")
        if not idle_ttl >= 1:
            raise ConfigurationError(f"idle_ttl must be at least 1 second, got {idle_ttl!r}")
        self._client = client
        self._owns_client = owns_client
        self._clock = clock
        self._idle_ttl = str(int(idle_ttl))
        self._description = description
        base = f"stigmergy:{{{key_prefix}}}"
        self._keys = [f"{base}:{name}" for name in _KEY_NAMES]
        self._config_key = f"{base}:config"
        self._shas = {name: hashlib.sha1(code.encode()).hexdigest() for name, code in _SCRIPTS.items()}
        self._policy: DecayPolicy | None = None
        self._specs: dict[str, tuple[str, float]] = {}
        self._threshold = ""
        self._salt = os.urandom  # per-signal randomness for stochastic decay
        encoder = getattr(client, "get_encoder", None)  # a decoding client can't take binary replies
        self._binary = encoder is None or not encoder().decode_responses

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisFieldBackend:
        """``redis://[:password@]host:port/db?key_prefix=name`` (``rediss://`` for TLS,
        ``redis+cluster://host:port`` for a cluster)."""
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        key_prefix = query.pop("key_prefix", kwargs.pop("key_prefix", "stigmergy"))
        cluster = parts.scheme == "redis+cluster"
        rest = urlunsplit(parts._replace(scheme="redis" if cluster else parts.scheme, query=urlencode(query)))
        if cluster:
            from redis.asyncio.cluster import RedisCluster

            client: Any = RedisCluster.from_url(rest, socket_connect_timeout=5.0, socket_timeout=10.0)
        else:
            from redis.asyncio import Redis

            client = Redis.from_url(rest, socket_connect_timeout=5.0, socket_timeout=10.0)
        return cls(client, key_prefix, description=f"Redis at {redact(url)}", owns_client=True, **kwargs)

    # -- protocol: lifecycle --------------------------------------------------------

    async def bind(self, policy: DecayPolicy) -> None:
        if self._policy is not None and self._policy is not policy:
            raise ConfigurationError(
                "this backend already serves another PheromoneField; give each field its own backend"
            )
        described = _describe(policy)
        try:
            await self._client.hsetnx(self._config_key, "policy", described)
            stored = _text(await self._client.hget(self._config_key, "policy"))
        except _UNREACHABLE as exc:
            raise self._unavailable(exc) from exc
        if stored != described:
            raise ConfigurationError(
                f"this field ({self._keys[0].rsplit(':', 1)[0]}) is shared with a policy different from "
                f"this process's: stored {stored}, here {described}. Use the same decay settings in every "
                "process (and the same stigmergy version: the layout is part of it), or another key_prefix"
            )
        self._policy = policy
        self._threshold = repr(policy.evaporation_threshold)

    async def now(self) -> float:
        return float(_text(await self._run("now")))

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # -- protocol: writes -----------------------------------------------------------

    async def deposit(
        self,
        agent_id: str,
        signal_type: str,
        intensity: float,
        metadata: dict[str, Any],
        target_agent_id: str | None,
        region: str | None,
    ) -> Signal:
        arguments = self._deposits(
            [agent_id], [signal_type], [float(intensity)], [target_agent_id], [region], [metadata]
        )
        reply = await self._run("deposit", *arguments, "[]")
        now = float(_text(reply[0]))
        return Signal(
            id=_text(reply[1]),
            agent_id=agent_id,
            signal_type=signal_type,
            intensity=intensity,
            metadata=metadata,
            created_at=datetime.fromtimestamp(now, tz=UTC),
            target_agent_id=target_agent_id,
            region=region,
            deposited_at=now,
        )

    async def deposit_many(self, batch: DepositBatch) -> int:
        if len(batch) == 0:
            return 0
        metadata: Sequence[dict[str, Any] | None] = [None] * len(batch)
        if batch.metadata is not None:
            metadata = batch.metadata
        arguments = self._deposits(
            batch.agent_ids,
            batch.signal_types,
            batch.intensities.tolist(),
            batch.target_agent_ids,
            batch.regions,
            metadata,
        )
        floors = json.dumps([[f.signal_type, f.region or "", f.at_least] for f in batch.floors])
        reply = await self._run("deposit", *arguments, floors)
        return int(_text(reply[2]))

    async def rescale(
        self,
        factor: float,
        *,
        signal_id: str | None = None,
        region: str | None = None,
        signal_type: str | None = None,
    ) -> list[StoredSignal]:
        reply = await self._run("rescale", repr(factor), signal_id or "", region or "", signal_type or "")
        return self._stored(reply)

    async def remove(self, *, agent_id: str | None = None, region: str | None = None) -> int:
        return int(await self._run("remove", agent_id or "", region or ""))

    async def evaporate(self) -> int:
        return int(await self._run("evaporate"))

    # -- protocol: reads ------------------------------------------------------------

    async def pressure(self, agent_id: str | None, query: PressureQuery) -> float:
        args = [agent_id or "", "0" if agent_id is None else "1", query.region or "", *self._weights(query)]
        return float(_text(await self._run("pressure", *args)))

    async def pressures(self, agent_ids: Sequence[str] | None, query: PressureQuery) -> dict[str, float]:
        binary = "1" if self._binary else "0"
        reply = await self._run(
            "pressures", query.region or "", binary, *self._weights(query), *(agent_ids or ())
        )
        listed = _text(reply[0])
        names = list(agent_ids) if agent_ids else listed.split(_SEP)[:-1]  # each name ends with _SEP
        if not names:
            return {}
        totals = np.zeros(len(names))
        vectors = _text(reply[2]) == "b"
        for i in range(3, len(reply), 3):  # per type: factor, sum 1, every agent's net sum
            if vectors:  # doubles in slot order; agents past its end have no net sum yet
                nets = np.zeros(len(names))
                stored = np.frombuffer(reply[i + 2], dtype="<f8")
                nets[: len(stored)] = stored
            else:
                nets = np.array(_text(reply[i + 2]).split(_SEP), dtype=np.float64)
            totals += float(reply[i]) * (float(reply[i + 1]) + nets)
        generic = reply[1]  # signals evaluated one by one: for all, then per position
        if generic:
            totals += float(generic[0])
            for j in range(1, len(generic), 2):
                totals[int(generic[j]) - 1] += float(generic[j + 1])
        return dict(zip(names, totals.tolist(), strict=True))

    async def signals(self, selector: SignalFilter) -> list[StoredSignal]:
        return await self._select("", selector)

    async def get(self, signal_id: str) -> StoredSignal | None:
        found = await self._select(signal_id, SignalFilter())
        return found[0] if found else None

    async def count(self) -> int:
        return int(await self._command("hlen", self._keys[0]))

    async def agents(self) -> list[str]:
        return sorted(_text(a) for a in await self._command("hkeys", self._keys[8]))

    # -- introspection ----------------------------------------------------------------

    async def memory_bytes(self) -> int:
        """Bytes Redis reports for this field's keys (``MEMORY USAGE``)."""
        total = 0
        for key in self._keys:
            total += int(await self._command("memory_usage", key, samples=0) or 0)
        return total

    # -- internals -----------------------------------------------------------------------

    def _deposits(
        self,
        agents: Sequence[str],
        signal_types: Sequence[str],
        intensities: Sequence[float],
        targets: Sequence[str | None],
        regions: Sequence[str | None],
        metadata: Sequence[dict[str, Any] | None],
    ) -> tuple[str, str]:
        """The deposit script's arguments (described in redis_field.lua). Records, sums per field
        and the expiry index are prepared here, so that the script does little per signal: this
        process's time is its own, while the script's is taken from every client of the field."""
        specs = {name: self._spec_of(name) for name in dict.fromkeys(signal_types)}
        batched = {
            name
            for name, (kind, _) in specs.items()
            if kind != "x" and signal_types.count(name) >= _BATCHED  # x: rates differ, so no common order
        }
        decay = [[kind, param] for kind, param in specs.values()]
        heads = {  # per type: its decay's position, and what its records hold after the intensity
            name: (k, f"{_SEP}{kind}{_SEP}{param!r}{_SEP}{'' if name in batched else '1'}{_SEP}")
            for k, (name, (kind, param)) in enumerate(specs.items(), 1)
        }
        middles = [heads[name][1] for name in signal_types]
        alone: list[list[Any]] = [  # [position, decay, intensity]
            [k, heads[name][0], intensity]
            for k, (name, intensity) in enumerate(zip(signal_types, intensities, strict=True), 1)
            if name not in batched
        ]
        for name, (kind, _) in specs.items():
            if kind == "x":  # stochastic: each signal draws its own rate (and is indexed alone)
                drawn = [signal for signal in alone if signal_types[signal[0] - 1] == name]
                for signal, rate in zip(drawn, self._draw(name, len(drawn)), strict=True):
                    decay.append([kind, rate])
                    signal[1] = len(decay)
                    middles[signal[0] - 1] = f"{_SEP}{kind}{_SEP}{rate!r}{_SEP}1{_SEP}"
        records = _RS.join(
            [
                f"{intensity!r}{middle}{agent}{_SEP}{name}{_SEP}{target or ''}{_SEP}{region or ''}{_SEP}"
                f"{json.dumps(meta, allow_nan=False) if meta else ''}"
                for intensity, middle, agent, name, target, region, meta in zip(
                    intensities, middles, agents, signal_types, targets, regions, metadata, strict=True
                )
            ]
        )
        sums = _BatchSums()
        summed = {name for name, (kind, _) in specs.items() if kind in "es"}
        for agent, name, intensity, target, region in zip(
            agents, signal_types, intensities, targets, regions, strict=True
        ):
            if name in summed:
                sums.add(name, agent, target, region, intensity)
        rates = {name: param if kind == "e" else 0.0 for name, (kind, param) in specs.items()}
        names = list({*agents, *(target for target in targets if target is not None)})
        batches = []
        if batched:  # positions in order of expiry: of |I|, within one type
            magnitudes = np.abs(np.asarray(intensities, dtype=np.float64))
            for name in batched:
                members = np.array([k for k, other in enumerate(signal_types) if other == name])
                order = (members[np.argsort(magnitudes[members], kind="stable")] + 1).tolist()
                for start in range(0, len(order), _BATCH_MAX):
                    part = order[start : start + _BATCH_MAX]
                    batches.append([heads[name][0], intensities[part[0] - 1], ",".join(map(str, part)) + ","])
        generic = [k for k, name in enumerate(signal_types, 1) if specs[name][0] in "lx"]
        argument = [len(intensities), decay, names, sums.groups(rates), alone, batches, generic]
        return json.dumps(argument), records

    def _draw(self, signal_type: str, count: int) -> list[float]:
        """Decay rates for ``count`` new stochastic signals: each draws its own half-life once."""
        strategy = self._bound().strategy(signal_type)
        assert isinstance(strategy, StochasticDecay)
        salts = np.frombuffer(self._salt(8 * count), dtype=np.uint64)
        return [math.log(2.0) / half_life for half_life in strategy.half_lives(salts).tolist()]

    def _bound(self) -> DecayPolicy:
        """The field's policy: scripts and records need it, so nothing runs before ``bind``."""
        if self._policy is None:
            raise BackendError("the backend is not bound to a field; use it through PheromoneField")
        return self._policy

    def _spec_of(self, signal_type: str) -> tuple[str, float]:
        spec = self._specs.get(signal_type)
        if spec is None:
            spec = self._specs[signal_type] = _spec(self._bound().strategy(signal_type))
        return spec

    @staticmethod
    def _weights(query: PressureQuery) -> list[str]:
        if query.signal_types is None:
            pairs = [(name, w) for name, w in query.weights.items()]
            mode = "*"
        else:
            pairs = [(name, query.weights.get(name, 1.0)) for name in dict.fromkeys(query.signal_types)]
            mode = "list"
        flat = [item for name, w in pairs for item in (name, repr(float(w)))]
        return [mode, str(len(pairs)), *flat]

    async def _select(self, signal_id: str, selector: SignalFilter) -> list[StoredSignal]:
        if selector.signal_types is not None and not selector.signal_types:
            return []
        reply = await self._run(
            "select",
            signal_id,
            selector.visible_to or "",
            selector.agent_id or "",
            selector.exclude_agent_id or "",
            selector.region or "",
            _SEP.join(selector.signal_types) if selector.signal_types is not None else "",
        )
        return self._stored(reply)

    @staticmethod
    def _stored(reply: list[Any]) -> list[StoredSignal]:
        out = []
        for i in range(0, len(reply) - 1, 4):  # id, record, value, evaporation time
            fields = _text(reply[i + 1]).split(_SEP)
            intensity, _kind, _param, _own, agent, signal_type, target, region, meta, t0 = fields
            deposited = float(t0)
            signal = Signal(
                id=_text(reply[i]),
                agent_id=agent,
                signal_type=signal_type,
                intensity=float(intensity),
                metadata=json.loads(meta) if meta else {},
                created_at=datetime.fromtimestamp(deposited, tz=UTC),
                target_agent_id=target or None,
                region=region or None,
                deposited_at=deposited,
            )
            out.append(StoredSignal(signal, float(_text(reply[i + 2])), float(_text(reply[i + 3]))))
        return out

    async def _run(self, name: str, *args: str) -> Any:
        if name != "now":
            self._bound()
        now = "" if self._clock is None else repr(float(self._clock()))
        argv = [now, self._threshold or "0.01", self._idle_ttl, *args]
        try:
            try:
                return await self._client.evalsha(self._shas[name], len(self._keys), *self._keys, *argv)
            except redis_errors.NoScriptError:  # first use, SCRIPT FLUSH or a restart: send the source
                return await self._client.eval(_SCRIPTS[name], len(self._keys), *self._keys, *argv)
        except _UNREACHABLE as exc:
            raise self._unavailable(exc) from exc
        except redis_errors.ResponseError as exc:
            raise BackendError(f"{self._description} refused the {name} script: {exc}") from exc

    async def _command(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self._client, name)(*args, **kwargs)
        except _UNREACHABLE as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"cannot reach {self._description}: {exc}. Check that the server is running and reachable "
            "from here (host, port, firewall), and the password, database number and TLS settings"
        )
