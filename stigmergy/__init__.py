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
    backend_from_url,
)
from stigmergy.clock import Clock, ManualClock, monotonic_clock
from stigmergy.decay import (
    DecayPolicy,
    DecayStrategy,
    ExponentialDecay,
    LinearDecay,
    StepDecay,
    StochasticDecay,
)
from stigmergy.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    DependencyCycleError,
    DuplicateTaskError,
    FieldCapacityError,
    InvalidSignalError,
    InvalidTaskError,
    StigmergyError,
    TaskError,
    UnknownDependencyError,
)
from stigmergy.events import TaskEvent
from stigmergy.field import Contribution, Explanation, PheromoneField
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
    "AgentDispatcher",
    "BackendError",
    "BackendUnavailableError",
    "Clock",
    "ConfigurationError",
    "Contribution",
    "DecayPolicy",
    "DecayStrategy",
    "DependencyCycleError",
    "DispatchResult",
    "DuplicateTaskError",
    "Explanation",
    "ExponentialDecay",
    "FieldBackend",
    "FieldCapacityError",
    "InMemoryFieldBackend",
    "InvalidSignalError",
    "InvalidTaskError",
    "LinearDecay",
    "ManualClock",
    "PheromoneField",
    "RunSummary",
    "SchedulerMetrics",
    "Signal",
    "StepDecay",
    "StigmergyError",
    "StigmergyScheduler",
    "StochasticDecay",
    "TaskError",
    "TaskEvent",
    "TaskOutcome",
    "TaskSpec",
    "TaskStatus",
    "UnknownDependencyError",
    "backend_from_url",
    "monotonic_clock",
]

__version__ = "0.1.0"

#: Need the ``redis`` extra, so they load on first use: ``from stigmergy import RedisFieldBackend``.
_REDIS_NAMES = {
    "RedisFieldBackend": "stigmergy.backends.redis_backend",
    "RedisTaskLedger": "stigmergy.backends.redis_ledger",
}


def __getattr__(name: str) -> Any:
    if name in _REDIS_NAMES:
        try:
            module = importlib.import_module(_REDIS_NAMES[name])
        except ImportError as exc:
            raise ImportError(
                f"{name} needs the redis extra: pip install 'stigmergy-field[redis]' ({exc})"
            ) from exc
        return getattr(module, name)
    raise AttributeError(f"module 'stigmergy' has no attribute {name!r}")
