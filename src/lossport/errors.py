"""The errors lossport raises. Each names the output or part concerned and says how to fix it."""

from __future__ import annotations


class LossSpecError(ValueError):
    """A loss specification, weight specification or batch does not fit the net it is used with."""


class NonFiniteLossError(FloatingPointError):
    """A part of the loss, a gradient, or a parameter after an optimizer step was NaN or infinite. The message
    says what was applied: for parts and gradients no step was taken; for parameters the step was."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read, does not belong to this run, or its directory is in use; the message names
    the file and what is wrong."""
