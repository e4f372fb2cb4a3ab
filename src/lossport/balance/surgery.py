"""Gradient-level balancers whose shared update is not a weighted sum of the current gradients.

GradDrop masks single coordinates of the parts' gradients by sign purity; DB-MTL follows a moving average of
each part's log-loss gradient, rescaled to a common norm. Both need the per-part gradients themselves (the
Jacobian ``J``: ``T x P`` on the shared parameters, or ``T x F`` on the representation in ``features`` mode), not
only the Gramian, so they cost ``T x P`` memory in ``params`` mode.

**How the update is applied.** As every lossport balancer, the method returns part weights ``b``: the update is
one ordinary backward of ``sum_i w_i L_i`` (``w_i = s_i b_i``, ``s_i`` the static weights), so each head receives
its own part's gradient times ``w_i``. To give the shared tensors ``x`` (the parameters, or the representation)
the method's direction ``d`` instead of ``J^T w``, the balancer adds one extra term, ``<method>/shared``, whose
value is exactly zero and whose gradient is the difference ``c = d - J^T w``::

    sum_x < x - sg(x), c_x >          (sg: stop-gradient)

Its backward leaves ``J^T w + c = d`` on the shared tensors; nothing else changes, and no hook is left behind if
the step is skipped. In ``features`` mode ``c`` enters at the representation and reaches the trunk by the chain
rule. The methods see the *unweighted* parts; the static weights scale each part's contribution to ``d``
(``d = sum_i s_i d_i``), as they scale the output of the Gramian methods.

``every=K``: the method runs on calls ``0, K, 2K, ...``; the calls in between apply plain weights (the sum for
GradDrop, the last DB-MTL scales for DB-MTL: see each class). A batch with a single part present gets that part's
own gradient (GradDrop leaves a single gradient unchanged; DB-MTL's buffers are then left as they are).

Under ``torchrun`` (:mod:`lossport.distributed`): in ``params`` mode ``J`` is the global Jacobian (all-reduced),
so ``c`` is the same on every rank and the ranks' averaged gradient is ``d``; in ``features`` mode the
statistics that mix examples (GradDrop's batch-summed signs, DB-MTL's norms) are all-reduced and each rank
corrects its own representation rows. GradDrop's random draws come from a seeded generator, identical on every
rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch import distributed as dist

from .. import distributed
from ..result_types import Losses
from .base import register
from .gramian_base import GramianBalancer, diagnostics
from .loss_level import _floats

_BLOCK = 16384  # columns of the Jacobian processed at a time (a few MB of temporaries)


def purity_sign(S: Tensor, U: Tensor) -> Tensor:
    """The sign GradDrop keeps per coordinate (Chen et al., NeurIPS 2020, Algorithm 1 with ``f(P) = P``): ``+1``
    where the positive sign purity ``P = (1 + sum_i S_i / sum_i |S_i|) / 2`` exceeds the draw ``U``, ``-1`` where
    it is below, ``0`` (kept by nobody) where ``P = U`` or every ``S_i`` is zero (``P`` NaN). ``S``: ``T x ...``,
    ``U``: ``S.shape[1:]``. (``sign(P - U)`` is the comparison exactly: ``P`` and ``U`` are 0 or far above the
    subnormal range, so their difference is zero only where they are equal.)"""
    P = 0.5 * (1 + S.sum(0) / S.abs().sum(0))
    return torch.sign(P - U).nan_to_num_(0.0)


def sign_purity_keep(S: Tensor, U: Tensor) -> Tensor:
    """GradDrop's masks (Chen et al., NeurIPS 2020, Algorithm 1 with ``f(P) = P``): which part keeps which
    coordinate (boolean, ``T x ...``).

    ``S`` (``T x ...``): the per-part sign statistics (the gradients themselves, or for activations the batch
    sums of ``sign(z) * dL_i/dz``); ``U``: uniform draws of shape ``S.shape[1:]``. Per coordinate the positive
    sign purity is ``P = (1 + sum_i S_i / sum_i |S_i|) / 2``; part ``i`` keeps it where ``P > U`` and ``S_i > 0``
    or ``P < U`` and ``S_i < 0`` (``S_i`` times :func:`purity_sign` positive). A coordinate where every ``S_i`` is
    zero (or ``P = U``) is kept by nobody. The update is ``sum_i (leak_i + (1 - leak_i) keep_i) g_i``."""
    return (S * purity_sign(S, U)) > 0


def _static(losses: Losses, like: Tensor) -> Tensor:
    """The static weights ``s_i`` of the parts present, as a vector like ``like``."""
    s = [float(w.detach()) if isinstance(w := losses.weights[k], Tensor) else float(w) for k in losses.names]
    return torch.tensor(s, dtype=like.dtype, device=like.device)


def _all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite, from its extremes: one reduction pass, no boolean copy of ``x``
    (``torch.aminmax`` propagates NaN)."""
    if x.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def stacked(rows: list[Tensor]) -> Tensor:
    """``torch.stack(rows)`` (``T x P``), without the copy when the rows are the consecutive rows of one tensor (a
    method's state kept as views of its last ``T x P`` buffer): then a view of that tensor, to be read only."""
    first = rows[0]
    P = first.numel()
    same = P > 0 and all(
        r.dim() == 1
        and r.numel() == P
        and r.stride() == (1,)
        and r.dtype == first.dtype
        and r.device == first.device
        and r.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and r.storage_offset() == first.storage_offset() + i * P
        for i, r in enumerate(rows)
    )
    return torch.as_strided(first, (len(rows), P), (P, 1)) if same else torch.stack(rows)


