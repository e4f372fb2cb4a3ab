"""The balancer base (lossport.balance.base): registry, kinds, declared state, its header and its moves."""

from __future__ import annotations

import io
import itertools
from typing import Any

import pytest
import torch
from torch import nn

import lossport
from lossport import Losses
from lossport.balance import (
    FAMO,
    KINDS,
    PREFERENCE,
    Balancer,
    Context,
    EqualWeights,
    PCGrad,
    Uncertainty,
    available,
    kind_of,
    register,
    resolve,
    suggest,
)
from lossport.balance.base import _REGISTRY
from lossport.inspection import inspect
from lossport.report import advise


def losses_of(values: list[float], requires_grad: bool = False) -> Losses:
    parts = {k: torch.tensor(v, requires_grad=requires_grad) for k, v in zip("abc", values)}
    return Losses(parts=parts, weights=dict.fromkeys(parts, 1.0))


# -- registry and kinds ---------------------------------------------------------------------------------------
def test_available_lists_each_method_once_and_aliases_still_resolve():
    names = available()
    classes = {_REGISTRY[n] for n in names}
    assert len(classes) == len(names) == len(set(_REGISTRY.values()))
    assert "uw" in names and "uncertainty" not in names and "nash_mtl" in names and "nash" not in names
    for alias, cls in _REGISTRY.items():
        assert type(resolve(alias)) is cls
    assert kind_of("uncertainty") == kind_of("uw") == "learned"


def test_every_method_has_a_kind_from_the_closed_set():
    kinds = {n: kind_of(n) for n in available()}
    assert set(kinds.values()) == set(KINDS)
    assert kinds["ew"] == "static" and kinds["dwa"] == "loss" and kinds["famo"] == "learned"
    assert kinds["upgrad"] == "gramian" and kinds["graddrop"] == "surgery"
    assert set(PREFERENCE) <= set(available())


def test_register_refuses_a_class_without_a_kind():
    class NoKind(Balancer):
        def balance(self, losses: Losses) -> dict[str, float]:
            return dict.fromkeys(losses.parts, 1.0)

    with pytest.raises(TypeError, match="NoKind has kind None; give the class kind = one of"):
        register("no_kind_method")(NoKind)
    assert "no_kind_method" not in available()


def test_suggest_selects_by_kind_in_preference_order():
    assert suggest(["loss", "learned"])[:5] == ["normalize", "uw", "famo", "dwa", "gradnorm"]
    assert suggest(["gramian"])[:3] == ["upgrad", "mgda", "pcgrad"]
    assert all(kind_of(n) == "gramian" for n in suggest(["gramian"]))
    assert suggest(["static"]) == ["ew", "static"]  # none preferred: alphabetical
    assert suggest(["loss", "learned"], among=["famo", "pcgrad", "cov"]) == ["famo", "cov"]
    with pytest.raises(ValueError, match="unknown balancer kinds \\['gradient'\\]"):
        suggest(["gradient"])


