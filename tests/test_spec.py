"""Random specs against random nets: compiling either succeeds (and then evaluates to a finite total with the
weighted-sum identity) or raises LossSpecError; nothing else ever escapes."""

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lossport import L1, L2, CustomLoss, LossSpecError, Objective, Scaled
from lossport.losses import MAE, MSE, CrossEntropy
from lossport.spec import Term, TermKind, apply_weights, compile_spec

OUTPUT_KINDS = ["linear", "softmax", "sigmoid", "scalar"]


class RandomNet(nn.Module):
    def __init__(self, kinds: list[str], structure: str) -> None:
        super().__init__()
        self.kinds, self.structure = kinds, structure
        self.trunk = nn.Linear(3, 4)
        heads = []
        for k in kinds:
            if k == "softmax":
                heads.append(nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)))
            elif k == "sigmoid":
                heads.append(nn.Sequential(nn.Linear(4, 1), nn.Sigmoid()))
            else:
                heads.append(nn.Linear(4, 1))
        self.heads = nn.ModuleList(heads)

    def names(self):
        if self.structure == "single":
            return ["out"]
        if self.structure == "tuple":
            return [f"out{i}" for i in range(len(self.kinds))]
        return [f"y{i}" for i in range(len(self.kinds))]

    def forward(self, x):
        h = self.trunk(x)
        outs = []
        for k, head in zip(self.kinds, self.heads):
            o = head(h)
            outs.append(o.mean() if k == "scalar" else o)
        if self.structure == "single":
            return outs[0]
        if self.structure == "tuple":
            return tuple(outs)
        return dict(zip(self.names(), outs))


def batch_for(net: RandomNet, n: int = 4):
    g = torch.Generator().manual_seed(0)
    b = {"x": torch.randn(n, 3, generator=g)}
    for name, k in zip(net.names(), net.kinds):
        if k == "softmax":
            b[name] = torch.randint(0, 3, (n,), generator=g)
        elif k == "sigmoid":
            b[name] = torch.randint(0, 2, (n, 1), generator=g).float()
        else:
            b[name] = torch.randn(n, 1, generator=g)
    return b


def leaf_specs(names):
    return st.one_of(
        st.sampled_from(["auto", "mse", "mae", "huber", "ce", "bce", "contrastive", "msee", None]),
        st.sampled_from([*names, "nope"]),
        st.builds(MSE),
        st.builds(MAE),
        st.builds(CrossEntropy, st.sampled_from(["index", "binary", "probabilities"])),
        st.just(lambda o, t: (o - t.float().reshape(o.shape[0], -1)[:, :1]).pow(2).mean()),
        st.just(CustomLoss(lambda o: o.float().pow(2).mean(), target=False)),
        st.just(lambda o: {"a": o.float().mean(), "b": o.float().pow(2).mean()}),
        st.integers(0, 3),
    )


def specs(names):
    leaf = leaf_specs(names)
    scaled = st.builds(Scaled, leaf, st.floats(-2, 2, allow_nan=False))
    item = st.one_of(leaf, scaled)
    pair = st.tuples(st.sampled_from([*names, "nope"]), item)
    regs = st.one_of(st.builds(L1, st.floats(0, 1)), st.builds(L2, st.floats(0, 1)))
    return st.one_of(
        item,
        st.dictionaries(st.sampled_from([*names, "nope"]), st.one_of(item, st.lists(item, max_size=2)), max_size=4),
        st.lists(st.one_of(item, pair, regs), max_size=4),
    )


def weight_specs(names):
    return st.one_of(
        st.none(),
        st.floats(-3, 3, allow_nan=False),
        st.lists(st.floats(0, 3), max_size=4),
        st.dictionaries(st.sampled_from([*names, "nope", names[0] + "/mse"]), st.floats(0, 3), max_size=4),
    )


@st.composite
def cases(draw):
    kinds = draw(st.lists(st.sampled_from(OUTPUT_KINDS), min_size=1, max_size=3))
    structure = draw(st.sampled_from(["dict", "tuple"] + (["single"] if len(kinds) == 1 else [])))
    net = RandomNet(kinds, structure)
    names = net.names()
    return net, draw(specs(names)), draw(weight_specs(names))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_specs_compile_or_raise_loss_spec_error(case):
    net, spec, weights = case
    obj = Objective(spec, weights=weights)
    try:
        losses = obj(net, batch_for(net))
    except LossSpecError:
        return
    d = losses.as_dict()
    expected = sum(float(losses.weights[k]) * d[k] for k in losses.parts) + sum(d[k] for k in losses.extra)
    assert math.isclose(d["loss"], expected, rel_tol=1e-5, abs_tol=1e-6)
    assert obj.describe().count("\n") >= 1


FITTING = {  # losses that fit each output kind (a scalar output is itself a loss: "auto" only)
    "linear": ["auto", "mse", "mae", "huber", MSE()],
    "softmax": ["auto", "ce", CrossEntropy("index", from_logits=False)],
    "sigmoid": ["auto", "bce", "mse", CrossEntropy("binary", from_logits=False)],
    "scalar": ["auto"],
}


