"""Hugging Face integration: :class:`LossportTrainer`, a ``transformers.Trainer`` trained on a lossport objective
(``pip install lossport[hf]``).

::

    objective = lossport.Objective({"topic": "ce", "score": "mse"}, balance="famo")
    trainer = LossportTrainer(model=model, args=TrainingArguments(...), train_dataset=ds, objective=objective)
    trainer.train()
    trainer.state.log_history     # [{'loss': ..., 'topic': ..., 'score': ..., 'weight/topic': ..., ...}, ...]
    trainer.evaluate()            # {'eval_loss': ..., 'eval_topic': ..., 'eval_score': ..., ...}

**The loss.** ``compute_loss`` is ``objective(model, inputs).total``: the batch dict is read as in a hand-written
loop (:mod:`lossport.objective`): keys that are parameters of ``model.forward`` are inputs (every key but the
objective's targets when ``forward`` takes ``**kwargs``, as the Hugging Face models do), the target of output
``y`` is key ``y``. A model that computes its own loss (``labels`` in the batch) is trained with
``Objective("loss")`` (the ``loss`` output is the part), a multi-head model with one part per head. The Trainer
divides the total by ``gradient_accumulation_steps`` (the parts are per-batch means); the balancer weighs every
micro-batch, and its post-step update (``objective.step``: FAMO, learned weights) runs after every optimizer
step with the last micro-batch of the step, as in :func:`lossport.train`.

**Columns.** The targets are read by the objective, not by ``model.forward``, so the Trainer's removal of the
columns ``forward`` does not name (``remove_unused_columns``) is not applied: every column reaches the objective.

**Logs.** At every logging step the mean of every part over the logging window (each micro-batch counted by its
labelled examples) and the mean applied weight ``weight/<part>`` go into the same ``log_history`` row as
``loss``; balancer diagnostics go in as ``balancer/<key>``. ``evaluate()`` adds ``eval_<part>`` (the mean over
the evaluation set's labelled examples; ``eval_loss`` is the Trainer's mean of the per-batch totals with the
spec's static weights; the balancer is not run in evaluation, as in :func:`lossport.evaluate`).

**Extra and meta batches.** A balancer that declares extra training batches (SDMGrad, MoDo: ``batches=3``) or a
meta batch (Auto-Lambda, MOML: ``meta``) gets its :class:`~lossport.balance.Context` in ``compute_loss``: the
extra batches and the meta batch come from independent shuffles of ``train_dataset``, batched like the main
batch (``per_device_train_batch_size``, the Trainer's ``data_collator``, ``dataloader_drop_last``;
``meta_data=`` gives the meta batches their own data), one draw per micro-batch, moved to the device by
``_prepare_inputs`` as the main batch; ``Context.train`` evaluates the objective again on the main batch and
``Context.optimizer`` is the Trainer's optimizer. The streams are seeded ``args.seed + 1 + i``
(:mod:`lossport.training.draws`), as :func:`lossport.train` with ``seed=args.seed`` seeds them.

**Checkpoints.** Every checkpoint folder gets ``lossport_balancer.pt`` (the balancer's ``state_dict()``) and,
when the balancer draws extra or meta batches, ``lossport_draws.pt`` (the streams' generator states); and
``train(resume_from_checkpoint=...)`` restores them before the first resumed step (a run resumed within an
epoch draws the batches the saved run would have drawn next).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .balance import Context
from .objective import Objective
from .result_types import Losses
from .training.data import make_source
from .training.draws import Draws, RoundDraws

__all__ = ["BALANCER_FILE", "DRAWS_FILE", "LossportTrainer"]

BALANCER_FILE = "lossport_balancer.pt"
DRAWS_FILE = "lossport_draws.pt"
_TRAINER_KEYS = ("loss", "learning_rate", "epoch", "grad_norm", "step")


def _float(x: Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


class _Window:
    """Sums of the parts (by labelled examples), of the applied weights and of the diagnostics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.weights: dict[str, float] = {}
        self.info: dict[str, float] = {}
        self.calls = 0

    def add(self, losses: Losses, info: Mapping[str, float] | None = None) -> None:
        self.calls += 1
        for k, v in losses.parts.items():
            n = max(int(losses.counts.get(k, 1)), 1)
            self.sums[k] = self.sums.get(k, 0.0) + _float(v) * n
            self.counts[k] = self.counts.get(k, 0) + n
        for k, w in losses.weights.items():
            self.weights[k] = self.weights.get(k, 0.0) + _float(w)
        for k, x in (info or {}).items():
            self.info[k] = self.info.get(k, 0.0) + float(x)

    def means(self, prefix: str = "") -> dict[str, float]:
        out = {prefix + k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}
        if self.calls:
            out.update({f"{prefix}weight/{k}": w / self.calls for k, w in self.weights.items()})
            out.update({f"{prefix}balancer/{k}": x / self.calls for k, x in self.info.items() if math.isfinite(x)})
        return out


