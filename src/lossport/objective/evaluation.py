"""Evaluation: a bound :class:`~lossport.objective.binding.Plan`, the net's outputs and a batch -> ``Losses``.

Each part is the mean of its loss over the labelled examples (:mod:`lossport.losses`). A part is *missing* (left
out of ``parts`` and listed in ``Losses.missing``, never reported as 0) when no example of the batch has its
label, or when the net did not return its output in this forward: auxiliary heads that exist only in training
mode are simply absent when the net is evaluated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..auto import capture_inputs
from ..errors import LossSpecError
from ..gramian import retainable_compile
from ..losses import port_loss
from ..result_types import Losses
from ..spec import Term, TermKind
from .batch import Batch, batch_size, count_labelled, net_inputs, unwrap
from .binding import Plan
from .outputs import name_outputs

Values = dict[str, tuple[Tensor, Tensor | None]]  # part -> (value, per-example values or None)


def run_forward(plan: Plan, net: nn.Module, batch: Batch, skip: set[str]) -> tuple[Any, dict[str, dict[int, Tensor]]]:
    """The net's raw output on ``batch`` and, for each producer module of the plan, ``id(output) -> input``."""
    inner = unwrap(net)
    args, kwargs = net_inputs(inner, batch, skip)
    producers = plan.producers
    # a torch.compile'd net compiles here, in retainable_compile (see lossport.gramian); a plain net needs nothing
    compiled = plan.compiled or type(net).__name__ == "OptimizedModule"
    scope = retainable_compile() if compiled else contextlib.nullcontext()
    if not producers:
        with scope:
            return net(*args, **kwargs), {}
    wanted = {m: inner.get_submodule(m) for m in set(producers.values())}
    with capture_inputs(wanted) as got, scope:
        out = net(*args, **kwargs)
    return out, got


def named_outputs(plan: Plan, out: Any, training: bool) -> dict[str, Tensor]:
    """The outputs of one forward by name. In a mode other than the plan's, a lone tensor is the plan's first
    output (torchvision's GoogLeNet/Inception return only their main logits in evaluation) and outputs that cannot
    be named (a detection model's per-image detections) are no outputs: every part is then missing."""
    if training == plan.training:
        return name_outputs(out)[0]
    if isinstance(out, Tensor) and plan.structure != "single":
        return {plan.output_names[0]: out}
    try:
        return name_outputs(out)[0]
    except LossSpecError:
        return {}


def logits_of(plan: Plan, outputs: Mapping[str, Tensor], got: Mapping[str, Mapping[int, Tensor]]) -> dict[str, Tensor]:
    """For each output read from its producer's input, that input (the logits entering a Softmax/Sigmoid)."""
    logits: dict[str, Tensor] = {}
    for o, mname in plan.producers.items():
        if o not in outputs:
            continue
        calls = got[mname]
        x = calls.get(id(outputs[o]))
        if x is None and len(calls) == 1:  # a wrapper (DDP) replaced the output tensor
            x = next(iter(calls.values()))
        if x is None:
            raise LossSpecError(
                f"output {o!r} was produced by {mname!r} when the objective was bound but not in this forward; "
                "give its loss explicitly"
            )
        logits[o] = x
    return logits


def evaluate_terms(
    plan: Plan,
    outputs: Mapping[str, Tensor],
    source: Mapping[str, Any],
    *,
    net: nn.Module | None,
    logits: Mapping[str, Tensor],
    per_example: bool,
    source_name: str = "the batch",
) -> tuple[Losses, dict[str, tuple[str, ...]]]:
    """The parts of every term, and (by term name) the part names of dict-returning terms that changed.

    ``source`` holds the targets and sample weights (:func:`lossport.objective.batch.target_source`);
    ``source_name`` says what it is in error messages."""
    parts: dict[str, Tensor] = {}
    weights: dict[str, Tensor | float] = {}
    extra: dict[str, Tensor] = {}
    missing: list[str] = []
    counts: dict[str, int] = {}
    examples: dict[str, Tensor] = {}
    found: dict[str, tuple[str, ...]] = {}
    bsize = batch_size(outputs, source)
    # the batch's own size, for outputs that already are losses (only they need it: not on every call)
    has_ports = any(t.kind is TermKind.PORT for t in plan.terms)
    batch_n = batch_size({k: v for k, v in source.items() if isinstance(v, Tensor)}, outputs) if has_ports else 0
    for t in plan.terms:
        if t.kind is TermKind.REG:
            if net is None:
                raise RuntimeError("regularization parts need the net: objective.losses(..., net=net)")
            extra[t.name] = t.static_weight * t.loss.value(unwrap(net))
            continue
        assert t.output is not None
        if t.output not in outputs:  # not returned in this mode (auxiliary heads in evaluation)
            missing.extend(t.part_names)
            continue
        target = _get_target(t, source, source_name) if t.needs_target else None
        sw = source.get(f"{t.output}_weight")
        values = _term_values(t, outputs[t.output], logits, target, sw, per_example, batch_n)
        if t.kind is TermKind.CALLABLE and tuple(values) != t.part_names:
            found[t.name] = tuple(values)
        n = count_labelled(target, bsize)
        for name, (v, ex) in values.items():
            if name in parts or name in missing:
                raise LossSpecError(f"two losses are named {name!r}; rename the keys your loss returns")
            if n == 0:
                missing.append(name)
                continue
            parts[name], weights[name], counts[name] = v, t.static_weight, n
            if ex is not None:
                examples[name] = ex.detach()
    losses = Losses(
        parts=parts,
        weights=weights,
        extra=extra,
        missing=tuple(missing),
        counts=counts,
        outputs=dict(outputs),
        per_example=examples,
    )
    return losses, found


