"""Binding in the net's current mode: training-only outputs, rebinding, a side-effect-free binding forward."""

import dataclasses
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lossport
from lossport import Objective
from lossport.spec import TermKind

AuxOutputs = namedtuple("AuxOutputs", ["logits", "aux_logits"])


class AuxNet(nn.Module):
    """Like torchvision's Inception v3: a namedtuple (logits, aux_logits) in training, the logits alone in eval."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 3), nn.LogSoftmax(dim=1))  # auto: cross-entropy
        self.aux = nn.Sequential(nn.Linear(8, 3), nn.LogSoftmax(dim=1))

    def forward(self, x):
        h = self.trunk(x)
        if self.training:
            return AuxOutputs(self.head(h), self.aux(h))
        return self.head(h)


class Detector(nn.Module):
    """Like torchvision's Faster R-CNN: a dict of losses in training, per-image detections in eval."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(3, 2)

    def forward(self, x, boxes):
        z = self.lin(x)
        if self.training:
            return {
                "loss_classifier": (z[:, 0] - boxes[:, 0]).pow(2).mean(),
                "loss_box": (z[:, 1] - boxes[:, 1]).abs().mean(),
            }
        return [{"boxes": z[i : i + 1], "scores": z[i, :1]} for i in range(z.shape[0])]


def aux_batch(n=6):
    g = torch.Generator().manual_seed(4)
    return {"x": torch.randn(n, 4, generator=g), "label": torch.randint(0, 3, (n,), generator=g)}


def test_training_only_outputs_are_bound_in_training_and_missing_in_eval():
    net, b = AuxNet(), aux_batch()
    net.train()
    obj = Objective(targets={"logits": "label", "aux_logits": "label"})
    losses = obj(net, b)
    assert losses.names == ["logits", "aux_logits"]
    h = net.trunk(b["x"])
    ce_main, ce_aux = F.cross_entropy(net.head[0](h), b["label"]), F.cross_entropy(net.aux[0](h), b["label"])
    assert torch.allclose(losses.total, ce_main + ce_aux, atol=1e-6)
    net.eval()
    with torch.no_grad():
        ev = obj(net, b)
    assert ev.names == ["logits"] and ev.missing == ("aux_logits",)
    assert ev.total.item() == pytest.approx(ce_main.item(), rel=1e-6)
    # lossport.evaluate with the same objective: the aux part is absent, not an error
    out = lossport.evaluate(net, b, loss=obj)
    assert "aux_logits" not in out and out["logits"] == pytest.approx(ce_main.item(), rel=1e-5)
    assert out["loss"] == pytest.approx(ce_main.item(), rel=1e-5)


def test_one_key_serves_several_outputs():
    net, b = AuxNet(), aux_batch()
    obj = Objective({"logits": "ce", "aux_logits": lossport.Scaled("ce", 0.5)}, targets="label")
    losses = obj(net, b)
    h = net.trunk(b["x"])
    expected = F.cross_entropy(net.head[0](h), b["label"]) + 0.5 * F.cross_entropy(net.aux[0](h), b["label"])
    assert torch.allclose(losses.total, expected, atol=1e-6)
    assert [t.target for t in obj.terms] == ["label", "label"]


def test_bound_in_eval_first_then_rebound_when_training_shows_more_outputs():
    net, b = AuxNet(), aux_batch()
    net.eval()
    obj = Objective(targets={"logits": "label", "aux_logits": "label"})
    with pytest.raises(lossport.LossSpecError, match="no output of that name"):
        obj(net, b)  # bound in eval: the net has no 'aux_logits' there, so targets= naming it is checked
    obj = Objective(targets="label")
    assert obj(net, b).names == ["out"]
    net.train()
    assert obj(net, b).names == ["logits", "aux_logits"]
    assert obj.plan is not None and obj.plan.training
    assert "bound in training mode" in obj.describe()


def test_loss_dict_in_training_and_unnamable_detections_in_eval():
    net = Detector()
    g = torch.Generator().manual_seed(5)
    b = {"x": torch.randn(10, 3, generator=g), "boxes": torch.randn(10, 2, generator=g)}
    net.train()
    obj = Objective()
    losses = obj(net, b)
    assert losses.names == ["loss_classifier", "loss_box"]
    assert all(t.kind is TermKind.PORT for t in obj.terms)
    z = net.lin(b["x"])
    expected = (z[:, 0] - b["boxes"][:, 0]).pow(2).mean() + (z[:, 1] - b["boxes"][:, 1]).abs().mean()
    assert torch.allclose(losses.total, expected, atol=1e-6)
    net.eval()
    with torch.no_grad():
        ev = obj(net, b)  # a list of 10 dicts: not outputs of the plan; every part is absent
    assert ev.parts == {} and ev.missing == ("loss_classifier", "loss_box")


def test_binding_forward_leaves_no_trace():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(6)
            self.lin = nn.Linear(4, 3)
            self.bn = nn.BatchNorm1d(3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.bn(self.lin(x)))

    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    a, ref = Noisy(), Noisy()
    a.train(), ref.train()
    torch.manual_seed(123)
    losses = Objective("mse")(a, (x, y))
    torch.manual_seed(123)
    expected = F.mse_loss(ref(x), y)
    assert losses.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(a.bn.running_mean, ref.bn.running_mean) and int(a.bn.num_batches_tracked) == 1


def test_plan_and_terms_are_immutable():
    net, b = AuxNet(), aux_batch()
    obj = Objective(targets="label")
    obj(net, b)
    assert obj.plan is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.plan.terms[0].weight = 3.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        obj.plan.target_keys["logits"] = "x"  # type: ignore[index]
    assert all(t.kind in (TermKind.LAYER, TermKind.PORT) for t in obj.terms)
