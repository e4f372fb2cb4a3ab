"""PyTorch Lightning integration: :class:`LossportCallback` (``pip install lossport[lightning]``).

::

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net()
            self.objective = lossport.Objective({"digit": "ce", "size": "mse"}, balance="famo")

        def training_step(self, batch, batch_idx):
            return self.objective(self.net, batch).total          # the balanced total is the loss

        def validation_step(self, batch, batch_idx):
            self.objective(self.net, batch)                       # parts logged as val/<part>

        def configure_optimizers(self):
            return torch.optim.Adam(self.net.parameters(), lr=1e-3)

    L.Trainer(max_epochs=3, callbacks=[LossportCallback()]).fit(Module(), train_loader, val_loader)

**What the callback does.** At the start of fitting it finds the :class:`~lossport.Objective` s the module holds
(attributes, and the items of attributes that are lists, tuples or dicts). It records what each objective
computes (the ``Losses`` of every call, with the net and the batch it was called with) by giving the objective
instance a subclass whose ``__call__`` also records: the instance, its attributes and ``isinstance`` checks are
unchanged, and the class is restored when fitting ends. With that record it

* logs ``train/<part>`` (unweighted), ``train/weight/<part>`` (the applied weight ``s_i b_i``), ``train/<extra>``
  (regularization and balancer terms) and ``train/balancer/<key>`` (the balancer's ``info`` diagnostics) every
  training batch, and ``val/<part>`` in validation (averaged by Lightning over the epoch, each batch counted by
  its number of labelled examples); with several objectives the path of the attribute comes after
  ``train/`` (``train/objectives.0/<part>``);
* runs the balancer's post-step update ``objective.step(net, batch)`` after every **optimizer step** (FAMO's
  second look at the batch, learned weights), with the last micro-batch under gradient accumulation: a real
  step is recognised by ``trainer.global_step`` having moved during the batch, so accumulation micro-batches do
  not update the balancer;
* calls ``balancer.end_round(means)`` at the end of each training epoch with the mean of every part over the
  epoch's labelled examples (DWA's loss history);
* gives a balancer that declares extra batches or a meta batch (SDMGrad and MoDo: ``batches=3``; Auto-Lambda,
  MOML: ``meta``) its :class:`~lossport.balance.Context` when the module calls ``self.objective(net, batch)``
  in training: the extra batches and the meta batch come from independent shuffles of the trainer's training
  dataloader's dataset (same batch size, collate function and ``drop_last``; ``meta_data=`` gives the meta
  batches their own data), one draw per training batch, moved to the device by the strategy as Lightning moves
  the main batch; ``Context.train`` evaluates the objective again on the main batch and ``Context.optimizer``
  is the module's optimizer. The streams are seeded ``seed + 1 + i`` (:mod:`lossport.training.draws`), so
  ``seed=`` equal to :func:`lossport.train`'s gives the same extra batches;
* saves every balancer's ``state_dict()`` and the streams' generator states in Lightning checkpoints (the
  callback's own state) and restores them on ``trainer.fit(..., ckpt_path=...)``, before the first resumed
  batch.

The net and the objective see exactly what they see in a hand-written loop (:mod:`lossport.objective`), so the
precision plugins (``"bf16-mixed"``), gradient accumulation and clipping of Lightning apply as usual; under its
DDP strategies the parts are those of the global batch on every rank (:mod:`lossport.distributed`), so the logged
values need no ``sync_dist``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .balance import Context
from .objective import Objective
from .result_types import Losses
from .training.data import make_source
from .training.draws import Draws, RoundDraws

__all__ = ["LossportCallback", "find_objectives"]


def find_objectives(module: nn.Module) -> dict[str, Objective]:
    """The objectives held by ``module``: its attributes that are an :class:`Objective`, and the items of its
    attributes that are lists, tuples or dicts (one level), by path (``"objective"``, ``"objs.0"``,
    ``"by_task.depth"``), in attribute order; an objective reachable by two paths is listed once."""
    found: dict[str, Objective] = {}
    seen: set[int] = set()

    def add(path: str, value: Any) -> None:
        if isinstance(value, Objective) and id(value) not in seen:
            seen.add(id(value))
            found[path] = value

    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        add(name, value)
        if isinstance(value, Mapping):
            for k, v in value.items():
                add(f"{name}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                add(f"{name}.{i}", v)
    return found


@dataclass
class _Call:
    net: nn.Module
    batch: Any
    losses: Losses


@dataclass
class _Record:
    """What one objective computed in the current batch, and the epoch's sums of its parts."""

    calls: list[_Call] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    more: tuple[list[Any], Any] | None = None
    """The current training batch's extra batches and meta batch (balancers that declare them)."""
    optimizer: torch.optim.Optimizer | None = None


