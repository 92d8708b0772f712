"""Field backends: where signals live and their arithmetic runs (installed as ``stigmergy.backends``)."""

from stigmergy.backends.memory import InMemoryFieldBackend
from stigmergy.backends.protocol import (
    DepositBatch,
    FieldBackend,
    PressureFloor,
    PressureQuery,
    SignalFilter,
    StoredSignal,
)
from stigmergy.backends.urls import backend_from_url

__all__ = [
    "DepositBatch",
    "FieldBackend",
    "InMemoryFieldBackend",
    "PressureFloor",
    "PressureQuery",
    "SignalFilter",
    "StoredSignal",
    "backend_from_url",
]