class Scalars(nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.w = nn.Linear(3, 1, bias=False)
        self.k = k

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.w(x).mean()
        return {"a": s, "b": -self.k * s}


def test_advice_names_methods_by_kind():
    x = {"x": torch.randn(32, 3, generator=torch.Generator().manual_seed(0))}
    r = inspect(Scalars(200.0), x, "auto", batch_size=16, batches=2)
    text = " ".join(r.advice)
    assert "try balance='normalize' or 'uw' (loss scales)" in text
    assert "a gradient method ('upgrad', 'mgda', 'pcgrad')" in text
    only = " ".join(advise(r, ["famo", "pcgrad", "ew"]))
    assert "try balance='famo' (loss scales)" in only and "a gradient method ('pcgrad')" in only


# -- the header: a state is refused by another method -------------------------------------------------------
def test_another_methods_state_is_refused_naming_both():
    famo, uw = FAMO(), Uncertainty()
    famo(losses_of([1.0, 2.0]))
    with pytest.raises(
        ValueError, match="balancer state is FAMO's; the run uses Uncertainty: resume with balance='famo' or start"
    ):
        uw.load_state_dict(famo.state_dict())
    with pytest.raises(ValueError, match="state is Uncertainty's; the run uses PCGrad: resume with balance='uw'"):
        PCGrad().load_state_dict(uw.state_dict())
    assert uw.parameters() == []  # nothing was loaded


@pytest.mark.parametrize("mine", available())
def test_no_method_loads_another_methods_state(mine: str):
    bal = resolve(mine)
    for other in available():
        if other == mine:
            continue
        with pytest.raises(ValueError, match=f"state is {type(resolve(other)).__name__}'s; the run uses"):
            bal.load_state_dict(resolve(other).state_dict())


def test_state_without_header_or_of_another_version_is_refused():
    uw = Uncertainty()
    uw(losses_of([1.0, 2.0]))
    state = uw.state_dict()
    assert state["balancer"] == "uw" and state["version"] == Uncertainty.version
    with pytest.raises(ValueError, match="does not say which balancer wrote it"):
        Uncertainty().load_state_dict({k: v for k, v in state.items() if k != "balancer"})
    with pytest.raises(ValueError, match="has format version 1; this lossport reads version 2"):
        Uncertainty().load_state_dict({**state, "version": 1})  # one parameter per part, torch's Adam state
    with pytest.raises(ValueError, match="lacks \\['theta'\\]"):
        Uncertainty().load_state_dict({k: v for k, v in state.items() if k != "theta"})
    with pytest.raises(ValueError, match="DWA state lacks \\['history'\\]"):
        dwa = resolve("dwa")
        dwa.load_state_dict({k: v for k, v in dwa.state_dict().items() if k != "history"})


def test_an_unregistered_class_is_named_by_its_class():
    class Mine(Uncertainty):
        pass

    with pytest.raises(ValueError, match="state is Mine's; the run uses Uncertainty: resume with a Mine balancer"):
        Uncertainty().load_state_dict(Mine().state_dict())


# -- declared state -------------------------------------------------------------------------------------------
class Declared(Balancer):
    """Every kind of value a balancer declares: numbers, dicts, lists, None, tensors and a generator."""

    kind = "loss"

    def __init__(self) -> None:
        super().__init__()
        self.add_state("_count", 0)
        self.add_state("_means", {})
        self.add_state("_seen", [])
        self.add_state("_nadir", None)
        self.add_state("_avg", torch.zeros(3))
        self.add_state("_steps", torch.zeros(3, dtype=torch.long))
        self.add_state("generator", torch.Generator().manual_seed(5))

    def balance(self, losses: Losses) -> dict[str, float]:
        noise = torch.rand(len(losses.parts), generator=self.generator, dtype=torch.float64, device="cpu")
        self._count += 1
        for i, (k, v) in enumerate(losses.parts.items()):
            self._means[k] = self._means.get(k, 0.0) + float(v)
            self._avg[i] += float(v)
            self._steps[i] += 1
        self._seen.append(self._count)
        return {k: 1.0 + float(n) for k, n in zip(losses.parts, noise)}


def run(bal: Balancer, n: int) -> list[dict[str, Any]]:
    return [dict(bal(losses_of([1.0 + t, 2.0, 3.0 * t])).weights) for t in range(n)]


def test_declared_state_round_trips_through_a_checkpoint():
    a, b = Declared(), Declared()
    run(a, 3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"balancer", "version", "count", "means", "seen", "nadir", "avg", "steps", "generator"}
    assert state["balancer"] == "Declared"
    b.load_state_dict(state)
    assert run(a, 3) == run(b, 3)
    assert a._seen == b._seen == [1, 2, 3, 4, 5, 6] and torch.equal(a._avg, b._avg)
    state["avg"] += 100  # the balancer keeps copies, not the checkpoint's tensors
    assert not torch.equal(b._avg, state["avg"])


def test_add_state_refuses_a_second_or_reserved_name():
    bal = Declared()
    with pytest.raises(ValueError, match="'count' declared twice or under a reserved key"):
        bal.add_state("count", 1)
    with pytest.raises(ValueError, match="'version' declared twice or under a reserved key"):
        bal.add_state("version", 1)


def test_to_casts_floating_state_and_keeps_integers_and_the_generator():
    bal = Declared()
    run(bal, 2)
    gen_state = bal.generator.get_state()
    assert bal.to(torch.float64) is bal
    assert bal._avg.dtype == torch.float64 and bal._steps.dtype == torch.long
    assert torch.equal(bal.generator.get_state(), gen_state)
    bal.to("meta")
    assert bal._avg.device.type == "meta" and bal._steps.device.type == "meta"
    assert bal.generator.device.type == "cpu"  # a host generator: its draws are made on the host


def test_learned_state_to_float64_survives_a_checkpoint():
    uw = Uncertainty()
    for t in range(3):
        out = uw(losses_of([1.0 + t, 2.0]))
        out.total.backward()
        uw.step()
    uw.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in uw.parameters())
    state = uw.state_dict()
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float64 and state["steps"].tolist() == [3, 3]
    twin = Uncertainty()
    twin.load_state_dict(uw.state_dict())
    assert all(p.dtype == torch.float64 for p in twin.parameters())
    for bal in (uw, twin):
        out = bal(losses_of([0.5, 4.0]))
        out.total.backward()
        bal.step()
    assert uw.values == twin.values


