"""Exact multi-process training: every rank sees the global loss parts and applies identical weights.

Under ``torchrun`` each rank evaluates its share of the global batch. Let part ``i`` have ``n_i^r`` labelled
examples on rank ``r`` of ``R`` ranks, ``N_i = sum_r n_i^r``, and local mean ``L_i^r``. The part over the global
batch is ``L_i = sum_r n_i^r L_i^r / N_i``. :func:`global_losses` replaces each local part by the surrogate

    S_i^r = c_i^r L_i^r + sg(L_i - c_i^r L_i^r),      c_i^r = R n_i^r / N_i

whose *value* is the global ``L_i`` on every rank (one all-reduce of ``2T`` numbers: sums and counts) and whose
*gradient* is ``c_i^r grad L_i^r``. DistributedDataParallel averages gradients over ranks, so the backward of
``sum_i w_i S_i^r`` on every rank yields ``sum_i w_i (1/R) sum_r c_i^r grad L_i^r = sum_i w_i grad L_i``: the
gradient of the global batch, exactly, also when ranks hold different numbers of labelled examples. Since every
rank sees the same values, loss-level balancers compute identical weights, and their learned parameters
(which depend on the values only) get identical gradients with no extra communication.

Gradient-level balancers need the Gramian of the *global* per-part gradients ``g_i = (1/R) sum_r J_r[i]``
(``J_r`` the Jacobian of the surrogates on rank ``r``):

* ``gramian="params"``: ``G = J J^T`` with ``J = (1/R) sum_r J_r`` does not split into per-rank Gramians (the
  cross-rank terms ``J_r J_s^T`` are needed), so :func:`all_reduce_jacobian` sums the ``T x P`` local Jacobians
  (``T P`` numbers per step, the cost of ``T`` gradient all-reduces).
* ``gramian="features"``: the gradient with respect to the representation of example ``b`` is non-zero only on
  the rank that holds ``b``, so the rows of the global feature Jacobian are the concatenation of the ranks'
  rows scaled by ``1/R`` and ``G = (1/R^2) sum_r G_r``: :func:`all_reduce_gramian` sends ``T^2`` numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from .result_types import Losses


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _device_for_comm(t: Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_losses(losses: Losses, names: list[str], static_weights: Mapping[str, float] | None = None) -> Losses:
    """The surrogate parts of the module docstring: global values, gradients that DDP averages exactly.

    ``names`` lists every part the objective can produce, in the same order on every rank (so that ranks where
    a part is missing still take part in the all-reduce); ``static_weights`` gives their static weights (for
    parts missing on this rank). A part with no labelled example on any rank stays
    missing; a part labelled elsewhere but not here becomes a constant with the global value.
    """
    if not is_distributed():
        return losses
    R = world_size()
    T = len(names)
    ref = next(iter(losses.parts.values()), None)
    dev = _device_for_comm(ref) if ref is not None else torch.device("cpu")
    buf = torch.zeros(2 * T, dtype=torch.float64, device=dev)
    for k, name in enumerate(names):
        if name in losses.parts:
            n = losses.counts.get(name, 1)
            buf[k] = float(losses.parts[name].detach()) * n
            buf[T + k] = n
    dist.all_reduce(buf)
    parts: dict[str, Tensor] = {}
    weights: dict[str, Tensor | float] = {}
    counts: dict[str, int] = {}
    missing: list[str] = []
    for k, name in enumerate(names):
        total_n = float(buf[T + k])
        if total_n == 0:
            missing.append(name)
            continue
        value = buf[k] / total_n
        if name in losses.parts:
            local = losses.parts[name]
            c = R * losses.counts.get(name, 1) / total_n
            scaled = local * c
            parts[name] = scaled + (value.to(local.dtype).to(local.device) - scaled.detach())
            weights[name] = losses.weights[name]
        else:
            dtype = ref.dtype if ref is not None else torch.float32
            device = ref.device if ref is not None else torch.device("cpu")
            parts[name] = value.to(dtype).to(device) + _zero_anchor(losses, name)
            weights[name] = (static_weights or {}).get(name, 1.0)
        counts[name] = int(total_n)
    return replace(losses, parts=parts, weights=weights, counts=counts, missing=tuple(missing), _total=None)


def _zero_anchor(losses: Losses, name: str) -> Tensor | float:
    """``0 * output.sum()`` for the output of part ``name``: a zero gradient for its head on this rank, so that
    DDP all-reduces that head's gradient on every rank (a head unused on one rank would keep ``grad=None``
    there, and its optimizer would skip it: the replicas would drift apart)."""
    outputs = losses.outputs or {}
    out = outputs.get(name, outputs.get(name.split("/")[0]))
    if isinstance(out, Tensor) and out.requires_grad:
        return 0.0 * out.sum()
    return 0.0


def all_reduce_gramian(G: Tensor) -> Tensor:
    """``(1/R^2) sum_r G_r``: the global Gramian from per-rank Gramians of the surrogate parts (features mode)."""
    if not is_distributed():
        return G
    R = world_size()
    out = G.detach().to(torch.float64).to(_device_for_comm(G)).clone()
    dist.all_reduce(out)
    return (out / (R * R)).to(G.device)


def all_reduce_jacobian(J: Tensor) -> Tensor:
    """``(1/R) sum_r J_r``: the global Jacobian of the surrogate parts (params mode), ``T x P``."""
    if not is_distributed():
        return J
    R = world_size()
    out = J.detach().to(_device_for_comm(J)).clone()
    dist.all_reduce(out)
    return (out / R).to(J.device)


def setup(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), unless the
    script already did: gloo on CPU, nccl on CUDA. The timeout (seconds, ``LOSSPORT_DIST_TIMEOUT``, default
    300) bounds how long the other ranks wait for a rank that died. Returns whether training is distributed."""
    import datetime
    import os

    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get("LOSSPORT_DIST_TIMEOUT", "300")))
    dist.init_process_group(backend, timeout=timeout)
    return is_distributed()


def shard(global_batch: Tensor, rank_: int, world: int) -> Tensor:
    """The slice of a global batch of indices that rank ``rank_`` takes: contiguous, sizes differing by at
    most one, so that the ranks' batches at step k together are exactly the one-process batch of
    ``world * batch_size`` examples at step k."""
    return torch.tensor_split(global_batch, world)[rank_]


__all__ = [
    "all_reduce_gramian",
    "all_reduce_jacobian",
    "global_losses",
    "is_distributed",
    "rank",
    "setup",
    "shard",
    "world_size",
]
