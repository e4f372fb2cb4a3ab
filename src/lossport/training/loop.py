"""`train`: one call from a multi-output net and its data to a trained net and a per-part history.

::

    result = lossport.train(net, data, {"digit": "ce", "size": "mse"}, balance="dwa", epochs=20,
                            validation=0.1)
    result.net                    # the net of the best validation round (Wolfram "TrainedNet")
    result.history["val_digit"]   # per round, unweighted
    result.plot("loss.png")

The pieces: :mod:`~lossport.training.data` (every data form, one dispatcher), :mod:`~lossport.training.setup`
(device, precision, optimizer, scheduler), :mod:`~lossport.training.step` (one step and the skip path),
:mod:`~lossport.training.state` (the run's state and its checkpoints), :mod:`~lossport.training.evaluate`
(validation). This module holds the rounds: validation, best net, early stopping, callbacks, loggers.

**Checkpoints** (``checkpoint=DIR``): written at the end of every round (:mod:`~lossport.training.state`).
``resume=True`` loads it and continues with the next round: a run killed in the middle of round ``k`` restarts
round ``k`` from its beginning and, on CPU with a ``seed``, ends with the same weights bit for bit as a run never
interrupted. ``resume=True`` without a checkpoint file starts afresh (so the same command can be rerun after a
crash); ``checkpoint=DIR`` holding a checkpoint without ``resume=True`` is an error rather than an overwrite; a
checkpoint of another balancer, net or data form is a :class:`~lossport.CheckpointError`.

**Precision.** ``"32"`` (default); ``"bf16"``: forward and losses under bfloat16 autocast, no scaler;
``"16-mixed"``: float16 autocast with a ``GradScaler``, on CPU or CUDA. Balancers see unscaled parts.

**Best net.** With validation, ``Result.net`` is the net of the round with the best ``best_on`` value (default
``val_loss``: the validation parts summed with the spec's *static* weights; a balancer's weights are not applied
to validation); rounds where it is NaN or inf are passed over, and ``Result.best_reason`` says which round won
and why.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed, fsdp
from ..aliases import BalanceSpec, DataLike, LossSpec
from ..callbacks import Callback, CSVLogger, TrainState, as_callback, loggers
from ..history import History, Result
from ..metrics import MetricSet, higher_is_better, metric_set
from ..objective import Objective
from .data import Source, batch_size_of, make_source, to_device
from .draws import Draws
from .evaluate import as_objective, evaluate_source, floats
from .progress import Progress, RoundStats
from .setup import (
    grad_scaler,
    has_batchnorm,
    make_optimizer,
    make_scheduler,
    resolve_device,
    resolve_precision,
)
from .state import CheckpointDir, TrainingState
from .step import StepOutcome, Stepper
from .tracking import Tracker


@dataclass(frozen=True)
class TrainOptions:
    """The options of :func:`train` (see its docstring), checked once."""

    loss: Any
    weights: Any
    balance: Any
    targets: Any
    epochs: int
    batch_size: int
    optimizer: Any
    lr: float
    weight_decay: float
    scheduler: Any
    scheduler_every: str
    grad_clip: float | None
    accumulate: int
    precision: str
    validation: Any
    metrics: Any
    stop_on: str | None
    patience: int | None
    min_delta: float
    mode: str
    best_on: str | None
    on_nonfinite: str
    shuffle: bool
    progress: Any
    log: Any
    checkpoint: Any
    resume: bool
    seed: int | None
    device: Any
    callbacks: Iterable[Any]
    record_batches: bool
    monitor: bool | int
    meta_data: Any = None
    distributed: str = "auto"
    fsdp_policy: Any = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accumulate"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, not {v!r}")
        choices = {"on_nonfinite": ("raise", "skip"), "scheduler_every": ("round", "batch")}
        for name, allowed in {**choices, "mode": ("auto", "min", "max")}.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be a positive number, not {self.grad_clip!r}")
        if self.resume and self.checkpoint is None:
            raise ValueError("resume=True needs checkpoint=DIR (the directory the interrupted run wrote to)")
        m = self.monitor
        if not (isinstance(m, bool) or (type(m) is int and m >= 1)):
            raise ValueError(f"monitor must be True, False or a positive integer, not {m!r}")
        if self.distributed not in ("auto", "ddp", "fsdp"):
            raise ValueError(f"distributed must be 'auto', 'ddp' or 'fsdp', not {self.distributed!r}")
        if self.fsdp_policy is not None and (self.distributed != "fsdp" or not callable(self.fsdp_policy)):
            raise ValueError("fsdp_policy= is a function module -> bool, used with distributed='fsdp'")
        if isinstance(self.validation, (int, bool)) and not isinstance(self.validation, float):
            raise ValueError(f"validation={self.validation!r}: give validation data or a float fraction like 0.1")


def train(
    net: nn.Module,
    data: DataLike,
    loss: LossSpec | Objective = "auto",
    *,
    weights: Any = None,
    balance: BalanceSpec = None,
    targets: Any = None,
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
    meta_data: Any = None,
    distributed: str = "auto",
    fsdp_policy: Any = None,
) -> Result:
    """Train ``net`` on ``data`` with a loss per output; return a :class:`~lossport.history.Result`.

    Args:
        net: the net; trained in place (``Result.final_net`` is this object).
        data: training data (:mod:`lossport.training.data` lists the forms).
        loss, weights, balance, targets: the loss spec, static weights, balancer and where each output's target
            is in a batch (:class:`~lossport.Objective`); ``loss`` may also be an ``Objective``.
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
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"`` (module docstring).
        validation: validation data (any data form) or a fraction ``0 < f < 1`` of the training data (the last
            examples). Evaluated after every round (:func:`~lossport.evaluate`) into ``val_*`` keys.
        metrics: ``{output: ["accuracy", "f1", "mae", "rmse", callable, ...]}`` (:mod:`lossport.metrics`).
        stop_on, patience, min_delta, mode: early stopping when ``stop_on`` (any history key, default
            ``val_loss`` with validation else ``loss``) has not improved by more than ``min_delta`` for
            ``patience`` rounds (default 5); given either of ``stop_on``/``patience`` turns it on.
            ``mode="auto"`` minimises losses and maximises accuracy-like metrics; ``"min"``/``"max"`` force it.
        best_on: the key selecting ``Result.net``; default ``stop_on`` when it is a ``val_`` key, else
            ``val_loss`` (only with validation).
        on_nonfinite: ``"raise"`` (:class:`~lossport.NonFiniteLossError`) or ``"skip"`` the batch
            (:mod:`lossport.training.step`); a parameter made non-finite by the optimizer step raises in both.
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
        meta_data: the meta batches of a bilevel balancer (``balance="auto_lambda"``), any data form; by default
            another shuffle of the training data, as the Auto-Lambda authors' code does. Balancers that use
            extra independent batches per step (SDMGrad, MoDo) get them from other shuffles of the training data
            (:mod:`lossport.training.draws`); an error if given to a balancer without a meta batch.
        distributed: under ``torchrun`` only (docs/distributed.md). ``"auto"``: DistributedDataParallel, or the
            net as it is when the user already wrapped it with FSDP2's ``fully_shard``; ``"ddp"``:
            DistributedDataParallel; ``"fsdp"``: shard the net with ``fully_shard`` (:mod:`lossport.fsdp`).
        fsdp_policy: with ``"fsdp"``, a function ``module -> bool`` choosing the submodules that get their own
            ``fully_shard`` (the root is always wrapped); default: each direct child that holds parameters.
    """
    options = TrainOptions(**{k: v for k, v in locals().items() if k not in ("net", "data")})
    return _Run(net, data, options).fit()


class _Run:
    """One call of :func:`train`: built from the options, then :meth:`fit`."""

    def __init__(self, net: nn.Module, data: Any, o: TrainOptions) -> None:
        self.o = o
        self.objective = as_objective(o.loss, o.weights, o.balance, o.targets)
        self.balancer = self.objective.balancer
        monitor = None
        if o.monitor is not False:
            from ..inspection import Monitor

            monitor = Monitor(every=10 if o.monitor is True else int(o.monitor))
        self.dev = resolve_device(o.device, net)
        self.prec = resolve_precision(o.precision, self.dev)
        net.to(self.dev)
        self.net, self.model = net, net
        progress, log = o.progress, o.log
        self.sharded = False
        if distributed.setup(self.dev):
            self.model, self.sharded = _wrap(net, self.dev, o)
            if self.sharded:
                fsdp.check_balancer(self.balancer, monitor=monitor is not None)
                if self.prec == "16-mixed":
                    raise ValueError(
                        "precision='16-mixed' (a GradScaler) is not supported with distributed='fsdp': its skipped "
                        "steps are not verified to agree across the shards; use precision='bf16' (no scaler) or '32'"
                    )
            if distributed.rank() != 0:  # one voice: progress, logs and checkpoints from rank 0 only
                progress, log = False, None
        elif o.distributed != "auto":
            raise ValueError(
                f"distributed={o.distributed!r} needs a torchrun launch with more than one process (WORLD_SIZE > 1); "
                "run e.g. torchrun --nproc_per_node=2 script.py, or leave distributed='auto'"
            )
        if o.seed is not None:
            torch.manual_seed(o.seed)
        gen = torch.Generator()
        gen.manual_seed(o.seed if o.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self.train_src, self.val_src = self._sources(data, gen)
        self.draws = Draws(self.balancer, self.train_src, o.meta_data, o.batch_size, gen.initial_seed())
        opt = make_optimizer(o.optimizer, net, o.lr, o.weight_decay, self.balancer)
        if self.sharded:
            fsdp.check_optimizer(net, opt)
        self.sched = make_scheduler(o.scheduler, opt)
        self.cbs: list[Callback] = [as_callback(c) for c in o.callbacks] + loggers(log)
        self.ckpt: CheckpointDir | None = None
        if o.checkpoint is not None:
            self.ckpt = CheckpointDir(o.checkpoint)
            self.cbs.append(CSVLogger(self.ckpt.dir / "history.csv"))
        stopper, best = self._trackers()
        self.state = TrainingState(
            net=net, optimizer=opt, scheduler=self.sched, scaler=grad_scaler(self.prec, self.dev),
            balancer=self.balancer, monitor=monitor, history=History(), stopper=stopper, best=best,
            callbacks=self.cbs, generators=self.train_src.generators() + self.draws.generators(),
        )  # fmt: skip
        self.stepper = Stepper(
            model=self.model, objective=self.objective, optimizer=opt, scaler=self.state.scaler,
            grad_clip=o.grad_clip, accumulate=o.accumulate, on_nonfinite=o.on_nonfinite, precision=self.prec,
            device=self.dev, batch_scheduler=self.sched if o.scheduler_every == "batch" else None, monitor=monitor,
        )  # fmt: skip
        self.view = TrainState(net=net, optimizer=opt, objective=self.objective, history=self.state.history,
                               epochs=o.epochs)  # fmt: skip
        self.progress = Progress(progress, o.epochs)
        self.mset: MetricSet | None = None
        self.val_mset: MetricSet | None = None
        self.part_order: list[str] = []

    # -- set-up -------------------------------------------------------------------------------------------------
    def _sources(self, data: Any, gen: torch.Generator) -> tuple[Source, Source | None]:
        o = self.o
        train_src = make_source(data, o.batch_size, o.shuffle, gen, "data", shard=True)
        val_src: Source | None = None
        if isinstance(o.validation, float):
            tr, va = train_src.split(o.validation)
            train_src = make_source(tr, o.batch_size, o.shuffle, gen, "data", shard=True)
            val_src = make_source(va, o.batch_size, False, None, "validation")
        elif o.validation is not None:
            val_src = make_source(o.validation, o.batch_size, False, None, "validation")
        memory = train_src.memory
        one_left = memory is not None and train_src.world == 1 and memory.last_batch_size(o.batch_size) == 1
        if one_left and has_batchnorm(self.net):
            assert memory is not None
            raise ValueError(
                f"the last batch of every round would hold 1 example ({len(memory)} examples, batch_size="
                f"{o.batch_size}) and the net has BatchNorm layers, which cannot train on one example: choose "
                f"a batch_size that does not leave one example over (e.g. {o.batch_size + 1}), or drop it "
                "from the data"
            )
        return train_src, val_src

    def _trackers(self) -> tuple[Tracker | None, Tracker | None]:
        o = self.o
        stopper = None
        if o.stop_on is not None or o.patience is not None:
            key = o.stop_on or ("val_loss" if self.val_src is not None else "loss")
            if key.startswith("val_") and self.val_src is None:
                raise ValueError(f"stop_on={key!r} needs validation data (validation=...)")
            stopper = Tracker(key, o.min_delta, 5 if o.patience is None else int(o.patience))
        best = None
        if self.val_src is not None:
            best = Tracker(o.best_on or (o.stop_on if o.stop_on and o.stop_on.startswith("val_") else "val_loss"))
        elif o.best_on is not None:
            raise ValueError(f"best_on={o.best_on!r} needs validation data (validation=...)")
        return stopper, best

    def _maximise(self, key: str) -> bool:
        stopper = self.state.stopper
        if self.o.mode != "auto" and stopper is not None and key == stopper.key:
            return self.o.mode == "max"
        return higher_is_better(key, self.val_mset or self.mset)

    # -- the run --------------------------------------------------------------------------------------------
    def fit(self) -> Result:
        st, o = self.state, self.o
        if self.ckpt is not None and distributed.rank() == 0:
            self.ckpt.acquire()
        try:
            if self.ckpt is not None:
                self._resume_or_refuse()
            for cb in self.cbs:
                cb.on_train_begin(self.view)
            try:
                for r in range(st.round + 1, o.epochs + 1):
                    if self._round(r):
                        break
            finally:
                self.progress.close()
        finally:
            if self.ckpt is not None:
                self.ckpt.release()
        for cb in self.cbs:
            cb.on_train_end(self.view)
        return self._result()

    def _resume_or_refuse(self) -> None:
        from ..errors import CheckpointError
        from .state import load_checkpoint

        assert self.ckpt is not None
        st, path = self.state, self.ckpt.path
        if not path.exists():
            return
        if not self.o.resume:
            raise FileExistsError(
                f"{path} holds a checkpoint of an earlier run; pass resume=True to continue it, or choose another "
                "checkpoint directory (or delete it)"
            )
        ck = load_checkpoint(path)
        name = ck.get("sharded")
        if self.sharded != (name is not None):
            raise CheckpointError(
                f"{path} was written by a run {'with' if name else 'without'} FSDP sharding, and this run is "
                f"{'' if self.sharded else 'not '}sharded: resume with the same distributed= and launch"
            )
        if name is not None:
            fsdp.load_sharded(self.ckpt.dir / name, st.net, st.optimizer)
        st.load_state_dict(ck, where=str(path), net_loaded=name is not None)
        if st.stopped_because != "completed":
            st.round = max(st.round, self.o.epochs)

    def _round(self, r: int) -> bool:
        """Round ``r``; True when training stops after it."""
        st, view = self.state, self.view
        view.round, view.batch = r, -1
        for cb in self.cbs:
            cb.on_round_begin(view)
        t_round = time.perf_counter()
        self.net.train()
        stats = RoundStats()
        lr_now = float(st.optimizer.param_groups[0]["lr"])
        if self.mset is not None:
            self.mset.reset()
        try:
            total_batches: int | None = len(self.train_src)
        except TypeError:
            total_batches = None
        self.progress.begin_round(r, total_batches)
        st.optimizer.zero_grad(set_to_none=True)
        draws = self.draws.round() if self.draws.active else None
        for b, raw_batch in enumerate(self.train_src):
            batch = to_device(raw_batch, self.dev) if self.dev.type != "cpu" else raw_batch
            more = None if draws is None else to_device(next(draws), self.dev)  # extra batches, meta batch
            out = self.stepper.run(batch, r, b, more)
            if not self.part_order and self.objective.compiled:
                self.part_order = self.objective.part_names
            if out.kind == "empty":
                continue
            if out.kind == "skipped":
                stats.skipped += 1
                self.progress.batch(None, self.part_order)
                continue
            self._record_batch(out, batch, stats, r, b)
            if view.stop_reason is not None:
                break
        end = self.stepper.finish(r, view.batch)
        if end is not None and end.kind == "skipped":
            stats.skipped += 1
        self.stepper.check_parameters(r)
        seconds = time.perf_counter() - t_round
        st.train_seconds += seconds
        st.train_examples += stats.examples
        if stats.examples == 0 and stats.skipped == 0 and st.round == 0 and r == 1:
            raise ValueError(
                "the first round met no batch with a labelled example of any part: the data is empty or every "
                "target is missing (NaN / -100); check the data and its target keys"
            )
        row = self._row(r, stats, lr_now, t_round)
        return self._end_round(r, row)

    def _record_batch(self, out: StepOutcome, batch: Any, stats: RoundStats, r: int, b: int) -> None:
        assert out.raw is not None and out.losses is not None
        if self.balancer is None:  # static weights: recorded once per round
            other = out.extra_vals
        else:
            other = {f"weight/{k}": float(w) for k, w in floats(out.losses.weights).items()}
            other.update(floats(out.losses.extra))
            other.update({f"balancer/{k}": float(v) for k, v in self.balancer.info.items()})
        stats.add(out.raw_vals, out.raw.counts, out.total, batch_size_of(batch), other)
        if self.o.metrics is not None:
            if self.mset is None:
                self.mset = metric_set(self.o.metrics, self.objective.output_names)
            if self.mset is not None:
                self.mset.update(out.raw.outputs or {}, self.objective.targets(batch))
        if self.o.record_batches:
            self.state.history.batches.append({"round": float(r), "batch": float(b), "loss": out.total, **out.raw_vals})
        self.view.batch = b
        if self.cbs:
            self.view.logs = {"loss": out.total, **out.raw_vals}
            for cb in self.cbs:
                cb.on_batch_end(self.view)
        self.progress.batch(stats, self.part_order)

    def _row(self, r: int, stats: RoundStats, lr_now: float, t_round: float) -> dict[str, float]:
        st = self.state
        row: dict[str, float] = {"round": float(r)}
        row.update(stats.row(self.part_order, None if self.balancer is not None else self.objective.static_weights))
        if self.balancer is not None:
            self.balancer.end_round(stats.part_means())
        if st.monitor is not None:
            row.update({f"monitor/{k}": v for k, v in st.monitor.end_round().items()})
        if self.mset is not None:
            row.update(self.mset.compute())
        if self.o.on_nonfinite == "skip":
            row["skipped"] = float(stats.skipped)
        if self.val_src is not None:
            if self.o.metrics is not None and self.val_mset is None and self.objective.compiled:
                self.val_mset = metric_set(self.o.metrics, self.objective.output_names)
            vals, _ = evaluate_source(self.net, self.val_src, self.objective, self.dev, self.prec, mset=self.val_mset)
            row.update({f"val_{k}": v for k, v in vals.items()})
        row["lr"] = lr_now
        row["seconds"] = time.perf_counter() - t_round
        if stats.examples == 0 and stats.skipped:
            row["loss"] = math.nan
        st.history.rounds.append(row)
        return row

    def _end_round(self, r: int, row: dict[str, float]) -> bool:
        st, view = self.state, self.view
        if self.sched is not None and self.o.scheduler_every == "round":
            if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.sched.step(row.get("val_loss", row["loss"]))
            else:
                self.sched.step()
        for tracker in (st.best, st.stopper):
            if tracker is not None:
                _check_key(tracker.key, row, st.history, "best_on" if tracker is st.best else "stop_on")
                tracker.maximise = self._maximise(tracker.key)
        if st.best is not None and st.best.update(row.get(st.best.key, math.nan), r) and not self.sharded:
            st.keep_best()  # under FSDP no copy of the sharded weights is kept: Result.net is the final net
        stopper = st.stopper
        if stopper is not None:
            stopper.update(row.get(stopper.key, math.nan), r)
            if stopper.wait >= stopper.patience and view.stop_reason is None:
                view.stop(
                    f"early stopping: {stopper.key} did not improve for {stopper.wait} rounds ({stopper.describe()})"
                )
        view.logs = dict(row)
        for cb in self.cbs:
            cb.on_round_end(view)
        if view.stop_reason is not None:
            st.stopped_because = view.stop_reason
        st.round = r
        if self.ckpt is not None:
            self._save_checkpoint()
        self.progress.end_round(r, row)
        return view.stop_reason is not None

    def _save_checkpoint(self) -> None:
        """Rank 0 writes ``checkpoint.pt``; under FSDP every rank first writes its shards of the net and optimizer
        (:func:`lossport.fsdp.save_sharded`), which ``checkpoint.pt`` names. Under torchrun every rank returns once
        the checkpoint is complete (a barrier), so that no rank reads a half-replaced pair (e.g. a next run's resume
        in the same process group)."""
        st, ckpt = self.state, self.ckpt
        assert ckpt is not None
        if not self.sharded:
            if distributed.rank() == 0:
                ckpt.save(st.state_dict())
        else:
            name = fsdp.save_sharded(ckpt.dir, st.round, st.net, st.optimizer)
            if distributed.rank() == 0:
                ckpt.save({**st.state_dict(), "net": None, "optimizer": None, "sharded": name})
                fsdp.remove_older(ckpt.dir, keep=name)
        if distributed.is_distributed():
            torch.distributed.barrier()

    def _result(self) -> Result:
        st = self.state
        best_net, best_round, reason = self.net, None, None
        if st.best is not None:
            reason = st.best.describe()
            if st.best.key == "val_loss" and self.balancer is not None:
                reason += " (val_loss sums the validation parts with the static weights, not the balancer's)"
            if st.best_state is not None:
                best_round = st.best.round
                best_net = copy.deepcopy(self.net)
                best_net.load_state_dict(st.best_state)
            else:
                reason += "; Result.net is the final net"
                if self.sharded:
                    reason += " (under FSDP the best round's weights are not kept)"
        if not self.part_order and self.objective.compiled:
            self.part_order = self.objective.part_names
        return Result(
            net=best_net,
            final_net=self.net,
            history=st.history,
            best_round=best_round,
            best_key=st.best.key if st.best is not None else None,
            best_reason=reason,
            stopped_because=st.stopped_because,
            examples_per_second=st.train_examples / st.train_seconds if st.train_seconds > 0 else math.nan,
            seconds=st.train_seconds,
            part_names=list(self.part_order),
            balanced=self.balancer is not None,
        )


def _wrap(net: nn.Module, dev: torch.device, o: TrainOptions) -> tuple[nn.Module, bool]:
    """The model a distributed run steps (DDP, or the net sharded with FSDP2) and whether it is sharded."""
    sharded = fsdp.is_sharded(net)
    if o.distributed == "fsdp" or (o.distributed == "auto" and sharded):
        return fsdp.shard(net, o.fsdp_policy), True
    if sharded:
        raise ValueError(
            "distributed='ddp' but the net is wrapped with fully_shard (FSDP2): use distributed='fsdp' or 'auto'"
        )
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None), False


def _check_key(key: str, row: Mapping[str, float], history: History, what: str) -> None:
    if key not in row and key not in history:
        raise ValueError(f"{what}={key!r} is not a history key; keys are {sorted(row)}")


__all__ = ["TrainOptions", "train"]
