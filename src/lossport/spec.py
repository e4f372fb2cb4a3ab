"""Loss specifications -> terms.

A spec says which loss each output gets. Every form Keras (``compile(loss=..., loss_weights=...)``) and
Wolfram (``NetTrain[..., LossFunction -> ...]``) accept is accepted here, and each means exactly one thing;
anything else raises :class:`~lossport.LossSpecError` naming the output, listing the valid names and saying how
to fix it. The forms (``outputs`` are the net's outputs, named by dict key, namedtuple or dataclass field,
``out0, out1, ...`` for a tuple, ``out`` for a single tensor, ``parent/child`` one level down: see
:mod:`lossport.objective.outputs`):

==========================================  ==================================================================
``"auto"``                                  a loss for every output, chosen from the module that produced it
                                            (:mod:`lossport.auto`); scalar outputs, if any, are the losses.
``"name"`` (an output name)                 that output already is a loss (an HF model's ``loss``; Wolfram
                                            ``"port"``); an array output is summed per example and averaged
                                            over the batch (see below).
a loss layer, alias or callable             single-output nets only (``"mse"``, ``"mae"``, ``"huber"``, ``"ce"``,
                                            ``"bce"``, ``"contrastive"``, a :class:`~lossport.losses.LossLayer`,
                                            a ``torch.nn`` loss module, a function).
``{output: spec}``                          per output: ``"auto"``, a loss, an alias, a callable, ``Scaled``,
                                            ``None`` (no loss) or a list of these (several losses). Outputs not
                                            named get no loss.
``[spec, ...]``                             Wolfram's "several losses at once": output names, ``(output, spec)``
                                            pairs, dicts, ``L1``/``L2``; on a single-output net a list of losses
                                            is summed (every entry, unlike Keras); on a tuple-output net a list
                                            of plain specs matches outputs by position and needs exactly one
                                            entry per output (``None`` = no loss).
``Scaled(spec, r)``                         anywhere: multiplies that loss's weight by ``r``.
``L1(weight)``, ``L2(weight)``              regularization parts with no output, reported as their own parts.
==========================================  ==================================================================

Callables: one required positional parameter means ``fn(output)`` (no target), two mean
``fn(output, target)``; :class:`CustomLoss` declares it explicitly. A callable whose first two parameters are
named target-first, as Keras's ``(y_true, y_pred)`` (:func:`keras_order`), is called ``fn(target, output)``;
any other names keep ``fn(output, target)``. A callable may return a scalar, a per-example array (summed over
non-batch dimensions, then averaged over the batch, weighted by the sample weights when given), or a dict of
those: one part per key, named ``output/key`` (Wolfram's multi-port loss nets, e.g. a VAE's reconstruction
and KL). An output that already is a loss follows the same rule: a scalar as is, an array with the batch
dimension summed per example and averaged over the batch, an array without it summed
(:func:`lossport.losses.port_loss`).

PyTorch losses: any ``torch.nn`` loss module (``nn.MSELoss()``, ``nn.CrossEntropyLoss(weight=w)``, anything with
a ``reduction``) and the functional losses ``F.cross_entropy``, ``F.mse_loss``, ... are loss layers
(:class:`lossport.losses.TorchLoss`): run per example so that missing labels and sample weights apply, reduced
as the module's ``reduction`` says. Cross-entropy ones on a Softmax/Sigmoid output take the logits that entered
it, as the ``"ce"``/``"bce"`` aliases do (:func:`lossport.auto.fit_torch_loss`).

Part names: the output's name when it has one loss; ``output/<loss>`` when an output has several (a repeat
gets ``_2``, ``_3``...); ``l1``/``l2`` for regularization. ``loss`` always means the total: the parts of an output
named ``loss`` (a Hugging Face model's) are ``loss/<loss>``, ``loss/port`` when it already is the loss.
``weights=`` (Keras ``loss_weights``) is a list in declaration order, a dict by loss name, or a number when
there is exactly one loss; every loss needs a weight, and an unknown name is an error.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from torch import Tensor, nn

from .errors import LossSpecError
from .losses import ALIASES, LossLayer, TorchLoss, from_alias, is_torch_loss, module_name, torch_loss
from .result_types import TOTAL_KEY


class Scaled:
    """``Scaled(spec, r)``: the loss of ``spec`` with its weight multiplied by ``r`` (Wolfram ``Scaled[r]``).

    The reported part stays unweighted; its weight is reported beside it.
    """

    def __init__(self, spec: Any, r: float) -> None:
        if isinstance(spec, Scaled):
            inner: Scaled = spec
            r = inner.r * r
            spec = inner.spec
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise LossSpecError(f"Scaled(spec, r): r must be a number, got {r!r}")
        self.spec: Any = spec
        self.r: float = float(r)

    def __repr__(self) -> str:
        return f"Scaled({self.spec!r}, {self.r})"


_TARGET_NAMES = frozenset({"y_true", "target", "targets", "label", "labels", "y"})
_PREDICTION_NAMES = frozenset(
    {"y_pred", "output", "outputs", "pred", "preds", "prediction", "predictions", "input", "logits", "y_hat", "yhat"}
)


def keras_order(fn: Any) -> bool:
    """Whether ``fn``'s first two positional parameters name the target first and the prediction second, as
    Keras's ``loss(y_true, y_pred)`` (also ``(target, output)``, ``(labels, logits)``, ``(y, y_hat)``, ...).

    Such a callable is called ``fn(target, output)``. Any other names (``(output, target)``, ``(a, b)``, no
    signature) keep lossport's documented ``fn(output, target)``.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in sig.parameters.values() if p.kind in kinds][:2]
    return len(names) == 2 and names[0] in _TARGET_NAMES and names[1] in _PREDICTION_NAMES


