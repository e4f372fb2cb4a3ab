"""targets=: a dict {output: key}, one key for every supervised output, a callable; the `labels` rule; errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossport import LossSpecError, Objective
from lossport.metrics import metric_set


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 1)

    def forward(self, x):
        return {"a": self.a(x), "b": self.b(x)}


class Classifier(nn.Module):
    """Hugging Face style: forward(input, labels=None) -> {"logits"}; labels are also an input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(3, 4)

    def forward(self, x, labels=None):
        return {"logits": self.lin(x)}


def batch(n=5):
    g = torch.Generator().manual_seed(2)
    return {"x": torch.randn(n, 3, generator=g), "y": torch.randn(n, 3, generator=g)}


def test_dict_targets_read_other_keys():
    net, b = TwoHeads(), batch()
    b["ya"], b["yb"] = b["y"][:, :2], b["y"][:, 2:]
    obj = Objective({"a": "mse", "b": "mae"}, targets={"a": "ya", "b": "yb"})
    losses = obj(net, b)
    out = net(b["x"])
    assert torch.allclose(losses.total, F.mse_loss(out["a"], b["ya"]) + F.l1_loss(out["b"], b["yb"]))
    assert "ya" in obj.describe() and "yb" in obj.describe()
    # the targets by output name, as metrics read them
    t = obj.targets(b)
    assert torch.equal(t["a"], b["ya"]) and torch.equal(t["b"], b["yb"])


def test_callable_targets():
    net, b = TwoHeads(), batch()
    obj = Objective({"a": "mse", "b": "mse"}, targets=lambda bt: {"a": bt["y"][:, :2], "b": bt["y"][:, 2:]})
    losses = obj(net, b)
    out = net(b["x"])
    assert torch.allclose(losses.total, F.mse_loss(out["a"], b["y"][:, :2]) + F.mse_loss(out["b"], b["y"][:, 2:]))
    with pytest.raises(LossSpecError, match=r"output 'b'.*targets\(batch\) has no key 'b' \(its keys: \['a'\]\)"):
        Objective({"a": "mse", "b": "mse"}, targets=lambda bt: {"a": bt["y"][:, :2]})(net, b)
    with pytest.raises(LossSpecError, match="must return a dict"):
        Objective({"a": "mse"}, targets=lambda bt: bt["y"])(net, b)


def test_labels_serve_the_single_supervised_output():
    net = Classifier()
    g = torch.Generator().manual_seed(3)
    x, labels = torch.randn(6, 3, generator=g), torch.randint(0, 4, (6,), generator=g)
    obj = Objective({"logits": "ce"})
    losses = obj(net, {"x": x, "labels": labels})
    assert torch.allclose(losses.total, F.cross_entropy(net.lin(x), labels))
    assert obj.terms is not None and obj.terms[0].target == "labels"
    # metrics read the same target
    ms = metric_set(["accuracy"], obj.output_names)
    assert ms is not None
    ms.update({"logits": net.lin(x)}, obj.targets({"x": x, "labels": labels}))
    expected = (net.lin(x).argmax(1) == labels).float().mean().item()
    assert ms.compute()["logits/accuracy"] == pytest.approx(expected)


def test_labels_do_not_serve_several_outputs_and_the_error_says_what_to_do():
    net, b = TwoHeads(), batch()
    b["labels"] = b.pop("y")
    with pytest.raises(
        LossSpecError, match=r"output 'a'.*the batch has no key 'a' \(its keys: \['labels', 'x'\]\).*targets="
    ):
        Objective({"a": "mse", "b": "mse"})(net, b)


def test_own_key_wins_over_labels():
    net, b = TwoHeads(), batch()
    b["a"], b["labels"] = b["y"][:, :2], torch.zeros(5, 2)
    losses = Objective({"a": "mse"})(net, b)
    assert torch.allclose(losses.total, F.mse_loss(net(b["x"])["a"], b["a"]))


def test_targets_errors_name_the_output_and_the_key():
    net, b = TwoHeads(), batch()
    with pytest.raises(LossSpecError, match=r"targets= names output 'c'.*'a', 'b'"):
        Objective({"a": "mse"}, targets={"c": "y"})(net, b)
    with pytest.raises(LossSpecError, match=r"output 'a'.*the batch has no key 'za' \(its keys: \['x', 'y'\]\)"):
        Objective({"a": "mse"}, targets={"a": "za"})(net, b)
    with pytest.raises(LossSpecError, match="targets= must be"):
        Objective({"a": "mse"}, targets=3)
    with pytest.raises(LossSpecError, match="maps output names to batch keys"):
        Objective({"a": "mse"}, targets={"a": 1})