_RECORDS: weakref.WeakKeyDictionary[Objective, _Record] = weakref.WeakKeyDictionary()
_SUBCLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` also appends its result to the objective's record."""
    if cls not in _SUBCLASSES:

        def __call__(self: Objective, net: nn.Module, batch: Any, **kwargs: Any) -> Losses:
            rec = _RECORDS.get(self)
            if rec is not None and rec.more is not None and kwargs.get("context") is None and net.training:
                kwargs["context"] = _context(self, net, batch, rec.more, rec.optimizer)
            losses = super(sub, self).__call__(net, batch, **kwargs)  # type: ignore[arg-type]
            if rec is not None:
                rec.calls.append(_Call(net, batch, losses))
            return losses

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def _float(x: Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


def _draws_batches(obj: Objective) -> bool:
    """Whether the objective's balancer takes extra batches or a meta batch."""
    return obj.balancer is not None and obj.balancer.needs_context


def _context(
    obj: Objective, net: nn.Module, batch: Any, more: tuple[list[Any], Any], opt: torch.optim.Optimizer | None
) -> Context:
    """The objective (unbalanced parts) on the extra batches, the meta batch and again on the main batch."""
    extra, meta = more
    return Context.of(lambda data: obj.evaluate(net, data), batch, extra, meta, opt)


class LossportCallback(pl.Callback):
    """Balancer updates, logging and checkpointing of the :class:`~lossport.Objective` s of a ``LightningModule``
    (see the module docstring).

    Args:
        log_balancer_info: also log the balancer's diagnostics (``train/balancer/<key>``: gradient norms and
            cosines of the Gramian balancers, learned log-variances, ...).
        prog_bar: show the parts in the progress bar.
        seed: seeds the extra and meta batch streams (stream ``i``: ``seed + 1 + i``, as :func:`lossport.train`
            with the same ``seed``); unused by balancers that draw nothing.
        meta_data: the meta batches of a bilevel balancer (Auto-Lambda, MOML), any data form of
            :func:`lossport.train`, batched like the training dataloader; by default another shuffle of the
            training data. An error with an objective whose balancer uses no meta batch.
    """

    def __init__(
        self, *, log_balancer_info: bool = True, prog_bar: bool = False, seed: int = 0, meta_data: Any = None
    ) -> None:
        super().__init__()
        self.log_balancer_info = log_balancer_info
        self.prog_bar = prog_bar
        self.seed = seed
        self.meta_data = meta_data
        self.objectives: dict[str, Objective] = {}
        self.draws: dict[str, RoundDraws] = {}
        self._swapped: dict[str, type] = {}
        self._pending: dict[str, Any] | None = None
        self._pending_draws: dict[str, Any] = {}
        self._step_at_start = 0

    # -- finding and recording the objectives ----------------------------------------------------------
    def _attach(self, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            return
        self.objectives = find_objectives(pl_module)
        if not self.objectives:
            raise ValueError(
                f"LossportCallback: {type(pl_module).__name__} holds no lossport.Objective; keep the objective as "
                "an attribute of the LightningModule (self.objective = lossport.Objective(...)), or in a list or "
                "dict attribute"
            )
        for path, obj in self.objectives.items():
            self._swapped[path] = type(obj)
            obj.__class__ = _recording_class(type(obj))
            _RECORDS[obj] = _Record()
        if self._pending is not None:
            self._load_balancers(self._pending)
            self._pending = None

    def _detach(self) -> None:
        for path, cls in self._swapped.items():
            obj = self.objectives[path]
            obj.__class__ = cls
            _RECORDS.pop(obj, None)
        self._swapped = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._attach(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    def _prefix(self, phase: str, path: str) -> str:
        return f"{phase}/" if len(self.objectives) == 1 else f"{phase}/{path}/"

    # -- extra and meta batches -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draws = {}
        wanting = {p: o for p, o in self.objectives.items() if _draws_batches(o)}
        if self.meta_data is not None and not any(o.balancer.meta for o in wanting.values()):  # type: ignore[union-attr]
            raise ValueError(
                "LossportCallback: meta_data= is given but no objective's balancer uses a meta batch; drop "
                "meta_data= or choose a bilevel method (e.g. balance='auto_lambda')"
            )
        if not wanting:
            return
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"LossportCallback: the balancers of {list(wanting)} draw extra (or meta) batches from other "
                f"shuffles of the training dataloader, and the trainer's training data is a "
                f"{type(loader).__name__}; give trainer.fit one DataLoader over a map-style Dataset"
            )
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"LossportCallback: the balancers of {list(wanting)} need the net's optimizer, and the module "
                f"configures {len(trainer.optimizers)}; configure_optimizers should return one"
            )
        size = loader.batch_size or 1
        for path, obj in wanting.items():
            meta = self.meta_data if obj.balancer.meta else None  # type: ignore[union-attr]
            rd = RoundDraws(Draws(obj.balancer, make_source(loader, size), meta, size, self.seed))
            if path in self._pending_draws:
                rd.load_state_dict(self._pending_draws.pop(path))
            self.draws[path] = rd
            _RECORDS[obj].optimizer = trainer.optimizers[0]

    def _draw(self, trainer: pl.Trainer, batch_idx: int) -> None:
        for path, rd in self.draws.items():
            if not rd.started:  # resumed within an epoch: Lightning does not start the epoch again
                rd.begin(trainer.current_epoch)
            rd.skip_to(batch_idx)  # a resumed epoch starts at the saved batch
            extra, meta = rd.next()
            move = trainer.strategy.batch_to_device
            _RECORDS[self.objectives[path]].more = ([move(x) for x in extra], None if meta is None else move(meta))

    # -- training --------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for obj in self.objectives.values():
            rec = _RECORDS[obj]
            rec.sums, rec.counts = {}, {}
        for rd in self.draws.values():
            rd.begin(trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_start = trainer.global_step
        for obj in self.objectives.values():
            _RECORDS[obj].calls = []
        self._draw(trainer, batch_idx)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = trainer.global_step != self._step_at_start  # False on accumulation micro-batches
        for path, obj in self.objectives.items():
            rec = _RECORDS[obj]
            calls = [c for c in rec.calls if c.losses.parts and c.losses.total.requires_grad]
            if not calls:
                continue
            last = calls[-1]
            self._log(pl_module, self._prefix("train", path), last.losses, obj, on_step=True)
            for k, v in last.losses.parts.items():
                n = max(int(last.losses.counts.get(k, 1)), 1)
                rec.sums[k] = rec.sums.get(k, 0.0) + _float(v) * n
                rec.counts[k] = rec.counts.get(k, 0) + n
            if stepped:
                obj.step(last.net, last.batch)
            rec.calls = []
        for path in self.draws:
            _RECORDS[self.objectives[path]].more = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for obj in self.objectives.values():
            rec = _RECORDS[obj]
            if obj.balancer is not None and rec.counts:
                obj.balancer.end_round({k: rec.sums[k] / rec.counts[k] for k in rec.sums if rec.counts[k] > 0})

    # -- validation ------------------------------------------------------------------------------------
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        for obj in self.objectives.values():
            _RECORDS[obj].calls = []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for path, obj in self.objectives.items():
            rec = _RECORDS[obj]
            if rec.calls:
                self._log(pl_module, self._prefix("val", path), rec.calls[-1].losses, None, on_step=False)
            rec.calls = []

    # -- logging ---------------------------------------------------------------------------------------
    def _log(
        self, pl_module: pl.LightningModule, prefix: str, losses: Losses, obj: Objective | None, *, on_step: bool
    ) -> None:
        """Parts weighted by their labelled examples in the epoch means; weights, extras, diagnostics."""
        kw: dict[str, Any] = {"on_step": on_step, "on_epoch": not on_step, "prog_bar": self.prog_bar}
        for k, v in losses.parts.items():
            pl_module.log(prefix + k, _float(v), batch_size=max(int(losses.counts.get(k, 1)), 1), **kw)
        if obj is None:
            return
        size = max([int(n) for n in losses.counts.values()] or [1])
        for k, w in losses.weights.items():
            pl_module.log(f"{prefix}weight/{k}", _float(w), batch_size=size, **{**kw, "prog_bar": False})
        for k, v in losses.extra.items():
            pl_module.log(prefix + k, _float(v), batch_size=size, **{**kw, "prog_bar": False})
        if self.log_balancer_info and obj.balancer is not None:
            for k, x in obj.balancer.info.items():
                if isinstance(x, (int, float)) and math.isfinite(float(x)):
                    pl_module.log(f"{prefix}balancer/{k}", float(x), batch_size=size, **{**kw, "prog_bar": False})

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"balancers": {path: balancer.state_dict()}, "draws": {path: streams' state}}`` for every objective
        with a balancer (``draws``: those that draw extra or meta batches, :class:`RoundDraws`)."""
        return {
            "balancers": {
                path: obj.balancer.state_dict() for path, obj in self.objectives.items() if obj.balancer is not None
            },
            "draws": {**self._pending_draws, **{path: rd.state_dict() for path, rd in self.draws.items()}},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the balancers (now, or when the objectives are found at the start of fitting); the streams
        of extra and meta batches when training starts."""
        self._pending_draws = dict(state_dict.get("draws", {}))
        balancers = dict(state_dict.get("balancers", {}))
        if self.objectives:
            self._load_balancers(balancers)
        else:
            self._pending = balancers

    def _load_balancers(self, balancers: Mapping[str, Any]) -> None:
        unknown = [p for p in balancers if p not in self.objectives or self.objectives[p].balancer is None]
        if unknown:
            raise ValueError(
                f"LossportCallback: the checkpoint holds balancer states for {unknown}, but the module's objectives "
                f"with a balancer are {[p for p, o in self.objectives.items() if o.balancer is not None]}; resume "
                "with the same objectives (attribute names and balancers) as the run that saved it"
            )
        for path, state in balancers.items():
            bal = self.objectives[path].balancer
            assert bal is not None
            bal.load_state_dict(state)
