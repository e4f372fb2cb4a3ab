"""NTKMTL and NTKMTL-SR (Qin, Wang, Liao, Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from
Neural Tangent Kernel Perspective", NeurIPS 2025; code github.com/jianke0604/NTKMTL): balance the tasks'
convergence speeds through the largest eigenvalue of each task's neural tangent kernel.

Under gradient flow the residuals of task ``i`` decay along the eigenvectors of its NTK block
``K_i = J_i J_i^T`` (``J_i``: the Jacobian of task ``i``'s ``n`` mini-batch losses with respect to the shared
parameters), fastest along the largest eigenvalue ``lambda_i``. Weighting task ``i`` by ``w_i`` scales its block
by ``w_i^2``; the paper equalises the blocks' largest eigenvalues with
``w_i = (mean_j lambda_j / lambda_i)^(1/2)`` (the authors' code: ``ntk_exp``, default 1/2, as the exponent).

* :class:`NTKMTL` takes ``n = 1`` (the paper's setting, for the same cost as the other gradient methods): the
  block of task ``i`` is the number ``||g_i||^2 = G_ii``, so the weights are a function of the Gramian's
  diagonal, on the shared parameters (``gramian="params"``) or on a representation (``"features"``).
* :class:`NTKMTLSR` ("shared representation") takes the Jacobian with respect to the shared representation
  ``z`` and ``n`` mini-batch chunks (4 in the authors' CelebA and QM9 runs): ``lambda_i`` is the largest
  eigenvalue of the ``n x n`` kernel of the chunks' mean losses; it costs one backward through the heads only.

The weights are recomputed at each step from the current batch (no state carried besides the engine's
``every=K`` schedule); their update is one ordinary backward of ``sum_i b_i L_i``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..gramian import _split, batched_grads, check_reached
from ..result_types import Losses
from .base import register
from .gramian_base import GramianBalancer
from .weighting import check_gramian


def ntk_weights(lam: Tensor, ntk_exp: float = 0.5) -> Tensor:
    """``b_i = (mean_j lambda_j / lambda_i)^ntk_exp`` over the parts with ``lambda_i > 0``; a part whose
    largest eigenvalue is exactly 0 (its gradient is zero: nothing of it to speed up or slow down) gets
    ``b_i = 1`` and is left out of the mean. Equal eigenvalues give ``b = 1`` (equal weighting)."""
    lam = lam.detach().to(torch.float64)
    if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
        raise FloatingPointError(f"NTKMTL: the NTK eigenvalues {lam.tolist()} are not finite and >= 0")
    pos = lam > 0
    if not bool(pos.any()):
        return torch.ones_like(lam)
    scaled = lam / lam.max()  # scale-free: gradients of any finite scale give the same weights
    mean = scaled[pos].mean()
    b = torch.ones_like(lam)
    b[pos] = (mean / scaled[pos]) ** ntk_exp
    return b


def _check_exp(ntk_exp: float) -> float:
    if not (ntk_exp >= 0 and math.isfinite(ntk_exp)):
        raise ValueError(
            f"NTKMTL: ntk_exp (the exponent of the eigenvalue ratio) must be finite and >= 0, not {ntk_exp!r}"
        )
    return float(ntk_exp)


@register("ntkmtl", "ntk_mtl")
class NTKMTL(GramianBalancer):
    """NTKMTL (Qin et al., NeurIPS 2025) with ``n = 1`` mini-batch, the authors' setting:
    ``b_i = (mean_j G_jj / G_ii)^ntk_exp`` (``G_ii = ||g_i||^2``, the task's NTK eigenvalue; see the module
    docstring). Parts with a zero gradient get ``b_i = 1`` and are left out of the mean (:func:`ntk_weights`).
    With ``gramian="features"`` this is NTKMTL-SR with ``n = 1`` (the authors' NYUv2 and Cityscapes setting).

    :param ntk_exp: the exponent (0.5, the paper's square root; the authors' README recommends trying slightly
        larger values such as 0.75, which their NYUv2 run script uses).
    :param max_norm: ``> 0``: scale ``b`` down so that the shared update ``||J^T b|| = sqrt(b^T G b)`` is at most
        ``max_norm`` (the authors clip the shared gradient to norm 1.0 after weighting); default ``0.0``: no
        clipping (use the trainer's ``grad_clip`` to clip every parameter instead). The heads' gradients are
        scaled by the same factor here.

    Factor: the authors' code sets the shared gradient to ``T sum_i (sum_j G_jj / G_ii)^ntk_exp g_i``, i.e.
    ``T^(1 + ntk_exp) b_i`` on the shared parameters (a common factor, which their clipping to norm 1 removes
    whenever it acts), and gives the heads their unweighted gradients; lossport gives every head its weight
    ``b_i`` too (as for every gradient-level method) and keeps equal weighting at ``b = 1``. Cost: that of the
    Gramian (``T`` backward passes in params mode), as MGDA; only its diagonal is used.
    """

    name = "ntkmtl"

    def __init__(self, ntk_exp: float = 0.5, max_norm: float = 0.0, **engine: Any) -> None:
        super().__init__(**engine)
        self.ntk_exp = _check_exp(ntk_exp)
        if not (max_norm >= 0 and math.isfinite(max_norm)):
            raise ValueError(f"NTKMTL: max_norm must be finite and >= 0 (0 disables the clipping), not {max_norm!r}")
        self.max_norm = float(max_norm)

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        G = check_gramian(G, type(self).__name__)
        b = ntk_weights(G.diagonal(), self.ntk_exp)  # the engine reports sqrt(G_ii) as info["norm/<part>"]
        if self.max_norm > 0:
            scale = float(G.abs().max())
            norm = math.sqrt(max(float(b @ (G / scale) @ b), 0.0)) * math.sqrt(scale) if scale > 0 else 0.0
            if norm > self.max_norm:
                b = b * (self.max_norm / norm)
        return b

    def __repr__(self) -> str:
        clip = f", max_norm={self.max_norm}" if self.max_norm else ""
        return super().__repr__()[:-1] + f", ntk_exp={self.ntk_exp}{clip})"


@register("ntkmtl_sr", "ntk_mtl_sr")
class NTKMTLSR(NTKMTL):
    """NTKMTL-SR (Qin et al., NeurIPS 2025, Algorithm 2): the NTK of each task on the shared representation
    ``z`` over ``n`` mini-batch chunks. The batch is cut into ``n`` chunks along its first dimension
    (``torch.chunk``, as the authors' code); ``C_ik`` is the mean loss of task ``i`` on chunk ``k``;
    ``K_i[k, l] = <dC_ik/dz, dC_il/dz>``; ``lambda_i`` its largest eigenvalue;
    ``b_i = (mean_j lambda_j / lambda_i)^ntk_exp`` (:func:`ntk_weights`).

    Computed from one gradient per part of its batch mean ``L_i`` with respect to ``z``: when the heads treat the
    examples independently (no batch statistics in the heads), ``dC_ik/dz`` is the chunk's rows of ``dL_i/dz``
    times ``B / |chunk k|`` (``B`` the batch size) and zero elsewhere, so ``K_i`` is diagonal and ``lambda_i =
    max_k (B / |chunk k|)^2 ||dL_i/dz [chunk k]||^2``. With missing labels the chunk's rows are those of the
    part's mean over its labelled examples, scaled the same way. (With batch statistics in the heads this is an
    approximation of the chunks' kernel.)

    :param n: the number of chunks (4, the authors' CelebA and QM9 setting; ``n = 1`` gives NTKMTL on
        ``z``, their NYUv2 and Cityscapes setting). Under ``torchrun`` each rank cuts its batch into
        ``n / world_size`` chunks (``n`` must be a multiple of the world size), which are the one-process chunks
        of the global batch when the local batches are equal (lossport's contiguous shards).
    :param ntk_exp: as :class:`NTKMTL`.
    :param features: the representation: a net output's name or the module computing it, as the Gramian
        engine's ``features=``; ``None`` (default): the tensors where the parts' own graphs (the heads) meet the
        shared graph, found in the autograd graph at each call (one backward of ``sum_i L_i`` through the heads
        gives every part's gradient there).
    :param every: recompute every ``every`` calls (the engine's schedule).

    Factor: the authors' code backpropagates ``sum_i (sum_j lambda_j / lambda_i)^ntk_exp L_i``, i.e.
    ``T^ntk_exp b_i`` (a common factor), to every parameter, heads included, as lossport. Cost: one backward
    through the heads (or ``T`` of them with ``features=``) and ``T x B x dim(z)`` numbers, plus the balanced
    backward; no backward through the trunk.
    """

    name = "ntkmtl_sr"

    def __init__(
        self,
        n: int = 4,
        ntk_exp: float = 0.5,
        features: str | nn.Module | None = None,
        every: int = 1,
        params: Iterable[Tensor] | None = None,
    ) -> None:
        if params is not None:  # the toy problem and hand loops pass params= to every gradient-level method
            raise ValueError(
                "NTKMTL-SR takes the kernel on a shared representation (a batch of examples), not on parameters: "
                "drop params=, or use 'ntkmtl' for the kernel on the parameters"
            )
        if features is None:
            super().__init__(ntk_exp=ntk_exp, every=every)
        else:
            super().__init__(ntk_exp=ntk_exp, gramian="features", features=features, every=every)
        self.mode = "features"
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"NTKMTL-SR: n (the number of mini-batch chunks) must be an integer >= 1, not {n!r}")
        self.n = n

    def compute_gramian(self, losses: Losses) -> Tensor:
        """Not used: NTKMTL-SR needs the representation's gradients example by example, not their Gramian."""
        raise TypeError("NTKMTL-SR needs the per-example gradients on the representation, not the Gramian")

    def run(self, losses: Losses) -> Any:
        names = losses.names
        R = distributed.world_size()
        if self.n % R:
            raise ValueError(
                f"NTKMTL-SR: n={self.n} chunks cannot be shared by {R} ranks; give n a multiple of the world size"
            )
        sq = _chunk_sq_norms(self._row_grads(losses), self.n // R)  # T x n/R, this rank's chunks
        if distributed.is_distributed():
            buf = sq.new_zeros((R, *sq.shape)).to(distributed._device_for_comm(sq))
            buf[distributed.rank()] = sq
            torch.distributed.all_reduce(buf)
            sq = buf.to(sq.device).permute(1, 0, 2).reshape(len(names), -1)
        lam = sq.max(dim=1).values
        if not bool(torch.isfinite(lam).all()):
            bad = [k for k, v in zip(names, lam.tolist()) if not math.isfinite(v)]
            raise FloatingPointError(
                f"NTKMTL-SR: the representation gradients of {bad} are not finite although the losses are; the "
                "balancer's state is unchanged"
            )
        b = ntk_weights(lam, self.ntk_exp)
        self._last = dict(zip(names, b.cpu().tolist()))
        self.info = {f"ntk/lambda/{k}": v for k, v in zip(names, lam.tolist())}
        return dict(self._last)

    def _row_grads(self, losses: Losses) -> list[Tensor]:
        """Each part's gradient on the representation: tensors ``T x B x ...`` (first dimension the batch)."""
        parts = [losses.parts[k] for k in losses.names]
        if self.features is not None:
            zs = self.representation(losses)
            check_reached(parts, zs)
            gs = batched_grads(parts, zs)
            rows = [
                torch.zeros((len(parts), *z.shape), dtype=z.dtype, device=z.device) if g is None else g
                for z, g in zip(zs, gs)
            ]
        else:
            split = _split(parts)
            if split is None:
                raise ValueError(
                    f"NTKMTL-SR: cannot find where the parts {losses.names} leave the shared graph (a part computed "
                    "from another part, or directly from a shared tensor); give features= the representation (a net "
                    "output's name or the module that computes it)"
                )
            rows = split.grads
        shapes = [tuple(r.shape[1:]) for r in rows]
        if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
            raise ValueError(
                f"NTKMTL-SR: the representation tensors have shapes {shapes}, which do not share a first (batch) "
                "dimension; give features= the representation (a net output's name or the module computing it)"
            )
        return rows


def _chunk_sq_norms(rows: list[Tensor], n: int) -> Tensor:
    """``T x n``: entry ``(i, k)`` is ``(B / |chunk k|)^2 ||rows_i[chunk k]||^2`` summed over the tensors (zero for a
    chunk ``torch.chunk`` does not make), in float64. Each example's row norm is taken in the rows' dtype, then
    squared and summed by chunk in float64 (no float64 copy of the ``T x B x dim(z)`` rows)."""
    T, B = rows[0].shape[0], rows[0].shape[1]
    per = torch.zeros(T, B, dtype=torch.float64, device=rows[0].device)
    for r in rows:
        per += torch.linalg.vector_norm(r.detach().reshape(T, B, -1), dim=2).to(torch.float64) ** 2
    out = torch.zeros(T, n, dtype=torch.float64, device=per.device)
    for k, c in enumerate(torch.chunk(per, n, dim=1)):
        out[:, k] = (B / c.shape[1]) ** 2 * c.sum(dim=1)
    return out


__all__ = ["NTKMTL", "NTKMTLSR", "ntk_weights"]
