"""Keras 3 models (torch backend: a ``keras.Model`` is a ``torch.nn.Module``) trained unchanged through lossport
with dict batches; per-output losses equal Keras's own ``compile(loss=..., loss_weights=...)`` values and one SGD
step equals ``train_on_batch``."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch

import lossport

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - keras imported earlier with another backend
    pytest.skip(f"keras runs on the {keras.backend.backend()!r} backend here, not torch", allow_module_level=True)

WEIGHTS = {"cls": 1.0, "reg": 0.5}
LR = 0.1


def _model() -> keras.Model:
    inp = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, activation="relu", name="trunk")(inp)
    return keras.Model(inp, {"cls": keras.layers.Dense(3, name="cls")(h), "reg": keras.layers.Dense(1, name="reg")(h)})


def _twins() -> tuple[keras.Model, keras.Model]:
    keras.utils.set_random_seed(0)
    a, b = _model(), _model()
    b.set_weights(a.get_weights())
    b.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"},
        loss_weights=WEIGHTS,
    )
    return a, b


def _arrays() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6)).astype("float32")
    return x, {"cls": rng.integers(0, 3, 8), "reg": rng.standard_normal((8, 1)).astype("float32")}


def _dict_batch() -> dict[str, torch.Tensor]:
    x, y = _arrays()
    return {"x": torch.tensor(x), "cls": torch.tensor(y["cls"]), "reg": torch.tensor(y["reg"])}


def test_parts_equal_keras_compile_losses_on_a_dict_batch():
    ours, theirs = _twins()
    x, y = _arrays()
    keras_values = theirs.evaluate(x, y, return_dict=True, verbose=0)
    losses = lossport.Objective({"cls": "ce", "reg": "mse"}, weights=WEIGHTS)(ours, _dict_batch())
    assert float(losses.parts["cls"].detach()) == pytest.approx(keras_values["cls_loss"], abs=1e-6)
    assert float(losses.parts["reg"].detach()) == pytest.approx(keras_values["reg_loss"], abs=1e-6)
    assert float(losses.total.detach()) == pytest.approx(keras_values["loss"], abs=1e-6)


def test_keras_loss_objects_and_functions_as_specs():
    ours, theirs = _twins()
    x, y = _arrays()
    keras_values = theirs.evaluate(x, y, return_dict=True, verbose=0)
    spec = {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": keras.losses.mean_squared_error}
    losses = lossport.Objective(spec)(ours, _dict_batch())
    assert float(losses.parts["cls"].detach()) == pytest.approx(keras_values["cls_loss"], abs=1e-6)
    assert float(losses.parts["reg"].detach()) == pytest.approx(keras_values["reg_loss"], abs=1e-6)


def test_one_sgd_step_equals_keras_train_on_batch():
    ours, theirs = _twins()
    start = [w.copy() for w in ours.get_weights()]
    x, y = _arrays()
    theirs.train_on_batch(x, y)
    lossport.train(
        ours,
        _dict_batch(),
        {"cls": "ce", "reg": "mse"},
        weights=WEIGHTS,
        optimizer="sgd",
        lr=LR,
        epochs=1,
        batch_size=8,
        shuffle=False,
        progress=False,
    )
    # torch's SGD with momentum: the first step is p - lr * g, as Keras's plain SGD
    for a, b, s in zip(ours.get_weights(), theirs.get_weights(), start):
        assert np.abs(a - b).max() < 1e-6
        assert np.abs(a - s).max() > 1e-4


def test_two_named_inputs_from_a_dict_batch():
    keras.utils.set_random_seed(1)
    image, meta = keras.Input((5,), name="image"), keras.Input((2,), name="meta")
    h = keras.layers.Dense(4, name="trunk")(keras.layers.Concatenate()([image, meta]))
    model = keras.Model([image, meta], {"score": keras.layers.Dense(1, name="score")(h)})
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(6, 5, generator=g),
        "meta": torch.randn(6, 2, generator=g),
        "score": torch.randn(6, 1, generator=g),
    }
    losses = lossport.Objective({"score": "mse"})(model, batch)
    expected = ((model([batch["image"], batch["meta"]])["score"] - batch["score"]) ** 2).mean()
    assert float(losses.parts["score"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    with pytest.raises(lossport.LossSpecError, match="'meta' is not in the batch"):
        lossport.Objective({"score": "mse"})(model, {"image": batch["image"], "score": batch["score"]})


def test_subclassed_model_with_targets_named():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.a = keras.layers.Dense(2, name="a")
            self.b = keras.layers.Dense(1, name="b")

        def call(self, x):  # the batch's only key that is not a target comes as the tensor itself
            return {"label": self.a(x), "value": self.b(x)}

    keras.utils.set_random_seed(2)
    net = Net()
    g = torch.Generator().manual_seed(1)
    batch = {
        "x": torch.randn(4, 3, generator=g),
        "label": torch.tensor([0, 1, 1, 0]),
        "value": torch.randn(4, 1, generator=g),
    }
    net(batch["x"])  # a subclassed Keras model has no weights before its first call
    # before the first forward lossport knows the target keys only from targets= (a functional model names its
    # inputs; a subclassed one does not)
    result = lossport.train(
        net,
        batch,
        {"label": "ce", "value": "mse"},
        targets={"label": "label", "value": "value"},
        balance="uw",
        epochs=3,
        batch_size=4,
        progress=False,
        seed=0,
    )
    assert result.history["value"][-1] < result.history["value"][0]


def test_inspect_attributes_parameters_to_keras_layers():
    keras.utils.set_random_seed(3)
    inp = keras.Input((6,), name="x")
    block = keras.Sequential([keras.layers.Dense(4), keras.layers.BatchNormalization()], name="block")
    h = block(keras.layers.Dense(8, activation="relu", name="trunk")(inp))
    outs = {
        "cls": keras.layers.Dense(3, name="cls")(h),
        "reg": keras.layers.Dense(1, name="reg")(h),
        "aux": keras.layers.Dense(2, name="unused")(h),
    }
    model = keras.Model(inp, outs)
    batch = _dict_batch()
    report = lossport.inspect(model, batch, {"cls": "ce", "reg": "mse"}, batches=1, batch_size=8)
    names = {m.name: m for m in report.modules}
    assert set(names) == {"trunk", "block/dense", "block/batch_normalization", "cls", "reg", "unused"}
    assert names["trunk"].kind == "Dense" and names["trunk"].params == 6 * 8 + 8
    assert names["block/batch_normalization"].trainable == 8  # gamma and beta; the moving statistics are frozen
    assert names["unused"].status == "not reached"
    assert any("'unused'" in a and "never trains" in a for a in report.advice)
    assert report.reach["cls"] == ["block/batch_normalization", "block/dense", "cls", "trunk"]
    # the pull on a layer is the norm of the part's gradient on that layer's variables
    losses = lossport.Objective({"cls": "ce", "reg": "mse"})(model, batch)
    trunk = [v.value for v in model.get_layer("trunk").trainable_weights]
    g = torch.autograd.grad(losses.parts["reg"], trunk)
    assert report.pull["reg"]["trunk"] == pytest.approx(float(torch.cat([x.reshape(-1) for x in g]).norm()), rel=1e-5)