def _zero_valued(xs: list[Tensor], c: Tensor) -> Tensor:
    """``sum_x <x - sg(x), c_x>``: value zero, gradient ``c_x`` on each ``x`` (``c`` flattened over ``xs``)."""
    term = None
    offset = 0
    for x in xs:
        n = x.numel()
        piece = ((x - x.detach()) * c[offset : offset + n].view_as(x).to(x.dtype)).sum()
        term = piece if term is None else term + piece
        offset += n
    assert term is not None
    return term


class _Surgery(GramianBalancer):
    """Base of the methods here: run :meth:`surgery` on the Jacobian, add the zero-valued correction term. The
    ``every=K`` schedule and the failure rules are :meth:`GramianBalancer.balance`'s."""

    kind = "surgery"

    def surgery(self, J: Tensor, xs: list[Tensor], losses: Losses, s: Tensor) -> tuple[Tensor, Tensor, dict]:
        """``(b, c, state)``: the part weights (``T``), the correction ``c = sum_i s_i (d_i - b_i J_i)`` on the
        flattened shared tensors, and the method's new state (attributes set only once the update is known to
        be finite, so a failed step leaves the balancer as it was). Written by each method."""
        raise NotImplementedError

    def between(self, losses: Losses) -> dict[str, float]:
        """The weights of the calls between two runs of the method (``every=K``) and of single-part batches."""
        return dict.fromkeys(losses.names, 1.0)

    def run(self, losses: Losses) -> Any:
        """The method on the Jacobian; its new state is set only once the update is known to be finite."""
        names = losses.names
        J, xs = self.compute_jacobian(losses)
        b, c, state = self.surgery(J, xs, losses, _static(losses, J))
        if not (_all_finite(b) and _all_finite(c)):
            bad = [k for k, ok in zip(names, torch.isfinite(J).all(dim=1).tolist()) if not ok]
            raise FloatingPointError(
                f"{type(self).__name__}: the gradients of {bad or names} are not finite although the losses "
                "are; no step was taken and the balancer's state is unchanged"
            )
        self.__dict__.update(state)
        G = (J @ J.T).to(torch.float64)  # for the diagnostics only: float32 products are enough
        if self.mode == "features":
            G = distributed.all_reduce_gramian(G)
        self.info = diagnostics(G, names)
        self._last = dict(zip(names, b.tolist()))
        return dict(self._last), {f"{self.name}/shared": _zero_valued(xs, c)}

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        raise TypeError(f"{type(self).__name__} is not a function of the Gramian; it works on the gradients")


