"""Adversarial Gramians (issue 17): every Gramian weighting function and every registered Gramian balancer's
``weigh``, on random Gramians including zero, rank-one, duplicated, opposite, huge, tiny, NaN and inf ones,
returns finite weights (possibly with a warning) or raises a lossport error (``FloatingPointError`` or a
``ValueError``), within a time bound, and never returns NaN. Also the training-level regressions of issue 17
(CAGrad at ~1e110 gradients, GradVac on identical gradients, GradNorm on a single-part batch)."""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lossport
from lossport.balance import GradNorm, GramianBalancer, resolve
from lossport.balance import weighting as W
from lossport.balance.base import _REGISTRY
from lossport.result_types import Losses

LIMIT_S = 5.0  # per call; the solvers take milliseconds, a hang takes forever


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the body with ``Hang`` after ``seconds`` (SIGALRM: interrupts pure-Python loops)."""

    def handler(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def orders(T: int) -> list[list[int]]:
    return [[j for j in range(T) if j != i] for i in range(T)]


FUNCTIONS: dict[str, Callable[[torch.Tensor], object]] = {
    "mgda": W.mgda,
    "pcgrad": lambda G: W.pcgrad(G, orders(G.shape[0])),
    "imtl_g": W.imtl_g,
    "cagrad": W.cagrad,
    "upgrad": W.upgrad,
    "dualproj": W.dualproj,
    "aligned_mtl": W.aligned_mtl,
    "nash_mtl": W.nash_mtl,
    "fairgrad": W.fairgrad,
    "config": W.config,
    "gradvac": lambda G: W.gradvac(G, orders(G.shape[0]), torch.full((G.shape[0],) * 2, 0.5))[0],
}

BALANCERS = sorted(
    {
        name
        for name, cls in _REGISTRY.items()
        # the methods whose weights are a function of the Gramian alone (surgery methods and ExcessMTL need the
        # gradients themselves)
        if issubclass(cls, GramianBalancer) and cls.kind == "gramian" and not hasattr(cls, "weigh_jacobian")
    }
)


def test_every_registered_gramian_balancer_is_driven():
    assert {"mgda", "pcgrad", "cagrad", "upgrad", "nash_mtl", "fairgrad", "gradvac", "config"} <= set(BALANCERS)


KINDS = ("random", "rank1", "zero", "duplicate", "opposite", "zero_row", "nan", "inf", "overflow")


@st.composite
def gramians(draw: st.DrawFn) -> tuple[str, torch.Tensor]:
    T = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**20))
    exponent = draw(st.sampled_from([-150, -75, 0, 75, 150]))  # gradient scale 10^e, Gramian 10^(2e)
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, draw(st.integers(1, 8)), generator=g, dtype=torch.float64)
    if kind == "rank1":
        J = torch.randn(T, 1, generator=g, dtype=torch.float64) * J[:1]
    elif kind == "zero":
        J = J * 0
    elif kind == "duplicate" and T > 1:
        J[1] = J[0]
    elif kind == "opposite" and T > 1:
        J[1] = -J[0]
    elif kind == "zero_row":
        J[0] = 0
    G = (J * 10.0**exponent) @ (J * 10.0**exponent).T
    i, j = draw(st.integers(0, T - 1)), draw(st.integers(0, T - 1))
    if kind == "nan":
        G[i, j] = G[j, i] = float("nan")
    elif kind == "inf":
        G[i, j] = G[j, i] = float("inf")
    elif kind == "overflow":  # gradients of norm ~1e160: the products overflow
        G = (J * 1e160) @ (J * 1e160).T
    return kind, G


def check(call: Callable[[], object], kind: str, G: torch.Tensor) -> None:
    """Finite weights (a warning allowed) or a lossport error; never NaN, never a hang."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with time_limit(LIMIT_S):
                w = call()
        except (FloatingPointError, ValueError) as e:
            assert str(e)  # an error that says something
            assert kind in ("nan", "inf", "overflow") or not torch.isfinite(G).all(), f"{kind}: {e}"
            return
    assert isinstance(w, torch.Tensor) and w.shape == (G.shape[0],)
    assert bool(torch.isfinite(w).all()), f"{kind}: non-finite weights {w.tolist()}"
    assert bool(torch.isfinite(G).all()), f"{kind}: weights from a non-finite Gramian"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=gramians(), name=st.sampled_from(sorted(FUNCTIONS)))
def test_weighting_functions_never_hang_nor_return_nan(case, name):
    kind, G = case
    check(lambda: FUNCTIONS[name](G), kind, G)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=gramians(), name=st.sampled_from(BALANCERS))
def test_registered_balancers_never_hang_nor_return_nan(case, name):
    kind, G = case
    T = G.shape[0]
    names = [f"p{i}" for i in range(T)]
    losses = Losses(parts={k: torch.tensor(1.0 + i) for i, k in enumerate(names)}, weights=dict.fromkeys(names, 1.0))
    bal = resolve(name)
    minimum = getattr(bal, "f", -3) + 3  # Krum's precondition: f + 3 parts (its own documented error otherwise)
    if minimum > T and bool(torch.isfinite(G).all()):
        with pytest.raises(ValueError, match=f"needs at least {minimum} parts present"):
            bal.weigh(G, losses)
        return
    check(lambda: bal.weigh(G, losses), kind, G)