class _PostStep(TrainerCallback):
    """Runs the balancer's post-step update after each optimizer step and writes its state into checkpoints."""

    def __init__(self, trainer: LossportTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t = self.trainer
        if t._last is not None:
            net, batch = t._last
            t.objective.step(net, batch)
            t._last = None

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer._draws is not None:  # state.epoch: the epochs done (a fraction when resumed within one)
            self.trainer._draws.begin(math.floor(state.epoch or 0.0))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        bal = self.trainer.objective.balancer
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if bal is not None and state.is_world_process_zero and os.path.isdir(folder):
            torch.save(bal.state_dict(), os.path.join(folder, BALANCER_FILE))
            if self.trainer._draws is not None:
                torch.save(self.trainer._draws.state_dict(), os.path.join(folder, DRAWS_FILE))


class LossportTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is a lossport :class:`~lossport.Objective` (see the module docstring).

    Args:
        objective: the objective (loss spec, static weights, balancer); required.
        meta_data: the meta batches of a bilevel balancer (Auto-Lambda, MOML), any data form of
            :func:`lossport.train` (a Dataset is collated by ``torch``'s ``default_collate``, not the Trainer's
            ``data_collator``); by default another shuffle of ``train_dataset``. An error with a balancer that
            uses no meta batch.
        *args, **kwargs: as for ``transformers.Trainer`` (``compute_loss_func`` is not accepted: the objective is
            the loss).
    """

    objective: Objective

    def __init__(self, *args: Any, objective: Objective, meta_data: Any = None, **kwargs: Any) -> None:
        if not isinstance(objective, Objective):
            raise TypeError(
                f"LossportTrainer: objective= must be a lossport.Objective, not {type(objective).__name__}; "
                "build it with lossport.Objective(spec, weights=..., balance=...)"
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("LossportTrainer: compute_loss_func= conflicts with objective=; the objective is the loss")
        super().__init__(*args, **kwargs)
        self.objective = objective
        # the total is a per-batch mean: the Trainer divides it by the accumulation steps itself
        self.model_accepts_loss_kwargs = False
        self._window = _Window()
        self._eval = _Window()
        self._last: tuple[nn.Module, Any] | None = None
        self.meta_data = meta_data
        self._draws: RoundDraws | None = None
        bal = objective.balancer
        if meta_data is not None and (bal is None or not bal.meta):
            raise ValueError(
                f"LossportTrainer: meta_data= is given but the balancer ({type(bal).__name__ if bal else 'none'}) "
                "uses no meta batch; drop meta_data= or choose a bilevel method (e.g. balance='auto_lambda')"
            )
        self.add_callback(_PostStep(self))

    # -- extra and meta batches --------------------------------------------------------------------------
    def _make_draws(self) -> RoundDraws | None:
        """The streams of extra and meta batches (:mod:`lossport.training.draws`), or ``None``."""
        bal = self.objective.balancer
        if bal is None or not bal.needs_context:
            return None
        ds = self.train_dataset
        if ds is None or isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
            raise ValueError(
                f"LossportTrainer: {type(bal).__name__} draws extra (or meta) batches from other shuffles of "
                f"train_dataset, and it is {type(ds).__name__}; give a map-style dataset (indexable, with a length)"
            )
        size = self._train_batch_size
        loader = DataLoader(
            ds, batch_size=size, collate_fn=self.data_collator, drop_last=self.args.dataloader_drop_last
        )
        return RoundDraws(Draws(bal, make_source(loader, size), self.meta_data, size, self.args.seed))

    def _context(self, model: nn.Module, inputs: dict[str, Any]) -> Context:
        """The balancer's Context for the micro-batch ``inputs`` (one draw from every stream)."""
        assert self._draws is not None
        extra, meta = self._draws.next()
        prepare = self._prepare_inputs
        return Context.of(
            lambda data: self.objective.evaluate(model, data),
            inputs,
            [prepare(x) for x in extra],
            None if meta is None else prepare(meta),
            self.optimizer,
        )

    # -- the loss ----------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """``objective(model, inputs).total`` (balanced); in training the parts and weights go to the log window
        and the batch is kept for the balancer's post-step update."""
        training = model.training and torch.is_grad_enabled()
        context = self._context(model, inputs) if training and self._draws is not None else None
        losses = self.objective(model, inputs, context=context)
        if training:
            clash = [k for k in losses.parts if k in _TRAINER_KEYS and len(losses.parts) > 1]
            if clash:
                raise ValueError(
                    f"LossportTrainer: part {clash[0]!r} would overwrite the Trainer's own log key; rename the "
                    "output (or the key the loss returns)"
                )
            bal = self.objective.balancer
            self._window.add(losses, bal.info if bal is not None else None)
            self._last = (model, inputs)
        return (losses.total, losses.outputs) if return_outputs else losses.total

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the window's part means and weights to every training log row (the rows with ``loss``)."""
        if "loss" in logs and self._window.calls:
            logs = {**logs, **{k: v for k, v in self._window.means().items() if k not in logs}}
            self._window = _Window()
        super().log(logs, *args, **kwargs)

    # -- evaluation --------------------------------------------------------------------------------------
    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Any, Any]:
        """The unbalanced parts with the spec's static weights (no balancer, as :func:`lossport.evaluate`)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs, logits = self.objective.forward(model, inputs)
            losses = self.objective.losses(outputs, inputs, net=model, logits=logits)
        self._eval.add(losses)
        loss = losses.total.detach().float()
        if prediction_loss_only:
            return loss, None, None
        names = [k for k in self.objective.output_names if k in outputs and k not in (ignore_keys or [])]
        preds = tuple(outputs[k] for k in names)
        labels = tuple(inputs[k] for k in names if isinstance(inputs.get(k), Tensor))
        return (
            loss,
            preds[0] if len(preds) == 1 else preds,
            (labels[0] if len(labels) == 1 else labels) if labels else None,
        )

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's loop, with ``<prefix>_<part>`` added to its metrics."""
        self._eval = _Window()
        out = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        sums, counts = self._eval.sums, self._eval.counts
        names = list(sums)
        if names and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([sums[k] for k in names] + [float(counts[k]) for k in names], dtype=torch.float64)
            t = t.to(self.args.device)
            torch.distributed.all_reduce(t)
            vals = t.cpu().tolist()
            sums = dict(zip(names, vals[: len(names)]))
            counts = {k: int(c) for k, c in zip(names, vals[len(names) :])}
        metrics = out.metrics if out.metrics is not None else {}
        for k in names:
            if counts[k] > 0:
                metrics[f"{prefix}_{k}"] = sums[k] / counts[k]
        self._eval = _Window()
        return out

    # -- columns -----------------------------------------------------------------------------------------
    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        return dataset  # the objective reads targets the model's forward does not name

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        return data_collator

    # -- checkpoints -------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; when resuming, the balancer's state (and its streams') is restored from the
        checkpoint first."""
        self._draws = self._make_draws()
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
            if path is None:
                raise ValueError(f"no checkpoint found in output_dir {self.args.output_dir!r} to resume from")
        if isinstance(path, str) and self.objective.balancer is not None:
            file = os.path.join(path, BALANCER_FILE)
            if not os.path.isfile(file):
                raise ValueError(
                    f"checkpoint {path!r} has no {BALANCER_FILE}: it was not saved by a LossportTrainer with a "
                    "balancer, so the balancer's state cannot be restored; resume from a checkpoint of the same run"
                )
            self.objective.balancer.load_state_dict(torch.load(file, map_location="cpu", weights_only=False))
            if self._draws is not None:
                file = os.path.join(path, DRAWS_FILE)
                if not os.path.isfile(file):
                    raise ValueError(
                        f"checkpoint {path!r} has no {DRAWS_FILE}: it was not saved by a LossportTrainer whose "
                        "balancer draws extra or meta batches; resume with the balancer of the run that saved it"
                    )
                self._draws.load_state_dict(torch.load(file, map_location="cpu", weights_only=False))
        return super().train(resume_from_checkpoint, *args, **kwargs)
