"""Hugging Face transformers models (tiny configs, built offline) trained unchanged through lossport: a model's own
``loss`` output (part ``loss/port``), a token-classification head's ``(B, T, K)`` logits with ``"ce"``, a two-head
multi-task net on a BertModel, and DETR's loss dict weighted as DETR weights it."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import lossport

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

LR = 0.1


def _config(**kw):
    base = {
        "vocab_size": 40,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 16,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    return transformers.BertConfig(**{**base, **kw})


def _tokens(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (4, 8), generator=g)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _sgd_by_hand(net: nn.Module, loss: torch.Tensor) -> None:
    """First SGD step (momentum buffer = gradient): p <- p - lr * g."""
    net.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= LR * p.grad


def _one_step(net: nn.Module, data, loss, **kw) -> lossport.Result:
    return lossport.train(
        net, data, loss, epochs=1, batch_size=4, optimizer="sgd", lr=LR, shuffle=False, progress=False, **kw
    )


def _assert_same(a: nn.Module, b: nn.Module, start: nn.Module) -> None:
    moved = 0
    for (name, p), q, p0 in zip(a.named_parameters(), b.parameters(), start.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name
        moved += int(not torch.equal(p, p0))
    assert moved > 0


def test_sequence_classification_own_loss_is_the_part():
    torch.manual_seed(0)
    net = transformers.BertForSequenceClassification(_config(num_labels=3))
    data = {**_tokens(), "labels": torch.tensor([0, 1, 2, 1])}
    objective = lossport.Objective()
    losses = objective(net, data)
    assert set(losses.parts) == {"loss/port"}
    start, ref = copy.deepcopy(net), copy.deepcopy(net)
    result = _one_step(net, data, "auto")
    own = ref(**data).loss
    assert result.history["loss/port"][0] == pytest.approx(float(own.detach()), rel=1e-6)
    _sgd_by_hand(ref, own)
    _assert_same(net, ref, start)


def test_token_classification_ce_on_btk_logits_equals_the_models_loss():
    torch.manual_seed(0)
    net = transformers.BertForTokenClassification(_config(num_labels=5))
    labels = torch.randint(0, 5, (4, 8), generator=torch.Generator().manual_seed(1))
    labels[0, 6:] = -100  # padding
    labels[1, :5] = -100  # unlabelled tokens: a different count per sentence
    data = {**_tokens(), "labels": labels}
    objective = lossport.Objective({"logits": "ce"})
    losses = objective(net, data)
    with torch.no_grad():
        own = net(**data).loss  # HF: mean over all labelled tokens of the batch
        logits = net(**data).logits
    assert float(losses.parts["logits"].detach()) == pytest.approx(float(own), rel=1e-6)
    assert float(own) == pytest.approx(float(F.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1))), rel=1e-6)
    start, ref = copy.deepcopy(net), copy.deepcopy(net)
    _one_step(net, data, {"logits": "ce"})
    _sgd_by_hand(ref, ref(**data).loss)
    _assert_same(net, ref, start)


class TwoHeads(nn.Module):
    """A sentence label and a tag per token on one BertModel."""

    def __init__(self, config, sentiments: int = 3, tags: int = 4) -> None:
        super().__init__()
        self.bert = transformers.BertModel(config, add_pooling_layer=False)
        self.sentiment = nn.Linear(config.hidden_size, sentiments)
        self.tags = nn.Linear(config.hidden_size, tags)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return {"sentiment": self.sentiment(h[:, 0]), "tags": self.tags(h)}


def _multitask_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    tags = torch.randint(0, 4, (4, 8), generator=g)
    tags[0, 6:] = -100
    return {**_tokens(), "sentiment": torch.tensor([2, 0, 1, 1]), "tags": tags}


def test_two_head_multitask_bert_step_equals_by_hand():
    torch.manual_seed(0)
    net, data = TwoHeads(_config()), _multitask_data()
    weights = {"sentiment": 1.0, "tags": 0.5}
    start, ref = copy.deepcopy(net), copy.deepcopy(net)
    result = _one_step(net, data, {"sentiment": "ce", "tags": "ce"}, weights=weights)
    out = ref(data["input_ids"], data["attention_mask"])
    parts = {
        "sentiment": F.cross_entropy(out["sentiment"], data["sentiment"]),
        "tags": F.cross_entropy(out["tags"].reshape(-1, 4), data["tags"].reshape(-1)),
    }
    for k, v in parts.items():
        assert result.history[k][0] == pytest.approx(float(v.detach()), rel=1e-6), k
    _sgd_by_hand(ref, parts["sentiment"] + 0.5 * parts["tags"])
    _assert_same(net, ref, start)


@pytest.mark.parametrize("balance", ["upgrad", "famo"])
def test_two_head_multitask_bert_balanced(balance):
    torch.manual_seed(0)
    net, data = TwoHeads(_config()), _multitask_data()
    result = lossport.train(
        net,
        data,
        {"sentiment": "ce", "tags": "ce"},
        balance=balance,
        epochs=3,
        batch_size=4,
        lr=1e-2,
        progress=False,
        seed=0,
    )
    for k in ("sentiment", "tags"):
        assert result.history[k][-1] < result.history[k][0], k
        assert all(w >= 0 for w in result.history[f"weight/{k}"])


def _detr():
    backbone = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage1", "stage2"]
    )
    config = transformers.DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=5,
        num_labels=3,
        auxiliary_loss=False,
        dropout=0.0,
    )
    torch.manual_seed(0)
    return transformers.DetrForObjectDetection(config), config


def _detr_batch() -> dict:
    labels = [
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.3]])},
    ]
    return {"pixel_values": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)), "labels": labels}


DETR_PARTS = ["loss_dict/loss_ce", "loss_dict/loss_bbox", "loss_dict/loss_giou"]


def test_detr_loss_dict_weighted_as_detr_is_its_own_loss():
    pytest.importorskip("scipy")  # DETR's Hungarian matcher
    net, config = _detr()
    batch = _detr_batch()
    # DETR's own total: loss_ce * 1 + loss_bbox * bbox_loss_coefficient + loss_giou * giou_loss_coefficient
    weights = dict(zip(DETR_PARTS, [1.0, config.bbox_loss_coefficient, config.giou_loss_coefficient]))
    objective = lossport.Objective(DETR_PARTS, weights=weights)
    losses = objective(net.train(), batch)
    own = net(**batch)
    assert set(losses.parts) == set(DETR_PARTS)
    for k in DETR_PARTS:
        expected = float(own.loss_dict[k.split("/")[1]].detach())
        assert float(losses.parts[k].detach()) == pytest.approx(expected, rel=1e-5), k
    assert float(losses.total.detach()) == pytest.approx(float(own.loss.detach()), rel=1e-5)


def test_detr_trains_with_upgrad():
    pytest.importorskip("scipy")
    net, _ = _detr()
    before = copy.deepcopy(net.state_dict())
    loader = DataLoader([_detr_batch()], batch_size=None)
    result = lossport.train(net, loader, DETR_PARTS, balance="upgrad", epochs=2, lr=1e-3, progress=False, seed=0)
    assert all(len(result.history[k]) == 2 for k in DETR_PARTS)
    assert not torch.equal(net.state_dict()["class_labels_classifier.weight"], before["class_labels_classifier.weight"])
