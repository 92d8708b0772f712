"""Signals are validated at the door; every deliberate error is a StigmergyError."""

from __future__ import annotations

import math
import re

import pytest

import stigmergy
from stigmergy import InvalidSignalError, Signal, StigmergyError
from stigmergy import errors as errors_module


def test_a_valid_signal_is_frozen() -> None:
    signal = Signal(agent_id="a", signal_type="work", intensity=-0.5, metadata={"k": [1, "x"]})
    assert signal.is_repulsion and not signal.is_attraction
    with pytest.raises(AttributeError):
        signal.intensity = 0.1  # type: ignore[misc]
    assert signal.with_intensity(0.25).intensity == 0.25
    assert signal.age_seconds >= 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1.01, -2, "0.5", None, True])
def test_bad_intensities_are_refused_not_clamped(bad: object) -> None:
    with pytest.raises(InvalidSignalError, match="intensity"):
        Signal(agent_id="a", signal_type="work", intensity=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidSignalError):
        Signal(agent_id="a", signal_type="work").with_intensity(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("metadata", [{"f": {1, 2}}, {1j: 1}, {"x": math.inf}, ["not", "a", "dict"]])
def test_metadata_must_survive_json(metadata: object) -> None:
    with pytest.raises(InvalidSignalError, match="metadata"):
        Signal(agent_id="a", signal_type="work", metadata=metadata)  # type: ignore[arg-type]


def test_empty_signal_type_is_refused() -> None:
    with pytest.raises(InvalidSignalError, match="signal_type"):
        Signal(agent_id="a", signal_type="")


def test_errors_form_one_hierarchy_drawn_in_the_module_docstring() -> None:
    classes = {
        name: obj
        for name, obj in vars(errors_module).items()
        if isinstance(obj, type) and issubclass(obj, Exception)
    }
    assert all(issubclass(cls, StigmergyError) for cls in classes.values())
    drawn = set(re.findall(r"(\w+Error)", errors_module.__doc__ or "")) - {"ValueError"}
    assert drawn == set(classes)
    assert issubclass(stigmergy.InvalidSignalError, ValueError)


def test_public_api_is_exported_from_the_package() -> None:
    for name in stigmergy.__all__:
        assert hasattr(stigmergy, name), name
    assert {"PheromoneField", "InMemoryFieldBackend", "ExponentialDecay", "Signal"} <= set(stigmergy.__all__)
