"""Output names: namedtuples, dataclasses, OrderedDict subclasses, nested dicts/lists, unnamable outputs."""

from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lossport import LossSpecError, Objective, Scaled
from lossport.objective import name_outputs

Pair = namedtuple("Pair", ["main", "side"])


class NamedTupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 1)

    def forward(self, x):
        return Pair(self.a(x), self.b(x))


@dataclass
class Heads:
    score: Tensor
    depth: Tensor
    unused: Tensor | None = None


class DataclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 1)

    def forward(self, x):
        return Heads(score=self.a(x), depth=self.b(x))


class FakeModelOutput(OrderedDict):
    """Like a Hugging Face ModelOutput: an OrderedDict subclass, None fields left out, a tuple of hidden states."""


class HFLikeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h1 = torch.tanh(self.emb(x))
        return FakeModelOutput(loss=None, logits=self.head(h1), hidden_states=(x, h1))


def test_namedtuple_fields_name_the_outputs_and_lists_still_match_by_position():
    net, x = NamedTupleNet(), torch.randn(5, 3)
    y0, y1 = torch.randn(5, 2), torch.randn(5, 1)
    obj = Objective(["mse", Scaled("mae", 2.0)])
    losses = obj(net, {"x": x, "main": y0, "side": y1})
    assert obj.output_names == ["main", "side"] and losses.names == ["main", "side"]
    out = net(x)
    assert torch.allclose(losses.total, F.mse_loss(out.main, y0) + 2 * F.l1_loss(out.side, y1))
    # (x, y) pairs: y by position, as for plain tuples
    assert torch.allclose(obj(net, (x, (y0, y1))).total, losses.total)


def test_dataclass_fields_name_the_outputs_and_none_fields_are_left_out():
    net, x = DataclassNet(), torch.randn(4, 3)
    t = torch.tensor([0, 1, 1, 0])
    obj = Objective({"score": "ce", "depth": "mse"})
    d = torch.randn(4, 1)
    losses = obj(net, {"x": x, "score": t, "depth": d})
    assert obj.output_names == ["score", "depth"]
    out = net(x)
    assert torch.allclose(losses.total, F.cross_entropy(out.score, t) + F.mse_loss(out.depth, d))
    with pytest.raises(LossSpecError, match="no output of that name"):
        Objective({"unused": "mse"})(net, {"x": x, "unused": d})


def test_ordered_dict_subclass_with_none_and_nested_tuple():
    net, x = HFLikeNet(), torch.randn(4, 3)
    t = torch.tensor([1, 0, 1, 1])
    obj = Objective({"logits": "ce"})
    losses = obj(net, {"x": x, "logits": t})
    assert obj.output_names == ["logits", "hidden_states/0", "hidden_states/1"]
    assert torch.allclose(losses.total, F.cross_entropy(net(x)["logits"], t))
    # a nested output can carry a loss of its own
    h1 = net(x)["hidden_states"][1]
    both = Objective({"logits": "ce", "hidden_states/1": lambda h: h.pow(2).mean()})(net, {"x": x, "logits": t})
    assert both.names == ["logits", "hidden_states/1"]
    assert both.parts["hidden_states/1"].item() == pytest.approx(h1.pow(2).mean().item(), rel=1e-6)


def test_nested_loss_dicts_are_named_parent_child_and_auto_takes_them_as_losses():
    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            z = self.lin(x)
            return {"rpn": {"objectness": z[:, 0].pow(2).mean(), "box": z[:, 1].abs().mean()}, "roi": z.pow(2).mean()}

    net, x = Detector(), torch.randn(6, 3)
    losses = Objective()(net, {"x": x})
    assert losses.names == ["rpn/objectness", "rpn/box", "roi"]
    z = net.lin(x)
    expected = z[:, 0].pow(2).mean() + z[:, 1].abs().mean() + z.pow(2).mean()
    assert torch.allclose(losses.total, expected, atol=1e-6)


def test_unnamable_outputs_are_errors_that_say_how_to_name_them():
    many = tuple(torch.zeros(2) for _ in range(9))
    with pytest.raises(LossSpecError, match=r"tuple of 9 values.*return a dict"):
        name_outputs(many)
    assert list(name_outputs(many[:8])[0]) == [f"out{i}" for i in range(8)]
    with pytest.raises(LossSpecError, match=r"'a/b'.*one level deep"):
        name_outputs({"a": {"b": {"c": torch.zeros(1)}}})
    with pytest.raises(LossSpecError, match=r"output 'n'.*int, not a tensor"):
        name_outputs({"n": 3})
    with pytest.raises(LossSpecError, match="twice"):
        name_outputs({"a/b": torch.zeros(1), "a": {"b": torch.zeros(1)}})
    with pytest.raises(LossSpecError, match="non-string key"):
        name_outputs({1: torch.zeros(1)})


def test_many_tensor_net_error_comes_from_the_objective():
    class Wide(nn.Module):
        def forward(self, x):
            return [x * i for i in range(10)]

    with pytest.raises(LossSpecError, match="list of 10 values"):
        Objective()(Wide(), {"x": torch.randn(2, 3)})