def test_pairs_of_aliases_share_one_canonical_name_in_the_state():
    for a, b in itertools.combinations(_REGISTRY, 2):
        if _REGISTRY[a] is _REGISTRY[b]:
            state = resolve(a).state_dict()
            resolve(b).load_state_dict(state)  # an alias loads its canonical name's state
            assert state["balancer"] in available()


def test_public_names():
    assert lossport.balance.suggest is suggest and "kind_of" in lossport.balance.__all__


def test_to_before_the_first_call_sets_the_dtype_of_state_made_later():
    uw = Uncertainty().to(torch.float64)
    uw(losses_of([1.0, 2.0]))  # float32 parts
    assert [p.dtype for p in uw.parameters()] == [torch.float64]
    half = Uncertainty()
    half(Losses(parts={"a": torch.tensor(1.0, dtype=torch.float16)}, weights={"a": 1.0}))
    assert half.parameters()[0].dtype == torch.float32  # an optimizer's parameter: at least float32


def test_a_call_brings_the_state_to_the_parts_device():
    class Holder(Balancer):
        kind = "static"

        def __init__(self) -> None:
            super().__init__()
            self.add_state("_avg", {"a": torch.zeros(2)})

        def balance(self, losses: Losses) -> dict[str, float]:
            assert self._avg["a"].device == losses.parts["a"].device  # already there when the method runs
            return {"a": 1.0}

    bal = Holder()
    out = bal(Losses(parts={"a": torch.zeros((), device="meta")}, weights={"a": 1.0}))
    assert out.total.device.type == "meta" and bal._avg["a"].device.type == "meta"


# -- what a method needs per step: the Context ------------------------------------------------------------------
class NeedsTwo(Balancer):
    kind = "static"
    batches = 2

    def balance(self, losses: Losses) -> dict[str, float]:
        assert self.context is not None
        other = self.context.extra[0]()
        return {k: float(other.parts[k]) for k in losses.parts}


def test_a_method_that_needs_extra_batches_or_a_meta_batch_refuses_a_call_without_them():
    bal = NeedsTwo()
    with pytest.raises(ValueError, match="NeedsTwo uses 2 independent training batches per step and got 0 extra"):
        bal(losses_of([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"context must be a lossport\.balance\.Context, not dict"):
        bal(losses_of([1.0, 2.0]), {"extra": ()})  # type: ignore[arg-type]
    out = bal(losses_of([1.0, 2.0]), Context(extra=(lambda: losses_of([3.0, 5.0]),)))
    assert out.weights == {"a": 3.0, "b": 5.0}
    assert bal.context is None  # the context lives for its call only

    class Bilevel(NeedsTwo):
        batches = 1
        meta = True

    with pytest.raises(ValueError, match=r"Bilevel is bilevel: .*\['train', 'optimizer'\] missing"):
        Bilevel()(losses_of([1.0]), Context(meta=lambda: losses_of([1.0])))
    assert EqualWeights()(losses_of([1.0, 2.0]), Context()).weights == {"a": 1.0, "b": 1.0}  # unused: accepted
