"""`train` and `evaluate`: one call from a multi-output net and its data to a trained net and a per-part
history.

::

    result = lossport.train(net, data, {"digit": "ce", "size": "mse"}, balance="dwa", epochs=20,
                            validation=0.1)
    result.net                    # the net of the best validation round (Wolfram "TrainedNet")
    result.history["val_digit"]   # per round, unweighted
    result.plot("loss.png")
    lossport.evaluate(result.net, test, loss=...)  # {"loss", "digit", "size", "digit/accuracy"}

**Data** (training and validation alike): a dict of tensors or numpy arrays with a common first dimension (a
batch is the same dict sliced); a pair ``(x, y)`` of tensors, arrays, tuples or dicts of them; a map-style
``Dataset`` yielding dicts or pairs (a list of dicts is one); or a ``DataLoader``, used as it is (its own
batch size and shuffling). In-memory data is shuffled each round by a ``torch.Generator`` seeded from
``seed`` and sliced into batches of ``batch_size`` (the last one smaller); float64 arrays become float32.
``validation=f`` with ``0 < f < 1`` (Wolfram ``Scaled[f]``, Keras ``validation_split``) holds out the *last*
``ceil(f N)`` examples, before any shuffling.

**One step.** The objective evaluates the unweighted parts; every part (and regularization term) is checked to
be finite *before* the balancer sees it and before any backward; the balancer sets the weights; one backward
of the total (divided by ``accumulate``); every ``accumulate`` batches the gradients are unscaled (16-mixed),
clipped to norm ``grad_clip``, and the optimizer steps; then ``objective.step(net, batch)`` runs the
balancer's own update (its learned parameters, FAMO's second look at the batch). Balancer parameters are
never given to the net's optimizer. After each round: ``balancer.end_round(part means)``, validation,
history, scheduler, best net, early stopping, callbacks, loggers, checkpoint.

**Non-finite parts.** ``on_nonfinite="raise"`` (default): :class:`~lossport.NonFiniteLossError` naming the
part, round and batch; no optimizer step was taken with that batch, so the net keeps its last good weights,
and the checkpoint (written only at round ends) is that of the last complete round. The same holds when the
parts are finite but a gradient is not: the gradients are checked before every optimizer step (one sum per
parameter tensor; a gradient-level balancer finds it even earlier), and the error names the parameters.
``"skip"``: the batch is dropped (no backward, no step, no balancer update; for a non-finite gradient, the whole
accumulated step) and the history counts ``skipped`` batches per round.

**Checkpoints** (``checkpoint=DIR``): ``DIR/checkpoint.pt`` is rewritten at the end of every round,
atomically (a temporary file in ``DIR``, fsync, ``os.replace``), with the net, the optimizer, scheduler,
GradScaler and balancer states, the history, the best net, early-stopping state, the RNG states (torch CPU and
CUDA, numpy, Python ``random``, the data generators) and the round number. ``resume=True`` loads it and
continues with the next round: a run killed in the middle of round ``k`` restarts round ``k`` from its
beginning and, on CPU with a ``seed``, ends with the same weights bit for bit as a run never interrupted.
``resume=True`` without a checkpoint file starts afresh (so the same command can be rerun after a crash);
``checkpoint=DIR`` holding a checkpoint without ``resume=True`` is an error rather than an overwrite.
Checkpoints are pickles: load only your own.

**Precision.** ``"32"`` (default); ``"bf16"``: forward and losses under ``torch.autocast(dtype=bfloat16)`` on
CPU or CUDA, no scaler needed; ``"16-mixed"``: float16 autocast with a ``GradScaler``, CUDA only (on CPU it is
an error: use ``"bf16"``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from . import distributed
from .callbacks import Callback, CSVLogger, TrainState, as_callback, loggers
from .errors import NonFiniteLossError
from .history import History, Result
from .metrics import MetricSet, guess_higher_is_better, metric_set
from .objective import Objective, unwrap
from .result_types import Losses

CHECKPOINT_NAME = "checkpoint.pt"
_PRECISIONS = {
    "32": "32",
    "32-true": "32",
    "fp32": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "16-mixed": "16-mixed",
    "16": "16-mixed",
    "fp16": "16-mixed",
}


# ==================================================================================================== data
def _tree_map(fn: Callable[[Tensor], Any], s: Any) -> Any:
    if isinstance(s, Tensor):
        return fn(s)
    if isinstance(s, Mapping):
        return {k: _tree_map(fn, v) for k, v in s.items()}
    if isinstance(s, tuple):
        return tuple(_tree_map(fn, v) for v in s)
    if isinstance(s, list):
        return [_tree_map(fn, v) for v in s]
    return s


def _leaves(s: Any) -> list[Tensor]:
    out: list[Tensor] = []
    _tree_map(lambda t: out.append(t), s)
    return out


def _to_tensors(s: Any, where: str = "data") -> Any:
    """numpy arrays -> tensors (float64 -> float32); tensors kept; None kept; anything else an error."""
    if isinstance(s, Tensor):
        return s
    if isinstance(s, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(s))
        return t.float() if t.dtype == torch.float64 else t
    if isinstance(s, Mapping):
        return {k: _to_tensors(v, f"{where}[{k!r}]") for k, v in s.items()}
    if isinstance(s, (tuple, list)):
        return type(s)(_to_tensors(v, f"{where}[{i}]") for i, v in enumerate(s))
    if s is None:
        return None
    raise TypeError(f"{where} is a {type(s).__name__}; in-memory data holds tensors or numpy arrays")


def _take(t: Tensor, idx: Tensor) -> Tensor:
    return t.index_select(0, idx) if t.dim() > 0 else t


def _rows(t: Tensor, a: int, b: int) -> Tensor:
    return t[a:b] if t.dim() > 0 else t


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch: the first dimension of its first tensor with one."""
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, Tensor) and v.dim() > 0:
                return int(v.shape[0])
    for t in _leaves(batch):
        if t.dim() > 0:
            return int(t.shape[0])
    return 1


