"""The errors lossport raises. Each names the output or part concerned and says how to fix it."""

from __future__ import annotations


class LossSpecError(ValueError):
    """A loss specification, weight specification or batch does not fit the net it is used with."""


class NonFiniteLossError(FloatingPointError):
    """A part of the loss was NaN or infinite; raised before any optimizer step touched the weights."""
