"""`Objective`: a net's outputs and a batch -> loss parts, weights and total.

::

    objective = lossport.Objective({"digit": "ce", "size": "mse"}, weights={"digit": 1.0, "size": 0.1})
    losses = objective(net, batch)        # forward + every part; compiled against the net at the first call
    losses.total.backward()               # sum_i w_i * L_i + regularization
    print(losses.as_dict())               # {'loss': ..., 'digit': ..., 'size': ..., 'weight/digit': 1.0, ...}

**Batches.** A dict: keys that are parameters of ``net.forward`` are inputs; the target of output ``y`` is
key ``y``; ``y_weight`` holds per-example sample weights of output ``y`` (shape (B,), or the target's shape).
A pair ``(x, y)``: ``x`` a tensor (one input), a tuple (positional inputs) or a dict (keyword inputs); ``y`` a
tensor for a single-output net, a tuple for a tuple-output net (outputs named ``out0``, ``out1``, ...), a dict
for a dict-output net. A missing target, a shape or dtype mismatch, or an input name that is also an output
name raises :class:`LossSpecError` before any backward, naming the output, the loss and what was expected.

**Missing labels.** NaN float targets and class targets equal to -100 are masked per example; a part is the
mean over its labelled examples (:mod:`lossport.losses`); a part with no labelled example in the batch is
left out of ``parts`` and listed in ``Losses.missing`` (not reported as 0).

**Balancing.** ``balance=`` takes a balancer or its name (:mod:`lossport.balance`); the returned ``Losses``
then carry the balanced weights. In a hand-written loop call ``objective.step(net, batch)`` after the
optimizer step (it runs the balancer's post-step update, e.g. FAMO's).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .auto import Producer, capture_inputs, choose, fit_torch_loss, producer_of, record_producers
from .distributed import global_losses, is_distributed
from .errors import LossSpecError
from .losses import CrossEntropy, TorchLoss, _may_be_missing, port_loss
from .result_types import Losses
from .spec import RESERVED, Term, _Regularization, apply_weights, compile_spec

Batch = Mapping[str, Any] | Sequence[Any]


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


def name_outputs(out: Any) -> tuple[dict[str, Tensor], str]:
    """The net's outputs by name, and their structure: ``"dict"``, ``"tuple"`` or ``"single"``."""
    if isinstance(out, Tensor):
        return {"out": out}, "single"
    if isinstance(out, Mapping):
        named: dict[str, Tensor] = {}
        for k, v in out.items():
            if v is None:
                continue
            if not isinstance(k, str):
                raise LossSpecError(f"the net returned a dict with a non-string key {k!r}; use string keys")
            if not isinstance(v, Tensor):
                raise LossSpecError(
                    f"output {k!r} is a {type(v).__name__}, not a tensor; return tensors (or nest them as 'a/b' keys)"
                )
            named[k] = v
        return named, "dict"
    if isinstance(out, (tuple, list)):
        named = {}
        for i, v in enumerate(out):
            if not isinstance(v, Tensor):
                raise LossSpecError(f"output {i} of the tuple is a {type(v).__name__}, not a tensor")
            named[f"out{i}"] = v
        return named, "tuple"
    raise LossSpecError(
        f"the net returned a {type(out).__name__}; lossport needs a tensor, a tuple or a dict of tensors"
    )


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


def _count_labelled(target: Tensor | None, batch_size: int) -> int:
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