class _TargetFirst:
    """``fn`` called in Keras order: ``_TargetFirst(fn)(output, target) = fn(target, output)``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = str(getattr(fn, "__name__", type(fn).__name__))

    def __call__(self, output: Any, target: Any) -> Any:
        return self.fn(target, output)


class CustomLoss:
    """A callable declared as a loss: ``CustomLoss(fn, target=True)`` calls ``fn(output, target)`` (or
    ``fn(target, output)`` when its parameters are named in Keras order, :func:`keras_order`),
    ``target=False`` calls ``fn(output)``. Plain callables are told apart by their signature."""

    def __init__(self, fn: Callable[..., Any], *, target: bool, name: str | None = None) -> None:
        if not callable(fn):
            raise LossSpecError(f"CustomLoss needs a callable, got {fn!r}")
        self.target = bool(target)
        self.target_first = self.target and keras_order(fn)
        self.fn: Callable[..., Any] = _TargetFirst(fn) if self.target_first else fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def __repr__(self) -> str:
        order = ", called fn(target, output)" if self.target_first else ""
        return f"CustomLoss({self.name}, target={self.target}{order})"


class _Regularization:
    kind = "reg"
    power = 2

    def __init__(self, weight: float, params: str | Sequence[str] | Iterable[Tensor] | None = None) -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise LossSpecError(f"{type(self).__name__}(weight): weight must be a number, got {weight!r}")
        self.weight = float(weight)
        self.params = params

    def select(self, net: nn.Module) -> list[Tensor]:
        """The regularized tensors: ``params=None`` means every weight matrix/kernel (``ndim > 1``) of the
        net (biases and normalisation scales are left alone, as Keras's ``kernel_regularizer``); a string
        or list of strings are glob patterns on parameter names (``"trunk.*"``); or explicit tensors."""
        named = dict(net.named_parameters())
        if self.params is None:
            return [p for p in named.values() if p.requires_grad and p.dim() > 1]
        if isinstance(self.params, str) or (
            isinstance(self.params, Sequence) and all(isinstance(s, str) for s in self.params)
        ):
            patterns = [self.params] if isinstance(self.params, str) else list(self.params)
            chosen: list[Tensor] = [p for n, p in named.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
            if not chosen:
                raise LossSpecError(
                    f"{self!r}: no parameter name matches {patterns}; names look like {list(named)[:6]}"
                )
            return chosen
        return list(self.params)  # type: ignore[arg-type]

    def value(self, net: nn.Module) -> Tensor:
        ps = self.select(net)
        if not ps:
            raise LossSpecError(f"{self!r}: the net has no parameter to regularize")
        total = sum(p.abs().sum() if self.power == 1 else p.pow(2).sum() for p in ps)
        return self.weight * total  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weight})"


class L1(_Regularization):
    """L1 regularization part: ``weight * sum |p|`` over the chosen parameters."""

    power = 1


class L2(_Regularization):
    """L2 regularization part: ``weight * sum p^2`` over the chosen parameters (Keras ``L2``)."""

    power = 2


class TermKind(str, Enum):
    """The closed set of term kinds. ``AUTO`` exists only between :func:`compile_spec` and binding
    (:mod:`lossport.objective.binding`), which resolves it to ``PORT`` or ``LAYER``."""

    PORT = "port"  # the output already is the loss
    LAYER = "layer"  # a LossLayer applied to (output, target)
    CALLABLE = "callable"  # a user callable: fn(output) or fn(output, target), may return a dict of parts
    REG = "reg"  # an L1/L2 regularization part, no output
    AUTO = "auto"  # "auto": chosen at binding from the module that produced the output

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Term:
    """One declared loss, immutable: what it reads, how it computes, its static weight.

    Terms are built by :func:`compile_spec` and completed by binding with :func:`dataclasses.replace`; nothing
    edits a term in place. ``kind`` is a :class:`TermKind` (a plain string naming one is converted; any other
    string is a ``ValueError``)."""

    name: str
    output: str | None
    kind: TermKind
    loss: Any = None  # LossLayer, callable, _Regularization or None
    scale: float = 1.0
    weight: float = 1.0
    target: str | None = None  # the key of its target (a batch key, or an output name for targets=callable)
    needs_target: bool = False
    use_producer_input: bool = False  # auto CE/BCE from the logits that entered a Softmax/Sigmoid module
    producer: str | None = None  # the module whose input is taken as logits when use_producer_input
    how: str = ""  # how the loss was chosen, for describe()
    parts: tuple[str, ...] = ()  # part names of a dict-returning callable, once known (else the term's name)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", TermKind(self.kind))

    @property
    def static_weight(self) -> float:
        return self.weight * self.scale

    @property
    def part_names(self) -> tuple[str, ...]:
        """The names this term reports its values under (its name, or a dict-returning callable's parts)."""
        return self.parts or (self.name,)

    def loss_name(self) -> str:
        if self.kind is TermKind.PORT:
            return "(output is the loss)"
        if self.kind is TermKind.REG:
            return repr(self.loss)
        if isinstance(self.loss, LossLayer):
            return self.loss.describe()
        return getattr(self.loss, "name", getattr(self.loss, "__name__", type(self.loss).__name__))


def callable_needs_target(fn: Any) -> bool:
    """Whether a loss callable takes a target: its number of required positional parameters (1 or 2)."""
    if isinstance(fn, CustomLoss):
        return fn.target
    if isinstance(fn, LossLayer):
        return fn.needs_target
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:  # builtins without signatures
        raise LossSpecError(
            f"cannot tell whether loss {fn!r} takes a target; wrap it: lossport.CustomLoss(fn, target=True)"
        ) from e
    required = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(required) in (1, 2):
        return len(required) == 2
    raise LossSpecError(
        f"loss callable {getattr(fn, '__name__', fn)!r} has {len(required)} required positional parameters; "
        "a loss takes (output) or (output, target). Declare it: lossport.CustomLoss(fn, target=True)"
    )


def _is_loss_like(spec: Any) -> bool:
    return (
        isinstance(spec, (LossLayer, CustomLoss))
        or is_torch_loss(spec)
        or (isinstance(spec, str) and spec in ALIASES)
        or (callable(spec) and not isinstance(spec, (str, type, nn.Module, _Regularization)))
    )


def _fmt(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


class _Compiler:
    def __init__(self, outputs: Sequence[str], structure: str, scalars: Sequence[str]) -> None:
        self.outputs = list(outputs)
        self.structure = structure
        self.scalars = list(scalars)
        self.terms: list[Term] = []

    # -- helpers -------------------------------------------------------------------------------------
    def err(self, msg: str) -> LossSpecError:
        return LossSpecError(f"{msg}\n  the net's outputs: {_fmt(self.outputs)}")

    def check_output(self, name: str) -> None:
        if name not in self.outputs:
            raise self.err(
                f"the loss spec names output {name!r}, but the net has no output of that name. "
                "Use one of the output names below"
            )

    def add(self, output: str | None, spec: Any, scale: float) -> None:
        """Add the term(s) for one output and one spec (not a list)."""
        if isinstance(spec, Scaled):
            return self.add(output, spec.spec, scale * spec.r)
        if spec is None:
            return None
        if isinstance(spec, _Regularization):
            self.terms.append(
                Term(name="", output=None, kind=TermKind.REG, loss=spec, scale=scale, how="regularization")
            )
            return None
        if output is None:
            raise self.err(f"internal: no output for spec {spec!r}")
        if isinstance(spec, str):
            if spec == "auto":
                self.terms.append(Term(name="", output=output, kind=TermKind.AUTO, scale=scale))
                return None
            if spec in ALIASES:
                layer = from_alias(spec)
                self.terms.append(
                    Term(
                        name="",
                        output=output,
                        kind=TermKind.LAYER,
                        loss=layer,
                        scale=scale,
                        needs_target=True,
                        how=f"alias {spec!r}",
                    )
                )
                return None
            raise self.err(
                f"output {output!r}: unknown loss {spec!r}; use one of {_fmt(ALIASES)}, 'auto', a loss layer, "
                "a callable, or None for no loss"
            )
        if isinstance(spec, (list, tuple)):
            for s in spec:
                self.add(output, s, scale)
            return None
        if isinstance(spec, dict):
            raise self.err(f"output {output!r}: a dict is not a loss; give a loss, an alias or a list of them")
        if _is_loss_like(spec):
            loss, how = self.loss_of(output, spec)
            kind = TermKind.LAYER if isinstance(loss, LossLayer) else TermKind.CALLABLE
            needs = callable_needs_target(loss)
            self.terms.append(
                Term(name="", output=output, kind=kind, loss=loss, scale=scale, needs_target=needs, how=how)
            )
            return None
        raise self.err(f"output {output!r}: cannot use {spec!r} as a loss; {_not_a_loss_hint(spec)}")

    def loss_of(self, output: str, spec: Any) -> tuple[Any, str]:
        """What a given loss turns into: a torch loss -> :class:`TorchLoss`, a Keras-order callable ->
        :class:`CustomLoss` calling ``fn(target, output)``, anything else unchanged; and how, for describe()."""
        try:
            tl = torch_loss(spec)
        except ValueError as e:
            raise self.err(f"output {output!r}: {e}") from e
        if tl is not None:
            if tl is spec or is_torch_loss(spec):
                return tl, "given"
            return tl, f"F.{getattr(spec, '__name__', spec)} run as {module_name(tl.inner)}()"
        if not isinstance(spec, (LossLayer, CustomLoss)) and callable_needs_target(spec) and keras_order(spec):
            return CustomLoss(spec, target=True), "given; Keras order (y_true, y_pred): called fn(target, output)"
        return spec, "given"

    # -- top-level forms ---------------------------------------------------------------------------
    def top(self, spec: Any, scale: float = 1.0) -> None:
        if isinstance(spec, Scaled):
            return self.top(spec.spec, scale * spec.r)
        if spec is None:
            raise self.err("no loss: loss=None. Give 'auto', an output name, a loss, a dict {output: loss} or a list")
        if isinstance(spec, str):
            if spec == "auto":
                others = [o for o in self.scalars if o != TOTAL_KEY]
                if TOTAL_KEY in self.scalars and others:
                    raise self.err(
                        f"'auto' takes every scalar output as a loss, but the net returns its own total "
                        f"{TOTAL_KEY!r} and other scalars ({_fmt(others)}): the total would count its components "
                        f"twice. Say which to train: loss={TOTAL_KEY!r} (the model's own total) or a list of the "
                        "components"
                    )
                if self.scalars:
                    for o in self.scalars:
                        self.terms.append(
                            Term(
                                name="", output=o, kind=TermKind.PORT, scale=scale, how="auto: scalar output is a loss"
                            )
                        )
                    return None
                for o in self.outputs:
                    self.terms.append(Term(name="", output=o, kind=TermKind.AUTO, scale=scale))
                return None
            if spec in self.outputs:
                if spec in ALIASES:
                    raise self.err(
                        f"{spec!r} is both an output name and a loss alias; write {{{spec!r}: 'mse'}} or "
                        f"[{spec!r}] with a pair ({spec!r}, None) to say which you mean"
                    )
                self.terms.append(Term(name="", output=spec, kind=TermKind.PORT, scale=scale, how="output is a loss"))
                return None
            if spec in ALIASES:
                return self.single(spec, scale)
            raise self.err(f"loss {spec!r} is neither an output name nor a loss alias ({_fmt(ALIASES)}) nor 'auto'")
        if isinstance(spec, _Regularization):
            return self.add(None, spec, scale)
        if isinstance(spec, Mapping):
            for k, v in spec.items():
                if not isinstance(k, str):
                    raise self.err(f"loss dict keys must be output names (strings), got {k!r}")
                if isinstance(v, _Regularization):
                    raise self.err(
                        f"loss dict key {k!r}: put L1/L2 in a list next to the dict, e.g. [{{...}}, lossport.L2(1e-4)]"
                    )
                self.check_output(k)
                self.add(k, v, scale)
            return None
        if isinstance(spec, (list, tuple)) and not _is_pair(spec):
            return self.listing(list(spec), scale)
        if _is_pair(spec):
            return self.listing([spec], scale)
        if _is_loss_like(spec):
            return self.single(spec, scale)
        raise self.err(f"cannot use {spec!r} as a loss spec; {_not_a_loss_hint(spec)}")

    def single(self, spec: Any, scale: float) -> None:
        if len(self.outputs) != 1:
            raise self.err(
                f"a single loss ({spec!r}) needs a net with exactly one output, but this net has "
                f"{len(self.outputs)}. Give one loss per output with a dict, e.g. "
                "{" + ", ".join(f"{o!r}: 'mse'" for o in self.outputs[:3]) + "}"
            )
        self.add(self.outputs[0], spec, scale)

    def listing(self, items: list[Any], scale: float) -> None:
        regs = [s for s in items if isinstance(_unscale(s), _Regularization)]
        rest = [s for s in items if not isinstance(_unscale(s), _Regularization)]
        named = all(_is_named_entry(s, self.outputs) for s in rest)
        if self.structure == "tuple" and rest and not named:
            if len(rest) != len(self.outputs):
                raise self.err(
                    f"a list of losses on a tuple-output net is matched by position and needs exactly one entry "
                    f"per output ({len(self.outputs)}), got {len(rest)}. Use None for an output with no loss"
                )
            for o, s in zip(self.outputs, rest):
                self.add(o, s, scale)
        elif len(self.outputs) == 1 and rest and not named:
            for s in rest:
                self.add(self.outputs[0], s, scale)
        else:
            for s in rest:
                self.named_entry(s, scale)
        for s in regs:
            self.top(s, scale)

    def named_entry(self, s: Any, scale: float) -> None:
        if isinstance(s, Scaled):
            return self.named_entry(s.spec, scale * s.r)
        if isinstance(s, str) and (s in self.outputs or s == "auto"):
            return self.top(s, scale)
        if _is_pair(s):
            o, inner = s
            self.check_output(o)
            return self.add(o, inner, scale)
        if isinstance(s, Mapping):
            return self.top(s, scale)
        raise self.err(
            f"list entry {s!r}: on a net with several outputs each entry must say its output: an output name, "
            "an (output, loss) pair or a dict {output: loss}"
        )


def _not_a_loss_hint(spec: Any) -> str:
    """How to fix a value that is not a loss spec."""
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return f"give an instance, {spec.__name__}(), not the class"
    if isinstance(spec, nn.Module):
        return (
            f"{type(spec).__name__} has no `reduction`, so it is not recognised as a torch loss; declare it: "
            "lossport.CustomLoss(module, target=True) calls module(output, target)"
        )
    return f"give an alias ({_fmt(ALIASES)}), 'auto', an output name, a loss layer, a torch.nn loss or a callable"


def _unscale(s: Any) -> Any:
    while isinstance(s, Scaled):
        s = s.spec
    return s


def _is_pair(s: Any) -> bool:
    return isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str) and s[0] not in ALIASES and s[0] != "auto"


def _is_named_entry(s: Any, outputs: Sequence[str]) -> bool:
    s = _unscale(s)
    return (isinstance(s, str) and s in outputs and s not in ALIASES) or _is_pair(s) or isinstance(s, Mapping)


def compile_spec(spec: Any, outputs: Sequence[str], *, structure: str, scalars: Sequence[str] = ()) -> list[Term]:
    """Turn a spec into named terms (``AUTO`` terms are resolved at binding, from :mod:`lossport.auto`).

    ``structure`` is ``"dict"``, ``"tuple"`` or ``"single"``; ``scalars`` the outputs that are scalars.
    """
    c = _Compiler(outputs, structure, scalars)
    c.top(spec)
    if not c.terms:
        raise c.err("the loss spec gives no loss at all (every output has None); nothing would be trained")
    return _name_terms(c.terms)


def _name_terms(terms: Sequence[Term]) -> list[Term]:
    """Part names: the output's name when it has one loss, ``output/<loss>`` when it has several, ``l1``/``l2``
    for regularization, ``_2``, ``_3``... for repeats. The name :data:`~lossport.result_types.TOTAL_KEY`
    (``"loss"``) belongs to the total: the parts of an output named ``loss`` are always ``loss/<loss>``
    (``loss/port`` when that output already is the loss), as if it had several losses."""
    per_output: dict[str | None, int] = {}
    for t in terms:
        per_output[t.output] = per_output.get(t.output, 0) + 1
    used: dict[str, int] = {}
    named = []
    for t in terms:
        if t.kind is TermKind.REG:
            base = "l1" if isinstance(t.loss, L1) else "l2"
        elif per_output[t.output] == 1 and t.output != TOTAL_KEY:
            base = str(t.output)
        else:
            base = f"{t.output}/{_short(t)}"
        n = used.get(base, 0) + 1
        used[base] = n
        named.append(replace(t, name=base if n == 1 else f"{base}_{n}"))
    return named


def _short(t: Term) -> str:
    if t.kind in (TermKind.PORT, TermKind.AUTO):
        return t.kind.value
    if isinstance(t.loss, TorchLoss):
        return type(t.loss.inner).__name__.lower()
    if isinstance(t.loss, LossLayer):
        return type(t.loss).__name__.lower()
    return str(getattr(t.loss, "name", getattr(t.loss, "__name__", "loss")))


def apply_weights(terms: Sequence[Term], weights: Any) -> list[Term]:
    """The terms with each non-regularization term's static weight from ``weights=`` (Keras ``loss_weights``):
    a number (exactly one loss), a list in declaration order, or a dict by part name."""
    losses = [t for t in terms if t.kind is not TermKind.REG]
    if weights is None:
        return list(terms)
    given = _weights_by_name(losses, weights)
    negative = {n: w for n, w in given.items() if w < 0}
    if negative:
        n, w = next(iter(negative.items()))
        raise LossSpecError(
            f"weights gives {_fmt(negative)} a negative weight ({n!r}: {w}), which would maximise that loss. If that "
            f"is what you want (an adversarial or gradient-reversal term), say so in the spec: Scaled(<its loss>, "
            f"{w}) for output {n.split('/')[0]!r}, and give it weight 1.0 here"
        )
    out = [replace(t, weight=given[t.name]) if t.name in given else t for t in terms]
    if losses and all(t.static_weight == 0 for t in out if t.kind is not TermKind.REG):
        raise LossSpecError(
            f"every loss has weight 0 ({_fmt([t.name for t in losses])}), so training would change nothing (the parts "
            "would only be reported). Give at least one loss a non-zero weight"
        )
    return out


def _weights_by_name(losses: Sequence[Term], weights: Any) -> dict[str, float]:
    names = [t.name for t in losses]
    if isinstance(weights, bool):
        raise LossSpecError("weights must be a number, a list or a dict, not a bool")
    if isinstance(weights, (int, float)):
        if len(losses) != 1:
            raise LossSpecError(
                f"a single number as weights needs exactly one loss, but there are {len(losses)}: {_fmt(names)}. "
                "Give a dict {name: weight} or a list in this order"
            )
        return {names[0]: float(weights)}
    if isinstance(weights, Mapping):
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise LossSpecError(
                f"weights names {_fmt(unknown)}, which are not losses of this objective; the losses are "
                f"{_fmt(names)}. Weights are matched by name, never by position or sorted order"
            )
        missing = [n for n in names if n not in weights]
        if missing:
            raise LossSpecError(
                f"weights gives no weight for {_fmt(missing)}; every loss needs one ({_fmt(names)}). "
                "Add them (1.0 for unchanged)"
            )
        return {n: _number(weights[n], n) for n in names}
    if isinstance(weights, (list, tuple)) or (isinstance(weights, Tensor) and weights.dim() == 1):
        ws = list(weights)
        if len(ws) != len(losses):
            raise LossSpecError(
                f"weights has {len(ws)} entries but there are {len(losses)} losses, in this order: {_fmt(names)}. "
                "Give one weight per loss, or a dict {name: weight}"
            )
        return {n: _number(w, n) for n, w in zip(names, ws)}
    raise LossSpecError(f"weights must be a number, a list or a dict {{name: weight}}, not {type(weights).__name__}")


def _number(w: Any, name: str) -> float:
    if isinstance(w, Tensor) and w.numel() == 1:
        w = w.item()
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise LossSpecError(f"the weight of {name!r} must be a number, got {w!r}")
    if w != w or w in (float("inf"), float("-inf")):
        raise LossSpecError(f"the weight of {name!r} is {w}; weights must be finite")
    return float(w)


__all__ = [
    "L1",
    "L2",
    "CustomLoss",
    "Scaled",
    "Term",
    "TermKind",
    "apply_weights",
    "callable_needs_target",
    "compile_spec",
    "keras_order",
]
