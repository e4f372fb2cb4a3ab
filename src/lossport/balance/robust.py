"""Byzantine-robust aggregators (from federated learning) as balancers: Krum / Multi-Krum and the coordinate-wise
trimmed mean.

Both treat the parts' gradients as the votes of ``T`` workers, some of which may be wrong, and keep the
update away from outliers: Krum picks the gradient(s) closest to their neighbours (a function of the Gramian,
so it takes every engine option of :class:`~lossport.balance.gramian_base.GramianBalancer`); the trimmed mean
drops, in every coordinate, the largest and smallest values (not a weighted sum: it needs the gradients
themselves and is applied as the surgery methods of :mod:`lossport.balance.surgery` are). TorchJD 0.18 has
both (``Krum``/``KrumWeighting``, ``TrimmedMean``); the tests check lossport against it.

In multi-task training the parts are not interchangeable workers: these methods discard whole tasks (Krum) or
the extreme task in each coordinate (trimmed mean), which is what they are for when some parts are noisy
or corrupted, and seldom what one wants when every part matters.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..result_types import Losses
from .base import register
from .gramian_base import GramianBalancer, _shallow_restore, _shallow_snapshot, gram64
from .surgery import _BLOCK, _all_finite, _Surgery
from .weighting import check_gramian

_DISTANCES = ("squared", "euclidean")


def krum(G: Tensor, f: int, m: int = 1, distance: str = "squared") -> Tensor:
    """Krum and Multi-Krum weights (Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017), from the Gramian ``G`` (``T x T``).

    With ``||g_i - g_j||^2 = G_ii + G_jj - 2 G_ij``, the score of ``g_i`` is the sum over its ``T - f - 2``
    nearest other gradients of their squared distances to it (the paper's ``s(i) = sum_{i -> j} ||V_i -
    V_j||^2``; ``distance="euclidean"`` sums the distances instead, as TorchJD 0.18 does). Krum (``m = 1``)
    selects the gradient of lowest score; Multi-Krum selects the ``m`` lowest scores and averages them. Returns
    weights ``1/m`` on the selected parts and 0 elsewhere (sum 1). Ties go to the lower index (``G`` is
    symmetrised first, so that rounding in ``G`` does not decide them). With ``T = f + 3`` each score is the
    distance to the nearest other gradient, so the two mutually nearest gradients always tie: Krum then selects
    the first of them in part order. Needs ``T >= f + 3`` (at least one neighbour) and ``m <= T``."""
    if distance not in _DISTANCES:
        raise ValueError(f"krum: distance must be one of {_DISTANCES}, not {distance!r}")
    G = G.detach().to(torch.float64)
    T = G.shape[0]
    if f + 3 > T or m > T:
        raise ValueError(f"krum needs at least f + 3 = {f + 3} and m = {m} gradients, got {T}")
    # a computed Gramian is symmetric only up to rounding (lossport's is built layer by layer); unsymmetrised,
    # ||g_i - g_j|| and ||g_j - g_i|| differ in the last bits and break ties (e.g. the two mutually nearest of
    # T = f + 3 gradients, whose scores are that one distance) by rounding instead of by index
    G = (G + G.T) / 2
    sq = G.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * G).clamp_min(0)
    d = d2 if distance == "squared" else d2.sqrt()
    d = d + torch.diag(torch.full((T,), float("inf"), dtype=torch.float64, device=G.device))  # not its own neighbour
    nearest = torch.sort(d, dim=1, stable=True).values[:, : T - f - 2]
    scores = nearest.sum(dim=1)
    chosen = torch.sort(scores, stable=True).indices[:m]
    w = torch.zeros(T, dtype=torch.float64, device=G.device)
    w[chosen] = 1.0 / m
    return w


def _tournament(x: Tensor, low: bool) -> tuple[Tensor, list[Tensor]]:
    """The column-wise minimum (``low``) or maximum of the rows of ``x`` by a knockout tournament of
    ``torch.minimum``/``torch.maximum`` over halves, and the losers' rows: with the winner, the same multiset of
    values in every column."""
    losers: list[Tensor] = []
    while x.shape[0] > 1:
        q = x.shape[0] // 2
        a, b = x[:q], x[q : 2 * q]
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        win, lose = (lo, hi) if low else (hi, lo)
        losers.append(lose)
        x = win if x.shape[0] == 2 * q else torch.cat([win, x[2 * q :]])
    return x, losers


def _drop_extremes(rows: Tensor) -> Tensor:
    """``rows`` (``m x B``, ``m >= 3``) without the smallest and the largest value of each column: ``(m - 2) x B``,
    the remaining values of each column in no particular order (a selection network of about ``3m / 2``
    min/max comparators; the values are moved, never computed, so the multiset is exact)."""
    m = rows.shape[0]
    h = m // 2
    a, b = rows[:h], rows[h : 2 * h]
    low, kept = _tournament(torch.minimum(a, b), low=True)  # the minimum is among the pairs' smaller values ...
    high, more = _tournament(torch.maximum(a, b), low=False)  # ... the maximum among their larger ones
    kept += more
    if m % 2:  # the odd row out: against the minimum, then the larger of the two against the maximum
        kept.append(torch.minimum(high, torch.maximum(low, rows[2 * h :])))
    return torch.cat(kept)


def _network_pays(T: int, trim_number: int) -> bool:
    """Whether removing the extremes by :func:`_drop_extremes` (about ``3 (T - 2j)`` elementwise operations per
    column at round ``j``) should cost less than sorting the columns (``~T log2 T`` comparisons each): the rule
    ``sum_j (T - 2j) <= 3 T log2 T``. Measured on one CPU thread, ``T x 656,896``: the sort 85 ms at ``T = 8``,
    710 ms at ``T = 32``; the network 12 ms at ``T = 8``, 59 / 190 / 310 / 410 ms at ``T = 32`` with
    ``trim_number`` 1 / 4 / 8 / 15."""
    work = sum(T - 2 * j for j in range(trim_number))  # rows entering each round
    return work <= 3 * T * max(1.0, math.log2(T))


def trimmed_mean(J: Tensor, trim_number: int) -> Tensor:
    """Coordinate-wise trimmed mean of the rows of ``J`` (``T x P``) (Yin, Chen, Ramchandran, Bartlett,
    "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018, the ``beta``-trimmed
    mean with ``beta = trim_number / T``): in every column, drop the ``trim_number`` largest and the
    ``trim_number`` smallest entries and average the ``T - 2 trim_number`` left. ``trim_number = 0`` is the
    mean. Needs ``T >= 2 trim_number + 1``.

    The extremes are removed by a min/max selection network (:func:`_drop_extremes`, ``trim_number`` rounds)
    where that costs less than sorting every column (:func:`_network_pays`), else by ``torch.sort``: the same
    values are averaged either way (only the order of the float additions differs). A column holding NaN is
    averaged as after ``torch.sort`` (NaN above ``+inf``, as TorchJD's ``TrimmedMean``)."""
    T = J.shape[0]
    if 2 * trim_number + 1 > T:
        raise ValueError(f"trimmed_mean needs at least 2 * trim_number + 1 = {2 * trim_number + 1} rows, got {T}")
    if trim_number == 0:
        return J.mean(dim=0)
    if _network_pays(T, trim_number):
        kept = J
        for _ in range(trim_number):
            kept = _drop_extremes(kept)
        out = kept.mean(dim=0)
        if not bool(out.isnan().any()):  # min/max spread NaN, which the sort would order (and maybe trim)
            return out
    return torch.sort(J, dim=0).values[trim_number : T - trim_number].mean(dim=0)


def _count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
    return value


@register("krum")
class Krum(GramianBalancer):
    """Krum / Multi-Krum (Blanchard et al., NeurIPS 2017; :func:`krum`): only the part(s) whose gradients lie
    closest to their ``T - f - 2`` nearest neighbours train the shared parameters and their heads.

    :param f: the number of parts whose gradients may be arbitrary (the paper's ``f``, TorchJD's
        ``n_byzantine``; no default in the paper or TorchJD; lossport's 0 keeps the ``T - 2`` nearest
        neighbours). The parts present in a batch must number at least ``f + 3``.
    :param m: how many parts Multi-Krum selects and averages (the paper's ``m``, TorchJD's ``n_selected``;
        1: Krum).
    :param distance: ``"squared"`` (the paper's score) or ``"euclidean"`` (TorchJD 0.18's score, the sum of
        plain distances; it can select a different part).

    Factor: the paper's and TorchJD's weights sum to 1 (the selected gradient, or the mean of the ``m``
    selected); lossport's sum to ``T`` (``b = T / m`` on the selected parts, 0 elsewhere), as the other
    normalised methods. A part with weight 0 gets no gradient at all, its head included (TorchJD's
    ``mtl_backward`` gives every head its own gradient instead).

    Beware with few parts: with ``T = f + 3`` (three parts and ``f = 0``, the defaults) every score is the
    distance to the nearest other gradient, so the two parts closest to each other tie and the first of them in
    part order is selected at every step, and a part whose gradient lies far from the others (a loss of another
    scale) is never selected: the other two heads never train. On multidigits (``left``, ``right``, ``ink``;
    BENCHMARKS.md, issue 15) only ``left`` trains: accuracies 0.93 / 0.10, ink MAE 32.9 against 0.81 single-task;
    TorchJD's Krum on the same schedule ends at 0.93 / 0.10 / 32.7 with the heads weighted as here and at
    0.93 / 0.23 / 3.1 with its plain-gradient heads."""

    name = "krum"
    kind: ClassVar[str] = "gramian"

    def __init__(self, f: int = 0, m: int = 1, distance: str = "squared", **engine: Any) -> None:
        super().__init__(**engine)
        self.f = _count("Krum: f", f, 0)
        self.m = _count("Krum: m", m, 1)
        if distance not in _DISTANCES:
            raise ValueError(f"Krum: distance must be one of {_DISTANCES}, not {distance!r}")
        self.distance = distance

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        G = check_gramian(G, "Krum")
        T = G.shape[0]
        if self.f + 3 > T or self.m > T:
            raise ValueError(
                f"Krum(f={self.f}, m={self.m}) needs at least {max(self.f + 3, self.m)} parts present, but the batch "
                f"has {T}: {losses.names} (missing: {list(losses.missing)}); lower f (or m), or use Krum with more "
                "parts"
            )
        return T * krum(G, self.f, self.m, self.distance)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", f={self.f}, m={self.m}, distance={self.distance!r})"


@register("trimmed_mean", "trimmedmean")
class TrimmedMean(_Surgery):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018; :func:`trimmed_mean`) of the parts' gradients on the
    shared tensors (the shared parameters, or the representation in ``features`` mode): in every coordinate the
    ``trim_number`` largest and ``trim_number`` smallest values are dropped and the rest averaged. Not a
    weighted sum of the gradients: it is applied through the zero-valued correction term of
    :mod:`lossport.balance.surgery` (``trimmed_mean/shared``).

    :param trim_number: values dropped at each end of every coordinate (TorchJD's ``trim_number``; the paper's
        fraction ``beta`` is ``trim_number / T``). The parts present must number at least ``2 trim_number + 1``.

    Factor: TorchJD's aggregation is a mean of the gradients; lossport's shared update is ``T`` times it, so
    ``trim_number = 0`` is the plain sum of the parts. Static weights scale each part's gradient before the
    trimming (the rows are ``s_i g_i``). Heads receive their plain gradient (``b = 1``): their parameters are
    not shared, so no coordinate has more than one value to trim. ``every=K``: the calls between two trimmed
    ones are the plain sum."""

    name = "trimmed_mean"
    kind: ClassVar[str] = "surgery"  # needs the gradients themselves (a correction term)

    def __init__(self, trim_number: int = 1, **engine: Any) -> None:
        super().__init__(**engine)
        self.trim_number = _count("TrimmedMean: trim_number", trim_number, 0)

    def surgery(self, J: Tensor, xs: list[Tensor], losses: Losses, s: Tensor) -> tuple[Tensor, Tensor, dict]:
        T = J.shape[0]
        if 2 * self.trim_number + 1 > T:
            raise ValueError(
                f"TrimmedMean(trim_number={self.trim_number}) needs at least {2 * self.trim_number + 1} parts "
                f"present, but the batch has {T}: {losses.names} (missing: {list(losses.missing)}); lower "
                "trim_number"
            )
        c = torch.empty(J.shape[1], dtype=J.dtype, device=J.device)
        scaled = not bool((s == 1).all())  # static weights all 1: the rows are J's (x * 1 = x), no product
        for a in range(0, J.shape[1], _BLOCK):  # column blocks: the sort's temporaries stay small
            rows = J[:, a : a + _BLOCK] * s[:, None] if scaled else J[:, a : a + _BLOCK]
            c[a : a + _BLOCK] = T * trimmed_mean(rows, self.trim_number) - rows.sum(0)
        return torch.ones(T, dtype=J.dtype, device=J.device), c, {}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", trim_number={self.trim_number})"


@register("excess_mtl", "excessmtl")
class ExcessMTL(GramianBalancer):
    """ExcessMTL (He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024): weights moved towards
    the parts far from their own optimum, measured by an estimate of the *excess* risk rather than the loss (so
    label noise, which raises the loss but not the excess risk, does not attract weight).

    Per part ``i``, with ``J_i`` its gradient on the shared parameters: accumulate ``S_i += J_i^2`` (AdaGrad's
    diagonal Hessian estimate, Eq. 7), estimate the excess risk ``e_i = sum_p J_ip^2 / sqrt(S_ip + 1e-7)``
    (``g^T H^-1 g``, Eq. 6), divide it by the part's baseline ``e_i(0)`` (Sec. 3.2), and update the weights by an
    exponentiated gradient step ``w_i <- w_i exp(robust_step_size * e_i)``, renormalised (Eq. 9; the equation
    numbers are those TorchJD's documentation cites).

    :param robust_step_size: ``eta_alpha`` (1.0, the official code, LibMTL and TorchJD).
    :param n_warmup_steps: calls with uniform weights during which the excess risks are averaged into the
        baseline (0: the first call's excess risk is the baseline and is used unscaled, as the official code,
        LibMTL and TorchJD; the paper's appendix C.1 collects 3 epochs).

    Factor ``T``: the paper's and TorchJD's weights sum to 1 (the official code and LibMTL start from 1 per
    part, lossport's ``b = 1`` at the start too). Follows TorchJD 0.18's ``ExcessMTLWeighting`` (tested equal).
    Needs the per-part gradients (``T x P`` memory, plus the ``T x P`` accumulated squares in the state, replaced
    by new tensors at each step, so a failed step restores the old ones without copying them); ``gramian="params"``
    only. The accumulators restart (counted in ``info`` as ``excess_mtl/restarts``) if the set of shared
    parameters changes. State per part name: a missing part keeps its accumulator and weight; the weights of the parts
    present are a softmax over their log-weights."""

    name = "excess_mtl"
    kind: ClassVar[str] = "gramian"

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0, **engine: Any) -> None:
        super().__init__(**engine)
        if self.mode != "params":
            raise ValueError(
                "ExcessMTL accumulates squared gradients per shared parameter across steps; in features mode the "
                "coordinates are the examples of one batch, so use gramian='params'"
            )
        if not robust_step_size > 0:
            raise ValueError(f"ExcessMTL: robust_step_size must be > 0, not {robust_step_size!r}")
        self.robust_step_size = float(robust_step_size)
        self.n_warmup_steps = _count("ExcessMTL: n_warmup_steps", n_warmup_steps, 0)
        self._jac: Tensor | None = None  # this batch's Jacobian, between compute_gramian and weigh only
        self._sq: dict[str, Tensor]  # accumulated squared gradients, on the gradients' device
        self._steps: dict[str, int]
        self._warm: dict[str, float]
        self._initial: dict[str, float]
        self._logw: dict[str, float]
        self._width: int | None
        self._restarts: int
        for name, value in (
            ("_sq", {}),
            ("_steps", {}),
            ("_warm", {}),
            ("_initial", {}),
            ("_logw", {}),
            ("_width", None),
            ("_restarts", 0),
        ):
            self.add_state(name, value)

    def _snapshot(self) -> Any:
        return _shallow_snapshot(self)  # the accumulators are replaced at each step, never changed in place

    def _restore(self, before: Any) -> None:
        _shallow_restore(self, before)

    def compute_gramian(self, losses: Losses) -> Tensor:
        """``G`` (float64) for the finite check and the diagnostics only (the weights come from the Jacobian):
        from float32 products, as the surgery methods' diagnostics (a third of the cost of float64 ones at
        ``T = 8``), or by :func:`gram64` where those overflow or the gradients are in another dtype."""
        J, _ = self.compute_jacobian(losses)
        self._jac = J.detach()
        if self._jac.dtype in (torch.float32, torch.float64):
            G = (self._jac @ self._jac.T).to(torch.float64)
            if _all_finite(G):
                return G
        return gram64(self._jac)  # float64, without a float64 copy of J

    def balance(self, losses: Losses) -> dict[str, Tensor | float]:
        try:
            return super().balance(losses)
        finally:
            self._jac = None  # never keep a batch's Jacobian past its step (a failed call included)

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        J = self._jac
        assert J is not None, "ExcessMTL.weigh is called by balance() after compute_gramian"
        return len(losses.names) * self.weigh_jacobian(J, losses.names)

    def weigh_jacobian(self, J: Tensor, names: list[str]) -> Tensor:
        """The weights (sum 1) after this step's update, from the Jacobian ``J`` (rows: ``names``); updates the
        state."""
        if self._width is not None and J.shape[1] != self._width:
            self._sq, self._steps, self._warm, self._initial = {}, {}, {}, {}
            self._restarts += 1
        self._width = J.shape[1]
        dtype = self._dtype or J.dtype  # the accumulators' dtype: the one asked by to(), else the gradients'
        sq = torch.empty(J.shape[1], dtype=dtype, device=J.device)  # two buffers for every part's row
        root = torch.empty_like(sq)
        excess = []
        for i, k in enumerate(names):
            g = J[i].detach().to(dtype)
            torch.mul(g, g, out=sq)  # g ** 2, the same rounding
            acc = self._sq[k].to(sq) + sq if k in self._sq else sq.clone()
            self._sq[k] = acc
            excess.append(sq.div_(torch.add(acc, 1e-7, out=root).sqrt_()).sum())  # sum sq / sqrt(acc + 1e-7)
        for k, e in zip(names, torch.stack(excess).tolist() if excess else []):  # one transfer
            n = self._steps.get(k, 0)
            self._steps[k] = n + 1
            if n < self.n_warmup_steps:
                self._warm[k] = self._warm.get(k, 0.0) + e
                continue
            if k not in self._initial:
                if self.n_warmup_steps > 0:
                    self._initial[k] = self._warm[k] / self.n_warmup_steps
                    e = e / (self._initial[k] + 1e-7)
                else:
                    self._initial[k] = e
            else:
                e = e / (self._initial[k] + 1e-7)
            self._logw[k] = self._logw.get(k, 0.0) + self.robust_step_size * e
        logw = torch.tensor([self._logw.get(k, 0.0) for k in names], dtype=torch.float64, device=J.device)
        self.info["excess_mtl/restarts"] = float(self._restarts)
        return torch.softmax(logw, dim=0)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", robust_step_size={self.robust_step_size})"


__all__ = ["ExcessMTL", "Krum", "TrimmedMean", "krum", "trimmed_mean"]
