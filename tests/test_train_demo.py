"""Training the demo models (pipeline/models/train_demo.py): the multi-label ("present") targets
that make the class-switch pointing game well posed (docs/saliency_eval.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.data.concepts import SHAPES
from pipeline.data.synthetic import render_sample, write_shards
from pipeline.models import demo, load_model, train_demo


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("present")
    write_shards(out, 96, seed=4, size=128, shard_size=48, workers=1, progress=False)
    return str(out / "shard-*.tar")


def test_present_labels_are_every_shape_the_scene_holds(shards) -> None:
    images, labels, keys = train_demo.load_arrays(shards, progress=False, labels="present")
    assert labels.shape == (96, len(SHAPES)) and labels.dtype == np.float32
    for key, row in zip(keys, labels):
        _, meta = render_sample(4, int(key))
        assert set(np.flatnonzero(row)) == {SHAPES.index(o["shape"]) for o in meta["objects"]}
    # a third of the scenes hold more than one shape: "present" differs from "largest" there
    assert 10 < int((labels.sum(1) > 1).sum()) < 90
    _, largest, _ = train_demo.load_arrays(shards, progress=False)
    assert (labels[np.arange(96), largest] == 1).all()
    with pytest.raises(ValueError, match="unknown labels 'all'; valid: largest, present"):
        train_demo.load_arrays(shards, progress=False, labels="all")


def test_multi_label_accuracy_counts_exact_sets_and_label_accuracy_each_decision() -> None:
    class Fixed(torch.nn.Module):  # returns preset logits whatever the image
        pretrained_cfg = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "input_size": (3, 8, 8)}

        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits, self.w = logits, torch.nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits[: len(x)] + self.w

    logits = torch.tensor([[2.0, -1, -1], [2.0, 1, -1], [-2.0, -1, -3], [0.5, -1, 4]])
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 1]], np.float32)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    assert train_demo.accuracy(Fixed(logits), images, labels, batch_size=4) == 0.75
    assert train_demo.accuracy(Fixed(logits), images, np.array([0, 1, 1, 0]), batch_size=4) == 0.5
    # one wrong decision of twelve: class 1 of the second image
    assert train_demo.label_accuracy(Fixed(logits), images, labels, batch_size=4) == 11 / 12


def _multi_label_scores(weights: str, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(share of (image, class) decisions right at logit 0, share of (present, absent) class
    pairs of an image whose present class has the higher logit)."""
    model = load_model("demo_resnet", weights).model
    with torch.no_grad():
        logits = model(train_demo._normalise(model, torch.from_numpy(images))).numpy()
    decisions = train_demo.label_accuracy(model, images, labels)
    ranked = [logits[i, j] > logits[i, k] for i in range(len(labels))
              for j in np.flatnonzero(labels[i]) for k in np.flatnonzero(labels[i] == 0)]
    return decisions, float(np.mean(ranked))


def test_a_present_label_run_learns_a_sigmoid_per_class(shards, tmp_path) -> None:
    # fine-tuned from the shipped single-label weights, as the shipped multi-label model was
    start = str(demo.weights_path("demo_resnet"))
    recipe = train_demo.Recipe("demo_resnet", epochs=30, batch_size=16, lr=3e-3, warmup_steps=10,
                               holdout_frac=0.25, threads=1, labels="present", init=start)
    card = train_demo.train(recipe, shards, tmp_path, progress=False)
    assert card["recipe"]["labels"] == "present"
    assert json.loads((tmp_path / "demo_resnet.json").read_text()) == card
    images, labels, _ = train_demo.load_arrays(shards, progress=False, labels="present")
    before = _multi_label_scores(start, images, labels)
    after = _multi_label_scores(str(tmp_path / "demo_resnet.safetensors"), images, labels)
    # a softmax over one class per image leaves the other present shapes' logits anywhere
    # (0.77 of the decisions, 0.80 of the rankings right); a sigmoid per class learns them
    # (0.956 and 0.976 on the development machine)
    assert before[0] < 0.8 and before[1] < 0.85, before
    assert after[0] >= 0.92 and after[1] >= 0.95, after


def test_present_labels_refuse_the_single_class_losses(shards, tmp_path) -> None:
    with pytest.raises(ValueError, match="labels='present' trains without token_loss and distill"):
        train_demo.train(train_demo.Recipe("demo_resnet", labels="present", distill=1.0, teacher="demo_resnet"),
                         shards, tmp_path, progress=False)


def test_the_command_line_offers_the_label_kinds_that_training_knows() -> None:
    from jobs import cli

    assert cli.LABELS == train_demo.LABELS