@pytest.mark.parametrize("name", BALANCERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_every_gramian_balancer_refuses_a_non_finite_gramian(name: str, bad: float) -> None:
    """Deterministic companion of the property test above (which found MoDo returning NaN weights from a NaN
    Gramian): each method's weigh checks its Gramian, for T = 1 and T = 5."""
    for T in (1, 5):
        G = torch.eye(T, dtype=torch.float64)
        G[0, 0] = bad
        names = [f"p{i}" for i in range(T)]
        losses = Losses(
            parts={k: torch.tensor(1.0 + i) for i, k in enumerate(names)}, weights=dict.fromkeys(names, 1.0)
        )
        with pytest.raises(FloatingPointError, match="NaN or inf"):
            resolve(name).weigh(G, losses)


def test_time_limit_catches_a_hang():
    def spin() -> None:
        while True:
            pass

    with pytest.raises(Hang), time_limit(0.2):
        spin()


# ------------------------------------------------------------------------------------ issue 17 regressions
class Wide(nn.Module):
    """A float64 trunk with two heads whose outputs are multiplied by ``scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.scale = scale
        self.trunk = nn.Linear(3, 4).double()
        self.a, self.b = nn.Linear(4, 1).double(), nn.Linear(4, 1).double()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return {"a": self.scale * self.a(h), "b": self.scale * self.b(h)}


def data(n: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(n, 3, generator=g, dtype=torch.float64),
        "a": torch.zeros(n, 1, dtype=torch.float64),
        "b": torch.zeros(n, 1, dtype=torch.float64),
    }


@pytest.mark.parametrize("name", ["cagrad", "nash_mtl", "fairgrad", "upgrad"])
def test_train_returns_at_1e110_gradients(name):
    """MSE of outputs ~1e55: losses ~1e110... gradients ~1e110, Gramian ~1e220 (finite): the weights are those
    of the same net at scale 1 (scale-invariant methods) and training returns."""
    with time_limit(60):
        res = lossport.train(
            Wide(1e55), data(), {"a": "mse", "b": "mse"}, balance=name, epochs=1, batch_size=16, progress=False
        )
    assert len(res.history) == 1


def test_cagrad_weights_identical_at_every_gradient_scale():
    net1, net2 = Wide(1.0), Wide(1e55)
    objs = [lossport.Objective({"a": "mse", "b": "mse"}, balance="cagrad") for _ in range(2)]
    d = data()
    d2 = {**d, "a": d["a"] + 0.3, "b": d["b"] - 0.2}
    d3 = {**d2, "a": d2["a"] * 1e55, "b": d2["b"] * 1e55}
    w1 = objs[0](net1, d2).weights
    w2 = objs[1](net2, d3).weights
    for k in ("a", "b"):
        assert float(w1[k]) == pytest.approx(float(w2[k]), rel=1e-9)


class Twin(nn.Module):
    """Two heads that are the same function: identical gradients on the trunk."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.head(torch.tanh(self.trunk(x)))
        return {"a": y, "b": y.clone()}


def test_gradvac_on_identical_gradients_trains_100_steps():
    """Cosines of identical gradients round to 1 + 1e-16; the EMA target reaches 1 (complex sqrt, then a
    division by 0, before the clamps)."""
    g = torch.Generator().manual_seed(2)
    d = {"x": torch.randn(16, 3, generator=g), "a": torch.randn(16, 1, generator=g)}
    d["b"] = d["a"].clone()
    res = lossport.train(
        Twin(), d, {"a": "mse", "b": "mse"}, balance="gradvac", epochs=100, batch_size=16, progress=False
    )
    assert len(res.history) == 100
    assert all(v == v for v in res.history["loss"])  # no NaN


def test_gradnorm_passes_a_single_part_batch_and_counts_it():
    net = Twin()
    gn = GradNorm()
    obj = lossport.Objective({"a": "mse", "b": "mse"}, balance=gn)
    x = torch.randn(8, 3)
    unlabelled = torch.full((8, 1), float("nan"))  # NaN: no label
    only_a = obj(net, {"x": x, "a": torch.randn(8, 1), "b": unlabelled})  # first batch: one labelled part
    assert list(only_a.parts) == ["a"] and only_a.missing == ("b",) and float(only_a.weights["a"]) == 1.0
    assert gn.info["gradnorm/single_part_batches"] == 1.0
    before = gn.values
    only_a.total.backward()
    gn.step()
    assert gn.values == before  # no GradNorm update
    both = obj(net, {"x": x, "a": torch.randn(8, 1), "b": torch.randn(8, 1)})
    assert "gradnorm/grad_loss" in both.extra  # the next two-part batch is balanced as usual
    both.total.backward()
    gn.step()
    assert gn.values != before and sum(gn.values.values()) == pytest.approx(2.0, rel=1e-6)
    assert gn.info["gradnorm/single_part_batches"] == 1.0
