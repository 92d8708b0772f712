"""What the proxy has done: counters, wait and overhead percentiles, one log line per request.

Each finished request is one :class:`RequestRecord`; :meth:`ProxyMetrics.record`
counts it and logs it as one JSON line on ``stigmergy.proxy`` (INFO). Nothing
secret is in a record: the channel names a key by its hash, and the path's query
has the values of secret-looking parameters (Gemini's ``?key=``) replaced.
:meth:`ProxyMetrics.snapshot` adds the gate's live state per channel for
``/_stigmergy/metrics``; :func:`prometheus` renders that as Prometheus text.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from stigmergy.gate import Gate

logger = logging.getLogger("stigmergy.proxy")

SECRET_PARAMETER = re.compile(r"key|token|secret|password|passwd|signature|sig|auth|credential", re.I)
REDACTED = "REDACTED"
#: Recent samples kept for the percentiles: enough for a stable p99, bounded memory.
SAMPLES = 10_000


def redact_query(query: str) -> str:
    """``query`` with the values of secret-looking parameters replaced (it is logged)."""
    if not query:
        return ""
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, REDACTED if SECRET_PARAMETER.search(k) else v) for k, v in pairs])


@dataclass(slots=True)
class RequestRecord:
    """One request as the log and the metrics see it (times in milliseconds)."""

    agent: str
    channel: str
    method: str
    path: str
    status: int
    outcome: str  # ok, upstream_error, refused, disconnected, broken_stream
    attempts: int
    wait_ms: float
    overhead_ms: float | None
    duration_ms: float
    input_tokens: int
    output_tokens: int


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class ProxyMetrics:
    """Counters since start, and the recent waits and overheads for p50/p99."""

    def __init__(self) -> None:
        self.by_status: Counter[int] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.retries = 0
        self.in_flight = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self._waits: deque[float] = deque(maxlen=SAMPLES)
        self._overheads: deque[float] = deque(maxlen=SAMPLES)

    def record(self, record: RequestRecord) -> None:
        """Count a finished request and log its line."""
        self.count(
            record.status,
            record.outcome,
            record.wait_ms,
            record.overhead_ms,
            record.input_tokens,
            record.output_tokens,
        )
        if logger.isEnabledFor(logging.INFO):
            self.log(record)

    def count(
        self,
        status: int,
        outcome: str,
        wait_ms: float,
        overhead_ms: float | None,
        input_tokens: int,
        output_tokens: int,
    ) -> None:
        """Count a finished request (what :meth:`record` counts, without a record to build)."""
        self.by_status[status] += 1
        self.by_outcome[outcome] += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self._waits.append(wait_ms / 1000)
        if overhead_ms is not None:
            self._overheads.append(overhead_ms / 1000)

    @staticmethod
    def log(record: RequestRecord) -> None:
        """The request's JSON line on ``stigmergy.proxy`` (INFO)."""
        logger.info(json.dumps({"event": "request", **asdict(record)}, separators=(",", ":")))

    async def snapshot(self, gate: Gate, upstream: str, provider: str) -> dict[str, Any]:
        """Everything ``/_stigmergy/metrics`` shows: counters, percentiles, channels, budgets."""
        channels = []
        for route, state in gate.channels().items():
            reading = await gate.read(route)
            channels.append(
                {
                    "channel": route.region,
                    "waiting": state["waiting"],
                    "in_flight": state["in_flight"],
                    "limits": state["limits"],
                    "fill": dict(reading.fill),
                    "hold_seconds": reading.hold,
                    "soft_pressure": reading.soft,
                }
            )
        return {
            "upstream": upstream,
            "provider": provider,
            "in_flight": self.in_flight,
            "waiting": sum(c["waiting"] for c in channels),
            "requests": sum(self.by_status.values()),
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_outcome": dict(sorted(self.by_outcome.items())),
            "retries": self.retries,
            "tokens": {"input": self.input_tokens, "output": self.output_tokens},
            "wait_seconds": _quantiles(self._waits),
            "overhead_seconds": _quantiles(self._overheads),
            "channels": channels,
            "budgets": gate.budgets.snapshot() if gate.budgets is not None else {},
        }


def _quantiles(samples: Iterable[float]) -> dict[str, float | None]:
    ordered = sorted(samples)
    return {"p50": _percentile(ordered, 0.5), "p99": _percentile(ordered, 0.99), "samples": len(ordered)}


# -- Prometheus text format -----------------------------------------------------------------------


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(lines: list[str], name: str, kind: str, help_text: str, rows: Iterable[tuple[str, Any]]) -> None:
    """One metric family; ``rows`` are (label text, value), value None skipped."""
    lines += [f"# HELP stigmergy_{name} {help_text}", f"# TYPE stigmergy_{name} {kind}"]
    for labels, value in rows:
        if value is not None:
            series = f"stigmergy_{name}{{{labels}}}" if labels else f"stigmergy_{name}"
            lines.append(f"{series} {value if isinstance(value, int) else float(value)!r}")


def prometheus(snapshot: dict[str, Any]) -> str:
    """A metrics snapshot in Prometheus text exposition format 0.0.4."""
    lines: list[str] = []
    by_status = [(f'status="{s}"', n) for s, n in snapshot["by_status"].items()]
    _metric(lines, "requests_total", "counter", "Requests answered, by status.", by_status)
    by_outcome = [(f'outcome="{_label(o)}"', n) for o, n in snapshot["by_outcome"].items()]
    _metric(lines, "outcomes_total", "counter", "Requests answered, by outcome.", by_outcome)
    _metric(lines, "retries_total", "counter", "Transparent retries.", [("", snapshot["retries"])])
    _metric(lines, "in_flight", "gauge", "Requests being handled.", [("", snapshot["in_flight"])])
    tokens = [(f'kind="{k}"', n) for k, n in snapshot["tokens"].items()]
    _metric(lines, "tokens_total", "counter", "Tokens the upstream reported.", tokens)
    for name, what in (("wait_seconds", "Time waited in the gate"), ("overhead_seconds", "Proxy overhead")):
        quantiles = [('quantile="0.5"', snapshot[name]["p50"]), ('quantile="0.99"', snapshot[name]["p99"])]
        _metric(lines, name, "summary", f"{what} (recent requests).", quantiles)
    channels = snapshot["channels"]
    for key, kind, text in (
        ("waiting", "gauge", "Requests waiting in the gate."),
        ("in_flight", "gauge", "Requests admitted and not finished."),
        ("hold_seconds", "gauge", "Seconds until every hold on the channel lifts."),
        ("soft_pressure", "gauge", "Latency, success and error pressure."),
    ):
        rows = [(f'channel="{_label(c["channel"])}"', c[key]) for c in channels]
        _metric(lines, f"channel_{key}", kind, text, rows)
    fills = [
        (f'channel="{_label(c["channel"])}",dimension="{d}"', f)
        for c in channels
        for d, f in c["fill"].items()
    ]
    _metric(lines, "channel_fill", "gauge", "How full each rate-limit window is (0-1).", fills)
    budgets = [
        (f'budget="{_label(b)}",kind="{k}"', v)
        for b, row in snapshot["budgets"].items()
        for k, v in row.items()
    ]
    _metric(lines, "budget_tokens", "gauge", "Token budgets: limit, spent, reserved.", budgets)
    return "\n".join(lines) + "\n"