@register("graddrop")
class GradDrop(_Surgery):
    """GradDrop (Chen et al., "Just Pick a Sign", NeurIPS 2020): per coordinate, draw ``U ~ Uniform(0, 1)``
    and keep only the parts whose gradient sign agrees with a sign chosen with probability the positive sign
    purity ``P`` (:func:`sign_purity_keep`, ``f(P) = P``); ``d = sum_i (leak + (1 - leak) M_i) g_i``.

    * ``params`` mode (the nash-mtl / FAMO code): the coordinates are those of the shared parameters' gradient;
      equal to TorchJD's ``GradDrop`` aggregator given the same draws.
    * ``features`` mode (the paper's setting): the coordinates are those of the representation ``z``; the sign
      statistic is the batch sum of ``sign(z) * dL_i/dz`` (the paper's batch-separated case), one draw per
      feature, and each part's per-example gradients are kept or dropped together.

    Heads get their plain gradient (``b = 1``), as the sum of losses; ``leak`` (0, as LibMTL and TorchJD)
    lets that fraction of every gradient through. The draws come from a host generator seeded with ``seed`` (in
    the state dict): on the CPU directly, on another device through a generator of that device seeded by one
    host draw per call (so a seed gives the same masks on the same kind of device, and the draws are made where
    the gradients are). With ``every=K`` GradDrop runs on every ``K``-th call and the calls between are the
    plain sum.
    """

    name = "graddrop"

    def __init__(self, leak: float = 0.0, seed: int = 0, **engine: Any) -> None:
        super().__init__(**engine)
        if not 0.0 <= leak <= 1.0:
            raise ValueError(f"GradDrop: leak must be in [0, 1], not {leak!r}")
        self.leak = float(leak)
        self.generator: torch.Generator
        self.add_state("generator", torch.Generator().manual_seed(seed))

    def _uniform(self, gen: torch.Generator, shape: torch.Size, like: Tensor) -> Tensor:
        """Uniform draws like ``like``. On the CPU they come from the seeded host generator itself; on another
        device from a generator of that device seeded by one host draw, so the draws are made where they are
        used and the balancer's state stays the portable host generator."""
        if like.device.type == "cpu":
            return torch.rand(shape, generator=gen, dtype=like.dtype, device=like.device)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device="cpu"))
        local = torch.Generator(device=like.device).manual_seed(seed)
        return torch.rand(shape, generator=local, dtype=like.dtype, device=like.device)

    def surgery(self, J: Tensor, xs: list[Tensor], losses: Losses, s: Tensor) -> tuple[Tensor, Tensor, dict]:
        # d - J^T s = -(1 - leak) sum_i s_i (1 - keep_i) g_i: only the dropped entries are needed
        T = J.shape[0]
        b = torch.ones(T, dtype=J.dtype, device=J.device)
        gen = torch.Generator()  # host copy: the balancer's generator moves on only if the step succeeds
        gen.set_state(self.generator.get_state())
        if self.mode == "params":
            U = self._uniform(gen, J.shape[1:], J)
            dropped = torch.empty(J.shape[1], dtype=J.dtype, device=J.device)
            for a in range(0, J.shape[1], _BLOCK):  # column blocks: T x P temporaries would cost more than the maths
                Jb = J[:, a : a + _BLOCK]
                sign = purity_sign(Jb, U[a : a + _BLOCK])
                # the kept entries are sign * relu(sign * J) (exact: products by +-1 and 0), the dropped ones J - kept
                kept = torch.mul(Jb, sign).clamp_min_(0.0).mul_(sign)
                dropped[a : a + _BLOCK] = torch.sub(Jb, kept, out=kept).T @ s
            return b, -(1 - self.leak) * dropped, {"generator": gen}
        pieces = []
        offset = 0
        for z in xs:
            Jz = J[:, offset : offset + z.numel()].reshape(T, *z.shape)
            offset += z.numel()
            batched = z.dim() > 1
            S = (Jz * z.detach().sign()).sum(1) if batched else Jz * z.detach().sign()
            if batched and distributed.is_distributed():
                dist.all_reduce(S)
            keep = sign_purity_keep(S, self._uniform(gen, S.shape[1:], S))
            dropped = torch.where(keep.unsqueeze(1) if batched else keep, 0.0, Jz).reshape(T, -1)
            pieces.append(-(1 - self.leak) * (dropped.T @ s))
        return b, torch.cat(pieces), {"generator": gen}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", leak={self.leak})"


