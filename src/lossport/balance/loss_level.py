"""Loss-level balancers: weights from the values of the losses (and their history), no extra backward.

Each method costs one forward and one backward per step, like the plain sum; the weights are numbers computed
from detached loss values, so no gradient flows through them. Methods: :class:`Normalize` (initial value,
running EMA, or log-losses), :class:`SI`, :class:`GLS`, :class:`DWA`, :class:`RLW`, :class:`STCH`,
:class:`CoV`.

State advances only on training calls: under ``torch.no_grad()`` (validation) the weights are computed from the
current state and the state is left unchanged (RLW then gives ``b = 1``).

Missing parts (``losses.missing``): a part absent from a batch gets no weight in that batch and its
statistics are left as they are; normalised weights (summing to ``T``) count only the parts present.

The update rules, defaults and published standing are in ``docs/balancing.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..result_types import Losses
from .base import Balancer, register


def _training() -> bool:
    """State advances only on training calls (autograd enabled); evaluations under ``torch.no_grad()`` read the
    state without changing it."""
    return torch.is_grad_enabled()


def _floats(losses: Losses) -> list[float]:
    """The detached values of the parts present, in order, as floats: one host transfer (not one per part)."""
    parts = [v.detach() for v in losses.parts.values()]
    if not parts:
        return []
    if len({(v.dtype, v.device) for v in parts}) == 1:
        return torch.stack(parts).tolist()
    return torch.stack([v.to("cpu", torch.float64) for v in parts]).tolist()


def _values(losses: Losses) -> dict[str, float]:
    """The detached values of the parts present, as floats (one host transfer)."""
    return dict(zip(losses.parts, _floats(losses), strict=True))


def _positive(method: str, name: str, value: float, why: str = "it divides by the losses or their means") -> None:
    """Raise the error of a method that needs finite losses >= 0 (``why`` says what breaks otherwise)."""
    if not value >= 0 or math.isinf(value):
        raise ValueError(
            f"{method} needs finite losses >= 0 ({why}), but part {name!r} is {value}; shift the loss so that "
            "it is >= 0 (add a constant) or use a balancer that accepts any sign ('ew', 'static', 'rlw')"
        )


def _softmax(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


# ------------------------------------------------------------------------------------------------------
@register("normalize", "norm")
class Normalize(Balancer):
    """Divide each part by a detached scale: ``b_i = 1 / m_i``, so every part contributes ``L_i / sg(m_i)``.

    ``mode``:

    * ``"initial"``: ``m_i = L_i(0)``, the part's value in the first batch where it is present.
    * ``"ema"``: ``m_i`` = bias-corrected exponential moving average of ``L_i`` with decay ``beta`` (the
      current batch included, so the first step has ``m_i = L_i``).
    * ``"log"``: ``m_i = L_i`` of the current batch: the gradient is that of ``sum_i log L_i``
      (:class:`SI`, the scale-invariant baseline of Nash-MTL). The total's *value* is then ``T``
      (the parts present), not ``sum_i log L_i``; the parts are reported unweighted next to it.

    Multiplying a part by a constant ``a`` multiplies ``m_i`` by ``a``: the weighted parts, the gradient and the
    training trajectory are unchanged (scale invariance). Factor 1 to the papers (``d = sum_i g_i / m_i``).
    A part at exactly 0 is divided by ``eps``; a negative part raises an error (no scale to divide by).

    Why not the per-batch standardisation ``mean_batch((l - mean(l)) / std(l))`` of the per-example losses ``l``
    (the seed's "standardise the losses to zero mean and unit variance"): the standardised values have batch
    mean exactly 0 for every parameter value, so the reduced loss is the constant 0 and its gradient vanishes
    identically: nothing trains. Detaching the statistics does not rescue it: the gradient becomes
    ``grad mean(l) / std(l)``, a weight set by the *spread* of the per-example losses rather than their size,
    noisy from batch to batch and unbounded as the examples become alike (``std -> 0``). Standardising across
    parts instead subtracts a common mean (no effect on the gradient) and divides every part by the same
    number (no rebalancing at all). Dividing each part by a slowly varying, positive scale of *its own
    magnitude*, as here, is what equalises the scales (and is invariant to multiplying a part by a constant).

    Missing parts keep their ``m_i`` (and EMA step count) untouched.
    """

    name = "normalize"
    kind = "loss"

    def __init__(self, mode: str = "initial", beta: float = 0.9, eps: float = 1e-12) -> None:
        super().__init__()
        if mode not in ("initial", "ema", "log"):
            raise ValueError(f"Normalize: mode must be 'initial', 'ema' or 'log', not {mode!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Normalize: beta must be in [0, 1), not {beta}")
        if not eps > 0:
            raise ValueError(f"Normalize: eps must be > 0, not {eps}")
        self.mode = mode
        self.beta = float(beta)
        self.eps = float(eps)
        self._scale: dict[str, float]  # initial value, or raw (uncorrected) EMA
        self._count: dict[str, int]
        self.add_state("_scale", {})
        self.add_state("_count", {})

    def balance(self, losses: Losses) -> dict[str, float]:
        vals = _values(losses)
        out: dict[str, float] = {}
        for k, v in vals.items():
            _positive(type(self).__name__, k, v)
            if self.mode == "log":
                m = v
            elif self.mode == "initial":
                if k not in self._scale and _training():
                    self._scale[k] = v
                m = self._scale.get(k, v)
            else:
                n = self._count.get(k, 0) + 1
                ema = self.beta * self._scale.get(k, 0.0) + (1 - self.beta) * v
                if _training():
                    self._scale[k], self._count[k] = ema, n
                m = ema / (1 - self.beta**n)
            out[k] = 1.0 / max(m, self.eps)
            self.info[f"scale/{k}"] = m
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, beta={self.beta})"


@register("si", "scale_invariant")
class SI(Normalize):
    """Scale-invariant loss (Nash-MTL's SI baseline, Navon et al. 2022): minimise ``sum_i log L_i``, i.e.
    ``b_i = 1 / sg(L_i)`` (``d = sum_i g_i / L_i``, factor 1). ``Normalize(mode="log")``; see
    :class:`Normalize` for the value of the total and for zero or negative parts. No state."""

    name = "si"

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__(mode="log", eps=eps)

    def __repr__(self) -> str:
        return "SI()"


# ------------------------------------------------------------------------------------------------------
@register("gls", "geometric_mean")
class GLS(Balancer):
    """Geometric loss strategy (Chennupati et al., CVPR-W 2019): minimise ``(prod_i L_i)^(1/T)``.

    Gradient ``sum_i [GM / (T L_i)] g_i`` with ``GM = (prod_j L_j)^(1/T)``, so ``b_i = GM / (T L_i)`` (detached):
    the total's value *and* gradient are those of the geometric mean (factor 1 to the paper and to TorchJD's
    ``GeometricMean``). GLS is SI times the common factor ``GM / T``. ``T`` and ``GM`` count the parts present.
    Needs losses ``>= 0`` (a part at 0 is floored at ``eps``). No state.
    """

    name = "gls"
    kind = "loss"

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = float(eps)

    def balance(self, losses: Losses) -> dict[str, float]:
        vals = _values(losses)
        for k, v in vals.items():
            _positive("GLS", k, v)
        clipped = {k: max(v, self.eps) for k, v in vals.items()}
        T = len(clipped)
        gm = math.exp(sum(math.log(v) for v in clipped.values()) / T)
        self.info["gls/geometric_mean"] = gm
        return {k: gm / (T * v) for k, v in clipped.items()}


# ------------------------------------------------------------------------------------------------------
@register("dwa")
class DWA(Balancer):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

    ``r_i = L_i(t-1) / L_i(t-2)`` from the mean losses of the two previous periods,
    ``b_i = T softmax(r / temperature)_i`` (sums to ``T``; the paper's convention, factor 1; LibMTL and TorchJD
    too). ``b = 1`` until two periods are complete. A period is a round (epoch; ``window=None``, closed by
    :meth:`end_round`, as the paper) or ``window`` consecutive steps (nash-mtl/FAMO use 25). In round mode, the
    means passed to ``end_round`` are used for the parts they name; parts they omit use the mean of the batch
    values this balancer saw.

    Missing parts: a part's period mean is over the batches where it was present; a part absent for a whole
    period keeps its previous history. The softmax runs over the parts present; if one of them has fewer
    than two period means, all weights are 1. Losses must be ``>= 0`` (the rates are ratios of means).
    """

    name = "dwa"
    kind = "loss"

    def __init__(self, temperature: float = 2.0, window: int | None = None) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"DWA: temperature must be > 0, not {temperature}")
        if window is not None and (int(window) != window or window < 1):
            raise ValueError(f"DWA: window must be None (rounds) or an integer >= 1, not {window!r}")
        self.temperature = float(temperature)
        self.window = None if window is None else int(window)
        self._history: dict[str, list[float]]  # up to the last two period means, oldest first
        self._sum: dict[str, float]
        self._n: dict[str, int]
        self._steps: int
        for name, value in (("_history", {}), ("_sum", {}), ("_n", {}), ("_steps", 0)):
            self.add_state(name, value)

    def balance(self, losses: Losses) -> dict[str, float]:
        vals = _values(losses)
        for k, v in vals.items():
            _positive("DWA", k, v, "its rates are ratios of mean losses")
        names = list(vals)
        if all(len(self._history.get(k, [])) == 2 for k in names):
            rates = [self._history[k][1] / self._history[k][0] for k in names]
            z = _softmax([r / self.temperature for r in rates])
            b = {k: len(names) * zi for k, zi in zip(names, z, strict=True)}
        else:
            b = dict.fromkeys(names, 1.0)
        if not _training():
            return b
        for k, v in vals.items():
            self._sum[k] = self._sum.get(k, 0.0) + v
            self._n[k] = self._n.get(k, 0) + 1
        self._steps += 1
        if self.window is not None and self._steps >= self.window:
            self._close({})
        return b

    def end_round(self, round_means: Mapping[str, float]) -> None:
        if self.window is None:
            self._close(round_means)

    def _close(self, given: Mapping[str, float]) -> None:
        means = {k: self._sum[k] / self._n[k] for k in self._sum if self._n[k] > 0}
        means.update({k: float(v) for k, v in given.items()})
        for k, m in means.items():
            self._history[k] = ([*self._history.get(k, []), m])[-2:]
        self._sum, self._n, self._steps = {}, {}, 0

    def __repr__(self) -> str:
        return f"DWA(temperature={self.temperature}, window={self.window})"


