"""The key "loss" is the weighted total everywhere; an output named "loss" gives parts "loss/<loss>"."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lossport
from lossport import Losses, Objective
from lossport.result_types import TOTAL_KEY, part_key


class HF(nn.Module):
    """Returns its own loss, as Hugging Face models do when given labels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)

    def forward(self, x, labels):
        logits = self.lin(x)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


def hf_batch(n=8):
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, 3, generator=g), "labels": torch.randint(0, 2, (n,), generator=g)}


def test_weighted_single_loss_part_is_not_the_total():
    net, b = HF(), hf_batch()
    d = Objective(weights=2.0)(net, b).as_dict()
    part = F.cross_entropy(net.lin(b["x"]), b["labels"]).item()
    assert d["loss/port"] == pytest.approx(part, rel=1e-6)
    assert d[TOTAL_KEY] == pytest.approx(2 * part, rel=1e-6)
    assert d["weight/loss/port"] == 2.0


def test_balanced_single_loss_part_is_not_the_total():
    net, b = HF(), hf_batch()
    losses = Objective(balance="uw")(net, b)
    d = losses.as_dict()
    assert d[TOTAL_KEY] == pytest.approx(losses.total.item(), rel=1e-6)
    assert d["loss/port"] == pytest.approx(losses.parts["loss/port"].item(), rel=1e-6)


def test_an_output_named_loss_can_sit_beside_other_parts():
    net, b = HF(), hf_batch()
    losses = Objective(["loss", ("logits", "ce")], weights=[1.0, 0.5])(net, b)
    assert losses.names == ["loss/port", "logits"]
    ce = F.cross_entropy(net.lin(b["x"]), b["labels"])
    assert losses.as_dict()[TOTAL_KEY] == pytest.approx(1.5 * ce.item(), rel=1e-6)


def test_losses_refuse_a_part_named_loss():
    with pytest.raises(ValueError, match="may not be named 'loss'"):
        Losses(parts={"loss": torch.tensor(1.0)}, weights={"loss": 1.0})
    with pytest.raises(ValueError, match="may not be named 'loss'"):
        Losses(parts={"a": torch.tensor(1.0)}, weights={"a": 1.0}, extra={"loss": torch.tensor(0.1)})
    assert part_key("loss/port") == "loss/port"
    with pytest.raises(ValueError, match="weighted total"):
        part_key("loss")


def test_history_and_table_show_one_total():
    net, b = HF(), hf_batch()
    result = lossport.train(net, b, weights=2.0, epochs=1, batch_size=8, shuffle=False, progress=False, lr=0.0)
    row = result.history.rounds[-1]
    assert row["loss"] == pytest.approx(2 * row["loss/port"], rel=1e-5)
    table = result.table()
    assert sum(line.split()[0] == "total" for line in table.splitlines() if line.split()) == 1
    assert "loss/port" in table


def test_auto_refuses_a_total_loss_beside_its_components():
    """DETR-style outputs (its total `loss` and the components under `loss_dict`): 'auto' would train both and
    count the components twice; it is an error naming them, and either choice then works."""
    import pytest
    import torch
    from torch import nn

    from lossport import LossSpecError, Objective

    class Detr(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Linear(3, 1)

        def forward(self, x):
            a, b = self.w(x).pow(2).mean(), self.w(x).abs().mean()
            return {"loss": a + 5 * b, "loss_dict": {"ce": a, "l1": b}}

    net, batch = Detr(), {"x": torch.randn(4, 3)}
    with pytest.raises(LossSpecError, match=r"own total 'loss' and other scalars .*loss_dict/ce"):
        Objective("auto")(net, batch)
    total = Objective("loss")(net, batch)
    parts = Objective(["loss_dict/ce", "loss_dict/l1"], weights=[1.0, 5.0])(net, batch)
    assert torch.allclose(total.total, parts.total)


def test_weighted_total_with_scalar_tensor_weights_is_the_sum_with_gradients_to_both():
    """Many parts with scalar tensor weights (learned ones) take the dot-product path: the same value and the same
    gradients, to the parts and to the weights, as the term-by-term sum; mixed weights take the term-by-term sum."""
    from lossport.result_types import weighted_total

    g = torch.Generator().manual_seed(0)
    for T in (3, 8):
        p = torch.rand(T, generator=g).requires_grad_()
        s = torch.randn(T, generator=g).requires_grad_()
        names = [f"p{i}" for i in range(T)]
        parts, weights = dict(zip(names, p.unbind(0))), dict(zip(names, torch.exp(s).unbind(0)))
        total = weighted_total(parts, weights, {"reg": 0.5 * s.sum()})
        ref = (torch.exp(s) * p).sum() + 0.5 * s.sum()
        assert torch.allclose(total, ref, rtol=1e-6)
        gp, gs = torch.autograd.grad(total, [p, s])
        rp, rs = torch.autograd.grad(ref, [p, s])
        assert torch.allclose(gp, rp, rtol=1e-6) and torch.allclose(gs, rs, rtol=1e-6)
    mixed = dict(zip(names, [1.0, *torch.exp(s).unbind(0)[1:]]))
    assert torch.allclose(weighted_total(parts, mixed, {}), p[0] + (torch.exp(s[1:]) * p[1:]).sum(), rtol=1e-6)
