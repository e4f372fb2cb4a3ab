"""Balancing under FSDP2 (``torch.distributed.fsdp.fully_shard``): nets whose parameters are sharded over ranks.

Under ``torchrun`` with ``lossport.train(..., distributed="fsdp")`` (or a net the user already wrapped with
``fully_shard``) every parameter is a ``DTensor`` of which rank ``r`` holds a shard; the forward all-gathers a
module's parameters, the backward reduce-scatters their gradients, *averaged over the ranks* as DDP averages them.
The surrogate parts of :mod:`lossport.distributed` therefore give the exact global-batch gradient here too:

* loss-level and learned balancers (which see the part values only) work unchanged;
* ``gramian="features"``: the representation Gramian is local to the batch and all-reduced as ``T x T`` numbers,
  as under DDP (:func:`lossport.distributed.all_reduce_gramian`);
* ``gramian="params"``: ``torch.autograd.grad`` with respect to the sharded parameters gives ``None`` (they are not
  the tensors the forward used), so :func:`sharded_gramian` takes **one backward per part** through FSDP's own
  reduce-scatter: after the backward of the surrogate ``S_i``, rank ``r`` holds in ``p.grad`` its shard of the
  global gradient ``g_i``. The rows of ``J`` restricted to a rank's shard, ``J^(r)`` (``T x P/R``), give

      G = J J^T = sum_r J^(r) J^(r)^T

  exactly (the columns of ``J`` are partitioned over the ranks), with one all-reduce of ``T^2`` numbers. Memory per
  rank: the ``T x P/R`` shard rows (plus the gradient shards of the run, as in any FSDP step); the full ``T x P``
  Jacobian is never formed. Cost: ``T`` backward passes through the net (each one reduce-scatter of the parameter
  gradients, ``P`` numbers), before the ordinary backward of the weighted total.

Methods that need the per-part gradients themselves (GradDrop, DB-MTL, TrimmedMean, MoCo, ExcessMTL) or gradients
with respect to one layer (GradNorm), and the gradient monitor, cannot run sharded: :func:`check_balancer` says so
before the first step.
"""

from __future__ import annotations

import functools
import shutil
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import LossSpecError

Policy = Callable[[nn.Module], bool]


@functools.cache  # called at every forward of the objective: one import attempt per process
def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    return FSDPModule