# ------------------------------------------------------------------------------------------------------
@register("rlw", "random")
class RLW(Balancer):
    """Random loss weighting (Lin, Ye, Zhang & Tsang, TMLR 2022): each step ``eps ~ N(0, I_T)`` and
    ``b = T softmax(eps)`` (LibMTL's weights sum to 1: factor ``T``). ``T`` counts the parts present; the draws
    come from a ``torch.Generator`` seeded with ``seed`` whose state is in the state dict."""

    name = "rlw"
    kind = "loss"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.generator: torch.Generator
        self.add_state("generator", torch.Generator().manual_seed(self.seed))

    def balance(self, losses: Losses) -> dict[str, float]:
        names = losses.names
        if not _training():
            return dict.fromkeys(names, 1.0)
        # host draws (the weights are numbers): a seed gives the same weights on every device
        eps = torch.randn(len(names), generator=self.generator, dtype=torch.float64, device="cpu")
        w = len(names) * torch.softmax(eps, 0)
        return dict(zip(names, w.tolist(), strict=True))

    def __repr__(self) -> str:
        return f"RLW(seed={self.seed})"


# ------------------------------------------------------------------------------------------------------
@register("stch", "smooth_tchebycheff")
class STCH(Balancer):
    """Smooth Tchebycheff scalarization (Lin et al., ICML 2024), in its multi-task form (STCH_MTL / LibMTL).

    Periods are rounds (closed by :meth:`end_round`) or, with ``window=K``, blocks of ``K`` steps. During the
    first ``warmup`` periods (default 4) the weights are SI's, ``b_i = 1 / L_i``; during period ``warmup`` they
    are still SI's and the mean loss of each part over that period is recorded as the nadir point ``n``
    (LibMTL's schedule: SI for epochs ``< warmup``, SI and recording at epoch ``warmup``). Afterwards the
    objective is ``T mu log sum_i exp(log(L_i / n_i) / mu)``, whose gradient is ``T sum_i p_i g_i / L_i`` with
    ``p = softmax(log(L / n) / mu)``: ``b_i = T p_i / L_i`` (detached). For ``mu = 1``:
    ``b_i = T (1/n_i) / sum_j (L_j / n_j)``. Factor 1 to LibMTL (which multiplies by ``T``). TorchJD's ``STCH``
    is the plain ``mu log sum exp(lambda (f - z*) / mu)``; with ``f = log L``, ``z* = log n`` and ``lambda = 1`` our
    gradient is ``T`` times its gradient (the log transform and the factor ``T`` are LibMTL's).

    ``nadir={part: n_i}`` skips the warm-up. ``T`` and the softmax run over the parts present; a part first
    seen after the warm-up takes its first value as its nadir. Losses must be ``>= 0``.
    """

    name = "stch"
    kind = "loss"

    def __init__(
        self,
        mu: float = 1.0,
        warmup: int = 4,
        window: int | None = None,
        nadir: Mapping[str, float] | None = None,
        eps: float = 1e-20,
    ) -> None:
        super().__init__()
        if not mu > 0:
            raise ValueError(f"STCH: mu must be > 0, not {mu}")
        if int(warmup) != warmup or warmup < 0:
            raise ValueError(f"STCH: warmup (SI periods before the nadir one) must be an integer >= 0, not {warmup!r}")
        if window is not None and (int(window) != window or window < 1):
            raise ValueError(f"STCH: window must be None (rounds) or an integer >= 1, not {window!r}")
        self.mu = float(mu)
        self.warmup = int(warmup)
        self.window = None if window is None else int(window)
        self.eps = float(eps)
        given = None if nadir is None else {k: float(v) for k, v in nadir.items()}
        for k, v in (given or {}).items():
            if not v > 0:
                raise ValueError(f"STCH: nadir of {k!r} must be > 0, not {v}")
        self._nadir: dict[str, float] | None
        self._periods: int
        self._steps: int
        self._sum: dict[str, float]
        self._n: dict[str, int]
        for name, value in (("_nadir", given), ("_periods", 0), ("_steps", 0), ("_sum", {}), ("_n", {})):
            self.add_state(name, value)

    def balance(self, losses: Losses) -> dict[str, float]:
        vals = _values(losses)
        for k, v in vals.items():
            _positive("STCH", k, v)
        L = {k: max(v, self.eps) for k, v in vals.items()}
        if self._nadir is None:  # warm-up: SI, record the nadir during period `warmup`
            if not _training():
                return {k: 1.0 / v for k, v in L.items()}
            if self._periods == self.warmup:
                for k, v in L.items():
                    self._sum[k] = self._sum.get(k, 0.0) + v
                    self._n[k] = self._n.get(k, 0) + 1
            self._steps += 1
            if self.window is not None and self._steps >= self.window:
                self._close_period()
            return {k: 1.0 / v for k, v in L.items()}
        for k, v in L.items():
            if _training():
                self._nadir.setdefault(k, v)
        names = list(L)
        nadir = {k: self._nadir.get(k, v) for k, v in L.items()}
        z = _softmax([math.log(L[k] / nadir[k]) / self.mu for k in names])
        T = len(names)
        self.info.update({f"stch/p/{k}": p for k, p in zip(names, z, strict=True)})
        return {k: T * p / L[k] for k, p in zip(names, z, strict=True)}

    def _close_period(self) -> None:
        self._steps = 0
        if self._nadir is not None:
            return
        if self._periods == self.warmup and self._sum:
            self._nadir = {k: self._sum[k] / self._n[k] for k in self._sum}
            self._sum, self._n = {}, {}
        self._periods += 1

    def end_round(self, round_means: Mapping[str, float]) -> None:
        if self.window is None:
            self._close_period()

    @property
    def nadir(self) -> dict[str, float] | None:
        """The nadir point ``n`` (``None`` during the warm-up)."""
        return None if self._nadir is None else dict(self._nadir)

    def __repr__(self) -> str:
        return f"STCH(mu={self.mu}, warmup={self.warmup}, window={self.window})"


