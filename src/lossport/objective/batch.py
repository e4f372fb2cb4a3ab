"""Reading a batch: the net's inputs, the targets by output, labelled counts.

**Inputs.** A dict batch: the keys that are parameters of ``net.forward`` are passed by keyword (a forward with
``**kwargs`` gets every key except the targets and sample weights of the outputs). A pair ``(x, y)``: ``x`` a
tensor (one input), a tuple (positional inputs) or a dict (keyword inputs).

**Targets** (the ``targets=`` argument of :class:`~lossport.Objective`). The target of output ``o`` is read from
a *target source*: the batch itself for a dict batch; for a pair ``(x, y)`` ``y`` (a tensor for a single-output
net, a tuple for a tuple-output net, by position, a dict by output name); or what ``targets(batch)`` returns when
``targets=`` is a callable ``batch -> {output: target}``. The key of ``o`` in that source is, in this order:

1. ``targets[o]`` when ``targets=`` is a dict ``{output: key}`` (one key may serve several outputs, e.g. a
   GoogLeNet's main and auxiliary logits both from ``"label"``); every supervised output when ``targets=`` is a
   single key (a string); ``o`` itself when ``targets=`` is a callable;
2. ``o`` itself when the source has that key;
3. ``labels`` (:data:`LABELS_KEY`, Hugging Face's name) when the objective has exactly one output whose loss needs
   a target, the source has no key of that output's name and has a key ``labels``;
4. otherwise ``o`` (and evaluating says that the key is missing, names the output and lists the batch's keys).

The keys are chosen once, on the first batch, and ``objective.describe()`` shows them. Sample weights of output
``o`` are always source key ``o_weight``.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LossSpecError
from ..losses import _may_be_missing

Batch = Mapping[str, Any] | Sequence[Any]
TargetsArg = None | str | Mapping[str, str] | Callable[[Any], Mapping[str, Any]]
LABELS_KEY = "labels"
"""The batch key that serves a single supervised output with no key of its own (Hugging Face batches)."""


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel / compiled wrapper."""
    while True:
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if isinstance(inner, nn.Module) and type(net).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
            "OptimizedModule",
        ):
            net = inner
        else:
            return net


def forward_parameters(net: nn.Module) -> tuple[list[str], list[str], bool]:
    """(all named parameters of forward, the required ones, whether it takes **kwargs)."""
    cls: Any = type(unwrap(net))
    return _forward_parameters(cls)


@functools.lru_cache(maxsize=256)
def _forward_parameters(cls: Any) -> tuple[list[str], list[str], bool]:
    sig = inspect.signature(cls.forward)
    names, required, var_kw = [], [], False
    for p in list(sig.parameters.values())[1:]:  # skip self
        if p.kind == p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY):
            names.append(p.name)
            if p.default is p.empty:
                required.append(p.name)
    return names, required, var_kw