@st.composite
def valid_cases(draw):
    """Specs that must compile: every output gets a loss that fits its kind (possibly Scaled by r > 0, possibly
    two of them), weights by name with positive values or none."""
    kinds = draw(st.lists(st.sampled_from(OUTPUT_KINDS), min_size=1, max_size=3))
    net = RandomNet(kinds, "dict")
    spec = {}
    for name, kind in zip(net.names(), kinds):
        leaves = draw(st.lists(st.sampled_from(FITTING[kind]), min_size=1, max_size=1 if kind == "scalar" else 2))
        r = draw(st.one_of(st.none(), st.floats(0.1, 3)))
        leaves = [Scaled(x, r) if r is not None else x for x in leaves]
        spec[name] = leaves[0] if len(leaves) == 1 else leaves
    weighted = draw(st.booleans())
    return net, spec, weighted


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_cases())
def test_well_formed_random_specs_always_compile(case):
    net, spec, weighted = case
    obj = Objective(spec)
    losses = obj(net, batch_for(net))  # must not raise
    if weighted:
        w = {k: 0.5 + i for i, k in enumerate(losses.parts)}
        losses = Objective(spec, weights=w)(net, batch_for(net))
        assert {k: float(v) for k, v in losses.weights.items()} == pytest.approx(
            {k: w[k] * float(obj(net, batch_for(net)).weights[k]) for k in w}
        )
    assert all(math.isfinite(float(v.detach())) for v in losses.parts.values())
    assert len(losses.parts) == sum(1 if not isinstance(v, list) else len(v) for v in spec.values())


# ------------------------------------------------------------------------------------ terms are immutable


def test_terms_are_frozen_with_a_closed_set_of_kinds():
    terms = compile_spec({"a": "auto", "b": ["mse", "mae"]}, ["a", "b"], structure="dict")
    assert [(t.name, t.kind) for t in terms] == [
        ("a", TermKind.AUTO),
        ("b/mse", TermKind.LAYER),
        ("b/mae", TermKind.LAYER),
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        terms[0].weight = 2.0  # type: ignore[misc]
    weighted = apply_weights(terms, {"a": 2.0, "b/mse": 1.0, "b/mae": 0.5})
    assert [t.weight for t in weighted] == [2.0, 1.0, 0.5] and [t.weight for t in terms] == [1.0, 1.0, 1.0]
    assert Term(name="x", output="x", kind="layer").kind is TermKind.LAYER  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a valid TermKind"):
        Term(name="x", output="x", kind="lyer")  # type: ignore[arg-type]


def test_an_output_named_loss_gives_loss_slash_parts():
    assert [t.name for t in compile_spec("loss", ["loss", "logits"], structure="dict")] == ["loss/port"]
    names = [t.name for t in compile_spec({"loss": "mse", "y": "mae"}, ["loss", "y"], structure="dict")]
    assert names == ["loss/mse", "y"]


def test_negative_weight_needs_scaled_and_all_zero_weights_are_refused() -> None:
    """A negative weight maximises its loss: allowed only when asked for in the spec (Scaled(spec, -r))."""
    import torch
    from torch import nn

    from lossport import LossSpecError, Objective, Scaled

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.lin(x)
            return {"a": h[:, :1], "b": h[:, 1:]}

    batch = {"x": torch.randn(4, 3), "a": torch.randn(4, 1), "b": torch.randn(4, 1)}
    with pytest.raises(LossSpecError, match=r"negative weight \('b': -0.5\).*Scaled\(<its loss>, -0.5\)"):
        Objective({"a": "mse", "b": "mse"}, weights={"a": 1.0, "b": -0.5})(Two(), batch)
    asked = Objective({"a": "mse", "b": Scaled("mse", -0.5)})(Two(), batch)
    assert asked.weights["b"] == -0.5
    with pytest.raises(LossSpecError, match="every loss has weight 0"):
        Objective({"a": "mse", "b": "mse"}, weights=[0, 0])(Two(), batch)
    assert Objective({"a": "mse", "b": "mse"}, weights=[0, 1])(Two(), batch).weights["a"] == 0.0


@pytest.mark.parametrize("key", ["a_weights", "weight_a", "a_sample_weight", "sample_weight", "A_W"])
def test_a_misspelt_sample_weight_key_is_an_error_naming_the_right_one(key: str) -> None:
    import torch
    from torch import nn

    from lossport import LossSpecError, Objective

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"a": self.lin(x)}

    batch = {"x": torch.randn(4, 3), "a": torch.randn(4, 1), key: torch.rand(4)}
    with pytest.raises(LossSpecError, match=f"batch key '{key}' looks like .*'a_weight'"):
        Objective({"a": "mse"})(Net(), batch)
    good = {"x": batch["x"], "a": batch["a"], "a_weight": torch.rand(4)}
    Objective({"a": "mse"})(Net(), good)  # the right key is read, no error
