"""One data layer for :func:`~lossport.train`, :func:`~lossport.evaluate`, :func:`~lossport.inspect` and
:func:`~lossport.compare`.

Accepted forms (every caller, one dispatcher, :func:`make_source`):

* a dict of tensors or numpy arrays with a common first dimension (a batch is the same dict sliced);
* a pair ``(x, y)`` (tuple, or a list of two) of tensors, arrays, tuples or dicts of them;
* a map-style ``Dataset`` yielding dicts or pairs; a list of dicts or pairs is a dataset of *examples*;
* a ``DataLoader``, used as it is (its own batch size and shuffling).

In-memory data is shuffled each round by a ``torch.Generator`` and sliced into batches of ``batch_size`` (the
last one smaller); float64 arrays become float32. Under torchrun the training data is sharded by lossport
itself: every global batch of ``world * batch_size`` examples is cut into one contiguous slice per rank, so a
step is exactly the one-process step on the global batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .. import distributed


def tree_map(fn: Callable[[Tensor], Any], s: Any) -> Any:
    """``fn`` applied to every tensor of a nest of dicts, tuples and lists (other leaves kept)."""
    if isinstance(s, Tensor):
        return fn(s)
    if isinstance(s, Mapping):
        return {k: tree_map(fn, v) for k, v in s.items()}
    if isinstance(s, tuple):
        return tuple(tree_map(fn, v) for v in s)
    if isinstance(s, list):
        return [tree_map(fn, v) for v in s]
    return s


def leaves(s: Any) -> list[Tensor]:
    """The tensors of a nest, in order."""
    out: list[Tensor] = []
    tree_map(out.append, s)
    return out


def to_tensors(s: Any, where: str = "data") -> Any:
    """numpy arrays -> tensors (float64 -> float32); tensors kept; None kept; anything else an error."""
    if isinstance(s, Tensor):
        return s
    if isinstance(s, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(s))
        return t.float() if t.dtype == torch.float64 else t
    if isinstance(s, Mapping):
        return {k: to_tensors(v, f"{where}[{k!r}]") for k, v in s.items()}
    if isinstance(s, (tuple, list)):
        return type(s)(to_tensors(v, f"{where}[{i}]") for i, v in enumerate(s))
    if s is None:
        return None
    raise TypeError(f"{where} is a {type(s).__name__}; in-memory data holds tensors or numpy arrays")


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch: the first dimension of its first tensor with one."""
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, Tensor) and v.dim() > 0:
                return int(v.shape[0])
    for t in leaves(batch):
        if t.dim() > 0:
            return int(t.shape[0])
    return 1


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor on ``device`` (non-blocking copies to an accelerator)."""
    if device.type == "cpu":
        return tree_map(lambda t: t if t.device.type == "cpu" else t.cpu(), batch)
    return tree_map(lambda t: t.to(device, non_blocking=True), batch)


def _take(t: Tensor, idx: Tensor) -> Tensor:
    return t.index_select(0, idx) if t.dim() > 0 else t


def _rows(t: Tensor, a: int, b: int) -> Tensor:
    return t[a:b] if t.dim() > 0 else t


class InMemory:
    """In-memory data: a structure (dict, pair, tuple) of tensors sharing their first dimension."""

    def __init__(self, struct: Any, where: str = "data") -> None:
        self.struct = to_tensors(struct, where)
        sizes = {int(t.shape[0]) for t in leaves(self.struct) if t.dim() > 0}
        if not sizes:
            raise ValueError(f"{where} holds no tensor with a batch dimension")
        if len(sizes) > 1:
            shapes = tree_map(lambda t: tuple(t.shape), self.struct)
            raise ValueError(f"{where}: every tensor needs the same first dimension (examples); shapes are {shapes}")
        self.n = sizes.pop()
        if self.n == 0:
            raise ValueError(f"{where} is empty: its tensors have 0 examples (first dimension 0)")

    def __len__(self) -> int:
        return self.n

    def split(self, fraction: float) -> tuple[InMemory, InMemory]:
        """The first and the last ``ceil(fraction n)`` examples."""
        n_val = math.ceil(fraction * self.n)
        n_train = self.n - n_val
        if n_val < 1 or n_train < 1:
            raise ValueError(
                f"validation={fraction} leaves {n_train} training and {n_val} validation examples of {self.n}"
            )
        return self._slice(0, n_train), self._slice(n_train, self.n)

    def _slice(self, a: int, b: int) -> InMemory:
        out = object.__new__(InMemory)
        out.struct = tree_map(functools.partial(_rows, a=a, b=b), self.struct)
        out.n = b - a
        return out

    def batches(
        self, batch_size: int, shuffle: bool, generator: torch.Generator | None, rank: int = 0, world: int = 1
    ) -> Iterator[Any]:
        order = torch.randperm(self.n, generator=generator) if shuffle else None
        if world > 1:  # global batches of world * batch_size examples, one contiguous slice per rank
            idx_all = order if order is not None else torch.arange(self.n)
            step = batch_size * world
            for i in range(0, self.n, step):
                mine = distributed.shard(idx_all[i : i + step], rank, world)
                yield tree_map(functools.partial(_take, idx=mine), self.struct)
            return
        for i in range(0, self.n, batch_size):
            if order is not None:
                yield tree_map(functools.partial(_take, idx=order[i : i + batch_size]), self.struct)
            else:
                yield tree_map(functools.partial(_rows, a=i, b=i + batch_size), self.struct)

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        return (self.n + batch_size * world - 1) // (batch_size * world)

    def last_batch_size(self, batch_size: int) -> int:
        """Examples in the last batch of a round (one process)."""
        return self.n - (self.num_batches(batch_size) - 1) * batch_size


class DataSource(Protocol):
    """What the training loop, evaluation and inspection need of their data."""

    def __iter__(self) -> Iterator[Any]: ...

    def generators(self) -> list[torch.Generator]: ...


class Source:
    """Where the batches of a round come from (:class:`DataSource`), and the generators to checkpoint."""

    def __init__(
        self,
        data: Any,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        where: str = "data",
        shard: bool = False,
    ) -> None:
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.where = where
        self.rank, self.world = (distributed.rank(), distributed.world_size()) if shard else (0, 1)
        self.memory: InMemory | None = None
        self.loader: DataLoader | None = None
        self.dataset: Any = None
        kind: Any = data if isinstance(data, (InMemory, DataLoader)) else _classify(data, where)
        if self.world > 1 and not isinstance(kind, InMemory):
            if isinstance(kind, (DataLoader, IterableDataset)):
                raise ValueError(
                    "under torchrun, lossport shards the training data itself so that every step is exactly the "
                    "one-process step on world_size * batch_size examples; give the data as a dict of tensors, "
                    "a pair (x, y) or a map-style Dataset, not a DataLoader or an IterableDataset"
                )
            kind = InMemory(_collate([kind[i] for i in range(len(kind))]), where)
        if isinstance(kind, InMemory):
            self.memory = kind
        elif isinstance(kind, DataLoader):
            self.loader = kind
        else:
            self.dataset = kind
            if isinstance(kind, IterableDataset):
                self.loader = DataLoader(kind, batch_size=batch_size, collate_fn=_collate)
            else:
                if len(kind) == 0:
                    raise ValueError(f"{where} is empty: the dataset has 0 examples")
                self.loader = DataLoader(
                    kind, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=_collate
                )

    def __iter__(self) -> Iterator[Any]:
        if self.memory is not None:
            return self.memory.batches(self.batch_size, self.shuffle, self.generator, self.rank, self.world)
        assert self.loader is not None
        return iter(self.loader)

    def __len__(self) -> int:
        if self.memory is not None:
            return self.memory.num_batches(self.batch_size, self.world)
        assert self.loader is not None
        return len(self.loader)

    def generators(self) -> list[torch.Generator]:
        """Every torch.Generator that shuffling draws from (checkpointed and restored)."""
        gens: list[torch.Generator] = []
        if self.generator is not None:
            gens.append(self.generator)
        if self.loader is not None:
            for obj in (self.loader, self.loader.sampler, getattr(self.loader.batch_sampler, "sampler", None)):
                g = getattr(obj, "generator", None)
                if isinstance(g, torch.Generator) and all(g is not h for h in gens):
                    gens.append(g)
        return gens

    def split(self, fraction: float) -> tuple[Any, Any]:
        """Training and validation data: the last ``ceil(fraction N)`` examples are held out, before any
        shuffling (Wolfram ``Scaled[f]``, Keras ``validation_split``)."""
        if not (isinstance(fraction, float) and 0.0 < fraction < 1.0):
            raise ValueError(f"validation={fraction!r}: a fraction must be a float strictly between 0 and 1")
        if self.memory is not None:
            return self.memory.split(fraction)
        ds = self.dataset
        if ds is None or isinstance(ds, IterableDataset):
            raise ValueError(
                "validation=<fraction> needs data that can be indexed (a dict, a pair, a Dataset); with a "
                "DataLoader or an IterableDataset give the validation data itself (validation=val_loader)"
            )
        n = len(ds)
        n_val = math.ceil(fraction * n)
        if n_val < 1 or n - n_val < 1:
            raise ValueError(f"validation={fraction} leaves {n - n_val} training and {n_val} validation examples")
        return Subset(ds, range(n - n_val)), Subset(ds, range(n - n_val, n))


def _collate(items: list[Any]) -> Any:
    from torch.utils.data import default_collate

    return to_tensors(default_collate(items))


def _classify(data: Any, where: str) -> Any:
    """InMemory, a DataLoader or a Dataset-like object."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Mapping) or (isinstance(data, tuple) and len(data) == 2):
        return InMemory(data, where)
    if isinstance(data, list) and data and isinstance(data[0], (Mapping, tuple)):
        return data  # a list of examples is a map-style dataset
    if isinstance(data, list) and len(data) == 2:
        return InMemory(tuple(data), where)
    if isinstance(data, list) and not data:
        raise ValueError(f"{where} is empty (an empty list)")
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return data
    raise TypeError(
        f"{where} is a {type(data).__name__}; give a dict of tensors/arrays, a pair (x, y), a Dataset of "
        "dicts or a DataLoader"
    )


def make_source(
    data: Any,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    where: str = "data",
    shard: bool = False,
) -> Source:
    """The one dispatcher from every accepted data form (module docstring) to a :class:`Source`."""
    return Source(data, batch_size, shuffle, generator, where, shard)


def first_batches(data: Any, batches: int, batch_size: int, where: str = "data") -> list[Any]:
    """The first ``batches`` batches of ``data`` in order (no shuffling), for inspection."""
    if int(batches) < 1:
        raise ValueError(f"batches must be a positive integer, not {batches!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
    out: list[Any] = []
    for batch in make_source(data, int(batch_size), where=where):
        out.append(batch)
        if len(out) == batches:
            break
    if not out:
        raise ValueError(f"{where} gave no batch")
    return out


__all__ = [
    "DataSource",
    "InMemory",
    "Source",
    "batch_size_of",
    "first_batches",
    "leaves",
    "make_source",
    "to_device",
    "to_tensors",
    "tree_map",
]
