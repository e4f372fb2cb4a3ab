"""Automatic loss choice from the module that produced an output (Wolfram's rule, in PyTorch).

During one forward pass lossport records, with forward hooks, which module returned each output tensor
(the innermost module whose forward returned that very tensor). Then, for each output:

==========================================  =====================================================================
producer                                     loss
==========================================  =====================================================================
``nn.Softmax(dim)``                          cross-entropy on class indices, computed from the *logits that entered
                                             the softmax* (log-softmax, stable for extreme logits), classes on ``dim``
``nn.LogSoftmax(dim)``                       cross-entropy on class indices from the log-probabilities
``nn.Sigmoid``                               binary cross-entropy from the logits that entered the sigmoid
:class:`lossport.losses.PairDistance`        contrastive loss (margin 0.5)
a :class:`lossport.losses.LossLayer`         the output already is a loss (used unchanged)
no module, ``torch.softmax`` in the graph    cross-entropy on class indices from the probabilities (clamped log;
                                             use ``nn.Softmax`` for the stable form)
no module, ``torch.sigmoid`` in the graph    binary cross-entropy from the probabilities (clamped log)
anything else                                mean squared error
==========================================  =====================================================================

``objective.describe()`` prints what was chosen for each output. A ``torch.nn`` cross-entropy given explicitly
(``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss``, ``F.cross_entropy``, ...) is fitted to its output's producer
the same way (:func:`fit_torch_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from .errors import LossSpecError
from .losses import MSE, Contrastive, CrossEntropy, LossLayer, PairDistance, TorchLoss, module_name


@dataclass
class Producer:
    """The module (by qualified name) that returned an output, and the kind of loss it implies."""

    module_name: str | None
    kind: str
    """softmax, logsoftmax, sigmoid, pair, loss, fn_softmax, fn_logsoftmax, fn_sigmoid or other."""
    dim: int = 1


def _kind_of(module: nn.Module) -> str:
    if isinstance(module, nn.Softmax):
        return "softmax"
    if isinstance(module, nn.LogSoftmax):
        return "logsoftmax"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, PairDistance):
        return "pair"
    if isinstance(module, LossLayer):
        return "loss"
    return "other"


@contextmanager
def record_producers(net: nn.Module) -> Iterator[dict[int, tuple[str, nn.Module, Tensor]]]:
    """Within the block, map ``id(output tensor)`` -> (module name, module, output) for every module call."""
    seen: dict[int, tuple[str, nn.Module, Tensor]] = {}
    handles = []

    def make(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(mod: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, Tensor) and id(out) not in seen:
                seen[id(out)] = (name, mod, out)

        return hook

    for name, mod in net.named_modules():
        handles.append(mod.register_forward_hook(make(name)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def producer_of(out: Tensor, seen: dict[int, tuple[str, nn.Module, Tensor]]) -> Producer:
    """Classify the producer of ``out`` from the hook records (and the autograd graph for functional ops)."""
    rec = seen.get(id(out))
    if rec is not None:
        name, mod, _ = rec
        kind = _kind_of(mod)
        if kind != "other":
            dim = getattr(mod, "dim", 1)
            dim = 1 if dim is None else dim
            return Producer(name, kind, dim % out.dim() if out.dim() else 0)
    fn = out.grad_fn
    fname = type(fn).__name__ if fn is not None else ""
    if fname.startswith("SoftmaxBackward"):
        return Producer(None, "fn_softmax", _saved_dim(fn) % max(out.dim(), 1))
    if fname.startswith("LogSoftmaxBackward"):
        return Producer(None, "fn_logsoftmax", _saved_dim(fn) % max(out.dim(), 1))
    if fname.startswith("SigmoidBackward"):
        return Producer(None, "fn_sigmoid")
    return Producer(rec[0] if rec else None, "other")


def _saved_dim(fn: object) -> int:
    """The dim a functional softmax saved for backward; autograd exposes it as an unsigned 64-bit integer, so
    ``dim=-1`` reads 2**64 - 1 (which modulo 3 would wrongly give dim 0 for a 3-d output)."""
    d = int(getattr(fn, "_saved_dim", 1))
    return d - 2**64 if d >= 2**63 else d


def choose(producer: Producer) -> tuple[LossLayer | None, bool, str]:
    """(loss layer or None for 'already a loss', use the producer's input as logits?, description)."""
    k = producer.kind
    where = f"produced by {producer.module_name!r}" if producer.module_name else "functional op"
    if k == "softmax":
        return CrossEntropy("index", from_logits=True, class_dim=producer.dim), True, f"auto: Softmax {where} -> CE"
    if k == "logsoftmax":
        return (
            CrossEntropy("index", from_logits=True, class_dim=producer.dim),
            False,
            f"auto: LogSoftmax {where} -> CE",
        )
    if k == "sigmoid":
        return CrossEntropy("binary", from_logits=True), True, f"auto: Sigmoid {where} -> binary CE"
    if k == "pair":
        return Contrastive(), False, f"auto: PairDistance {where} -> contrastive"
    if k == "loss":
        return None, False, f"auto: loss layer {where} -> used as the loss"
    if k == "fn_softmax":
        return (
            CrossEntropy("index", from_logits=False, class_dim=producer.dim),
            False,
            "auto: torch.softmax -> CE from probabilities (use nn.Softmax for the stable form)",
        )
    if k == "fn_logsoftmax":
        return CrossEntropy("index", from_logits=True, class_dim=producer.dim), False, "auto: log_softmax -> CE"
    if k == "fn_sigmoid":
        return (
            CrossEntropy("binary", from_logits=False),
            False,
            "auto: torch.sigmoid -> binary CE from probabilities (use nn.Sigmoid for the stable form)",
        )
    return MSE(), False, "auto: MSE" + (f" ({where})" if producer.module_name else "")


_MAKES = {"softmax": "index", "fn_softmax": "index", "sigmoid": "binary", "fn_sigmoid": "binary"}


def fit_torch_loss(output: str, loss: TorchLoss, producer: Producer) -> tuple[TorchLoss, bool, str]:
    """Fit a torch loss to the output it is given: (loss, use the producer's input?, how, for describe()).

    ``nn.CrossEntropyLoss`` and ``nn.BCEWithLogitsLoss`` expect logits. On an ``nn.Softmax``/``nn.Sigmoid``
    output they get the logits that entered it (classes on the softmax's dim), as the ``"ce"``/``"bce"``
    aliases do; on a functional ``torch.softmax``/``torch.sigmoid`` output, ``log p`` / ``logit p`` (the same
    loss of the probabilities, clamped). A softmax output under BCE-with-logits, a sigmoid output under
    cross-entropy, and probabilities under a loss of log-probabilities (``nn.NLLLoss``, ``nn.KLDivLoss``) are
    errors. Other losses and producers are left as they are.
    """
    expects, makes = loss.expects, _MAKES.get(producer.kind)
    if expects is None or makes is None:
        return loss, False, ""
    where = producer.module_name or "torch." + producer.kind[3:]
    if makes != expects:
        raise LossSpecError(_mismatch(output, loss, where, makes, expects))
    class_dim = producer.dim if makes == "index" else None
    if producer.kind in ("softmax", "sigmoid"):
        return loss.adapted(class_dim=class_dim), True, f", from the logits entering {where!r}"
    prepare = "log" if makes == "index" else "logit"
    how = f", from the {prepare} of the probabilities of {where}"
    return loss.adapted(class_dim=class_dim, prepare=prepare), False, how


def _mismatch(output: str, loss: TorchLoss, where: str, makes: str, expects: str) -> str:
    act = "softmax" if makes == "index" else "sigmoid"
    wants = {
        "index": "class scores (logits) for a softmax",
        "binary": "logits for a sigmoid",
        "log": "log-probabilities",
    }[expects]
    if expects == "log":
        fix = "end the net with nn.LogSoftmax, or use nn.CrossEntropyLoss() (lossport then takes the logits)"
    else:
        fix = "use nn.BCELoss() (it takes probabilities)" + (" or 'bce'" if act == "sigmoid" else "")
        fix += ", or an output with the activation the loss expects"
    return (
        f"output {output!r} holds {act} probabilities (produced by {where!r}) but its loss "
        f"{module_name(loss.inner)} expects {wants}; {fix}"
    )


@contextmanager
def capture_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, dict[int, Tensor]]]:
    """Within the block, record for each named module ``id(output) -> first input`` of every call."""
    got: dict[str, dict[int, Tensor]] = {n: {} for n in modules}
    handles = []

    def make(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(mod: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, Tensor) and args and isinstance(args[0], Tensor):
                got[name][id(out)] = args[0]

        return hook

    for n, m in modules.items():
        handles.append(m.register_forward_hook(make(n)))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()
