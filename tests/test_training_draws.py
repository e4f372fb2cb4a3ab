"""lossport.training.draws: the extra independent batches and the meta batch that train gives a balancer declaring
them; each stream its own shuffle of the training data, checkpointed, sharded like the main data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import lossport
from lossport import Losses, load_checkpoint
from lossport.balance import Balancer, SDMGrad

torch.set_num_threads(1)
N = 24


class Net(nn.Module):
    """Records the example ids (column 0 of x) of every forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2, 2)
        self.seen: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append([int(v) for v in x[:, 0].tolist()])
        out = self.lin(x)
        return {"a": out[:, :1], "b": out[:, 1:]}


def data(n: int = N, offset: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(offset, offset + n, dtype=torch.float32)
    return {"x": torch.stack([ids, torch.randn(n, generator=g)], 1), "a": torch.randn(n, 1, generator=g),
            "b": torch.randn(n, 1, generator=g)}  # fmt: skip


class Spy(Balancer):
    """Equal weights; evaluates every closure of its context and keeps which examples each one saw."""

    kind = "static"

    def __init__(self, batches: int = 3, meta: bool = False) -> None:
        super().__init__()
        self.batches, self.meta = batches, meta
        self.net: Net | None = None
        self.draws: list[dict[str, list[int]]] = []

    def attach(self, net: nn.Module) -> None:
        assert isinstance(net, Net)
        self.net = net

    def balance(self, losses: Losses) -> dict[str, float]:
        assert self.context is not None and self.net is not None
        seen = {"main": self.net.seen[-1]}
        for i, f in enumerate(self.context.extra):
            f()
            seen[f"extra{i}"] = self.net.seen[-1]
        if self.meta:
            assert self.context.meta is not None and self.context.train is not None
            self.context.meta()
            seen["meta"] = self.net.seen[-1]
            self.context.train()
            assert self.net.seen[-1] == seen["main"]  # train= evaluates the main batch again
        self.draws.append(seen)
        return dict.fromkeys(losses.parts, 1.0)


def fit(bal: Balancer, d=None, **kw):
    net = Net()
    kw = {"epochs": 1, "batch_size": 8, "seed": 0, "progress": False, **kw}
    return lossport.train(net, data() if d is None else d, {"a": "mse", "b": "mse"}, balance=bal, **kw)


def streams(spy: Spy) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for step in spy.draws:
        for k, ids in step.items():
            out.setdefault(k, []).extend(ids)
    return out


def test_each_extra_stream_is_its_own_shuffle_of_the_data_even_without_shuffling():
    spy = Spy(batches=3)
    fit(spy, shuffle=False)
    s = streams(spy)
    assert s["main"] == list(range(N))  # shuffle=False orders the main batches only
    for k in ("extra0", "extra1"):
        assert sorted(s[k]) == list(range(N)) and s[k] != list(range(N))  # a permutation: one epoch per round
    assert s["extra0"] != s["extra1"]
    assert all(step["extra0"] != step["main"] for step in spy.draws)


def test_meta_batches_come_from_another_shuffle_or_from_meta_data():
    spy = Spy(batches=1, meta=True)
    fit(spy, epochs=2)
    s = streams(spy)
    assert sorted(s["meta"]) == sorted(s["main"]) and s["meta"] != s["main"]
    spy2 = Spy(batches=1, meta=True)
    fit(spy2, meta_data=data(10, offset=100))  # shorter than a round: shuffled again when exhausted
    meta = streams(spy2)["meta"]
    assert len(meta) == 8 + 2 + 8  # 10 examples: batches of 8 and 2, then a new shuffle
    assert sorted(meta[:10]) == list(range(100, 110)) and set(meta[10:]) <= set(range(100, 110))


def test_extra_batches_come_from_the_training_split_only():
    spy = Spy(batches=2)
    fit(spy, validation=0.25)
    assert set(streams(spy)["extra0"]) == set(range(18))  # the last 6 examples are held out


def test_the_streams_generators_are_checkpointed_and_resume_is_bit_identical(tmp_path: Path):
    full = fit(SDMGrad(), epochs=3)
    fit(SDMGrad(), epochs=2, checkpoint=tmp_path)
    assert len(load_checkpoint(tmp_path)["rng"]["data"]) == 3  # the main shuffle and two extra streams
    resumed = fit(SDMGrad(), epochs=3, checkpoint=tmp_path, resume=True)
    for p, q in zip(full.final_net.parameters(), resumed.final_net.parameters()):
        assert torch.equal(p, q)
    assert full.history["weight/a"] == resumed.history["weight/a"]


def test_a_dataloader_is_reshuffled_over_its_dataset_and_an_iterable_dataset_is_refused():
    d = data()
    examples = [{k: v[i] for k, v in d.items()} for i in range(N)]
    spy = Spy(batches=2)
    fit(spy, DataLoader(examples, batch_size=8, shuffle=False))
    s = streams(spy)
    assert s["main"] == list(range(N)) and sorted(s["extra0"]) == list(range(N)) and s["extra0"] != s["main"]

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(examples)

    with pytest.raises(ValueError, match="an IterableDataset cannot be shuffled again"):
        fit(Spy(batches=2), Stream())


def test_meta_data_for_a_balancer_without_a_meta_batch_is_refused():
    with pytest.raises(ValueError, match="meta_data= is given but the run's balancer \\(Spy\\) uses no meta batch"):
        fit(Spy(batches=2), meta_data=data())
    with pytest.raises(ValueError, match="meta_data= is given but the run's balancer \\(no balancer\\)"):
        fit(None, meta_data=data())


def _ids(drawn: tuple[list, object]) -> list[list[int]]:
    return [[int(v) for v in b["x"][:, 0].tolist()] for b in drawn[0]]


def test_round_draws_resume_within_a_round_and_at_its_end() -> None:
    from lossport.training.data import make_source
    from lossport.training.draws import Draws, RoundDraws

    def fresh() -> RoundDraws:
        return RoundDraws(Draws(SDMGrad(), make_source(data(), 8), None, 8, seed=5))

    ref = fresh()
    ref.begin(0)
    r0 = [_ids(ref.next()) for _ in range(3)]
    ref.begin(1)
    r1 = [_ids(ref.next()) for _ in range(3)]
    assert r0 != r1  # each round is a new shuffle

    saver = fresh()
    saver.begin(0)
    saver.next()
    mid = saver.state_dict()  # after 1 draw of round 0
    assert mid["round"] == 0 and mid["taken"] == 1
    saver.next(), saver.next()
    end = saver.state_dict()

    again = fresh()
    again.load_state_dict(mid)
    again.begin(0)  # the same round: the saved run's next draws
    assert [_ids(again.next()) for _ in range(2)] == r0[1:]
    later = fresh()
    later.load_state_dict(end)
    later.begin(1)  # a later round: it starts from the generators' states at the save
    assert [_ids(later.next()) for _ in range(3)] == r1

    with pytest.raises(ValueError, match=r"resume with the same balancer"):
        RoundDraws(Draws(lossport.balance.AutoLambda(), make_source(data(), 8), None, 8, seed=5)).load_state_dict(mid)
    with pytest.raises(RuntimeError, match=r"before begin"):
        fresh().next()
