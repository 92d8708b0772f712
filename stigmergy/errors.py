"""One exception hierarchy for everything stigmergy raises on purpose.

::

    StigmergyError
    ├── InvalidSignalError      (also ValueError)  bad intensity, type, metadata, factor
    ├── ConfigurationError      (also ValueError)  bad decay parameters, thresholds, URLs
    ├── FieldCapacityError                         more agents, types or regions than a field indexes
    └── BackendError                               a backend could not do what was asked
        └── BackendUnavailableError                the backend's server cannot be reached

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
