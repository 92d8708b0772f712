"""One exception hierarchy for everything stigmergy raises on purpose.

::

    StigmergyError
    ├── InvalidSignalError      (also ValueError)  bad intensity, type, metadata, factor
    ├── ConfigurationError      (also ValueError)  bad decay parameters, thresholds, URLs
    ├── FieldCapacityError                         more agents, types or regions than a field indexes
    ├── BackendError                               a backend could not do what was asked
    │   └── BackendUnavailableError                the backend's server cannot be reached
    ├── AdmissionError                             the gate will not forward a request
    │   ├── AdmissionTimeoutError                  it waited longer than max_wait
    │   ├── BudgetExceededError                    a token budget is spent
    │   └── QuotaExhaustedError                    the upstream's quota is gone until a far deadline
    └── TaskError                                  a task or task graph the scheduler cannot run
        ├── InvalidTaskError    (also ValueError)  bad id, priority, attempts, timeout, threshold
        ├── DuplicateTaskError                     a task id that is already scheduled
        ├── UnknownDependencyError                 a dependency no task provides
        └── DependencyCycleError                   dependencies that wait on each other

Catch ``StigmergyError`` to handle all of them; the multiple bases let existing
``except ValueError`` code keep working.
"""

from __future__ import annotations


class StigmergyError(Exception):
    """Base of every error stigmergy raises on purpose."""


class InvalidSignalError(StigmergyError, ValueError):
    """A signal (or a change to one) was rejected: the message says which field and why."""


class ConfigurationError(StigmergyError, ValueError):
    """A setting cannot work (a non-positive half-life, a threshold out of range, ...)."""


class FieldCapacityError(StigmergyError):
    """The field cannot index more distinct agents, signal types or regions."""


class BackendError(StigmergyError):
    """A backend failed to carry out an operation."""


class BackendUnavailableError(BackendError):
    """The backend's server cannot be reached; the message names it (password redacted) and what to check."""


class TaskError(StigmergyError):
    """The scheduler cannot accept or run a task (graph): the message names the task(s) and the fix."""


class InvalidTaskError(TaskError, ValueError):
    """A task specification is malformed (empty id, priority out of [0, 1], ...)."""


class DuplicateTaskError(TaskError):
    """A task id was added twice; ids name tasks uniquely within one scheduler."""


class UnknownDependencyError(TaskError):
    """Tasks depend on ids that no task provides, so they could never start."""


class DependencyCycleError(TaskError):
    """Dependencies form a cycle, so none of the tasks on it could ever start."""


class AdmissionError(StigmergyError):
    """The gate will not forward a request; the message says why and what to change."""


class AdmissionTimeoutError(AdmissionError, TimeoutError):
    """A request waited longer than the gate's ``max_wait`` for its turn."""


class BudgetExceededError(AdmissionError):
    """A per-agent or global token budget cannot cover the request."""


class QuotaExhaustedError(AdmissionError):
    """The upstream said the quota is gone (402, a per-day limit): failing fast, not retrying."""

    def __init__(self, message: str, until: float | None = None) -> None:
        super().__init__(message)
        self.until = until  # epoch seconds when the upstream said it resets, if it did
