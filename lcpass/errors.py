"""Errors a user acts on: each names the object, the value and the fix."""
from __future__ import annotations

__all__ = ["UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """``lcpass.optimize`` refuses a model (or some of its sites) rather than compute something else.

    Raised when no route lcpass has can show that a planned site runs its plan and that the dense plan
    reproduces the model: the message names the model, the sites, the reason and what to do.
    """