def _term_values(
    t: Term,
    y_hat: Tensor,
    logits: Mapping[str, Tensor],
    target: Tensor | None,
    sw: Tensor | None,
    per_example: bool,
    batch_n: int,
) -> Values:
    if t.kind is TermKind.PORT:  # summed per example, averaged over the batch (Wolfram's rule)
        return {t.name: port_loss(t.name, y_hat, batch_n, sw)}
    if t.kind is TermKind.LAYER:
        assert t.output is not None
        x = logits.get(t.output, y_hat) if t.use_producer_input else y_hat
        return {t.name: _call_layer(t, x, target, sw, per_example)}
    return _call_fn(t, y_hat, target, sw)


def _get_target(t: Term, source: Mapping[str, Any], source_name: str) -> Tensor:
    key = t.target or t.output
    assert key is not None
    if key not in source or source[key] is None:
        avail = sorted(k for k in source if isinstance(k, str))
        raise LossSpecError(
            f"output {t.output!r} has loss {t.loss_name()} which needs a target, but {source_name} has no key "
            f"{key!r} (its keys: {avail}). Add the targets under {key!r}, read them from another key with "
            f"targets={{{t.output!r}: '<key>'}}, or give output {t.output!r} a loss without target (or None)"
        )
    y = source[key]
    return y if isinstance(y, Tensor) else torch.as_tensor(y)


def _call_layer(
    t: Term, x: Tensor, target: Tensor | None, sw: Tensor | None, per_example: bool
) -> tuple[Tensor, Tensor | None]:
    try:
        v = t.loss(x, target, sw)
        ex = t.loss(x.detach(), target, sw, reduction="none") if per_example else None
    except (ValueError, RuntimeError, IndexError) as e:
        raise LossSpecError(
            f"output {t.output!r} with loss {t.loss_name()}: {e} (output shape {tuple(x.shape)}, dtype {x.dtype}; "
            f"target shape {tuple(target.shape) if target is not None else None}, "
            f"dtype {target.dtype if target is not None else None})"
        ) from e
    return v, ex


def _reduce_custom(name: str, v: Any, sw: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if not isinstance(v, Tensor):
        v = torch.as_tensor(v, dtype=torch.float32)
    if v.dim() == 0:
        if sw is not None:
            raise LossSpecError(
                f"part {name!r}: sample weights were given but the loss returns a scalar; return per-example "
                "values so they can be weighted"
            )
        return v, None
    per_ex = v.reshape(v.shape[0], -1).sum(1)
    if sw is None:
        return per_ex.mean(), per_ex
    w = sw.to(per_ex.dtype).reshape(-1)
    if w.shape[0] != per_ex.shape[0]:
        raise LossSpecError(f"part {name!r}: {w.shape[0]} sample weights for {per_ex.shape[0]} examples")
    return (per_ex * w).sum() / w.sum(), per_ex


def _call_fn(t: Term, y_hat: Tensor, target: Tensor | None, sw: Tensor | None) -> Values:
    fn: Callable[..., Any] = getattr(t.loss, "fn", t.loss)
    try:
        v = fn(y_hat, target) if t.needs_target else fn(y_hat)
    except LossSpecError:
        raise
    except Exception as e:
        raise LossSpecError(f"output {t.output!r}: the loss {t.loss_name()} failed: {type(e).__name__}: {e}") from e
    if isinstance(v, Mapping):
        if not v:
            raise LossSpecError(f"output {t.output!r}: the loss {t.loss_name()} returned an empty dict")
        return {f"{t.output}/{k}": _reduce_custom(f"{t.output}/{k}", x, sw) for k, x in v.items()}
    return {t.name: _reduce_custom(t.name, v, sw)}