@register("db_mtl", "dbmtl")
class DBMTL(_Surgery):
    """DB-MTL (Lin et al., "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029, Algorithm 1).

    Loss-scale balancing: every part is trained through ``log(L_i + eps)``. Gradient-magnitude balancing: keep
    a moving average of each part's log-loss gradient ``g_i = grad log(L_i + eps) = grad L_i / (L_i + eps)``,
    ``h_i <- g_i + beta_k (h_i - g_i)`` with ``beta_k = beta / k^beta_sigma`` at the ``k``-th update (``h_i = 0``
    at the start, no bias correction: the paper's and LibMTL's rule; ``beta = 0.9``, ``beta_sigma = 0`` as
    LibMTL), and move the shared parameters along ``d = max_j ||h_j|| sum_i h_i / (||h_i|| + 1e-8)``: every part
    contributes a direction of the same norm, the largest one's.

    Heads receive the gradient of ``log(L_i + eps)``: ``b_i = 1 / (L_i + eps)``. ``params`` mode keeps the
    averages ``h_i`` (``T x P`` floats, in the state dict); they restart from zero (counted in ``info`` as
    ``db_mtl/restarts``) if the set of shared parameters changes. ``features`` mode: gradients with respect to
    the representation belong to the examples of one batch, so a moving average of them means nothing; there
    lossport averages their norms instead, ``n_i <- ||g_i|| + beta_k (n_i - ||g_i||)``, and moves ``z`` along
    ``max_j n_j sum_i g_i / (n_i + 1e-8)``. With ``every=K`` the method runs on every ``K``-th call and the calls
    between use ``b_i = a_i / (L_i + eps)`` with the last scales ``a_i = max_j ||h_j|| / (||h_i|| + 1e-8)``, on
    heads and trunk alike (no Jacobian on those calls).
    """

    name = "db_mtl"

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8, **engine: Any) -> None:
        super().__init__(**engine)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"DBMTL: beta must be in [0, 1), not {beta!r}")
        if beta_sigma < 0:
            raise ValueError(f"DBMTL: beta_sigma must be >= 0, not {beta_sigma!r}")
        if not eps > 0:
            raise ValueError(f"DBMTL: eps must be > 0, not {eps!r}")
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)
        self._k: int  # updates of the averages so far
        self._avg: dict[str, Tensor]  # params mode: each part's moving average h_i, on the gradients' device
        self._shapes: list[list[int]] | None
        self._scales: dict[str, float]
        self._norms: dict[str, float]  # features mode: the averaged norms n_i
        self._restarts: int
        for name, value in (
            ("_k", 0),
            ("_avg", {}),
            ("_shapes", None),
            ("_scales", {}),
            ("_norms", {}),
            ("_restarts", 0),
        ):
            self.add_state(name, value)

    def _values(self, losses: Losses) -> list[float]:
        return [v + self.eps for v in _floats(losses)]

    def between(self, losses: Losses) -> dict[str, float]:
        single = len(losses.names) == 1
        return {
            k: (1.0 if single else self._scales.get(k, 1.0)) / v for k, v in zip(losses.names, self._values(losses))
        }

    def surgery(self, J: Tensor, xs: list[Tensor], losses: Losses, s: Tensor) -> tuple[Tensor, Tensor, dict]:
        names = losses.names
        inv = 1 / torch.tensor(self._values(losses), dtype=J.dtype, device=J.device)
        g = J * inv[:, None]  # gradients of log(L_i + eps)
        k = self._k + 1
        rate = self.beta / k**self.beta_sigma
        state: dict[str, Any] = {"_k": k}
        if self.mode == "params":
            shapes = [list(x.shape) for x in xs]
            avg = self._avg
            if self._shapes is not None and shapes != self._shapes:
                avg = {}
                state["_restarts"] = self._restarts + 1
            # h_i = g_i + rate (avg_i - g_i), or (1 - rate) g_i for a new part, in one T x P buffer (same roundings)
            old = stacked([avg[n].to(g) if n in avg else g[i] for i, n in enumerate(names)])  # read only
            h = torch.sub(old, g).mul_(rate).add_(g)
            for i, n in enumerate(names):
                if n not in avg:
                    h[i] = (1 - rate) * g[i]
            # the rows of h are the new averages (views, no copy) when every average is renewed; otherwise copies,
            # so that a missing part's average does not keep this whole T x P tensor alive
            views = set(avg) <= set(names)
            rows = h.detach().unbind(0) if views else [h[i].detach().clone() for i in range(len(names))]
            state["_avg"] = {**avg, **dict(zip(names, rows))}
            state["_shapes"] = shapes
            norms = h.norm(dim=1)
        else:
            G = distributed.all_reduce_gramian(g.to(torch.float64) @ g.to(torch.float64).T)
            now = G.diagonal().clamp_min(0).sqrt().to(J.dtype)
            prev = torch.tensor([self._norms.get(n, 0.0) for n in names], dtype=J.dtype, device=J.device)
            norms = now + rate * (prev - now)
            state["_norms"] = {**self._norms, **dict(zip(names, norms.tolist()))}
            h = g
        a = norms.max() / (norms + 1e-8)
        state["_scales"] = {**self._scales, **dict(zip(names, a.tolist()))}
        return inv, (a * s) @ h - s @ g, state

    def balance(self, losses: Losses) -> Any:
        out = super().balance(losses)
        self.info.update({"db_mtl/restarts": float(self._restarts)})
        return out


__all__ = ["DBMTL", "GradDrop", "purity_sign", "sign_purity_keep", "stacked"]