def is_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` itself was wrapped with ``fully_shard``."""
    cls = _fsdp_module_class()
    return cls is not None and isinstance(module, cls)


def is_sharded(net: nn.Module) -> bool:
    """Whether ``net`` or any of its submodules was wrapped with ``fully_shard``. A net sharded below the root but
    not at the root is an error: its root's own parameters would keep unreduced per-rank gradients."""
    if is_fsdp(net):
        return True
    inner = [name for name, m in net.named_modules() if name and is_fsdp(m)]
    if inner:
        raise ValueError(
            f"the net's submodules {inner[:5]} are wrapped with fully_shard but the net itself is not: wrap the "
            "root too (fully_shard(net) after its children), as FSDP2 requires, or let lossport.train(..., "
            "distributed='fsdp') shard an unwrapped net"
        )
    return False


def default_policy(root: nn.Module) -> Policy:
    """The default wrapping policy: each direct child of ``root`` that holds parameters gets its own
    ``fully_shard`` (so its parameters are gathered only while it runs); the root is wrapped last, holding the
    parameters of the root itself and of children without any."""
    children = {id(m) for m in root.children() if any(True for _ in m.parameters())}
    return lambda m: id(m) in children


def shard(net: nn.Module, policy: Policy | None = None, **fsdp_kwargs: Any) -> nn.Module:
    """Wrap ``net`` in place with FSDP2: ``fully_shard`` on every submodule for which ``policy(module)`` is true
    (default :func:`default_policy`), deepest first, then on ``net`` itself. ``fsdp_kwargs`` go to every
    ``fully_shard`` call (e.g. ``mesh=``, ``reshard_after_forward=``). Returns ``net`` (its class is now an
    ``FSDPModule``). Build the optimizer after this: the parameters are replaced by sharded ones."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(net):
        return net
    chosen = policy if policy is not None else default_policy(net)
    if not callable(chosen):
        raise TypeError(f"fsdp_policy must be a function module -> bool, not {type(chosen).__name__}")
    targets = [m for name, m in net.named_modules() if name and chosen(m)]
    depth = {id(m): name.count(".") for name, m in net.named_modules()}
    for m in sorted(targets, key=lambda m: -depth[id(m)]):  # children before parents, as FSDP2 requires
        fully_shard(m, **fsdp_kwargs)
    fully_shard(net, **fsdp_kwargs)
    return net


def check_optimizer(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer built before ``fully_shard`` holds the replaced, unsharded parameters and would silently
    train nothing: refuse it."""
    mine = {id(p) for p in net.parameters()}
    stale = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in mine)
    if stale:
        raise ValueError(
            f"the optimizer holds {stale} tensors that are not parameters of the sharded net: fully_shard replaced "
            "the net's parameters, so an optimizer built before it would train nothing. Give the optimizer by name "
            "or as a function params -> Optimizer, or build it after fully_shard"
        )


def check_balancer(balancer: Any, monitor: bool = False) -> None:
    """Refuse, before the first step, what cannot run on a sharded net (see the module docstring)."""
    from .balance.gramian_base import GramianBalancer

    if monitor:
        raise ValueError(
            "monitor= needs per-part gradients on the trunk's parameters, which a net sharded with fully_shard does "
            "not expose; train without monitor (or with distributed='ddp')"
        )
    if balancer is None:
        return
    name = type(balancer).__name__
    supported = (
        "under FSDP lossport supports static weights, the loss-level and learned balancers except GradNorm and "
        "those with a meta batch (uw, famo, dwa, ...), and the Gramian-weighting methods (upgrad, mgda, "
        "nash_mtl, cagrad, ...) with gramian='params' or 'features'"
    )
    if getattr(balancer, "meta", False) or getattr(balancer, "batches", 1) > 1:
        raise ValueError(
            f"{name} takes gradients of extra or meta batches (a look-ahead step or cross-batch Jacobians) with "
            f"respect to the parameters, which a net sharded with fully_shard does not expose; {supported}. Use one "
            "of those, or distributed='ddp'"
        )
    if getattr(balancer, "kind", None) == "surgery" or (
        isinstance(balancer, GramianBalancer) and type(balancer).compute_gramian is not GramianBalancer.compute_gramian
    ):
        raise ValueError(
            f"{name} needs the per-part gradients themselves, which cannot be formed on a net sharded with "
            f"fully_shard; {supported}. Use one of those, or distributed='ddp'"
        )
    if name == "GradNorm":
        raise ValueError(
            f"GradNorm takes gradients with respect to one shared layer, whose parameters are sharded with "
            f"fully_shard; {supported}. Use one of those, or distributed='ddp'"
        )


def _local(g: Tensor) -> Tensor:
    local = getattr(g, "to_local", None)
    if local is None:
        raise LossSpecError(
            "a parameter of the sharded net has a plain (unsharded) gradient: every parameter must belong to a "
            "module wrapped with fully_shard (wrap the root last)"
        )
    return local().detach().reshape(-1)


def sharded_gramian(parts: Sequence[Tensor], net: nn.Module, params: Iterable[Tensor] | None = None) -> Tensor:
    """``G = sum_r J^(r) J^(r)^T`` (``T x T``, float64, identical on every rank) of the global parts' gradients on
    the shared parameters of a ``fully_shard``-ed net: one backward per part, each rank reading its shard of the
    reduce-scattered gradient (module docstring). Shared parameters are those that receive a gradient from more
    than one part, or ``params`` (sharded parameters of ``net``) when given. The parameters' ``.grad`` (e.g.
    accumulated over earlier batches) are left as they were."""
    cand = [p for p in net.parameters() if p.requires_grad] if params is None else list(params)
    if params is not None and not {id(p) for p in cand} <= {id(p) for p in net.parameters()}:
        raise ValueError(
            "params= holds tensors that are not parameters of the sharded net: fully_shard replaced the net's "
            "parameters, so give params= from the net after the sharding (e.g. list(net.trunk.parameters())): wrap the "
            "net with fully_shard yourself before building the balancer"
        )
    saved = [p.grad for p in cand]
    rows: list[list[Tensor | None]] = []
    try:
        for p in cand:
            p.grad = None
        for part in parts:
            part.backward(retain_graph=True)  # FSDP reduce-scatters: p.grad is this rank's shard of the global g_i
            rows.append([None if p.grad is None else _local(p.grad) for p in cand])
            for p in cand:
                p.grad = None
    finally:
        for p, g in zip(cand, saved):
            p.grad = g
    T = len(parts)
    cols = [j for j in range(len(cand)) if params is not None or sum(r[j] is not None for r in rows) > 1]
    if params is None and not cols:
        raise ValueError("no parameter of the sharded net is reached by more than one part: nothing to balance")
    G = torch.zeros(T, T, dtype=torch.float64, device=parts[0].device)
    for j in cols:
        ref = next(r[j] for r in rows if r[j] is not None) if any(r[j] is not None for r in rows) else None
        if ref is None or ref.numel() == 0:
            continue
        Jj = torch.stack([torch.zeros_like(ref) if (g := r[j]) is None else g for r in rows]).to(torch.float64)
        G += Jj @ Jj.T
    if dist.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else G.device
        out = G.to(dev)
        dist.all_reduce(out)  # the sum over the ranks' shards
        G = out.to(G.device)
    return G


class _Tie(torch.autograd.Function):
    """``part`` unchanged; in the backward, a zero gradient also flows into ``out`` (see :func:`tie_to_outputs`)."""

    @staticmethod
    def forward(ctx: Any, part: Tensor, out: Tensor) -> Tensor:
        ctx.like = (out.shape, out.dtype, out.device)
        return part.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        shape, dtype, device = ctx.like
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def tie_to_outputs(losses: Any) -> Any:
    """Each part tied to its net output, so that its backward passes through that output.

    FSDP2 gathers a module's parameters for the backward, and reduce-scatters their gradients, from hooks on the
    module's *output* tensors. A part computed from a tensor inside the graph (lossport's cross-entropy on a
    softmax head reads the logits under the softmax) would bypass them: the head's parameters would not be
    gathered, and a backward that reaches no net output would never reduce-scatter. The tie changes no value and
    adds an exact zero to every gradient; it only makes the backward enter the output's hooks."""
    from dataclasses import replace

    outputs = losses.outputs if isinstance(losses.outputs, dict) else {}
    parts = {}
    for name, part in losses.parts.items():
        out = outputs.get(name, outputs.get(name.split("/")[0]))
        tied = isinstance(out, Tensor) and out.requires_grad and part.requires_grad
        parts[name] = _Tie.apply(part, out) if tied else part
    return replace(losses, parts=parts, _total=None)


SHARDED_PREFIX = "sharded-round"
"""``DIR/sharded-round<k>``: the net and optimizer of round ``k``, sharded, written by every rank with DCP."""


def save_sharded(directory: Path, round_: int, net: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Every rank writes its shards of the net and optimizer states to ``directory/sharded-round<round_>`` with
    ``torch.distributed.checkpoint`` (a collective); returns that folder's name, which the run's
    ``checkpoint.pt`` records. A folder of the same name left by an interrupted write is removed first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"{SHARDED_PREFIX}{round_}"
    path = directory / name
    if dist.get_rank() == 0 and path.exists():
        shutil.rmtree(path)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(net, optimizer)
    dcp.save({"net": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))
    return name


def remove_older(directory: Path, keep: str) -> None:
    """Delete the sharded folders other than ``keep`` (after ``checkpoint.pt`` names ``keep``; rank 0 only)."""
    for old in directory.glob(f"{SHARDED_PREFIX}*"):
        if old.name != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def load_sharded(path: Path, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the shards :func:`save_sharded` wrote into ``net`` and ``optimizer`` (same world size and wrapping);
    a folder that is missing or does not fit is a :class:`~lossport.CheckpointError`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from .errors import CheckpointError

    if not (path / ".metadata").exists():
        raise CheckpointError(
            f"{path} is missing or incomplete (no .metadata): the sharded net and optimizer of the checkpoint "
            "cannot be read; start afresh in another checkpoint directory"
        )
    model_sd, optim_sd = get_state_dict(net, optimizer)
    sd: dict[str, Any] = {"net": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(sd, checkpoint_id=str(path))
    except Exception as err:  # DCP wraps every rank's failure in one CheckpointException
        raise CheckpointError(
            f"{path} does not fit this run's sharded net or optimizer ({type(err).__name__}: {err}); resume with "
            "the same net, optimizer and wrapping as the interrupted run"
        ) from err
    set_state_dict(net, optimizer, model_state_dict=sd["net"], optim_state_dict=sd["optimizer"])


class NetRef:
    """A weak reference to the sharded net a balancer was attached to (no cycle through the balancer)."""

    def __init__(self, net: nn.Module) -> None:
        self._ref = weakref.ref(net)

    def __call__(self) -> nn.Module:
        net = self._ref()
        if net is None:
            raise RuntimeError("the sharded net this balancer was attached to no longer exists")
        return net


__all__ = [
    "NetRef",
    "Policy",
    "check_balancer",
    "check_optimizer",
    "default_policy",
    "is_fsdp",
    "is_sharded",
    "load_sharded",
    "remove_older",
    "save_sharded",
    "shard",
    "sharded_gramian",
    "tie_to_outputs",
]