class InMemory:
    """In-memory data: a structure (dict, pair, tuple) of tensors sharing their first dimension."""

    def __init__(self, struct: Any, where: str = "data") -> None:
        self.struct = _to_tensors(struct, where)
        sizes = {int(t.shape[0]) for t in _leaves(self.struct) if t.dim() > 0}
        if not sizes:
            raise ValueError(f"{where} holds no tensor with a batch dimension")
        if len(sizes) > 1:
            shapes = _tree_map(lambda t: tuple(t.shape), self.struct)
            raise ValueError(f"{where}: every tensor needs the same first dimension (examples); shapes are {shapes}")
        self.n = sizes.pop()

    def __len__(self) -> int:
        return self.n

    def split(self, fraction: float) -> tuple[InMemory, InMemory]:
        n_val = math.ceil(fraction * self.n)
        n_train = self.n - n_val
        if n_val < 1 or n_train < 1:
            raise ValueError(
                f"validation={fraction} leaves {n_train} training and {n_val} validation examples of {self.n}"
            )
        return self._slice(0, n_train), self._slice(n_train, self.n)

    def _slice(self, a: int, b: int) -> InMemory:
        out = object.__new__(InMemory)
        out.struct = _tree_map(lambda t: t[a:b] if t.dim() > 0 else t, self.struct)
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
                yield _tree_map(functools.partial(_take, idx=mine), self.struct)
            return
        for i in range(0, self.n, batch_size):
            if order is not None:
                yield _tree_map(functools.partial(_take, idx=order[i : i + batch_size]), self.struct)
            else:
                yield _tree_map(functools.partial(_rows, a=i, b=i + batch_size), self.struct)

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        return (self.n + batch_size * world - 1) // (batch_size * world)


