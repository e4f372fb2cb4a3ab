"""Binding: loss spec + net + first batch -> an immutable :class:`Plan`.

One forward pass of the first batch, **in the mode the net is in** (training mode for a net about to be trained:
a detection model's loss dict and a GoogLeNet's auxiliary logits exist only there), with gradients enabled so
that the automatic choice sees the producing modules and functional ops (:mod:`lossport.auto`). This forward
leaves no trace: the random number generators are forked and the buffers (batch-norm statistics) restored.

The plan holds the terms (:class:`lossport.spec.Term`, frozen, with a :class:`~lossport.spec.TermKind`: every
``AUTO`` term resolved), the output names and structure, the target key of every output
(:mod:`lossport.objective.batch`) and the mode it was bound in.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from ..auto import Producer, choose, fit_torch_loss, producer_of, record_producers
from ..errors import LossSpecError
from ..losses import CrossEntropy, TorchLoss
from ..spec import Term, TermKind, apply_weights, compile_spec
from .batch import Batch, TargetsArg, forward_parameters, net_inputs, target_keys, target_source, unwrap
from .outputs import name_outputs


@dataclass(frozen=True)
class Plan:
    """What an objective computes for one net: its terms, in declaration order, and how it reads batches."""

    terms: tuple[Term, ...]
    structure: str  # "single" | "tuple" | "dict"
    output_names: tuple[str, ...]
    target_keys: Mapping[str, str]  # output -> key of its target in the target source
    training: bool  # the mode the net was in when the plan was bound
    net_id: int
    compiled: bool = False  # the net or one of its modules is torch.compile'd (forward in retainable_compile)

    @property
    def loss_terms(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.kind is not TermKind.REG)

    @property
    def part_names(self) -> list[str]:
        return [p for t in self.loss_terms for p in t.part_names]

    @property
    def static_weights(self) -> dict[str, float]:
        return {p: t.static_weight for t in self.loss_terms for p in t.part_names}

    @property
    def extra_names(self) -> list[str]:
        return [t.name for t in self.terms if t.kind is TermKind.REG]

    @property
    def producers(self) -> dict[str, str]:
        """Output -> the module whose input is taken as that output's logits (auto and alias CE/BCE)."""
        return {t.output: t.producer for t in self.terms if t.output is not None and t.producer is not None}

    def with_parts(self, parts: Mapping[str, tuple[str, ...]]) -> Plan:
        """The plan with the part names (by term name) that dict-returning callable terms gave when evaluated."""
        return replace(self, terms=tuple(replace(t, parts=parts[t.name]) if t.name in parts else t for t in self.terms))


def bind(spec: Any, weights: Any, targets: TargetsArg, net: nn.Module, batch: Batch) -> Plan:
    """Bind ``spec`` (with static ``weights=`` and ``targets=``) to ``net``'s outputs on ``batch``."""
    inner = unwrap(net)
    skip = _explicit_keys(targets)
    args, kwargs = net_inputs(inner, batch, skip)
    with torch.enable_grad(), _no_side_effects(inner), record_producers(inner) as seen:
        # the inner module, not a DDP wrapper: DDP replaces output tensors and would expect a backward
        out = inner(*args, **kwargs)
    outputs, structure = name_outputs(out)
    producers = {k: producer_of(v, seen) for k, v in outputs.items()}
    scalars = [k for k, v in outputs.items() if v.dim() == 0]
    terms = [
        _resolve(t, outputs, producers) for t in compile_spec(spec, list(outputs), structure=structure, scalars=scalars)
    ]
    terms = apply_weights(terms, weights)
    supervised = list(dict.fromkeys(t.output for t in terms if t.needs_target and t.output is not None))
    source = target_source(batch, targets, structure, list(outputs)) if not callable(targets) else {}
    keys = target_keys(list(outputs), supervised, source, targets)
    terms = [replace(t, target=keys[t.output]) if t.needs_target and t.output is not None else t for t in terms]
    if isinstance(batch, Mapping) and not callable(targets):
        _check_clash(terms, inner, targets)
        _check_weight_keys(batch, list(outputs), set(kwargs) | set(keys.values()))
    return Plan(
        terms=tuple(terms),
        structure=structure,
        output_names=tuple(outputs),
        target_keys=MappingProxyType(keys),
        training=inner.training,
        net_id=id(inner),
        compiled=has_compiled_code(net),
    )


def _explicit_keys(targets: TargetsArg) -> set[str]:
    if isinstance(targets, str):
        return {targets}
    if isinstance(targets, Mapping):
        return set(targets.values())
    return set()


