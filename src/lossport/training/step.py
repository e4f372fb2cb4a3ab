"""One training step of :func:`lossport.train`, and the only place where a batch is skipped.

For each batch: the objective evaluates the unweighted parts; every part (and regularization term) is checked
to be finite *before* the balancer sees it and before any backward; the balancer sets the weights (a
gradient-level balancer reports a non-finite gradient as ``FloatingPointError``); one backward of the total
(divided by ``accumulate``, scaled by the ``GradScaler`` under ``"16-mixed"``). Every ``accumulate`` batches:
the gradients are unscaled, checked to be finite (one sum per parameter tensor), clipped, the optimizer steps,
and the balancer's own update runs (``objective.step``). The parameters are checked whenever something is
non-finite and at the end of every round (:meth:`Stepper.check_parameters`), not after every step.

Any failed check is either a :class:`~lossport.NonFiniteLossError` (``on_nonfinite="raise"``) whose message
says what was and what was not applied, or a skipped batch (``"skip"``) counted in the round's history.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..balance import Context
from ..errors import NonFiniteLossError
from ..objective import Objective, unwrap
from ..result_types import Losses
from .evaluate import floats
from .setup import autocast


class _Skip(Exception):
    """A failed check: the message of the NonFiniteLossError ``raise`` mode gives."""


@dataclass
class StepOutcome:
    """What became of one batch: ``"done"`` (backward taken, values below), ``"skipped"`` (a failed check
    under ``on_nonfinite="skip"``; ``reason`` says which) or ``"empty"`` (no labelled example of any part)."""

    kind: Literal["done", "skipped", "empty"]
    reason: str = ""
    raw: Losses | None = None
    losses: Losses | None = None
    total: float = math.nan
    raw_vals: dict[str, float] = field(default_factory=dict)
    extra_vals: dict[str, float] = field(default_factory=dict)


class Stepper:
    """Runs the steps of a training run (see the module docstring); keeps the gradient-accumulation count."""

    def __init__(
        self,
        *,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        grad_clip: float | None,
        accumulate: int,
        on_nonfinite: str,
        precision: str,
        device: torch.device,
        batch_scheduler: Any = None,
        monitor: Any = None,
    ) -> None:
        self.model, self.inner = model, unwrap(model)
        self.objective, self.opt, self.scaler = objective, optimizer, scaler
        self.grad_clip, self.accumulate, self.on_nonfinite = grad_clip, accumulate, on_nonfinite
        self.precision, self.device = precision, device
        self.batch_scheduler, self.monitor = batch_scheduler, monitor
        self.pending = 0
        self.last_batch: Any = None
        self.params = list(self.inner.parameters())  # walked once: parameters() recurses through the modules

    def run(self, batch: Any, r: int, b: int, more: tuple[list[Any], Any] | None = None) -> StepOutcome:
        """Step on one batch (round ``r``, 0-based batch ``b``); ``more``: the extra training batches and the
        meta batch of a balancer that declares them (:mod:`lossport.training.draws`)."""
        try:
            return self._run(batch, r, b, more)
        except _Skip as skip:
            if self.on_nonfinite == "raise":
                self.opt.zero_grad(set_to_none=True)
                raise NonFiniteLossError(str(skip)) from skip.__cause__
            return StepOutcome("skipped", reason=str(skip))

    def finish(self, r: int, b: int) -> StepOutcome | None:
        """At the end of a round: the optimizer step of a partly accumulated step, if any."""
        if not self.pending:
            return None
        try:
            self._optimizer_step(self.last_batch, r, b)
        except _Skip as skip:
            if self.on_nonfinite == "raise":
                raise NonFiniteLossError(str(skip)) from skip.__cause__
            return StepOutcome("skipped", reason=str(skip))
        return StepOutcome("done")

    def _run(self, batch: Any, r: int, b: int, more: tuple[list[Any], Any] | None = None) -> StepOutcome:
        objective, balancer = self.objective, self.objective.balancer
        with autocast(self.precision, self.device):
            raw = objective.evaluate(self.model, batch)
        if not raw.parts and not raw.extra:
            return StepOutcome("empty")  # no labelled example of any part in this batch: nothing to learn from it
        if balancer is None:  # one device sync for the parts, extra terms and total
            flat = floats({**raw.parts, **{f"\0{k}": v for k, v in raw.extra.items()}, "\0\0": raw.total})
            total = flat.pop("\0\0")
            raw_vals = {k: flat[k] for k in raw.parts}
            extra_vals = {k: flat[f"\0{k}"] for k in raw.extra}
        else:
            raw_vals, extra_vals = floats(raw.parts), floats(raw.extra)
        bad = [k for k, v in {**raw_vals, **extra_vals}.items() if not math.isfinite(v)]
        if bad:
            self.check_parameters(r, b)  # the cause may be weights an earlier step overflowed
            value = raw_vals.get(bad[0], extra_vals.get(bad[0]))
            raise _Skip(
                f"part {bad[0]!r} is {value} in round {r}, batch {b} (0-based; non-finite parts: {bad}); no "
                "optimizer step was taken with this batch, so the net keeps the weights it had before it. Lower "
                "the learning rate, clip gradients (grad_clip=), check the inputs and targets, or skip such "
                "batches with on_nonfinite='skip'"
            )
        losses = raw
        if balancer is not None and raw.parts:
            losses = self._balance(raw, r, b, None if more is None else self._context(batch, *more))
            total = float(losses.total.detach())
        if self.monitor is not None:
            self.monitor.observe(losses, balancer)
        scaled = losses.total / self.accumulate if self.accumulate > 1 else losses.total
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.pending += 1
        self.last_batch = batch
        if self.pending == self.accumulate:
            self._optimizer_step(batch, r, b)
        return StepOutcome("done", raw=raw, losses=losses, total=total, raw_vals=raw_vals, extra_vals=extra_vals)

    def _context(self, batch: Any, extra: list[Any], meta: Any) -> Context:
        """The balancer's :class:`~lossport.balance.Context`: the objective on the other batches, through the
        unwrapped net (no DDP reducer involved; the parts are the global batch's under torchrun)."""

        def evaluate(data: Any) -> Losses:
            with autocast(self.precision, self.device):
                return self.objective.evaluate(self.inner, data)

        return Context.of(evaluate, batch, extra, meta, self.opt)

    def _balance(self, raw: Losses, r: int, b: int, context: Context | None = None) -> Losses:
        balancer = self.objective.balancer
        try:
            losses = balancer(raw, context)  # type: ignore[misc]
        except FloatingPointError as err:  # finite parts whose gradients are not (Gramian, surgery)
            self.check_parameters(r, b)
            raise _Skip(
                f"round {r}, batch {b}: every part is finite but the balancer {balancer!r} met a non-finite "
                f"gradient ({err}); no step was taken. Check the losses' gradients (e.g. sqrt or log at 0), or "
                "skip such batches with on_nonfinite='skip'"
            ) from err
        total = float(losses.total.detach())
        if not math.isfinite(total):
            raise _Skip(
                f"the total loss is {total} in round {r}, batch {b} although every part is finite: the balancer "
                f"{balancer!r} produced non-finite weights or terms ({losses.as_dict()}); no step was taken"
            )
        return losses

    def _optimizer_step(self, batch: Any, r: int, b: int) -> None:
        """Unscale, check the gradients, clip, step, check the parameters, then the balancer's update."""
        self.pending = 0
        inner, opt, scaler = self.inner, self.opt, self.scaler
        if scaler is not None:
            scaler.unscale_(opt)  # the GradScaler skips a step with non-finite gradients itself
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads and not all_finite(grads, fused=True):
                self.check_parameters(r, b)
                bad = [n for n, p in inner.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
                opt.zero_grad(set_to_none=True)
                raise _Skip(_bad_gradient_message(bad, r, b))
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if self.batch_scheduler is not None:
            self.batch_scheduler.step()
        try:
            self.objective.step(self.model, batch)
        except FloatingPointError as err:
            raise _Skip(
                f"round {r}, batch {b}: the optimizer step was taken, but the balancer's own update met a "
                f"non-finite value ({err}) and was not applied"
            ) from err

    def check_parameters(self, r: int, b: int | None = None) -> None:
        """Every parameter finite, or a :class:`~lossport.NonFiniteLossError` in both modes: a net whose weights
        hold NaN or inf cannot go on training, and the optimizer step that made them so cannot be undone (no copy
        of the weights is kept). Checked whenever a part, a gradient or the balancer is non-finite, and at the end
        of every round (so that no such net is checkpointed or reported "completed"), not after every step."""
        params = [p.detach() for p in self.params]
        if not params or all_finite(params):
            return
        bad = [n for n, p in self.inner.named_parameters() if not p.detach().isfinite().all()]
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        where = f"round {r}, batch {b} (0-based)" if b is not None else f"the end of round {r}"
        raise NonFiniteLossError(
            f"at {where}: the parameters {shown} are NaN or inf. An optimizer step made them so although its "
            "gradients were finite (an overflow: too large a step for the parameters' dtype). The net holds these "
            "non-finite weights and lossport cannot restore the previous ones (it keeps no copy); a checkpoint "
            "(checkpoint=DIR) holds the weights of the last complete round. Lower the learning rate, clip the "
            "gradients (grad_clip=), or train in a wider dtype"
        )


def all_finite(tensors: Sequence[Tensor], *, fused: bool = False) -> bool:
    """Whether every tensor is finite. ``fused=True`` (gradients): per device and dtype, one pass of torch's own
    AMP check (the one ``GradScaler`` uses), which multiplies the tensors by 1 in place (values unchanged, version
    counters bumped: not for tensors an autograd graph may hold). Otherwise, or where that kernel does not exist
    for a dtype, the sum of each tensor (a NaN or inf makes it non-finite), read once, and only a non-finite sum
    (which finite entries can also give, by overflow) checked element by element."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in tensors:
        groups.setdefault((g.device, g.dtype), []).append(g)
    return all(_group_finite(group, fused) for group in groups.values())


def _group_finite(group: list[Tensor], fused: bool) -> bool:
    if fused:
        dev = group[0].device
        found = torch.zeros((), device=dev)  # 0-dim: no DTensor warning on FSDP gradients
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones((), device=dev))
            return found.item() == 0
        except (RuntimeError, NotImplementedError):  # no such kernel for this device and dtype
            pass
    if math.isfinite(torch.stack([g.sum() for g in group]).sum().item()):
        return True
    return all(bool(g.isfinite().all()) for g in group)


def _bad_gradient_message(names: list[str], r: int, b: int) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"round {r}, batch {b} (0-based): every loss is finite but the gradient of {shown} is not (NaN or inf); "
        "no optimizer step was taken, so the net keeps the weights it had before this step. Look for a loss "
        "with an infinite slope (sqrt or log at 0, a division), lower the learning rate, or skip such steps with "
        "on_nonfinite='skip'"
    )


__all__ = ["StepOutcome", "Stepper", "all_finite"]