class Source:
    """Where the batches of a round come from, and the generators to checkpoint."""

    def __init__(
        self,
        data: Any,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None,
        where: str = "data",
        shard: bool = False,
    ) -> None:
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.rank, self.world = (distributed.rank(), distributed.world_size()) if shard else (0, 1)
        self.memory: InMemory | None = None
        self.loader: DataLoader | None = None
        self.dataset: Any = None
        if isinstance(data, (InMemory, DataLoader)):
            kind: Any = data
        else:
            kind = _classify(data, where)
        if self.world > 1 and not isinstance(kind, InMemory):
            if isinstance(kind, DataLoader) or isinstance(kind, IterableDataset):
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
            ds = kind
            self.dataset = ds
            if isinstance(ds, IterableDataset):
                self.loader = DataLoader(ds, batch_size=batch_size, collate_fn=_collate)
            else:
                self.loader = DataLoader(
                    ds, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=_collate
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

    @property
    def num_examples(self) -> int | None:
        if self.memory is not None:
            return len(self.memory)
        assert self.loader is not None
        try:
            return len(self.loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None

    def generators(self) -> list[torch.Generator]:
        """Every torch.Generator that shuffling draws from (checkpointed and restored)."""
        gens: list[torch.Generator] = []
        if self.generator is not None:
            gens.append(self.generator)
        if self.loader is not None:
            for obj in (
                self.loader,
                self.loader.sampler,
                getattr(self.loader.batch_sampler, "sampler", None),
            ):
                g = getattr(obj, "generator", None)
                if isinstance(g, torch.Generator) and all(g is not h for h in gens):
                    gens.append(g)
        return gens

    def split(self, fraction: float) -> tuple[Any, Any]:
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

    return _to_tensors(default_collate(items))


def _classify(data: Any, where: str) -> Any:
    """InMemory, a DataLoader or a Dataset-like object."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Mapping):
        return InMemory(data, where)
    if isinstance(data, tuple) and len(data) == 2:
        return InMemory(data, where)
    if isinstance(data, list) and data and isinstance(data[0], (Mapping, tuple)):
        return data  # a list of examples is a map-style dataset
    if isinstance(data, list) and len(data) == 2:
        return InMemory(tuple(data), where)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return data
    raise TypeError(
        f"{where} is a {type(data).__name__}; give a dict of tensors/arrays, a pair (x, y), a Dataset of "
        "dicts or "
        "a DataLoader"
    )


def make_source(
    data: Any,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    where: str = "data",
    shard: bool = False,
) -> Source:
    return Source(data, batch_size, shuffle, generator, where, shard)


def _to_device(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return _tree_map(lambda t: t if t.device.type == "cpu" else t.cpu(), batch)
    return _tree_map(lambda t: t.to(device, non_blocking=True), batch)


# ============================================================================================ configuration
def _device(device: Any, net: nn.Module) -> torch.device:
    if device is None:
        p = next(iter(net.parameters()), None)
        return p.device if p is not None else torch.device("cpu")
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per torchrun process
    return torch.device(device)


def _precision(precision: Any, device: torch.device) -> str:
    key = str(precision).lower() if precision is not None else "32"
    if key not in _PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of '32', 'bf16', '16-mixed'")
    p = _PRECISIONS[key]
    if p == "16-mixed" and device.type != "cuda":
        raise ValueError(
            f"precision='16-mixed' needs a CUDA device (training runs on {device.type}); on CPU use precision='bf16'"
        )
    return p


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _optimizer(
    spec: Any, net: nn.Module, lr: float, weight_decay: float, objective: Objective
) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    if isinstance(spec, torch.optim.Optimizer):
        opt = spec
    elif isinstance(spec, str):
        key = spec.lower()
        if key == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        elif key == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay if weight_decay else 0.01)
        elif key == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        else:
            raise ValueError(
                f"optimizer={spec!r}: use 'adam', 'adamw', 'sgd', an Optimizer or a function params -> Optimizer"
            )
    elif callable(spec):
        opt = spec(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer function returned a {type(opt).__name__}, not a torch.optim.Optimizer")
    else:
        raise TypeError(f"optimizer must be a name, an Optimizer or a function, not {type(spec).__name__}")
    if objective.balancer is not None:
        own = {id(p) for p in objective.balancer.parameters()}
        if any(id(p) in own for g in opt.param_groups for p in g["params"]):
            raise ValueError(
                f"the optimizer holds parameters of the balancer {objective.balancer!r}; the balancer "
                "trains them "
                "itself in balancer.step(): give the optimizer the net's parameters only"
            )
    return opt


def _scheduler(spec: Any, opt: torch.optim.Optimizer) -> Any:
    if spec is None:
        return None
    if isinstance(spec, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        if spec.optimizer is not opt:
            raise ValueError(
                "scheduler is bound to another optimizer; give a function optimizer -> scheduler "
                "(e.g. lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)) or pass that optimizer as "
                "optimizer="
            )
        return spec
    if callable(spec):
        return spec(opt)
    raise TypeError(f"scheduler must be a function optimizer -> scheduler or a scheduler, not {type(spec).__name__}")


# ============================================================================================ directions
def higher_is_better(key: str, metrics: MetricSet | None) -> bool:
    """Whether larger values of history key ``key`` are better: metrics say so themselves (accuracy, F1 yes;
    MAE, RMSE no); losses, parts and everything else are minimised."""
    base = key[4:] if key.startswith("val_") else key
    if metrics is not None:
        d = metrics.directions()
        if base in d:
            return d[base]
    if "/" in base and not base.startswith(("weight/", "balancer/")):
        return guess_higher_is_better(base)
    return False


class _Tracker:
    """Best value of one key (for the best net and early stopping)."""

    def __init__(self, key: str, min_delta: float = 0.0, patience: int = 0) -> None:
        self.key, self.min_delta, self.patience = key, float(min_delta), int(patience)
        self.maximise = False
        self.best: float | None = None
        self.round: int | None = None
        self.wait = 0

    def update(self, value: float, round_: int) -> bool:
        """Record a round's value; True when it improves on the best by more than ``min_delta``."""
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.maximise:
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best, self.round, self.wait = value, round_, 0
        else:
            self.wait += 1
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "round": self.round, "wait": self.wait}

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        self.best, self.round, self.wait = s["best"], s["round"], int(s["wait"])


# ============================================================================================== progress
class _Progress:
    def __init__(self, mode: Any, epochs: int) -> None:
        if mode is True or mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        if mode not in (False, None, "bar", "lines"):
            raise ValueError(f"progress={mode!r}: use True, False, 'bar' or 'lines'")
        self.mode = mode or None
        self.epochs = epochs
        self.bar: Any = None
        self._last = 0.0

    def begin_round(self, r: int, total: int | None) -> None:
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, desc=f"round {r}/{self.epochs}", leave=True, file=sys.stderr, dynamic_ncols=True
            )

    def batch(self, stats: _RoundStats | None, part_order: Sequence[str]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.perf_counter()
        if stats is not None and now - self._last > 0.2:
            self._last = now
            self.bar.set_postfix_str(_line(stats.row(part_order)), refresh=False)

    def end_round(self, r: int, row: Mapping[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(_line(row, skip=("round", "seconds", "lr")), refresh=True)
            self.bar.close()
            self.bar = None
        elif self.mode == "lines":
            print(
                f"round {r}/{self.epochs} - {row.get('seconds', 0):.2f}s - " + _line(row, skip=("round", "seconds")),
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _line(row: Mapping[str, float], skip: Sequence[str] = ()) -> str:
    return " - ".join(f"{k}: {v:.4g}" for k, v in row.items() if k not in skip and not k.startswith("balancer/"))


# ============================================================================================== round stats
class _RoundStats:
    """Accumulates one round: parts over labelled examples, the rest over batches."""

    def __init__(self) -> None:
        self.part_sum: dict[str, float] = {}
        self.part_n: dict[str, int] = {}
        self.loss_sum = 0.0
        self.examples = 0
        self.batches = 0
        self.other_sum: dict[str, float] = {}
        self.other_n: dict[str, int] = {}
        self.skipped = 0

    def add(
        self,
        part_values: Mapping[str, float],
        counts: Mapping[str, int],
        total: float,
        bs: int,
        other: Mapping[str, float],
    ) -> None:
        for k, v in part_values.items():
            n = counts.get(k, bs)
            self.part_sum[k] = self.part_sum.get(k, 0.0) + v * n
            self.part_n[k] = self.part_n.get(k, 0) + n
        self.loss_sum += total * bs
        self.examples += bs
        self.batches += 1
        for k, v in other.items():
            self.other_sum[k] = self.other_sum.get(k, 0.0) + v
            self.other_n[k] = self.other_n.get(k, 0) + 1

    def part_means(self) -> dict[str, float]:
        return {k: self.part_sum[k] / self.part_n[k] for k in self.part_sum if self.part_n[k] > 0}

    def row(self, part_order: Sequence[str], static: Mapping[str, float] | None = None) -> dict[str, float]:
        """The round's values; ``static`` gives the weights when they are the same in every batch."""
        out: dict[str, float] = {"loss": self.loss_sum / self.examples if self.examples else math.nan}
        means = self.part_means()
        present = [k for k in list(part_order) + [k for k in means if k not in part_order] if k in means]
        for k in present:
            out[k] = means[k]
        if static is not None:
            for k in present:
                out[f"weight/{k}"] = float(static.get(k, 1.0))
        for k in self.other_sum:
            out[k] = self.other_sum[k] / self.other_n[k]
        return out


# ================================================================================================= evaluate
def _objective(loss: Any, weights: Any, balance: Any) -> Objective:
    if isinstance(loss, Objective):
        if weights is not None or balance is not None:
            raise ValueError("weights= and balance= belong to the Objective when an Objective is given as loss")
        return loss
    return Objective(loss, weights=weights, balance=balance)


def evaluate(
    net: nn.Module,
    data: Any,
    loss: Any = "auto",
    *,
    weights: Any = None,
    metrics: Any = None,
    batch_size: int = 256,
    device: Any = None,
    precision: str = "32",
    per_example: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, Tensor]]:
    """Loss parts and metrics of ``net`` on ``data``, without gradients, in eval mode.

    Returns floats keyed as the history: ``loss`` (the total ``sum_i s_i L_i + regularization`` with the
    static weights ``s_i`` of the spec; a balancer of an Objective given as ``loss`` is not applied), every
    part ``L_i`` (its mean over *all* labelled examples of ``data``: ``sum_b n_ib L_ib / sum_b n_ib``; a part
    with no labelled example anywhere is absent), and ``output/metric``. With ``per_example=True`` also
    returns the per-example loss of every part (a tensor of length N in data order, NaN where unlabelled;
    Wolfram's "ExampleLosses"). ``loss`` may be an :class:`~lossport.Objective`. ``device=None`` uses the
    net's device.
    """
    objective = _objective(loss, weights, None)
    dev = _device(device, net)
    prec = _precision(precision, dev)
    src = make_source(data, batch_size, False, None, "data")
    return _evaluate(net, src, objective, metrics, dev, prec, per_example)


def _evaluate(
    net: nn.Module,
    src: Source,
    objective: Objective,
    metrics: Any,
    device: torch.device,
    precision: str,
    per_example: bool = False,
    mset: MetricSet | None = None,
) -> Any:
    was_training = net.training
    net.eval()
    if mset is not None:
        mset.reset()
    stats = _RoundStats()
    extra_last: dict[str, float] = {}
    examples: dict[str, list[Tensor]] = {}
    no_examples: set[str] = set()
    n_seen = 0
    try:
        with torch.no_grad():
            for batch in src:
                batch = _to_device(batch, device)
                with _autocast(precision, device):
                    outputs, logits = objective.forward(net, batch)
                    losses = objective.losses(outputs, batch, net=net, logits=logits, per_example=per_example)
                if mset is None and metrics is not None:
                    mset = metrics if isinstance(metrics, MetricSet) else metric_set(metrics, objective.output_names)
                    if mset is not None:
                        mset.reset()
                bs = batch_size_of(batch)
                vals = _floats(losses.parts)
                stats.add(vals, losses.counts, 0.0, bs, {})
                extra_last = _floats(losses.extra)
                if mset is not None:
                    mset.update(outputs, objective.targets(batch))
                if per_example:
                    for p in objective.part_names:
                        ex = losses.per_example.get(p)
                        if ex is None and p not in losses.missing:
                            no_examples.add(p)  # a part without per-example values (a scalar loss output)
                            continue
                        col = examples.setdefault(p, [torch.full((n_seen,), math.nan)] if n_seen else [])
                        col.append(
                            ex.reshape(bs, -1).float().mean(1).cpu() if ex is not None else torch.full((bs,), math.nan)
                        )
                n_seen += bs
    finally:
        net.train(was_training)
    means = stats.part_means()
    if objective.compiled:
        sw = objective.static_weights
        total = sum(sw.get(k, 1.0) * v for k, v in means.items()) + sum(extra_last.values())
        out: dict[str, float] = {"loss": float(total)}
        out.update({k: means[k] for k in objective.part_names if k in means})
        out.update({k: means[k] for k in means if k not in out})
    else:
        out = {}
    if mset is not None:
        out.update(mset.compute())
    if per_example:
        ex_out = {p: torch.cat(v) for p, v in examples.items() if v and p not in no_examples}
        return out, ex_out
    return out


def _floats(d: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Python floats of scalar tensors. On an accelerator the values are stacked first so that reading them
    costs one device synchronisation; on CPU ``item()`` per value is ten times cheaper than the stack."""
    if not d:
        return {}
    keys = list(d)
    tensors = [d[k] for k in keys]
    if all(isinstance(t, Tensor) and t.device.type == "cpu" for t in tensors):
        return {k: t.item() for k, t in zip(keys, tensors)}  # type: ignore[union-attr]
    if all(isinstance(t, Tensor) for t in tensors):
        vals = torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()  # type: ignore[union-attr]
    else:
        vals = [float(t.detach()) if isinstance(t, Tensor) else float(t) for t in tensors]
    return dict(zip(keys, vals))


# =================================================================================================== train
def train(
    net: nn.Module,
    data: Any,
    loss: Any = "auto",
    *,
    weights: Any = None,
    balance: Any = None,
    epochs: int = 10,
    batch_size: int = 32,
    optimizer: Any = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    scheduler: Any = None,
    scheduler_every: str = "round",
    grad_clip: float | None = None,
    accumulate: int = 1,
    precision: str = "32",
    validation: Any = None,
    metrics: Any = None,
    stop_on: str | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    mode: str = "auto",
    best_on: str | None = None,
    on_nonfinite: str = "raise",
    shuffle: bool = True,
    progress: Any = True,
    log: Any = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    seed: int | None = None,
    device: Any = "auto",
    callbacks: Iterable[Any] = (),
    record_batches: bool = True,
    monitor: bool | int = False,
) -> Result:
    """Train ``net`` on ``data`` with a loss per output; return a :class:`~lossport.history.Result`.

    Args:
        net: the net; trained in place (``Result.final_net`` is this object).
        data: training data (see the module docstring for the forms).
        loss, weights, balance: the loss spec, static weights and balancer (:class:`~lossport.Objective`);
            ``loss`` may also be an ``Objective``.
        epochs: number of rounds (passes over the data).
        batch_size: examples per batch for in-memory data and Datasets (a DataLoader keeps its own).
        optimizer: ``"adam"`` (default), ``"adamw"`` (weight decay 0.01 unless given), ``"sgd"`` (momentum
            0.9), an Optimizer over the net's parameters, or a function ``params -> Optimizer``.
        lr, weight_decay: for an optimizer given by name.
        scheduler: a function ``optimizer -> scheduler`` (or a scheduler of the ``optimizer`` given); stepped
            after every round (``scheduler_every="round"``) or optimizer step (``"batch"``).
            ``ReduceLROnPlateau`` gets ``val_loss`` (``loss`` without validation).
        grad_clip: clip the gradient norm of the net's parameters to this value before each step.
        accumulate: batches per optimizer step (gradient accumulation; each batch's total is divided by it).
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"`` (CUDA).
        validation: validation data (any data form) or a fraction ``0 < f < 1`` of the training data (the last
            examples). Evaluated after every round (:func:`evaluate`) into ``val_*`` keys.
        metrics: ``{output: ["accuracy", "f1", "mae", "rmse", callable, ...]}`` (:mod:`lossport.metrics`).
        stop_on, patience, min_delta, mode: early stopping when ``stop_on`` (any history key, default
            ``val_loss`` with validation else ``loss``) has not improved by more than ``min_delta`` for
            ``patience`` rounds (default 5); given either of ``stop_on``/``patience`` turns it on.
            ``mode="auto"`` minimises losses and maximises accuracy-like metrics; ``"min"``/``"max"`` force
        it. best_on: the key selecting ``Result.net``; default ``stop_on`` when it is a ``val_`` key, else
            ``val_loss`` (only with validation).
        on_nonfinite: ``"raise"`` (NonFiniteLossError) or ``"skip"``.
        shuffle: reshuffle in-memory data and Datasets every round.
        progress: ``True`` (a tqdm bar per round on a terminal, one line per round otherwise), ``"bar"``,
            ``"lines"`` or ``False``.
        log: ``"csv:PATH"``, ``"json:PATH"``, ``"tensorboard:DIR"`` or a list; with ``checkpoint=DIR`` the
            history is also written to ``DIR/history.csv``.
        checkpoint, resume: see the module docstring.
        seed: seeds torch's global generator (dropout, ...) and the data-shuffling generator.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, a ``torch.device``.
        callbacks: :class:`~lossport.callbacks.Callback` objects or functions ``state -> "stop" | None``.
        record_batches: keep the per-batch history (total and parts of every batch).
        monitor: record, per round, the gradient norms of the parts on the shared trunk and their cosines
            (:class:`~lossport.inspection.Monitor`, keys ``monitor/...``): ``True`` samples every 10 steps, an
            integer ``K`` every ``K`` steps. Each sample costs about one backward pass per part through the
            trunk; with a Gramian balancer the figures it already computed are reused at no cost.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, not {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive integer, not {accumulate!r}")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', not {on_nonfinite!r}")
    if scheduler_every not in ("round", "batch"):
        raise ValueError(f"scheduler_every must be 'round' or 'batch', not {scheduler_every!r}")
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', not {mode!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be a positive number, not {grad_clip!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=DIR (the directory the interrupted run wrote to)")

    objective = _objective(loss, weights, balance)
    mon = None
    if monitor is not False:
        from .inspection import Monitor

        if isinstance(monitor, bool) or not isinstance(monitor, int) or monitor < 1:
            if monitor is not True:
                raise ValueError(f"monitor must be True, False or a positive integer, not {monitor!r}")
        mon = Monitor(every=10 if monitor is True else int(monitor))
    dev = _device(device, net)
    prec = _precision(precision, dev)
    net.to(dev)
    model: nn.Module = net
    if distributed.setup(dev):
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        if distributed.rank() != 0:  # one voice: progress, logs and checkpoints from rank 0 only
            progress, log = False, None
    if seed is not None:
        torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))

    train_src = make_source(data, batch_size, shuffle, gen, "data", shard=True)
    val_src: Source | None = None
    if validation is not None:
        if isinstance(validation, float):
            tr, va = train_src.split(validation)
            train_src = make_source(tr, batch_size, shuffle, gen, "data", shard=True)
            val_src = make_source(va, batch_size, False, None, "validation")
        elif isinstance(validation, (int, bool)):
            raise ValueError(f"validation={validation!r}: give validation data or a float fraction like 0.1")
        else:
            val_src = make_source(validation, batch_size, False, None, "validation")

    opt = _optimizer(optimizer, net, lr, weight_decay, objective)
    sched = _scheduler(scheduler, opt)
    scaler = torch.amp.GradScaler(dev.type) if prec == "16-mixed" else None
    balancer = objective.balancer

    history = History()
    cbs: list[Callback] = [as_callback(c) for c in callbacks] + loggers(log)
    ckpt_path: Path | None = None
    if checkpoint is not None:
        ckpt_dir = Path(checkpoint)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = ckpt_dir / CHECKPOINT_NAME
        if ckpt_path.exists() and not resume:
            raise FileExistsError(
                f"{ckpt_path} holds a checkpoint of an earlier run; pass resume=True to continue it, or "
                "choose "
                "another checkpoint directory (or delete it)"
            )
        cbs.append(CSVLogger(ckpt_dir / "history.csv"))

    stopper: _Tracker | None = None
    if stop_on is not None or patience is not None:
        key = stop_on or ("val_loss" if val_src is not None else "loss")
        if key.startswith("val_") and val_src is None:
            raise ValueError(f"stop_on={key!r} needs validation data (validation=...)")
        stopper = _Tracker(key, min_delta, 5 if patience is None else int(patience))
    best: _Tracker | None = None
    if val_src is not None:
        best = _Tracker(best_on or (stop_on if stop_on and stop_on.startswith("val_") else "val_loss"))
    elif best_on is not None:
        raise ValueError(f"best_on={best_on!r} needs validation data (validation=...)")

    def maximise(key: str) -> bool:
        if mode != "auto" and stopper is not None and key == stopper.key:
            return mode == "max"
        return higher_is_better(key, val_mset or mset)

    best_state: dict[str, Tensor] | None = None

    state = TrainState(net=net, optimizer=opt, objective=objective, history=history, epochs=epochs)
    start_round = 0
    stopped_because = "completed"
    train_seconds = 0.0
    train_examples = 0
    if ckpt_path is not None and resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("scheduler") is not None:
            sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler") is not None:
            scaler.load_state_dict(ck["scaler"])
        if balancer is not None and ck.get("balancer") is not None:
            balancer.load_state_dict(ck["balancer"])
        history.load_state_dict(ck["history"])
        if stopper is not None and ck.get("stopper") is not None:
            stopper.load_state_dict(ck["stopper"])
        if best is not None and ck.get("best") is not None:
            best.load_state_dict(ck["best"])
            best_state = ck.get("best_state")
        for i, cb in enumerate(cbs):
            if hasattr(cb, "load_state_dict") and f"callback{i}" in ck.get("callbacks", {}):
                cb.load_state_dict(ck["callbacks"][f"callback{i}"])
        _set_rng(ck["rng"], train_src.generators())
        start_round = int(ck["round"])
        train_seconds, train_examples = float(ck.get("train_seconds", 0.0)), int(ck.get("train_examples", 0))
        if ck.get("stopped_because", "completed") != "completed":
            stopped_because = ck["stopped_because"]
            start_round = max(start_round, epochs)

    mset: MetricSet | None = None
    val_mset: MetricSet | None = None
    prog = _Progress(progress, epochs)
    for cb in cbs:
        cb.on_train_begin(state)
    part_order: list[str] = []
    try:
        for r in range(start_round + 1, epochs + 1):
            state.round, state.batch = r, -1
            for cb in cbs:
                cb.on_round_begin(state)
            t_round = time.perf_counter()
            net.train()
            stats = _RoundStats()
            lr_now = float(opt.param_groups[0]["lr"])
            if mset is not None:
                mset.reset()
            try:
                total_batches: int | None = len(train_src)
            except TypeError:
                total_batches = None
            prog.begin_round(r, total_batches)
            pending = 0
            last_batch: Any = None
            opt.zero_grad(set_to_none=True)
            for b, batch in enumerate(train_src):
                if dev.type != "cpu":
                    batch = _to_device(batch, dev)
                bs = batch_size_of(batch)
                with _autocast(prec, dev):
                    raw = objective._evaluate(model, batch)
                if not part_order and objective.compiled:
                    part_order = objective.part_names
                if not raw.parts and not raw.extra:
                    continue  # no labelled example of any part in this batch: nothing to learn from it
                if balancer is None:  # one device sync for the parts, extra terms and total
                    flat = _floats({**raw.parts, **{f"\0{k}": v for k, v in raw.extra.items()}, "\0\0": raw.total})
                    total = flat.pop("\0\0")
                    raw_vals = {k: flat[k] for k in raw.parts}
                    extra_vals = {k: flat[f"\0{k}"] for k in raw.extra}
                else:
                    raw_vals = _floats(raw.parts)
                    extra_vals = _floats(raw.extra)
                bad = [k for k, v in {**raw_vals, **extra_vals}.items() if not math.isfinite(v)]
                if bad:
                    if on_nonfinite == "raise":
                        opt.zero_grad(set_to_none=True)
                        value = raw_vals.get(bad[0], extra_vals.get(bad[0]))
                        raise NonFiniteLossError(
                            f"part {bad[0]!r} is {value} in round {r}, batch {b} (0-based; non-finite parts: "
                            f"{bad}); no optimizer step was taken with this batch, so the net keeps its "
                            "last good "
                            "weights. Lower the learning rate, clip gradients (grad_clip=), check the "
                            "inputs and "
                            "targets, or skip such batches with on_nonfinite='skip'"
                        )
                    stats.skipped += 1
                    prog.batch(None, part_order)
                    continue
                losses: Losses = raw
                total_t = raw.total
                if balancer is not None and raw.parts:
                    try:
                        losses = balancer(raw)
                    except FloatingPointError as err:  # finite parts whose gradients are not (Gramian, surgery)
                        if on_nonfinite == "raise":
                            opt.zero_grad(set_to_none=True)
                            raise NonFiniteLossError(
                                f"round {r}, batch {b}: every part is finite but the balancer {balancer!r} met a "
                                f"non-finite gradient ({err}); no step was taken. Check the losses' gradients "
                                "(e.g. sqrt or log at 0), or skip such batches with on_nonfinite='skip'"
                            ) from err
                        stats.skipped += 1
                        prog.batch(None, part_order)
                        continue
                    total_t = losses.total
                    total = float(total_t.detach())
                    if not math.isfinite(total):
                        if on_nonfinite == "raise":
                            opt.zero_grad(set_to_none=True)
                            raise NonFiniteLossError(
                                f"the total loss is {total} in round {r}, batch {b} although every part is "
                                "finite: "
                                f"the balancer {balancer!r} produced non-finite weights or terms "
                                f"({losses.as_dict()})"
                            )
                        stats.skipped += 1
                        prog.batch(None, part_order)
                        continue
                if mon is not None:
                    mon.observe(losses, balancer)
                scaled = total_t / accumulate if accumulate > 1 else total_t
                if scaler is not None:
                    scaler.scale(scaled).backward()
                else:
                    scaled.backward()
                pending += 1
                last_batch = batch
                if pending == accumulate:
                    pending = 0
                    bad_grads = _step(net, opt, scaler, grad_clip, sched if scheduler_every == "batch" else None)
                    if bad_grads:
                        if on_nonfinite == "raise":
                            raise NonFiniteLossError(_bad_gradient_message(bad_grads, r, b))
                        stats.skipped += 1
                        prog.batch(None, part_order)
                        continue
                    objective.step(net, batch)
                if balancer is None:  # static weights: recorded once per round
                    other = extra_vals
                else:
                    other = {f"weight/{k}": float(w) for k, w in _floats(losses.weights).items()}
                    other.update(_floats(losses.extra))
                    other.update({f"balancer/{k}": float(v) for k, v in balancer.info.items()})
                stats.add(raw_vals, raw.counts, total, bs, other)
                if metrics is not None:
                    if mset is None:
                        mset = metric_set(metrics, objective.output_names)
                    if mset is not None:
                        mset.update(raw.outputs or {}, objective.targets(batch))
                if record_batches:
                    history.batches.append({"round": float(r), "batch": float(b), "loss": total, **raw_vals})
                state.batch = b
                if cbs:
                    state.logs = {"loss": total, **raw_vals}
                    for cb in cbs:
                        cb.on_batch_end(state)
                prog.batch(stats, part_order)
                if state.stop_reason is not None:
                    break
            if pending:
                bad_grads = _step(net, opt, scaler, grad_clip, sched if scheduler_every == "batch" else None)
                if bad_grads and on_nonfinite == "raise":
                    raise NonFiniteLossError(_bad_gradient_message(bad_grads, r, state.batch))
                if bad_grads:
                    stats.skipped += 1
                else:
                    objective.step(net, last_batch)
            train_time = time.perf_counter() - t_round
            train_seconds += train_time
            train_examples += stats.examples

            row: dict[str, float] = {"round": float(r)}
            row.update(stats.row(part_order, None if balancer is not None else objective.static_weights))
            if balancer is not None:
                balancer.end_round(stats.part_means())
            if mon is not None:
                row.update({f"monitor/{k}": v for k, v in mon.end_round().items()})
            if mset is not None:
                row.update(mset.compute())
            if on_nonfinite == "skip":
                row["skipped"] = float(stats.skipped)
            if val_src is not None:
                if metrics is not None and val_mset is None and objective.compiled:
                    val_mset = metric_set(metrics, objective.output_names)
                vals = _evaluate(net, val_src, objective, None, dev, prec, mset=val_mset)
                row.update({f"val_{k}": v for k, v in vals.items()})
            row["lr"] = lr_now
            row["seconds"] = time.perf_counter() - t_round
            if stats.examples == 0 and stats.skipped:
                row["loss"] = math.nan
            history.rounds.append(row)

            if sched is not None and scheduler_every == "round":
                if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    sched.step(row.get("val_loss", row["loss"]))
                else:
                    sched.step()
            if best is not None:
                _check_key(best.key, row, history, "best_on")
                best.maximise = maximise(best.key)
                if best.update(row.get(best.key, math.nan), r):
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
            if stopper is not None:
                _check_key(stopper.key, row, history, "stop_on")
                stopper.maximise = maximise(stopper.key)
                stopper.update(row.get(stopper.key, math.nan), r)
                if stopper.wait >= stopper.patience and state.stop_reason is None:
                    state.stop(
                        f"early stopping: {stopper.key} did not improve for {stopper.wait} rounds "
                        f"(best {stopper.best:.6g} in round {stopper.round})"
                    )
            state.logs = dict(row)
            for cb in cbs:
                cb.on_round_end(state)
            if state.stop_reason is not None:
                stopped_because = state.stop_reason
            if ckpt_path is not None and distributed.rank() == 0:
                _save_checkpoint(
                    ckpt_path,
                    {
                        "format": 1,
                        "round": r,
                        "net": net.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict() if sched is not None else None,
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "balancer": balancer.state_dict() if balancer is not None else None,
                        "history": history.state_dict(),
                        "stopper": stopper.state_dict() if stopper is not None else None,
                        "best": best.state_dict() if best is not None else None,
                        "best_state": best_state,
                        "callbacks": {
                            f"callback{i}": cb.state_dict() for i, cb in enumerate(cbs) if hasattr(cb, "state_dict")
                        },
                        "rng": _get_rng(train_src.generators()),
                        "stopped_because": stopped_because,
                        "train_seconds": train_seconds,
                        "train_examples": train_examples,
                    },
                )
            prog.end_round(r, row)
            if state.stop_reason is not None:
                break
    finally:
        prog.close()
    for cb in cbs:
        cb.on_train_end(state)

    best_net = net
    best_round = None
    if best is not None and best_state is not None:
        best_round = best.round
        best_net = copy.deepcopy(net)
        best_net.load_state_dict(best_state)
    if not part_order and objective.compiled:
        part_order = objective.part_names
    return Result(
        net=best_net,
        final_net=net,
        history=history,
        best_round=best_round,
        best_key=best.key if best is not None else None,
        stopped_because=stopped_because,
        examples_per_second=train_examples / train_seconds if train_seconds > 0 else math.nan,
        seconds=train_seconds,
        part_names=list(part_order),
    )


def _check_key(key: str, row: Mapping[str, float], history: History, what: str) -> None:
    if key not in row and key not in history:
        raise ValueError(f"{what}={key!r} is not a history key; keys are {sorted(row)}")


def _step(net: nn.Module, opt: torch.optim.Optimizer, scaler: Any, grad_clip: float | None, sched: Any) -> list[str]:
    """One optimizer step (clip, step, clear the gradients, scheduler). Without a GradScaler (which skips
    non-finite steps itself) the gradients are checked first: if any is NaN or inf, nothing is stepped, the
    gradients are cleared and the names of the parameters concerned are returned (``[]`` after a step)."""
    inner = unwrap(net)
    if scaler is not None:
        if grad_clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(inner.parameters(), grad_clip)
        scaler.step(opt)
        scaler.update()
    else:
        grads = [p.grad for p in inner.parameters() if p.grad is not None]
        if grads and not _all_finite(grads):
            bad = [n for n, p in inner.named_parameters() if p.grad is not None and not bool(p.grad.isfinite().all())]
            opt.zero_grad(set_to_none=True)
            return bad
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(inner.parameters(), grad_clip)
        opt.step()
    opt.zero_grad(set_to_none=True)
    if sched is not None:
        sched.step()
    return []


def _all_finite(grads: list[Tensor]) -> bool:
    """Whether every gradient is finite: the sum of each tensor (a NaN or inf makes it non-finite), stacked and
    read once per device and dtype; only a non-finite sum (which finite entries can also give, by overflow) is
    checked element by element."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g.sum())
    if all(math.isfinite(torch.stack(v).sum().item()) for v in groups.values()):
        return True
    return all(bool(g.isfinite().all()) for g in grads)


def _bad_gradient_message(names: list[str], r: int, b: int) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"round {r}, batch {b} (0-based): every loss is finite but the gradient of {shown} is not (NaN or inf); "
        "no optimizer step was taken, so the net keeps its last good weights. Look for a loss with an infinite "
        "slope (sqrt or log at 0, a division), lower the learning rate, or skip such steps with "
        "on_nonfinite='skip'"
    )


# ============================================================================================= checkpoints
def _get_rng(generators: Sequence[torch.Generator]) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "data": [g.get_state() for g in generators],
    }


def _set_rng(state: Mapping[str, Any], generators: Sequence[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    saved = state.get("data", [])
    if len(saved) != len(generators):
        raise ValueError(
            f"the checkpoint has {len(saved)} data generator states but this run shuffles with "
            f"{len(generators)}; "
            "resume with the same data form and arguments as the interrupted run"
        )
    for g, s in zip(generators, saved):
        g.set_state(s)


def _save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace`` (atomic)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The content of a checkpoint written by :func:`train` (a directory or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    return torch.load(p, map_location="cpu", weights_only=False)


__all__ = ["train", "evaluate", "load_checkpoint", "higher_is_better", "CHECKPOINT_NAME"]
