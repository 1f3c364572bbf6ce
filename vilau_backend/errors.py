"""Errors meant for the person at the ComfyUI canvas: what was wrong, and what to do."""

from __future__ import annotations

import math


class VilaUError(Exception):
    """Base class of every error the backend raises on purpose."""


class CheckpointError(VilaUError):
    """A model folder is missing, incomplete or not a VILA-U checkpoint."""

    def __init__(self, message: str, hint: str | None = None):
        self.hint = hint
        super().__init__(f"{message}. {hint[0].upper() + hint[1:]}." if hint else message)


class InputError(VilaUError, ValueError):
    """A caller passed something the model cannot take (wrong shape, empty prompt...)."""


class GenerationCancelled(VilaUError):
    """For progress callbacks to raise when the user asked to stop. The generation loops
    let it (and anything else a callback raises) propagate unchanged."""


def require_finite(**numbers: float) -> None:
    """Refuse NaN and infinities, which pass every range check (and JSON can carry them): the check
    the sampling settings make first."""
    for name, value in numbers.items():
        if not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value}")
