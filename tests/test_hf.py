"""LossportTrainer: a transformers.Trainer trained on a lossport objective (lossport.hf). Tiny models built
from configs, no download."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, BertModel, TrainingArguments  # noqa: E402

import lossport  # noqa: E402
from lossport.balance.learned import FAMO  # noqa: E402
from lossport.hf import BALANCER_FILE, LossportTrainer  # noqa: E402

CONFIG = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "vocab_size": 50,
}


class TwoHeads(nn.Module):
    """A tiny BERT trunk with a topic head (3 classes) and a score head (regression)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bert = BertModel(BertConfig(**CONFIG))
        self.topic = nn.Linear(16, 3)
        self.score = nn.Linear(16, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return {"topic": self.topic(h), "score": self.score(h)}


def rows(n: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, 8), generator=g)
    topic = ids[:, 0] % 3
    score = (ids[:, 1].float() / 50).unsqueeze(1) * 10
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "topic": topic[i], "score": score[i]}
        for i in range(n)
    ]


def args(tmp_path, **kw) -> TrainingArguments:
    base = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-2,
        "max_steps": 4,
        "logging_steps": 2,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
        "lr_scheduler_type": "constant",
    }
    base.update(kw)
    return TrainingArguments(**base)


def params(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def test_model_computing_its_own_loss(tmp_path) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=3))
    data = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"], "labels": r["topic"]} for r in rows()]
    objective = lossport.Objective("loss")
    trainer = LossportTrainer(
        model=model, args=args(tmp_path), train_dataset=data, eval_dataset=data, objective=objective
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    part = objective.part_names[0]  # the model's own loss output
    assert len(logged) == 2 and all(f"weight/{part}" in h and h[part] == pytest.approx(h["loss"]) for h in logged)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_loss"])  # present and a number
    model.eval()
    with torch.no_grad():
        batches = [{k: torch.stack([r[k] for r in data[i : i + 8]]) for k in data[0]} for i in (0, 8, 16, 24)]
        expect = sum(float(model(**b).loss) for b in batches)
    assert metrics["eval_loss"] == pytest.approx(expect / 4, rel=1e-4)


def test_multi_head_parts_logged_and_evaluated(tmp_path) -> None:
    model = TwoHeads()
    objective = lossport.Objective({"topic": "ce", "score": "mse"}, balance="uw")
    trainer = LossportTrainer(
        model=model, args=args(tmp_path), train_dataset=rows(), eval_dataset=rows(16, 1), objective=objective
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:
        for key in ("topic", "score", "weight/topic", "weight/score"):
            assert key in h, sorted(h)
    assert logged[-1]["weight/topic"] != 1.0  # uncertainty weights moved
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        batch = {k: torch.stack([r[k] for r in rows(16, 1)]) for k in rows(1)[0]}
        parts = objective.losses(objective.forward(model, batch)[0], batch).parts
    for k in ("topic", "score"):
        assert metrics[f"eval_{k}"] == pytest.approx(float(parts[k]), rel=1e-5)


class CountingFAMO(FAMO):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def step(self, recompute=None) -> None:
        self.steps += 1
        super().step(recompute)


def test_famo_post_step_once_per_optimizer_step_with_accumulation(tmp_path) -> None:
    objective = lossport.Objective({"topic": "ce", "score": "mse"}, balance=CountingFAMO())
    trainer = LossportTrainer(
        model=TwoHeads(),
        args=args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3),
        train_dataset=rows(),
        objective=objective,
    )
    trainer.train()
    assert trainer.state.global_step == 3
    assert objective.balancer.steps == 3


def test_resume_restores_the_balancer(tmp_path) -> None:
    def run(out, max_steps, resume=None):
        objective = lossport.Objective({"topic": "ce", "score": "mse"}, balance="famo")
        model = TwoHeads()
        trainer = LossportTrainer(
            model=model,
            args=args(out, max_steps=max_steps, save_strategy="steps", save_steps=2),
            train_dataset=rows(),
            objective=objective,
        )
        trainer.train(resume_from_checkpoint=resume)
        return model, objective

    full, full_obj = run(tmp_path / "full", 4)
    run(tmp_path / "half", 2)
    ckpt = tmp_path / "half" / "checkpoint-2"
    assert (ckpt / BALANCER_FILE).is_file()
    resumed, resumed_obj = run(tmp_path / "half", 4, resume=str(ckpt))
    torch.testing.assert_close(params(resumed), params(full), rtol=0, atol=1e-6)
    assert repr(resumed_obj.balancer.state_dict()) == repr(full_obj.balancer.state_dict())


def test_resume_without_balancer_file_is_an_error(tmp_path) -> None:
    (tmp_path / "checkpoint-2").mkdir()
    trainer = LossportTrainer(
        model=TwoHeads(),
        args=args(tmp_path),
        train_dataset=rows(),
        objective=lossport.Objective({"topic": "ce", "score": "mse"}, balance="famo"),
    )
    with pytest.raises(ValueError, match=BALANCER_FILE):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_objective_is_required_to_be_an_objective(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"lossport.Objective"):
        LossportTrainer(model=TwoHeads(), args=args(tmp_path), objective={"topic": "ce"})


def test_docs_recipe_runs(tmp_path, monkeypatch) -> None:
    from doc_blocks import python_block

    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "recipe", "OUTPUT_DIR": tmp_path / "out"}
    exec(compile(python_block("integrations.md", "Hugging Face Trainer"), "integrations.md", "exec"), scope)
    first = scope["trainer"].state.log_history[0]
    assert {"loss", "topic", "score", "weight/topic", "weight/score"} <= set(first)
    assert (tmp_path / "out" / "checkpoint-4" / BALANCER_FILE).is_file()