# ------------------------------------------------------------------------------------------------------
@register("cov", "cov_weighting")
class CoV(Balancer):
    """Coefficient-of-variation weighting (Groenendijk, Karaoglu, Gevers & Mensink, WACV 2021).

    Each step, the loss ratio ``l_i = L_i / mu_L_i`` (``mu_L_i``: running mean of the part's past values; ``l = 1``
    at its first step) is tracked with a running mean ``mu_l_i`` and standard deviation ``sigma_l_i``
    (Welford). The weights use the statistics *before* the current step:
    ``alpha_i = c_i / sum_j c_j`` with ``c_i = sigma_l_i / mu_l_i``; uniform during each part's first two
    steps (the authors' code). The paper's ``alpha`` sums to 1; ``b = T alpha`` (factor ``T``).

    ``decay=None`` uses full-history means (the paper's default); ``decay=d`` uses exponential means with
    weight ``d`` on the past (their ``mean_decay`` option). Missing parts keep their statistics; the
    normalisation runs over the parts present.
    """

    name = "cov"
    kind = "loss"

    def __init__(self, decay: float | None = None, eps: float = 1e-8) -> None:
        super().__init__()
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"CoV: decay must be None or in [0, 1), not {decay}")
        self.decay = None if decay is None else float(decay)
        self.eps = float(eps)
        self._n: dict[str, int]
        self._mean_L: dict[str, float]
        self._mean_l: dict[str, float]
        self._S: dict[str, float]
        for name in ("_n", "_mean_L", "_mean_l", "_S"):
            self.add_state(name, {})

    def balance(self, losses: Losses) -> dict[str, float]:
        vals = _values(losses)
        names = list(vals)
        for k, v in vals.items():
            _positive("CoV", k, v)
        if all(self._n.get(k, 0) >= 2 for k in names):
            c = [self._std(k) / self._mean_l[k] for k in names]
            s = sum(c)
            b = {k: len(names) * ci / s for k, ci in zip(names, c, strict=True)} if s > 0 else None
        else:
            b = None
        if b is None:
            b = dict.fromkeys(names, 1.0)
        if _training():
            for k, v in vals.items():
                self._update(k, v)
        return b

    def _std(self, k: str) -> float:
        return math.sqrt(self._S[k] / self._n[k] + self.eps)

    def _update(self, k: str, v: float) -> None:
        n = self._n.get(k, 0)
        ratio = 1.0 if n == 0 else v / max(self._mean_L[k], 1e-300)
        p = 0.0 if n == 0 else (self.decay if self.decay is not None else 1.0 - 1.0 / (n + 1))
        old = self._mean_l.get(k, 0.0)
        new = p * old + (1 - p) * ratio
        self._S[k] = self._S.get(k, 0.0) + (ratio - old) * (ratio - new)
        self._mean_l[k] = new
        self._mean_L[k] = p * self._mean_L.get(k, 0.0) + (1 - p) * v
        self._n[k] = n + 1

    def __repr__(self) -> str:
        return f"CoV(decay={self.decay})"
