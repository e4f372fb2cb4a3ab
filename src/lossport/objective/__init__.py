"""`Objective`: a net's outputs and a batch -> loss parts, weights and total.

::

    objective = lossport.Objective({"digit": "ce", "size": "mse"}, weights={"digit": 1.0, "size": 0.1})
    losses = objective(net, batch)        # forward + every part; bound to the net at the first call
    losses.total.backward()               # sum_i w_i * L_i + regularization
    print(losses.as_dict())               # {'loss': ..., 'digit': ..., 'size': ..., 'weight/digit': 1.0, ...}

The package has one module per job: :mod:`~lossport.objective.outputs` (naming what the net returns),
:mod:`~lossport.objective.batch` (inputs, targets, labelled counts), :mod:`~lossport.objective.binding` (spec + net
+ first batch -> an immutable plan of terms), :mod:`~lossport.objective.evaluation` (plan + outputs + batch ->
``Losses``); :class:`Objective` is the facade.

**Binding.** At the first call the spec is bound to the net's outputs with one side-effect-free forward pass **in
the mode the net is in**. If the plan was bound in evaluation mode and the net, now training, returns outputs the
plan never saw (auxiliary heads, a detection model's loss dict), the objective binds again in training mode: the
losses are defined by training mode. Outputs the plan expects that a forward does not return (auxiliary heads in
evaluation) are absent: their parts are listed in ``Losses.missing``, like parts without labels, never an error.
In a mode other than the plan's, a lone tensor is the plan's first output (torchvision's GoogLeNet and Inception v3
return their main logits alone in evaluation).

**Output names** (:mod:`~lossport.objective.outputs`): dict keys (also of a Hugging Face ``ModelOutput``),
namedtuple and dataclass fields, ``out0, out1, ...`` for a tuple of at most 8 values, ``out`` for a tensor;
a nested dict or list is named ``parent/child``.

**Batches and targets** (:mod:`~lossport.objective.batch`): a dict (keys that are parameters of ``net.forward``
are inputs, the target of output ``y`` is key ``y``, ``y_weight`` its per-example sample weights) or a pair
``(x, y)``. ``targets=`` reads targets from other keys (``{output: key}``, one key for every supervised output,
or a callable ``batch -> {output: target}``); a single supervised output with no key of its own reads
``labels``. A missing target, a shape or dtype mismatch, or an input name that is also an output name raises
:class:`LossSpecError` before any backward, naming the output, the loss and what was expected.

**Missing labels.** NaN float targets and class targets equal to -100 are masked per example; a part is the
mean over its labelled examples (:mod:`lossport.losses`); a part with no labelled example in the batch is
left out of ``parts`` and listed in ``Losses.missing`` (not reported as 0).

**The total.** ``loss`` is the total's key everywhere (:data:`lossport.result_types.TOTAL_KEY`); the parts of an
output named ``loss`` are ``loss/<loss>`` (``loss/port`` when it already is the loss).

**Balancing.** ``balance=`` takes a balancer or its name (:mod:`lossport.balance`); the returned ``Losses``
then carry the balanced weights. In a hand-written loop call ``objective.step(net, batch)`` after the
optimizer step (it runs the balancer's post-step update, e.g. FAMO's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import global_losses, is_distributed
from ..fsdp import is_fsdp, tie_to_outputs
from ..result_types import Losses
from ..spec import Term, TermKind
from .batch import Batch, check_targets_arg, forward_parameters, target_source, unwrap
from .binding import Plan, bind
from .evaluation import evaluate_terms, logits_of, named_outputs, run_forward
from .outputs import name_outputs


class Objective:
    """Loss declaration for a net with one or several outputs (see the module docstring).

    Args:
        loss: the loss spec (:mod:`lossport.spec`): ``"auto"`` (default), an output name, a loss, a dict
            ``{output: spec}``, a list, ``Scaled``, ``L1``/``L2``.
        weights: static weights (Keras ``loss_weights``): a list in declaration order, a dict by loss name, or a
            number for a single loss. Validated against the loss names.
        balance: a balancer or its name (``"uw"``, ``"famo"``, ``"upgrad"``, ...); ``None`` keeps the static
            weights.
        targets: where targets are read (:mod:`lossport.objective.batch`): ``None`` (key = output name, or
            ``labels`` for a single supervised output), a key for every supervised output, a dict
            ``{output: key}``, or a callable ``batch -> {output: target}``.
    """

    def __init__(self, loss: Any = "auto", *, weights: Any = None, balance: Any = None, targets: Any = None) -> None:
        from ..balance import resolve

        self.spec = loss
        self.weight_spec = weights
        self.target_spec = check_targets_arg(targets)
        self.balancer = resolve(balance)
        self.plan: Plan | None = None

    # -- the plan -----------------------------------------------------------------------------------
    @property
    def compiled(self) -> bool:
        """Whether the objective is bound to a net (at its first call)."""
        return self.plan is not None

    @property
    def terms(self) -> list[Term] | None:
        """The bound terms (immutable), or ``None`` before the first call."""
        return None if self.plan is None else list(self.plan.terms)

    @property
    def structure(self) -> str | None:
        return None if self.plan is None else self.plan.structure

    @property
    def output_names(self) -> list[str]:
        return [] if self.plan is None else list(self.plan.output_names)

    @property
    def part_names(self) -> list[str]:
        """Names of the loss parts (before any dict-returning loss is first evaluated, its term name)."""
        return self._need_plan().part_names

    @property
    def static_weights(self) -> dict[str, float]:
        """The static weight of every part (``weights=`` times ``Scaled``)."""
        return self._need_plan().static_weights

    @property
    def extra_names(self) -> list[str]:
        return self._need_plan().extra_names

    def _need_plan(self) -> Plan:
        if self.plan is None:
            raise RuntimeError(
                "the objective is bound at its first call: objective(net, batch) or .compile(net, batch)"
            )
        return self.plan

    def compile(self, net: nn.Module, batch: Batch) -> Objective:
        """Bind the spec to the net's outputs with one forward pass of ``batch`` in the net's current mode
        (:mod:`lossport.objective.binding`). Called by the first ``__call__``."""
        if self.balancer is not None:
            from ..fsdp import check_balancer, is_sharded

            if is_sharded(unwrap(net)):  # before the first step: what cannot run sharded says so
                check_balancer(self.balancer)
        self.plan = bind(self.spec, self.weight_spec, self.target_spec, net, batch)
        if self.balancer is not None:
            self.balancer.attach(unwrap(net))
        return self

    # -- batches ------------------------------------------------------------------------------------
    def _skip(self) -> set[str]:
        """Batch keys a ``**kwargs`` forward must not get: targets and sample weights."""
        plan = self._need_plan()
        return set(plan.output_names) | set(plan.target_keys.values()) | {f"{o}_weight" for o in plan.output_names}

    def targets(self, batch: Batch) -> dict[str, Any]:
        """The batch's targets by output name (``y``), and sample weights (``y_weight``), as the plan reads them."""
        plan = self._need_plan()
        source = target_source(batch, self.target_spec, plan.structure, list(plan.output_names))
        out = {o: source[k] for o, k in plan.target_keys.items() if source.get(k) is not None}
        out.update({f"{o}_weight": source[f"{o}_weight"] for o in plan.output_names if f"{o}_weight" in source})
        return out

    # -- evaluation ---------------------------------------------------------------------------------
    def forward(self, net: nn.Module, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Run the net: (outputs by name, logits captured for automatic CE/BCE by output)."""
        inner = unwrap(net)
        if self.plan is None or self.plan.net_id != id(inner):
            self.compile(net, batch)
        plan = self._need_plan()
        out, got = run_forward(plan, net, batch, self._skip())
        outputs = named_outputs(plan, out, inner.training)
        if inner.training and not plan.training and not set(outputs) <= set(plan.output_names):
            self.compile(net, batch)  # bound in evaluation; training mode has more outputs and defines the losses
            return self.forward(net, batch)
        return outputs, logits_of(plan, outputs, got)

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
        plan = self._need_plan()
        source = target_source(batch, self.target_spec, plan.structure, list(plan.output_names))
        losses, found = evaluate_terms(
            plan,
            outputs,
            source,
            net=net,
            logits=logits or {},
            per_example=per_example,
            source_name="targets(batch)" if callable(self.target_spec) else "the batch",
        )
        if found:
            self.plan = plan.with_parts(found)
        return losses

    def evaluate(self, net: nn.Module, batch: Batch, *, per_example: bool = False) -> Losses:
        """Forward ``batch`` and compute the parts with the static weights (no balancer); under torchrun the parts
        are the global batch's (:mod:`lossport.distributed`)."""
        outputs, logits = self.forward(net, batch)
        losses = self.losses(outputs, batch, net=net, logits=logits, per_example=per_example)
        if is_distributed():
            losses = global_losses(losses, self.part_names, self.static_weights)
        if is_fsdp(unwrap(net)):  # FSDP2: every part's backward enters its output's hooks (lossport.fsdp)
            losses = tie_to_outputs(losses)
        return losses

    def __call__(self, net: nn.Module, batch: Batch, *, per_example: bool = False, context: Any = None) -> Losses:
        """Forward ``batch`` through ``net`` and return its loss parts, weights and total (balanced if a
        balancer was given; ``context``: the :class:`~lossport.balance.Context` of a balancer that needs extra
        batches or a meta batch)."""
        losses = self.evaluate(net, batch, per_example=per_example)
        if self.balancer is not None and losses.parts:
            losses = self.balancer(losses, context)
        return losses

    def step(self, net: nn.Module, batch: Batch) -> None:
        """After ``optimizer.step()``: the balancer's post-step update (FAMO re-evaluates the batch)."""
        if self.balancer is None:
            return

        def recompute() -> Losses:
            with torch.no_grad():
                return self.evaluate(net, batch)

        self.balancer.step(recompute)

    def describe(self) -> str:
        """One line per part: name, output, loss and how it was chosen, static weight, target key."""
        plan = self._need_plan()
        rows = [("part", "output", "loss", "weight", "target")]
        for t in plan.terms:
            loss = t.loss_name() + (f"  [{t.how}]" if t.how else "")
            rows.append((t.name, t.output or "-", loss, f"{t.static_weight:g}", t.target or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
        lines.append(f"bound in {'training' if plan.training else 'evaluation'} mode")
        if self.balancer is not None:
            lines.append(f"balanced by {self.balancer!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = f"{len(self.plan.terms)} terms" if self.plan is not None else "not compiled"
        return f"Objective({self.spec!r}, weights={self.weight_spec!r}, {state})"


__all__ = ["Losses", "Objective", "Plan", "Term", "TermKind", "forward_parameters", "name_outputs", "unwrap"]
