"""LossportCallback with balancers that take extra batches (SDMGrad) or a meta batch (Auto-Lambda): the same
Context as lossport.train, and checkpoints that resume the streams (lossport.lightning)."""

from __future__ import annotations

import warnings

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

from test_lightning import Module, Net, data, loader, params, trainer  # noqa: E402

import lossport  # noqa: E402
from lossport.lightning import _RECORDS, LossportCallback  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Seen:
    """Records the totals the balancer's Context gives on the extra batches and the meta batch, per call."""

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def __call__(self, losses, context=None):  # type: ignore[no-untyped-def]
        assert context is not None and context.optimizer is not None and context.train is not None
        got = [float(f().total.detach()) for f in context.extra]
        if context.meta is not None:
            got.append(float(context.meta().total.detach()))
        got.append(float(context.train().total.detach()))  # the main batch again: the two runs step on the same batches
        self.seen.append(got)
        return super().__call__(losses, context)  # type: ignore[misc]


class SeenSDMGrad(Seen, lossport.balance.SDMGrad):
    def __init__(self) -> None:
        Seen.__init__(self)
        lossport.balance.SDMGrad.__init__(self)


class SeenAutoLambda(Seen, lossport.balance.AutoLambda):
    def __init__(self) -> None:
        Seen.__init__(self)
        lossport.balance.AutoLambda.__init__(self)


BALANCERS = {"sdmgrad": SeenSDMGrad, "auto_lambda": SeenAutoLambda}


def by_train(balance: str, epochs: int, seed: int = 0) -> tuple[torch.nn.Module, list[list[float]]]:
    """The same net, data, optimizer and seed through lossport.train."""
    torch.manual_seed(0)
    net = Net()
    bal = BALANCERS[balance]()
    lossport.train(
        net, loader(), loss={"a": "mse", "b": "mse"}, balance=bal, epochs=epochs, seed=seed, device="cpu",
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05), progress=False,
    )  # fmt: skip
    return net, bal.seen


@pytest.mark.parametrize("balance", ["sdmgrad", "auto_lambda"])
def test_same_context_and_weights_as_lossport_train(tmp_path, balance: str) -> None:
    m = Module(BALANCERS[balance]())
    before = params(m.net)
    trainer(tmp_path, max_epochs=2, callbacks=[LossportCallback(seed=3)]).fit(m, loader())
    assert not torch.equal(params(m.net), before)
    net, seen = by_train(balance, 2, seed=3)
    assert len(m.objective.balancer.seen) == 8  # 2 rounds of 4 batches
    assert len(seen[0]) == {"sdmgrad": 3, "auto_lambda": 2}[balance]  # 2 extra or 1 meta batch, main
    assert m.objective.balancer.seen == seen
    torch.testing.assert_close(params(m.net), params(net), rtol=0, atol=1e-6)


def test_a_different_seed_draws_other_extra_batches(tmp_path) -> None:
    m = Module(SeenSDMGrad())
    trainer(tmp_path, max_epochs=1, callbacks=[LossportCallback(seed=4)]).fit(m, loader())
    seen = m.objective.balancer.seen
    assert seen != by_train("sdmgrad", 1, seed=3)[1]
    assert all(s[0] != s[1] for s in seen)  # the two extra streams are independent shuffles


@pytest.mark.parametrize("balance", ["sdmgrad", "auto_lambda"])
def test_resume_continues_the_streams(tmp_path, balance: str) -> None:
    full = Module(BALANCERS[balance]())
    trainer(tmp_path / "full", max_epochs=3).fit(full, loader())

    first = Module(BALANCERS[balance]())
    t1 = trainer(tmp_path / "a", max_epochs=1)
    t1.fit(first, loader())
    ckpt = tmp_path / "one.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    states = [v for k, v in saved["callbacks"].items() if "LossportCallback" in k]
    assert states[0]["draws"]["objective"]["taken"] == 4  # four batches drawn in round 0

    resumed = Module(BALANCERS[balance]())
    trainer(tmp_path / "b", max_epochs=3).fit(resumed, loader(), ckpt_path=str(ckpt))
    assert resumed.objective.balancer.seen == full.objective.balancer.seen[4:]  # the same extra/meta batches
    assert torch.equal(params(resumed.net), params(full.net))


def test_meta_data_is_used_for_the_meta_batches(tmp_path) -> None:
    a, b = Module("auto_lambda"), Module("auto_lambda")
    trainer(tmp_path / "a", max_epochs=1).fit(a, loader())
    cb = LossportCallback(meta_data=data(16, seed=9))
    trainer(tmp_path / "b", max_epochs=1, callbacks=[cb]).fit(b, loader())
    assert not torch.equal(params(a.net), params(b.net))


def test_meta_data_without_a_bilevel_balancer_is_an_error(tmp_path) -> None:
    cb = LossportCallback(meta_data=data(16))
    with pytest.raises(ValueError, match=r"meta_data= is given but no objective's balancer uses a meta batch"):
        trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(Module("sdmgrad"), loader())


class Drawn(LossportCallback):
    """Records the inputs of the extra batches given at each training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.drawn: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        extra, _ = _RECORDS[pl_module.objective].more
        self.drawn.append([x["x"] for x in extra])


def test_resume_within_an_epoch_draws_what_the_saved_run_would_have(tmp_path) -> None:
    full = Drawn()
    trainer(tmp_path / "full", max_epochs=3, callbacks=[full]).fit(Module("sdmgrad"), loader())
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1)
    trainer(tmp_path / "a", max_epochs=2, callbacks=[Drawn(), saver]).fit(Module("sdmgrad"), loader())
    ckpt = next(p for p in (tmp_path / "ck").iterdir() if "step=6" in p.name)  # after 2 of epoch 1's 4 batches
    resumed = Drawn()
    trainer(tmp_path / "b", max_epochs=3, callbacks=[resumed]).fit(Module("sdmgrad"), loader(), ckpt_path=str(ckpt))
    # Lightning resumes at batch 2 of epoch 1 (it restarts a plain DataLoader at its first batch, so the main
    # batches are not those of `full`); the extra batches are those the saved run would have drawn next
    assert len(resumed.drawn) == 6 and len(full.drawn) == 12
    for got, want in zip(resumed.drawn, full.drawn[6:]):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert not torch.equal(full.drawn[0][0], full.drawn[0][1])