class Objective:
    """Loss declaration for a net with one or several outputs (see the module docstring).

    Args:
        loss: the loss spec (:mod:`lossport.spec`): ``"auto"`` (default), an output name, a loss, a dict
            ``{output: spec}``, a list, ``Scaled``, ``L1``/``L2``.
        weights: static weights (Keras ``loss_weights``): a list in declaration order, a dict by loss name, or a
            number for a single loss. Validated against the loss names.
        balance: a balancer or its name (``"uw"``, ``"famo"``, ``"upgrad"``, ...); ``None`` keeps the static
            weights.
    """

    def __init__(self, loss: Any = "auto", *, weights: Any = None, balance: Any = None) -> None:
        from .balance import resolve

        self.spec = loss
        self.weight_spec = weights
        self.balancer = resolve(balance)
        self.terms: list[Term] | None = None
        self.structure: str | None = None
        self.output_names: list[str] = []
        self._producers: dict[str, str] = {}  # output -> producer module name, for auto CE/BCE from logits
        self._compiled_for: int | None = None

    # -- compilation --------------------------------------------------------------------------------
    @property
    def compiled(self) -> bool:
        return self.terms is not None

    @property
    def part_names(self) -> list[str]:
        """Names of the loss parts (before any dict-returning loss is first evaluated, its term name)."""
        self._need_compiled()
        assert self.terms is not None
        names: list[str] = []
        for t in self.terms:
            if t.kind != "reg":
                names.extend(t.parts or [t.name])
        return names

    @property
    def static_weights(self) -> dict[str, float]:
        """The static weight of every part (``weights=`` times ``Scaled``)."""
        self._need_compiled()
        assert self.terms is not None
        return {p: t.static_weight for t in self.terms if t.kind != "reg" for p in (t.parts or [t.name])}

    @property
    def extra_names(self) -> list[str]:
        self._need_compiled()
        assert self.terms is not None
        return [t.name for t in self.terms if t.kind == "reg"]

    def _need_compiled(self) -> None:
        if self.terms is None:
            raise RuntimeError(
                "the objective is compiled at its first call: objective(net, batch) or .compile(net, batch)"
            )

    def compile(self, net: nn.Module, batch: Batch) -> Objective:
        """Bind the spec to the net's outputs with one forward pass on ``batch`` (eval mode, grad enabled, so
        the automatic choice sees the producing modules and functional ops). Called by the first ``__call__``."""
        inner = unwrap(net)
        args, kwargs = self._inputs(inner, batch, outputs_known=False)
        was_training = inner.training
        inner.eval()
        try:
            # the inner module, not a DDP wrapper: DDP replaces output tensors and would expect a backward
            with torch.enable_grad(), record_producers(inner) as seen:
                out = inner(*args, **kwargs)
            outputs, structure = name_outputs(out)
            producers = {k: producer_of(v, seen) for k, v in outputs.items()}
        finally:
            inner.train(was_training)
        scalars = [k for k, v in outputs.items() if v.dim() == 0]
        terms = compile_spec(self.spec, list(outputs), structure=structure, scalars=scalars)
        self._producers = {}
        for t in terms:
            if t.kind == "auto":
                assert t.output is not None
                if outputs[t.output].dim() == 0:
                    t.kind, t.how = "port", "auto: scalar output is a loss"
                    continue
                layer, from_input, how = choose(producers[t.output])
                t.how = how
                if layer is None:
                    t.kind = "port"
                else:
                    t.kind, t.loss, t.needs_target, t.use_producer_input = "layer", layer, True, from_input
                    if from_input:
                        name = producers[t.output].module_name
                        assert name is not None
                        self._producers[t.output] = name
            elif t.kind == "layer" and isinstance(t.loss, CrossEntropy) and t.output is not None:
                self._fit_cross_entropy(t, producers[t.output])
            elif t.kind == "layer" and isinstance(t.loss, TorchLoss) and t.output is not None:
                t.loss, from_input, fitted = fit_torch_loss(t.output, t.loss, producers[t.output])
                t.how, t.use_producer_input = t.how + fitted, from_input
                if from_input:
                    self._producers[t.output] = str(producers[t.output].module_name)
            if t.kind in ("layer", "callable") and t.needs_target:
                t.target = t.output
        reserved = [t.name for t in terms if t.name in RESERVED]
        if reserved and len(terms) > 1:
            raise LossSpecError(
                "a part named 'loss' would be confused with the total 'loss' when there are several parts "
                f"({', '.join(t.name for t in terms)}); rename that output of the net (e.g. 'lm_loss')"
            )
        apply_weights(terms, self.weight_spec)
        params, _, _ = forward_parameters(inner)
        clash = [t.target for t in terms if t.target is not None and t.target in params]
        if clash:
            raise LossSpecError(
                f"output {clash[0]!r} takes its target from batch key {clash[0]!r}, which is also an input of "
                f"net.forward {tuple(params)}; rename the output or the forward parameter"
            )
        self.terms, self.structure, self.output_names = terms, structure, list(outputs)
        self._compiled_for = id(inner)
        if self.balancer is not None:
            self.balancer.attach(inner)
        return self

    def _fit_cross_entropy(self, t: Term, producer: Producer) -> None:
        """Make a cross-entropy term agree with what its output holds.

        The aliases ``"ce"``/``"bce"`` adapt: on an ``nn.Softmax``/``nn.Sigmoid`` output they use the logits that
        entered it (stable), on a functional softmax/sigmoid the probabilities. A :class:`CrossEntropy` layer
        given explicitly is taken at its word, except that ``from_logits=True`` on an output that holds
        probabilities is an error (it would train silently on the wrong loss)."""
        assert isinstance(t.loss, CrossEntropy) and t.output is not None
        probs = {"softmax": "index", "sigmoid": "binary", "fn_softmax": "index", "fn_sigmoid": "binary"}
        form = probs.get(producer.kind)
        if form is None or t.loss.form == "probabilities" and form == "binary" or not t.loss.from_logits:
            return
        where = producer.module_name or "torch." + producer.kind[3:]
        if not t.how.startswith("alias"):
            raise LossSpecError(
                f"output {t.output!r} holds probabilities (produced by {where!r}) but its loss {t.loss_name()} "
                "expects logits; use 'auto' or the alias ('ce'/'bce'), which take the logits before the "
                "activation, or CrossEntropy(..., from_logits=False)"
            )
        if form == "index":  # the softmax's dim, functional or module, is where the classes are
            t.loss.class_dim = producer.dim
        if producer.kind in ("softmax", "sigmoid"):
            assert producer.module_name is not None
            t.use_producer_input = True
            self._producers[t.output] = producer.module_name
            t.how += f", from the logits entering {producer.module_name!r}"
        else:
            t.loss.from_logits = False
            t.how += f", from the probabilities of {where}"

    # -- batches ------------------------------------------------------------------------------------
    def _inputs(self, inner: nn.Module, batch: Batch, outputs_known: bool = True) -> tuple[tuple, dict]:
        if isinstance(batch, Mapping):
            names, required, var_kw = forward_parameters(inner)
            missing = [n for n in required if n not in batch]
            if missing:
                raise LossSpecError(
                    f"net.forward needs input {missing[0]!r}, but the batch has keys {sorted(batch)}; "
                    f"name the batch keys after forward's parameters {tuple(names)}"
                )
            if var_kw:
                skip = set(self.output_names) | {f"{o}_weight" for o in self.output_names}
                kwargs = {k: v for k, v in batch.items() if k not in skip}
            else:
                kwargs = {k: batch[k] for k in names if k in batch}
            return (), kwargs
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

    def targets(self, batch: Batch) -> dict[str, Any]:
        """The batch's targets and sample weights by key (``y`` and ``y_weight``)."""
        if isinstance(batch, Mapping):
            return dict(batch)
        y = batch[1]
        if isinstance(y, Mapping):
            return dict(y)
        if self.structure == "single" or isinstance(y, Tensor):
            if len(self.output_names) != 1:
                raise LossSpecError(
                    f"the batch gives one target tensor but the net has {len(self.output_names)} outputs "
                    f"({', '.join(self.output_names)}); give a tuple or a dict of targets"
                )
            return {self.output_names[0]: y}
        if isinstance(y, (tuple, list)):
            if len(y) != len(self.output_names):
                raise LossSpecError(
                    f"the batch gives {len(y)} targets for {len(self.output_names)} outputs "
                    f"({', '.join(self.output_names)}); give one per output (None where there is none)"
                )
            return {o: t for o, t in zip(self.output_names, y) if t is not None}
        raise LossSpecError(f"cannot read targets from a {type(y).__name__}")

    # -- evaluation ---------------------------------------------------------------------------------
    def forward(self, net: nn.Module, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Run the net: (outputs by name, logits captured for automatic CE/BCE by output)."""
        if self.terms is None or self._compiled_for != id(unwrap(net)):
            self.compile(net, batch)
        inner = unwrap(net)
        args, kwargs = self._inputs(inner, batch)
        if not self._producers:
            outputs, _ = name_outputs(net(*args, **kwargs))
            return outputs, {}
        wanted = {m: inner.get_submodule(m) for m in self._producers.values()}
        with capture_inputs(wanted) as got:
            out = net(*args, **kwargs)
        outputs, _ = name_outputs(out)
        logits: dict[str, Tensor] = {}
        for o, mname in self._producers.items():
            if o in outputs:
                calls = got[mname]
                x = calls.get(id(outputs[o]))
                if x is None and len(calls) == 1:  # a wrapper (DDP) replaced the output tensor
                    x = next(iter(calls.values()))
                if x is None:
                    raise LossSpecError(
                        f"output {o!r} was produced by {mname!r} when the objective was compiled but not in this "
                        "forward; give its loss explicitly"
                    )
                logits[o] = x
        return outputs, logits

    def losses(
        self,
        outputs: Mapping[str, Tensor],
        batch: Batch,
        *,
        net: nn.Module | None = None,
        logits: Mapping[str, Tensor] | None = None,
        per_example: bool = False,
    ) -> Losses:
        """The unbalanced loss parts from already computed outputs (static weights applied)."""
        self._need_compiled()
        assert self.terms is not None
        targets = self.targets(batch)
        logits = logits or {}
        parts: dict[str, Tensor] = {}
        weights: dict[str, Tensor | float] = {}
        extra: dict[str, Tensor] = {}
        missing: list[str] = []
        counts: dict[str, int] = {}
        examples: dict[str, Tensor] = {}
        bsize = _batch_size(outputs, targets)
        for t in self.terms:
            if t.kind == "reg":
                if net is None:
                    raise RuntimeError("regularization parts need the net: objective.losses(..., net=net)")
                extra[t.name] = t.static_weight * _reg_value(t.loss, unwrap(net))
                continue
            assert t.output is not None
            if t.output not in outputs:
                raise LossSpecError(f"output {t.output!r} is not among this batch's outputs {sorted(outputs)}")
            y_hat = outputs[t.output]
            target = None
            if t.needs_target:
                target = _get_target(t, targets, self.output_names)
            sw = targets.get(f"{t.output}_weight")
            if t.kind == "port":
                values: dict[str, tuple[Tensor, Tensor | None]] = {
                    t.name: port_loss(t.name, y_hat, _batch_size(targets, outputs), sw)
                }
            elif t.kind == "layer":
                x = logits.get(t.output, y_hat) if t.use_producer_input else y_hat
                values = {t.name: _call_layer(t, x, target, sw, per_example)}
            else:
                values = _call_fn(t, y_hat, target, sw)
            if len(values) > 1 or next(iter(values)) != t.name:
                t.parts = list(values)
            n = _count_labelled(target, bsize)
            for name, (v, ex) in values.items():
                if name in parts:
                    raise LossSpecError(f"two losses are named {name!r}; rename the keys your loss returns")
                if n == 0:
                    missing.append(name)
                    continue
                parts[name] = v
                weights[name] = t.static_weight
                counts[name] = n
                if ex is not None:
                    examples[name] = ex.detach()
        return Losses(
            parts=parts,
            weights=weights,
            extra=extra,
            missing=tuple(missing),
            counts=counts,
            outputs=dict(outputs),
            per_example=examples,
        )

    def __call__(self, net: nn.Module, batch: Batch, *, per_example: bool = False) -> Losses:
        """Forward ``batch`` through ``net`` and return its loss parts, weights and total (balanced if a
        balancer was given)."""
        losses = self._evaluate(net, batch, per_example=per_example)
        if self.balancer is not None and losses.parts:
            losses = self.balancer(losses)
        return losses

    def evaluate(self, net: nn.Module, batch: Batch, *, per_example: bool = False) -> Losses:
        """The unweighted parts of ``batch`` (forward included), without the balancer: what ``__call__`` gives
        before the balancer sets the weights."""
        return self._evaluate(net, batch, per_example=per_example)

    def _evaluate(self, net: nn.Module, batch: Batch, *, per_example: bool = False) -> Losses:
        """Forward and parts; under torchrun the parts are the global batch's (:mod:`lossport.distributed`)."""
        outputs, logits = self.forward(net, batch)
        losses = self.losses(outputs, batch, net=net, logits=logits, per_example=per_example)
        if is_distributed():
            losses = global_losses(losses, self.part_names, self.static_weights)
        return losses

    def step(self, net: nn.Module, batch: Batch) -> None:
        """After ``optimizer.step()``: the balancer's post-step update (FAMO re-evaluates the batch)."""
        if self.balancer is None:
            return

        def recompute() -> Losses:
            with torch.no_grad():
                return self._evaluate(net, batch)

        self.balancer.step(recompute)

    def describe(self) -> str:
        """One line per part: name, output, loss and how it was chosen, static weight, target key."""
        self._need_compiled()
        assert self.terms is not None
        rows = [("part", "output", "loss", "weight", "target")]
        for t in self.terms:
            loss = t.loss_name() + (f"  [{t.how}]" if t.how else "")
            rows.append((t.name, t.output or "-", loss, f"{t.static_weight:g}", t.target or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
        if self.balancer is not None:
            lines.append(f"balanced by {self.balancer!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = f"{len(self.terms)} terms" if self.terms is not None else "not compiled"
        return f"Objective({self.spec!r}, weights={self.weight_spec!r}, {state})"


def _batch_size(outputs: Mapping[str, Tensor], targets: Mapping[str, Any]) -> int:
    for v in list(outputs.values()) + [v for v in targets.values() if isinstance(v, Tensor)]:
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def _get_target(t: Term, targets: Mapping[str, Any], outputs: Sequence[str]) -> Tensor:
    key = t.target or t.output
    assert key is not None
    if key not in targets or targets[key] is None:
        avail = sorted(k for k in targets if isinstance(k, str))
        raise LossSpecError(
            f"output {t.output!r} has loss {t.loss_name()} which needs a target, but the batch has no key {key!r} "
            f"(batch keys: {avail}). Add the targets under {key!r}, or give output {t.output!r} a loss without "
            "target (or None)"
        )
    y = targets[key]
    if not isinstance(y, Tensor):
        y = torch.as_tensor(y)
    return y


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


def _call_fn(
    t: Term, y_hat: Tensor, target: Tensor | None, sw: Tensor | None
) -> dict[str, tuple[Tensor, Tensor | None]]:
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


def _reg_value(reg: _Regularization, net: nn.Module) -> Tensor:
    return reg.value(net)


__all__ = ["Objective", "Losses", "name_outputs", "unwrap"]