@contextmanager
def _no_side_effects(inner: nn.Module) -> Iterator[None]:
    """Fork the random number generators (dropout) and restore the buffers (batch-norm statistics) afterwards."""
    saved = {n: b.detach().clone() for n, b in inner.named_buffers()}
    devices = sorted(
        {t.device.index or 0 for t in itertools.chain(inner.parameters(), inner.buffers()) if t.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for n, b in inner.named_buffers():
                    old = saved.get(n)
                    if old is not None and old.shape == b.shape:
                        b.copy_(old)


def _resolve(t: Term, outputs: Mapping[str, Tensor], producers: Mapping[str, Producer]) -> Term:
    """The term with ``AUTO`` resolved and cross-entropy fitted to what its output holds."""
    if t.kind is TermKind.AUTO:
        assert t.output is not None
        if outputs[t.output].dim() == 0:
            return replace(t, kind=TermKind.PORT, how="auto: scalar output is a loss")
        producer = producers[t.output]
        layer, from_input, how = choose(producer)
        if layer is None:
            return replace(t, kind=TermKind.PORT, how=how)
        return replace(
            t,
            kind=TermKind.LAYER,
            loss=layer,
            needs_target=True,
            use_producer_input=from_input,
            producer=producer.module_name if from_input else None,
            how=how,
        )
    if t.kind is TermKind.LAYER and isinstance(t.loss, CrossEntropy) and t.output is not None:
        return fit_cross_entropy(t, producers[t.output])
    if t.kind is TermKind.LAYER and isinstance(t.loss, TorchLoss) and t.output is not None:
        producer = producers[t.output]
        loss, from_input, fitted = fit_torch_loss(t.output, t.loss, producer)
        return replace(
            t,
            loss=loss,
            how=t.how + fitted,
            use_producer_input=from_input,
            producer=str(producer.module_name) if from_input else None,
        )
    return t


def fit_cross_entropy(t: Term, producer: Producer) -> Term:
    """A cross-entropy term that agrees with what its output holds.

    The aliases ``"ce"``/``"bce"`` adapt: on an ``nn.Softmax``/``nn.Sigmoid`` output they use the logits that
    entered it (stable), on a functional softmax/sigmoid the probabilities. A :class:`CrossEntropy` layer given
    explicitly is taken at its word, except that ``from_logits=True`` on an output that holds probabilities is an
    error (it would train silently on the wrong loss). The term's layer is copied, never edited."""
    assert isinstance(t.loss, CrossEntropy) and t.output is not None
    probs = {"softmax": "index", "sigmoid": "binary", "fn_softmax": "index", "fn_sigmoid": "binary"}
    form = probs.get(producer.kind)
    if form is None or (t.loss.form == "probabilities" and form == "binary") or not t.loss.from_logits:
        return t
    where = producer.module_name or "torch." + producer.kind[3:]
    if not t.how.startswith("alias"):
        raise LossSpecError(
            f"output {t.output!r} holds probabilities (produced by {where!r}) but its loss {t.loss_name()} "
            "expects logits; use 'auto' or the alias ('ce'/'bce'), which take the logits before the "
            "activation, or CrossEntropy(..., from_logits=False)"
        )
    layer = copy.copy(t.loss)
    if form == "index":  # the softmax's dim, functional or module, is where the classes are
        layer.class_dim = producer.dim
    if producer.kind in ("softmax", "sigmoid"):
        assert producer.module_name is not None
        return replace(
            t,
            loss=layer,
            use_producer_input=True,
            producer=producer.module_name,
            how=t.how + f", from the logits entering {producer.module_name!r}",
        )
    layer.from_logits = False
    return replace(t, loss=layer, how=t.how + f", from the probabilities of {where}")


def has_compiled_code(net: nn.Module) -> bool:
    """Whether ``net`` (a wrapper, itself or a submodule) runs code compiled by ``torch.compile``."""
    return type(net).__name__ == "OptimizedModule" or any(
        type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None
        for m in unwrap(net).modules()
    )


def _check_weight_keys(batch: Mapping[str, Any], outputs: list[str], used: set[str]) -> None:
    """A batch key that nothing reads but that looks like an output's sample weights (``a_weights``,
    ``weight_a``, ``sample_weight``) is a misspelling of ``a_weight``: an error, since the weights would be ignored."""
    for key in batch:
        if key in used or key in {f"{o}_weight" for o in outputs}:
            continue
        k = str(key).lower()
        for o in outputs:
            ol = re.escape(o.lower())
            if re.fullmatch(rf"(sample_?)?weights?_{ol}|{ol}[_-]?(sample_?)?(weights?|wts?|w)", k):
                raise LossSpecError(
                    f"batch key {key!r} looks like the sample weights of output {o!r}, but nothing reads it: "
                    f"lossport reads them from {o + '_weight'!r}. Rename the key"
                )
        if k in ("sample_weight", "sample_weights", "weights") and outputs:
            raise LossSpecError(
                f"batch key {key!r} looks like sample weights, but nothing reads it: lossport reads the sample "
                f"weights of output o from key 'o_weight' ({', '.join(repr(o + '_weight') for o in outputs)})"
            )


def _check_clash(terms: list[Term], inner: nn.Module, targets: TargetsArg) -> None:
    """An output whose target is read from its own name, which is also an input of forward, is an error."""
    params, _, _ = forward_parameters(inner)
    explicit = _explicit_keys(targets)
    clash = [t.target for t in terms if t.target is not None and t.target == t.output and t.target in params]
    clash = [k for k in clash if k not in explicit]
    if clash:
        raise LossSpecError(
            f"output {clash[0]!r} takes its target from batch key {clash[0]!r}, which is also an input of "
            f"net.forward {tuple(params)}; rename the output or the forward parameter, or read its target from "
            f"another key: targets={{{clash[0]!r}: '<key>'}}"
        )
