"""torchvision's own models trained unchanged through lossport: GoogLeNet and Inception v3 with their auxiliary
logits (weight 0.3, Szegedy et al. 2015 sec. 5), Faster R-CNN's training-mode loss dict with FAMO, UW and UPGrad.

torchvision is loaded by :mod:`torchvision_cpu` (the real package; only ``torchvision::nms`` is defined in Python
when the wheel's compiled extension does not load next to the CPU torch). Without torchvision the tests skip and
say why (``pytest -rs``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import lossport

torchvision_cpu = pytest.importorskip("torchvision_cpu")

try:
    tv = torchvision_cpu.load()
except ImportError as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"torchvision unavailable: {e}", allow_module_level=True)

from torchvision.models import googlenet, inception_v3  # noqa: E402
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn  # noqa: E402
from torchvision.ops import nms  # noqa: E402

AUX = 0.3


def _sgd_by_hand(net: torch.nn.Module, loss: torch.Tensor, lr: float) -> None:
    """First step of SGD with momentum 0.9: the buffer is the gradient, so p <- p - lr * g."""
    net.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def _assert_same_step(trained: torch.nn.Module, by_hand: torch.nn.Module, start: torch.nn.Module) -> None:
    moved = 0
    for (name, p), q, p0 in zip(trained.named_parameters(), by_hand.parameters(), start.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-4), name
        moved += int(not torch.equal(p, p0))
    assert moved > 0.9 * len(list(start.parameters()))


def test_greedy_nms_matches_the_definition():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9], [21, 21, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.6])
    # 3 (0.95) keeps; 0 overlaps it with IoU 0.9 -> gone; 1 overlaps 3 with IoU 81/119 = 0.68 -> gone at 0.5;
    # 2 keeps; 4 overlaps 2 with IoU 81/100 -> gone.
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2, 4]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


def _classifier_step(net: torch.nn.Module, data: dict, spec: dict, weights: dict) -> None:
    """lossport.train on one batch with SGD equals the step by hand on sum_i w_i CE(out_i, label)."""
    ref = copy.deepcopy(net)
    result = lossport.train(
        net,
        data,
        spec,
        weights=weights,
        targets="label",
        epochs=1,
        batch_size=len(data["label"]),
        optimizer="sgd",
        lr=0.05,
        shuffle=False,
        progress=False,
    )
    out = ref(data["x"])
    parts = {k: F.cross_entropy(getattr(out, k), data["label"]) for k in spec}
    for k, v in parts.items():
        assert result.history[k][0] == pytest.approx(float(v.detach()), rel=1e-5), k
    total = sum(weights[k] * v for k, v in parts.items())
    assert result.history["loss"][0] == pytest.approx(float(total), rel=1e-5)
    start = copy.deepcopy(ref)
    _sgd_by_hand(ref, total, 0.05)
    _assert_same_step(net, ref, start)


def test_googlenet_aux_logits_from_one_label_key():
    torch.manual_seed(0)
    net = googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=4, dropout=0.0, dropout_aux=0.0)
    data = {"x": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 3])}
    spec = {"logits": "ce", "aux_logits1": "ce", "aux_logits2": "ce"}
    _classifier_step(net, data, spec, {"logits": 1.0, "aux_logits1": AUX, "aux_logits2": AUX})


def test_googlenet_in_evaluation_returns_main_logits_and_lists_aux_as_missing():
    torch.manual_seed(0)
    net = googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=4)
    data = {"x": torch.randn(2, 3, 64, 64), "label": torch.tensor([0, 3])}
    objective = lossport.Objective({"logits": "ce", "aux_logits1": "ce", "aux_logits2": "ce"}, targets="label")
    objective(net.train(), data)
    net.eval()
    losses = objective(net, data)
    with torch.no_grad():
        expected = F.cross_entropy(net(data["x"]), data["label"])
    assert set(losses.parts) == {"logits"}
    assert set(losses.missing) == {"aux_logits1", "aux_logits2"}
    assert float(losses.parts["logits"]) == pytest.approx(float(expected), rel=1e-6)


def test_inception_v3_aux_logits_one_step():
    # 299 x 299 is the smallest input for which the auxiliary head's 5x5 pooling and convolution fit.
    torch.manual_seed(1)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=3, dropout=0.0)
    data = {"x": torch.randn(2, 3, 299, 299), "label": torch.tensor([2, 0])}
    _classifier_step(net, data, {"logits": "ce", "aux_logits": "ce"}, {"logits": 1.0, "aux_logits": AUX})


def _detector() -> torch.nn.Module:
    torch.manual_seed(0)
    return fasterrcnn_mobilenet_v3_large_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=3,
        min_size=128,
        max_size=128,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        box_batch_size_per_image=32,
    )


def _detection_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20, 60, 90]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 30, 100, 110], [5, 5, 40, 40]]), "labels": torch.tensor([2, 1])},
    ]
    return {"images": images, "targets": targets}


LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def test_faster_rcnn_loss_dict_is_the_parts():
    net, batch = _detector().train(), _detection_batch()
    objective = lossport.Objective("auto")
    objective(net, batch)  # bind
    torch.manual_seed(5)  # the RPN and ROI samplers draw from the global generator
    losses = objective(net, batch)
    torch.manual_seed(5)
    expected = net(batch["images"], batch["targets"])
    assert set(losses.parts) == LOSS_KEYS
    for k in LOSS_KEYS:
        assert float(losses.parts[k]) == pytest.approx(float(expected[k]), rel=1e-5), k
    assert float(losses.total) == pytest.approx(float(sum(expected.values())), rel=1e-5)


@pytest.mark.parametrize("balance", ["famo", "uw", "upgrad"])
def test_faster_rcnn_trains_with_a_balancer(balance):
    net, batch = _detector(), _detection_batch()
    before = copy.deepcopy(net.state_dict())
    loader = DataLoader([batch], batch_size=None)
    result = lossport.train(net, loader, "auto", balance=balance, epochs=2, lr=1e-3, progress=False, seed=0)
    for k in LOSS_KEYS:
        assert len(result.history[k]) == 2 and all(math.isfinite(v) for v in result.history[k]), k
        assert f"weight/{k}" in result.history
    weights = [[result.history[f"weight/{k}"][r] for k in sorted(LOSS_KEYS)] for r in range(2)]
    assert all(math.isfinite(w) and w >= 0 for row in weights for w in row)
    if balance in ("famo", "uw"):  # learned weights moved after the first step
        assert weights[0] != weights[1]
    moved = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("roi_heads.box_predictor") for k in moved)
    assert any(k.startswith("rpn.head") for k in moved)


def test_inspect_faster_rcnn_groups_its_modules():
    from lossport.inspection import MAX_ROWS

    net = _detector().train()
    loader = DataLoader([_detection_batch()], batch_size=None)
    report = lossport.inspect(net, loader, "auto", batches=1)
    n_modules = len([m for m in net.modules() if any(True for _ in m.parameters(recurse=False))])
    assert n_modules > 100 and len(report.modules) <= MAX_ROWS
    assert sum(m.members for m in report.modules) == n_modules
    names = [m.name for m in report.modules]
    assert "rpn.head.cls_logits" in names and "roi_heads.box_predictor.cls_score" in names
    # the heads are each reached by their own parts only; the backbone by all four
    assert report.reach["loss_objectness"].count("rpn.head.cls_logits") == 1
    assert "rpn.head.cls_logits" not in report.reach["loss_classifier"]
    assert all(report.module(m).status == "reached" for m in names)
    assert "backbone.body.0.0" in report.shared
    text = str(report)
    assert f"{n_modules} modules grouped to depth" in text
    section = text.split("Reach and pull")[1].split("Conflict")[0].splitlines()
    assert len(section) <= MAX_ROWS + 5  # one block: the parts' columns are numbered to fit 100 characters
    assert max(len(line) for line in text.splitlines()) <= 100
    assert len(text.splitlines()) <= 40  # rows reached alike are merged by default (issue 13: ~40 lines)
    full = report.table(detail=True)
    assert all(m.name[-20:] in full for m in report.modules) and len(full.splitlines()) > 80


def test_features_gramian_on_the_fpn_levels():
    """gramian="features" on Faster R-CNN's backbone, which returns a dict of FPN levels: G is the Gramian of
    the parts' gradients with respect to all levels together."""
    net, batch = _detector().train(), _detection_batch()
    upgrad = lossport.balance.UPGrad(gramian="features", features=net.backbone)
    objective = lossport.Objective("auto", balance=upgrad)
    objective(net, batch)  # bind (and attach the balancer)
    levels: list[torch.Tensor] = []
    hook = net.backbone.register_forward_hook(lambda m, a, out: levels.extend(out.values()))
    losses = objective.evaluate(net, batch)
    hook.remove()
    assert len(levels) >= 2
    G = upgrad.compute_gramian(losses)
    rows = []
    for k in losses.names:
        gs = torch.autograd.grad(losses.parts[k], levels, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([torch.zeros(z.numel()) if g is None else g.reshape(-1) for z, g in zip(levels, gs)]))
    J = torch.stack(rows).double()
    torch.testing.assert_close(G, J @ J.T, rtol=1e-6, atol=1e-12)