def net_inputs(inner: nn.Module, batch: Batch, skip: Collection[str] = ()) -> tuple[tuple, dict]:
    """Positional and keyword inputs of ``inner`` from ``batch``; ``skip``: keys a ``**kwargs`` forward must not
    get (targets and sample weights), unless they are named parameters of forward."""
    if isinstance(batch, Mapping) and _is_keras_model(inner):
        return (_keras_inputs(inner, batch, skip),), {}
    if isinstance(batch, Mapping):
        names, required, var_kw = forward_parameters(inner)
        missing = [n for n in required if n not in batch]
        if missing:
            raise LossSpecError(
                f"net.forward needs input {missing[0]!r}, but the batch has keys {sorted(batch)}; "
                f"name the batch keys after forward's parameters {tuple(names)}"
            )
        if var_kw:
            return (), {k: v for k, v in batch.items() if k in names or k not in skip}
        return (), {k: batch[k] for k in names if k in batch}
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x = batch[0]
        if isinstance(x, Mapping):
            return (), dict(x)
        if isinstance(x, (tuple, list)):
            return tuple(x), {}
        return (x,), {}
    raise LossSpecError(
        f"a batch must be a dict {{name: tensor}} or a pair (x, y), not a {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _is_keras_model(net: nn.Module) -> bool:
    keras = sys.modules.get("keras")
    model = getattr(keras, "Model", None)
    return isinstance(model, type) and isinstance(net, model)


def _keras_inputs(net: nn.Module, batch: Mapping[str, Any], skip: Collection[str]) -> Any:
    """A Keras 3 model's one positional ``inputs`` from a dict batch (``Model.forward(*args, **kwargs)`` hides them):
    a functional model's inputs by their ``keras.Input`` names, a subclassed model's every key not in ``skip`` (the
    targets; at binding only those of ``targets=``); a lone input as the tensor itself, several as a dict."""
    declared = getattr(net, "inputs", None)
    names = [t.name for t in declared] if isinstance(declared, (list, tuple)) and declared else None
    if names is None:
        names = [k for k in batch if k not in skip]
    missing = [n for n in names if n not in batch]
    if missing:
        raise LossSpecError(
            f"the Keras model's input {missing[0]!r} is not in the batch (keys {sorted(batch)}); name the batch keys "
            f"after the model's inputs {tuple(names)} (keras.Input(name=...))"
        )
    return batch[names[0]] if len(names) == 1 else {n: batch[n] for n in names}


def check_targets_arg(targets: Any) -> TargetsArg:
    """``targets=`` as given, after checking its form (``None``, a key, a dict ``{output: key}``, a callable)."""
    if targets is None or isinstance(targets, str) or callable(targets):
        return targets
    if isinstance(targets, Mapping):
        bad = [(o, k) for o, k in targets.items() if not isinstance(o, str) or not isinstance(k, str)]
        if bad:
            raise LossSpecError(
                f"targets= maps output names to batch keys (strings), got {bad[0][0]!r}: {bad[0][1]!r}; "
                "e.g. targets={'logits': 'label', 'aux': 'label'}"
            )
        return targets
    raise LossSpecError(
        f"targets= must be a batch key, a dict {{output: batch key}} or a callable batch -> {{output: target}}, "
        f"not a {type(targets).__name__}"
    )


def target_source(batch: Batch, targets: TargetsArg, structure: str, outputs: Sequence[str]) -> dict[str, Any]:
    """The mapping the targets and sample weights are read from (see the module docstring)."""
    if callable(targets) and not isinstance(targets, Mapping):
        got = targets(batch)
        if not isinstance(got, Mapping):
            raise LossSpecError(
                f"targets= is a callable, which must return a dict {{output: target}}; it returned a "
                f"{type(got).__name__}"
            )
        return dict(got)
    if isinstance(batch, Mapping):
        return dict(batch)
    y = batch[1]
    if isinstance(y, Mapping):
        return dict(y)
    if structure == "single" or isinstance(y, Tensor):
        if len(outputs) != 1:
            raise LossSpecError(
                f"the batch gives one target tensor but the net has {len(outputs)} outputs "
                f"({', '.join(outputs)}); give a tuple or a dict of targets"
            )
        return {outputs[0]: y}
    if isinstance(y, (tuple, list)):
        if len(y) != len(outputs):
            raise LossSpecError(
                f"the batch gives {len(y)} targets for {len(outputs)} outputs "
                f"({', '.join(outputs)}); give one per output (None where there is none)"
            )
        return {o: t for o, t in zip(outputs, y) if t is not None}
    raise LossSpecError(f"cannot read targets from a {type(y).__name__}")


def target_keys(
    outputs: Sequence[str], supervised: Sequence[str], source: Collection[str], targets: TargetsArg
) -> dict[str, str]:
    """The source key of every output's target, by the rule of the module docstring.

    ``supervised``: the outputs whose loss needs a target. A dict ``targets=`` naming an output the net does not
    have is a :class:`LossSpecError` listing the outputs."""
    if isinstance(targets, Mapping):
        unknown = [o for o in targets if o not in outputs]
        if unknown:
            raise LossSpecError(
                f"targets= names output {unknown[0]!r}, but the net has no output of that name; its outputs: "
                f"{', '.join(repr(o) for o in outputs)}"
            )
    keys: dict[str, str] = {}
    for o in outputs:
        if isinstance(targets, Mapping) and o in targets:
            keys[o] = targets[o]
        elif isinstance(targets, str) and o in supervised:
            keys[o] = targets
        else:
            keys[o] = o
    explicit = isinstance(targets, str) or (isinstance(targets, Mapping) and any(o in targets for o in supervised))
    if len(supervised) == 1 and not explicit and not callable(targets):
        (o,) = supervised
        if o not in source and LABELS_KEY in source:
            keys[o] = LABELS_KEY
    return keys


def count_labelled(target: Tensor | None, batch_size: int) -> int:
    """Examples with at least one label (NaN in a float target, -100 in a class target is missing)."""
    if target is None:
        return batch_size
    if target.dim() == 0:
        return 1
    if target.dtype == torch.bool:
        return int(target.shape[0])
    if not _may_be_missing(target):
        return int(target.shape[0])
    absent = torch.isnan(target) if target.is_floating_point() else target == -100
    return int((~absent).reshape(target.shape[0], -1).any(dim=1).sum())


def batch_size(outputs: Mapping[str, Tensor], targets: Mapping[str, Any]) -> int:
    """The leading dimension of the first non-scalar output or target (1 when there is none)."""
    for v in list(outputs.values()) + [v for v in targets.values() if isinstance(v, Tensor)]:
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1
