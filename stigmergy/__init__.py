"""stigmergy: a stigmergic pressure-field scheduler for LLM agents.

Events deposit decaying signals into a shared field; an agent (or a waiting
request) acts when the pressure it feels crosses its threshold.

    from stigmergy import PheromoneField

    field = PheromoneField()
    await field.deposit("agent-1", "work_claim", 0.8, target_agent_id="agent-2")
    pressure = await field.read_pressure("agent-2")
"""

import importlib
from typing import Any

from stigmergy.backends import (
    FieldBackend,
    InMemoryFieldBackend,
    PressureFloor,
    backend_from_url,
)
from stigmergy.budgets import TokenBudgets
from stigmergy.clock import AcceleratedClock, Clock, ManualClock, monotonic_clock
from stigmergy.decay import (
    DecayPolicy,
    DecayStrategy,
    ExponentialDecay,
    LinearDecay,
    StepDecay,
    StochasticDecay,
)
from stigmergy.errors import (
    AdmissionError,
    AdmissionTimeoutError,
    BackendError,
    BackendUnavailableError,
    BudgetExceededError,
    ConfigurationError,
    DependencyCycleError,
    DuplicateTaskError,
    FieldCapacityError,
    InvalidSignalError,
    InvalidTaskError,
    QuotaExhaustedError,
    StigmergyError,
    TaskError,
    UnknownDependencyError,
)
from stigmergy.events import TaskEvent
from stigmergy.field import Contribution, Explanation, PheromoneField
from stigmergy.gate import Cost, Gate, Route, gate_field
from stigmergy.ratelimits import Quota, RateLimitInfo, detect_provider, parse_response
from stigmergy.scheduler import StigmergyScheduler
from stigmergy.signal import Signal
from stigmergy.tasks import (
    AgentDispatcher,
    DispatchResult,
    RunSummary,
    SchedulerMetrics,
    TaskOutcome,
    TaskSpec,
    TaskStatus,
)

__all__ = [
    "AcceleratedClock",
    "AdmissionError",
    "AdmissionTimeoutError",
    "AgentDispatcher",
    "BackendError",
    "BackendUnavailableError",
    "BudgetExceededError",
    "Clock",
    "ConfigurationError",
    "Contribution",
    "Cost",
    "DecayPolicy",
    "DecayStrategy",
    "DependencyCycleError",
    "DispatchResult",
    "DuplicateTaskError",
    "Explanation",
    "ExponentialDecay",
    "FieldBackend",
    "FieldCapacityError",
    "Gate",
    "InMemoryFieldBackend",
    "InvalidSignalError",
    "InvalidTaskError",
    "LinearDecay",
    "ManualClock",
    "PheromoneField",
    "PressureFloor",
    "Quota",
    "QuotaExhaustedError",
    "RateLimitInfo",
    "RedisFieldBackend",
    "RedisTaskLedger",
    "Route",
    "RunSummary",
    "SchedulerMetrics",
    "Signal",
    "StepDecay",
    "StigmergyError",
    "StigmergyScheduler",
    "StigmergyTransport",
    "StochasticDecay",
    "TaskError",
    "TaskEvent",
    "TaskOutcome",
    "TaskSpec",
    "TaskStatus",
    "TokenBudgets",
    "UnknownDependencyError",
    "backend_from_url",
    "detect_provider",
    "gate_field",
    "monotonic_clock",
    "parse_response",
]

__version__ = "0.1.0"

#: Loaded on first use (the Redis ones need the ``redis`` extra): ``from stigmergy import RedisFieldBackend``.
_LAZY = {
    "RedisFieldBackend": "stigmergy.backends.redis_backend",
    "RedisTaskLedger": "stigmergy.backends.redis_ledger",
    "StigmergyTransport": "stigmergy.integrations.httpx_transport",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except ImportError as exc:
            raise ImportError(
                f"{name} needs the redis extra: pip install 'stigmergy-field[redis]' ({exc})"
            ) from exc
        return getattr(module, name)
    raise AttributeError(f"module 'stigmergy' has no attribute {name!r}")
