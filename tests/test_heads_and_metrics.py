"""Self-supervised rotation labels and per-head metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import validated_experiment
from labelflow.loaders import ImageTableDataset, apply_rotation_code, build_transform
from labelflow.metrics import head_metrics, per_class_f1
from labelflow.experiment import model_spec


def test_rotation_codes_on_an_asymmetric_image():
    # a single bright pixel in the top-left corner of a 4x4 image
    image = torch.zeros(1, 4, 4)
    image[0, 0, 0] = 1
    where = {code: tuple(int(v) for v in torch.nonzero(apply_rotation_code(image, code))[0, 1:]) for code in range(8)}
    assert where[0] == (0, 0)  # identity
    assert where[1] == (0, 3)  # horizontal flip only
    assert where[2] == (3, 0)  # 90 degrees counter-clockwise: top-left goes to bottom-left
    assert where[4] == (3, 3)  # 180 degrees
    assert where[6] == (0, 3)  # 270 degrees
    assert where[3] == (0, 0)  # flip (to top-right), then 90 counter-clockwise: back to top-left
    assert where[7] == (3, 3)  # flip, then 270 counter-clockwise: top-right goes to bottom-right


def _one_pixel_dataset(tmp_path, rotation, n=6):
    paths = []
    for i in range(n):
        pixels = np.zeros((8, 8, 3), dtype=np.uint8)
        pixels[0, 0] = 255  # marker in the top-left corner
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        paths.append(f"{i}.png")
    tf = build_transform(train=False, mean=(0, 0, 0), std=(1, 1, 1))
    return ImageTableDataset(
        tmp_path, paths, np.arange(n) % 3, 8, tf, rotation=rotation, rotation_seed=5,
        heads=("class", "rotation", "class_rotation"),
    )


def test_recorded_rotation_label_matches_the_transform_applied(tmp_path):
    ds = _one_pixel_dataset(tmp_path, "random")
    ds.reseed(3)
    expected_corner = {0: (0, 0), 1: (0, 7), 2: (7, 0), 3: (0, 0), 4: (7, 7), 5: (7, 0), 6: (0, 7), 7: (7, 7)}
    seen = set()
    for i in range(len(ds)):
        for _ in range(4):
            item = ds[i]
            code = int(item["rotation"])
            seen.add(code)
            corner = tuple(int(v) for v in torch.nonzero(item["image"][0] > 0.5)[0])
            assert corner == expected_corner[code]
            assert int(item["class_rotation"]) == int(item["class"]) * 8 + code
    assert len(seen) >= 5  # the codes really vary


def test_seeded_validation_rotation_is_reproducible(tmp_path):
    ds = _one_pixel_dataset(tmp_path, "seeded")
    first = [int(ds[i]["rotation"]) for i in range(len(ds))]
    again = [int(ds[i]["rotation"]) for i in reversed(range(len(ds)))][::-1]
    assert first == again


def test_model_spec_sizes_heads_from_the_data():
    experiment = validated_experiment(
        {
            "model": {"arch": "resnet18", "embedding_size": 8, "small_input": True},
            "heads": [{"name": "class"}, {"name": "rotation", "weight": 0.5}, {"name": "class_rotation", "weight": 0.5}],
            "stages": {"stage1": {"epochs": 1, "lr": 0.1}},
        }
    )
    spec = model_spec(experiment, num_classes=7)
    assert [(h.name, h.num_outputs) for h in spec.heads] == [("class", 7), ("rotation", 8), ("class_rotation", 56)]
    experiment["heads"] = experiment["heads"][1:]
    with pytest.raises(ValueError, match="first head"):
        model_spec(experiment, 7)
    experiment["heads"] = [{"name": "class"}, {"name": "jigsaw"}]
    with pytest.raises(ValueError, match="head 'jigsaw' is unknown.*class_rotation"):
        model_spec(experiment, 7)


def test_head_metrics_single_label_and_auc():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.0, 0.5, 2.0], [3.0, 0.0, 0.0]])
    targets = np.array([0, 1, 1, 0])
    softmax = head_metrics(logits, targets, "softmax")
    assert softmax == {"accuracy": 0.75, "f1_macro": pytest.approx((1.0 + 2 / 3) / 2)}
    sigmoid = head_metrics(logits, targets, "sigmoid")
    assert sigmoid["accuracy"] == 0.75
    probs = 1 / (1 + np.exp(-logits))
    present = [0, 1]  # class 2 has no positives: left out of the macro average
    onehot = np.eye(3)[targets][:, present]
    assert sigmoid["auc"] == pytest.approx(roc_auc_score(onehot, probs[:, present], average="macro"))


def test_head_metrics_multilabel():
    logits = np.array([[3.0, -3.0], [3.0, 3.0], [-3.0, 3.0], [3.0, -3.0]])
    targets = np.array([[1, 0], [1, 1], [0, 1], [0, 1]], dtype=np.float32)
    m = head_metrics(logits, targets, "sigmoid", decision_threshold=0.5)
    assert m["accuracy"] == 0.75  # exact match of label sets: the last row is wrong
    # micro: tp=4, fp=1, fn=1 → F1 = 0.8
    assert m["f1_micro"] == pytest.approx(0.8)
    assert per_class_f1(targets, (logits > 0).astype(int), 2) == pytest.approx([0.8, 0.8])


def test_macro_f1_counts_only_the_classes_present():
    # 3 classes, but class 2 never appears in the targets: its F1 is undefined, not 0
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    targets = np.array([0, 1, 0, 1])
    m = head_metrics(logits, targets, "softmax")
    # class 0: precision 1, recall 1 -> 1.0; class 1: precision 1, recall 0.5 -> 2/3
    assert m["f1_macro"] == pytest.approx((1.0 + 2 / 3) / 2)
    per_class = per_class_f1(targets, logits.argmax(axis=1), 3)
    assert per_class[:2] == pytest.approx([1.0, 2 / 3]) and per_class[2] is None
    multi = head_metrics(np.array([[3.0, -3.0, -3.0], [-3.0, 3.0, 3.0]]), np.array([[1, 0, 0], [0, 1, 0]], np.float32), "sigmoid")
    assert multi["f1_macro"] == pytest.approx(1.0)  # class 2 has no positives: left out (its false positive shows in micro F1)
    assert multi["f1_micro"] == pytest.approx(0.8)
