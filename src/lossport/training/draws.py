"""The extra batches and the meta batch that :func:`~lossport.train` gives a balancer declaring them.

A balancer declares what it needs per step (:mod:`lossport.balance.base`): ``batches - 1`` extra *independent*
training batches (SDMGrad, MoDo) and, for bilevel methods, a meta batch (Auto-Lambda). Each extra batch stream
is its own shuffle of the training data (the training split when ``validation=`` is a fraction), with its own
``torch.Generator``; the meta stream is another such shuffle, as in Auto-Lambda's released code ("a copy of
train_loader with different data order, used for Auto-Lambda meta-update"), or a shuffle of ``meta_data=``
when given. Every stream is always shuffled (``shuffle=False`` orders the main batches only: an extra batch
equal to the main one would not be independent).

Streams restart at every round and cycle within it (a stream shorter than the round starts a new shuffle), one
batch per step whatever the balancer does with it, so the generators' states at the end of a round decide the
next round: they are checkpointed with the main one and a resumed run draws the same batches. Under torchrun
each stream is sharded like the main data: a step's extra batch is ``world * batch_size`` examples, one
contiguous slice per rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .. import distributed
from ..balance import Balancer
from .data import Source, make_source


class Draws:
    """The streams of extra and meta batches of a run (module docstring).

    :param balancer: the run's balancer (``None``: nothing to draw).
    :param train: the main training source (its data is shuffled again for the extra and default meta streams).
    :param meta_data: the meta batches' data, or ``None`` (another shuffle of the training data).
    :param batch_size: the main batch size (every stream uses it).
    :param seed: the main shuffle's seed; stream ``i`` is seeded ``seed + 1 + i``.
    """

    def __init__(self, balancer: Balancer | None, train: Source, meta_data: Any, batch_size: int, seed: int) -> None:
        extra = (balancer.batches - 1) if balancer is not None else 0
        wants_meta = balancer is not None and balancer.meta
        if meta_data is not None and not wants_meta:
            name = type(balancer).__name__ if balancer is not None else "no balancer"
            raise ValueError(
                f"meta_data= is given but the run's balancer ({name}) uses no meta batch; drop meta_data= or choose "
                "a bilevel method (e.g. balance='auto_lambda')"
            )
        gens = [torch.Generator().manual_seed((seed + 1 + i) % 2**63) for i in range(extra + int(wants_meta))]
        self.extra = [_reshuffled(train, batch_size, g) for g in gens[:extra]]
        self.meta: Source | None = None
        if wants_meta:
            g = gens[extra]
            self.meta = (
                _reshuffled(train, batch_size, g)
                if meta_data is None
                else make_source(meta_data, batch_size, True, g, "meta_data", shard=True)
            )
            if self.meta.loader is not None and isinstance(self.meta.dataset, IterableDataset):
                raise ValueError("meta_data is an IterableDataset; give data that can be shuffled (a Dataset, a dict)")
        self._gens = gens

    @property
    def active(self) -> bool:
        """Whether the balancer draws anything."""
        return bool(self.extra) or self.meta is not None

    def generators(self) -> list[torch.Generator]:
        """The streams' generators (checkpointed after the main data's)."""
        return list(self._gens)

    def round(self) -> Iterator[tuple[list[Any], Any]]:
        """For each step of a round: the extra batches and the meta batch (``None`` without one)."""
        extra = [_cycle(s, "an extra training batch stream") for s in self.extra]
        meta = _cycle(self.meta, "meta_data") if self.meta is not None else None
        while True:
            yield [next(it) for it in extra], (next(meta) if meta is not None else None)


def _reshuffled(train: Source, batch_size: int, generator: torch.Generator) -> Source:
    """Another shuffle of the training data ``train`` draws from, sharded like it."""
    if train.memory is not None:
        return make_source(train.memory, batch_size, True, generator, "data", shard=True)
    if train.dataset is not None and not isinstance(train.dataset, IterableDataset):
        return make_source(train.dataset, batch_size, True, generator, "data", shard=True)
    loader = train.loader
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        again = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size or batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=loader.collate_fn,
            drop_last=loader.drop_last,
        )
        return make_source(again, batch_size, where="data")
    raise ValueError(
        "the balancer draws extra batches (or meta batches) from independent shuffles of the training data, and an "
        "IterableDataset cannot be shuffled again: give the training data as a dict, a pair (x, y), a map-style "
        "Dataset or a DataLoader over one"
    )


def _cycle(src: Source, what: str) -> Iterator[Any]:
    """The batches of ``src``, shuffled again each time it is exhausted."""
    while True:
        empty = True
        for batch in src:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{what} gave no batch")


class RoundDraws:
    """:class:`Draws` for a framework's loop (:mod:`lossport.lightning`, :mod:`lossport.hf`): one draw per
    training batch, rounds begun by the framework's epochs, and a state that resumes the streams.

    The state holds the streams' generator states at the start of the round in progress (``start``), the
    number of draws taken in it (``taken``), the round's index (``round``) and the states now (``now``). A run
    resumed in the same round restores ``start`` and draws (and drops) the batches the saved run had taken, so
    the next draw is the one the saved run would have made; a run resumed in a later round restores ``now``
    (the states the next round starts from, as in :func:`~lossport.train`).
    """

    def __init__(self, draws: Draws) -> None:
        if draws.active and distributed.is_distributed():
            raise ValueError(
                "the balancer draws extra (or meta) batches, which the Lightning and Hugging Face integrations draw "
                "on one process only (every rank would draw the same batch, not its share of a global one); train "
                "such balancers with lossport.train under torchrun, or on one process"
            )
        self.draws = draws
        self._it: Iterator[tuple[list[Any], Any]] | None = None
        self._start: list[torch.Tensor] = []
        self._round = -1
        self.taken = 0
        self._pending: dict[str, Any] | None = None

    def begin(self, round_index: int) -> None:
        """Start round ``round_index`` (0-based); after :meth:`load_state_dict`, resume the saved streams."""
        gens = self.draws.generators()
        skip = 0
        if self._pending is not None:
            saved, self._pending = self._pending, None
            same = int(saved["round"]) == round_index
            for g, s in zip(gens, saved["start"] if same else saved["now"]):
                g.set_state(s)
            skip = int(saved["taken"]) if same else 0
        self._start = [g.get_state() for g in gens]
        self._round, self.taken = round_index, 0
        self._it = self.draws.round()
        self.skip_to(skip)

    @property
    def started(self) -> bool:
        """Whether a round is in progress (:meth:`begin` was called)."""
        return self._it is not None

    def skip_to(self, taken: int) -> None:
        """Draw and drop batches until ``taken`` draws were made in the round (a framework skipping batches)."""
        while self.taken < taken:
            self.next()

    def next(self) -> tuple[list[Any], Any]:
        """The extra batches and the meta batch (``None`` without one) of the next training batch."""
        if self._it is None:
            raise RuntimeError("RoundDraws.next() before begin(): no round in progress")
        self.taken += 1
        return next(self._it)

    def state_dict(self) -> dict[str, Any]:
        """``{"round", "taken", "start", "now"}`` (generator states as uint8 tensors)."""
        if self._pending is not None:  # saved again before resuming: keep the loaded state
            return dict(self._pending)
        return {
            "round": self._round,
            "taken": self.taken,
            "start": [s.clone() for s in self._start] or [g.get_state() for g in self.draws.generators()],
            "now": [g.get_state() for g in self.draws.generators()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the next :meth:`begin` (see the class docstring)."""
        n = len(self.draws.generators())
        if len(state.get("now", ())) != n or len(state.get("start", ())) != n:
            raise ValueError(
                f"the checkpoint's extra/meta batch streams are {len(state.get('now', ()))}, this run's balancer "
                f"draws {n}; resume with the same balancer (and meta_data=) as the run that saved it"
            )
        self._pending = dict(state)


__all__ = ["Draws", "RoundDraws"]
