"""LossportTrainer with balancers that take extra batches (SDMGrad) or a meta batch (Auto-Lambda): the same
Context as lossport.train, and checkpoints that resume the streams (lossport.hf)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_hf import args, params, rows  # noqa: E402
from test_lightning_context import SeenAutoLambda, SeenSDMGrad  # noqa: E402

import lossport  # noqa: E402
from lossport.hf import DRAWS_FILE, LossportTrainer  # noqa: E402

BALANCERS = {"sdmgrad": SeenSDMGrad, "auto_lambda": SeenAutoLambda}


class Bag(nn.Module):
    """A bag of embeddings with a topic head (3 classes) and a score head: no dropout, so runs compare."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.topic = nn.Linear(16, 3)
        self.score = nn.Linear(16, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh((self.emb(input_ids) * attention_mask.unsqueeze(-1)).mean(1))
        return {"topic": self.topic(h), "score": self.score(h)}


class InOrder(LossportTrainer):
    """Main batches in order (as lossport.train with shuffle=False), to compare the two loops step by step."""

    def _get_train_sampler(self, *a, **k):  # type: ignore[no-untyped-def]
        return torch.utils.data.SequentialSampler(self.train_dataset)


SPEC = {"topic": "ce", "score": "mse"}


def hf_run(out, balance: str, cls: type = InOrder, resume: str | None = None, **kw):  # type: ignore[no-untyped-def]
    model, bal = Bag(), BALANCERS[balance]()
    trainer = cls(
        model=model,
        args=args(out, optim="adamw_torch", max_grad_norm=0.0, **kw),
        train_dataset=rows(),
        objective=lossport.Objective(SPEC, balance=bal),
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, bal.seen


@pytest.mark.parametrize("balance", ["sdmgrad", "auto_lambda"])
def test_same_context_and_weights_as_lossport_train(tmp_path, balance: str) -> None:
    model, seen = hf_run(tmp_path, balance, max_steps=8)  # 2 epochs of 4 batches
    net, bal = Bag(), BALANCERS[balance]()
    lossport.train(
        net, rows(), loss=SPEC, balance=bal, epochs=2, batch_size=8, shuffle=False, seed=0, device="cpu",
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0), progress=False,
    )  # fmt: skip
    assert len(seen) == 8 and len(seen[0]) == {"sdmgrad": 3, "auto_lambda": 2}[balance]
    torch.testing.assert_close(torch.tensor(seen), torch.tensor(bal.seen), rtol=1e-6, atol=0)
    torch.testing.assert_close(params(model), params(net), rtol=0, atol=1e-5)


@pytest.mark.parametrize("balance", ["sdmgrad", "auto_lambda"])
def test_resume_within_an_epoch_continues_the_streams(tmp_path, balance: str) -> None:
    full, full_seen = hf_run(tmp_path / "full", balance, LossportTrainer, max_steps=6)
    hf_run(tmp_path / "half", balance, LossportTrainer, max_steps=6, save_strategy="steps", save_steps=2)
    ckpt = tmp_path / "half" / "checkpoint-2"  # mid-epoch (4 batches per epoch)
    assert (ckpt / DRAWS_FILE).is_file()
    resumed, seen = hf_run(tmp_path / "half", balance, LossportTrainer, resume=str(ckpt), max_steps=6)
    assert seen == full_seen[2:]
    torch.testing.assert_close(params(resumed), params(full), rtol=0, atol=1e-6)


def test_meta_data_without_a_bilevel_balancer_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"meta_data= is given but the balancer \(SDMGrad\) uses no meta batch"):
        LossportTrainer(
            model=Bag(), args=args(tmp_path), train_dataset=rows(), meta_data=rows(8),
            objective=lossport.Objective(SPEC, balance="sdmgrad"),
        )  # fmt: skip


class MetaSize(lossport.balance.AutoLambda):
    """Records the labelled examples of each meta batch."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __call__(self, losses, context=None):  # type: ignore[no-untyped-def]
        self.sizes.append(int(context.meta().counts["topic"]))
        return super().__call__(losses, context)


def test_meta_data_gives_the_meta_batches(tmp_path) -> None:
    own, default = MetaSize(), MetaSize()
    for bal, meta in ((own, rows(5, seed=5)), (default, None)):
        LossportTrainer(
            model=Bag(), args=args(tmp_path), train_dataset=rows(), meta_data=meta,
            objective=lossport.Objective(SPEC, balance=bal),
        ).train()  # fmt: skip
    assert own.sizes == [5] * 4  # meta_data's 5 examples (batch size 8) at each of the 4 steps
    assert default.sizes == [8] * 4  # a batch of another shuffle of the 32 training rows
