import pytest
import torch
from torch import nn

import lossport
from lossport.balance import EqualWeights, Static, resolve


def _losses(a: float, b: float, wa: float = 1.0, wb: float = 1.0) -> lossport.Losses:
    return lossport.Losses(parts={"a": torch.tensor(a), "b": torch.tensor(b)}, weights={"a": wa, "b": wb})


def test_equal_weights_is_the_statically_weighted_sum():
    out = EqualWeights()(_losses(2.0, 3.0, wa=0.5))
    assert out.weights == {"a": 0.5, "b": 1.0}
    assert float(out.total) == pytest.approx(0.5 * 2 + 3)


def test_static_multiplies_the_spec_weights():
    out = Static({"b": 4.0})(_losses(2.0, 3.0, wa=0.5, wb=2.0))
    assert out.weights["a"] == 0.5
    assert float(out.weights["b"]) == 8.0
    assert float(out.total) == pytest.approx(0.5 * 2 + 8 * 3)


def test_static_rejects_unknown_part_and_bad_weight():
    with pytest.raises(ValueError, match="not loss parts"):
        Static({"c": 1.0})(_losses(1.0, 1.0))
    with pytest.raises(ValueError, match="finite number >= 0"):
        Static({"a": -1.0})
    with pytest.raises(ValueError, match="finite number >= 0"):
        Static({"a": float("nan")})


def test_static_accepts_a_missing_part():
    losses = lossport.Losses(parts={"a": torch.tensor(2.0)}, weights={"a": 1.0}, missing=("b",))
    out = Static({"b": 3.0})(losses)
    assert list(out.weights) == ["a"] and float(out.total) == 2.0


def test_by_name():
    assert isinstance(resolve("ew"), EqualWeights)
    assert isinstance(resolve("static", weights={"a": 2.0}), Static)
    assert EqualWeights().state_dict() == {"balancer": "ew", "version": 1}  # no state beyond the header


def test_end_to_end_static_and_ew():
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    y1, y2 = x.sum(1, keepdim=True), 10 * x[:, :1]
    for bal in (resolve("ew"), resolve("static", weights={"a": 2.0})):
        torch.manual_seed(1)
        trunk, h1, h2 = nn.Sequential(nn.Linear(4, 16), nn.Tanh()), nn.Linear(16, 1), nn.Linear(16, 1)
        params = [*trunk.parameters(), *h1.parameters(), *h2.parameters()]
        opt = torch.optim.Adam(params, lr=0.03)
        first = last = 0.0
        for t in range(30):
            z = trunk(x)
            parts = {"a": nn.functional.mse_loss(h1(z), y1), "b": nn.functional.mse_loss(h2(z), y2)}
            out = bal(lossport.Losses(parts=parts, weights={"a": 1.0, "b": 1.0}))
            expect = sum(float(out.weights[k]) * float(parts[k].detach()) for k in parts)
            assert float(out.total.detach()) == pytest.approx(expect, rel=1e-6)
            opt.zero_grad()
            out.total.backward()
            opt.step()
            bal.step()
            s = float(parts["a"].detach()) + float(parts["b"].detach())
            first, last = (s if t == 0 else first), s
        assert last < 0.5 * first


def test_static_state_round_trip_gives_identical_weights():
    a = Static({"a": 2.0})
    b = Static({"a": 2.0})
    b.load_state_dict(a.state_dict())
    assert b(_losses(1.0, 2.0)).weights == a(_losses(1.0, 2.0)).weights
