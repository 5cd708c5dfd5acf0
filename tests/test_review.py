"""Unit tests for the autolabel review queue (labelflow.autolabel.review): margin, farthest-first
diversity, the pool, and Label Studio tasks, labelling config and answers."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd

from labelflow.autolabel.review import (
    PSEUDO,
    QUEUE_COLUMNS,
    UNLABELLED,
    corrections_from_label_studio,
    farthest_first,
    label_studio_config,
    label_studio_tasks,
    rank_queue,
    review_pool,
    top_two_margin,
)


def test_top_two_margin():
    predicted, top, margin = top_two_margin(np.array([[0.1, 0.6, 0.3], [0.5, 0.5, 0.0]]))
    assert predicted.tolist() == [1, 0]
    np.testing.assert_allclose(top, [0.6, 0.5])
    np.testing.assert_allclose(margin, [0.3, 0.0])


def test_farthest_first_does_not_queue_copies_of_one_hard_case():
    rng = np.random.default_rng(0)
    hard = rng.normal(size=8)
    copies = hard + rng.normal(size=(10, 8)) * 1e-3  # ten near copies of the hardest case
    others = rng.normal(size=(5, 8)) * 3
    embeddings = np.vstack([copies, others])
    uncertainty = np.r_[np.full(10, 0.99), np.full(5, 0.6)]
    picked, distances = farthest_first(embeddings, uncertainty, 6)
    assert picked[0] < 10 and set(picked[1:].tolist()) == set(range(10, 15))  # one copy, then the distinct cases
    assert np.isnan(distances[0]) and (distances[1:] > 0.01).all()
    assert len(farthest_first(embeddings, uncertainty, 100)[0]) == 15
    assert farthest_first(np.zeros((0, 3)), np.zeros(0), 5)[0].size == 0


def test_review_pool_takes_the_least_confident_of_unlabelled_and_pseudo_rows():
    dataset = pd.DataFrame(
        {
            "path": ["clean/a.png", "raw/p1.png", "raw/p2.png"],
            "label": ["cat", "dog", "fox"],
            "source": ["human", "pseudo", "pseudo"],
            "round": [0, 1, 2],
            "confidence": [1.0, 0.91, 0.99],
        }
    )
    unlabelled = pd.DataFrame({"path": ["raw/u1.png", "raw/u2.png"], "label": "", "predicted": ["cat", "dog"], "confidence": [0.5, np.nan]})
    pool = review_pool(dataset, unlabelled, 3)
    assert pool["path"].tolist() == ["raw/u2.png", "raw/u1.png", "raw/p1.png"]
    assert pool["status"].tolist() == [UNLABELLED, UNLABELLED, PSEUDO] and pool["label"].tolist() == ["", "", "dog"]
    queue = rank_queue(pool, np.array([[0.5, 0.4, 0.1], [0.9, 0.05, 0.05], [0.3, 0.6, 0.1]]), np.eye(3), ["cat", "dog", "fox"], 2)
    assert list(queue.columns) == QUEUE_COLUMNS and queue["rank"].tolist() == [1, 2]
    assert queue["path"].tolist() == ["raw/u2.png", "raw/p1.png"]  # margins 0.1 and 0.3 beat 0.85


def test_label_studio_tasks_config_and_answers_round_trip():
    queue = pd.DataFrame(
        {"rank": [1, 2], "path": ["raw/a b.png", "raw/c.png"], "status": [UNLABELLED, PSEUDO], "predicted": ["cat", "dog"], "confidence": [0.4, 0.7]}
    )
    tasks = label_studio_tasks(queue, "/data/local-files/?d=", "round 3")
    json.dumps(tasks)  # plain JSON
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=raw/a b.png" and tasks[0]["data"]["path"] == "raw/a b.png"
    prediction = tasks[1]["predictions"][0]
    assert prediction["score"] == 0.7 and prediction["model_version"] == "round 3"
    assert prediction["result"] == [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["dog"]}}]
    view = ET.fromstring(label_studio_config(["cat", "dog", "<odd>"]))
    choices = view.find("Choices")
    assert view.find("Image").get("name") == "image" and view.find("Image").get("value") == "$image"
    assert choices.get("name") == "label" and choices.get("toName") == "image"
    assert [c.get("value") for c in choices] == ["cat", "dog", "<odd>"]
    # an export: the person corrected the first task, skipped the second
    export = [dict(task) for task in tasks]
    export[0]["annotations"] = [{"result": [{**prediction["result"][0], "value": {"choices": ["fox"]}}], "was_cancelled": False}]
    export[1]["annotations"] = [{"result": [], "was_cancelled": True}]
    assert corrections_from_label_studio(export).to_dict("records") == [{"path": "raw/a b.png", "label": "fox"}]


def test_review_pool_leaves_out_copies_of_disagreeing_clean_images_and_answered_images(caplog):
    """Raw copies of clean images whose labels disagree (a duplicate_of, no tag) are never
    predicted (NaN confidence, counted as 0): left in, they would fill the pool, and an answer is
    not used (their clean labels are the fix). Images answered already are left out too."""
    conflicts = [f"raw/c{i}.png" for i in range(5)]
    unlabelled = pd.DataFrame(
        {"path": conflicts + ["raw/u1.png", "raw/u2.png", "raw/u3.png"], "label": "", "predicted": "cat",
         "confidence": [np.nan] * 5 + [0.5, 0.6, np.nan]}
    )  # fmt: skip
    raw = pd.DataFrame(
        {
            "path": conflicts + ["raw/u1.png", "raw/u2.png", "raw/u3.png", "raw/dup.png"],
            "duplicate_of": ["clean/cat/a.png;clean/dog/b.png"] * 5 + [np.nan, "", np.nan, "clean/cat/a.png"],
            "tag": [np.nan] * 5 + [np.nan, np.nan, np.nan, "cat"],
        }
    )
    dataset = pd.DataFrame(
        {"path": ["clean/cat/a.png", "raw/dup.png", "raw/p1.png"], "label": ["cat", "cat", "dog"],
         "source": ["human", "human-duplicate", "pseudo"], "round": [-1, -1, 0], "confidence": [1.0, 1.0, 0.7]}
    )  # fmt: skip
    blind = review_pool(dataset, unlabelled, 4)
    assert blind["path"].tolist() == conflicts[:4]  # the bug: the copies fill the pool
    with caplog.at_level("INFO", logger="labelflow.autolabel.review"):
        pool = review_pool(dataset, unlabelled, 4, raw=raw)
    assert pool["path"].tolist() == ["raw/u3.png", "raw/u1.png", "raw/u2.png", "raw/p1.png"]
    assert "left out 5 unlabelled raw images that copy clean images whose labels disagree" in caplog.text
    assert "raw/c0.png (copies clean/cat/a.png;clean/dog/b.png)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="labelflow.autolabel.review"):
        pool = review_pool(dataset, unlabelled, 4, raw=raw, answered={"raw/u3.png", "raw/p1.png", "clean/cat/a.png"})
    assert pool["path"].tolist() == ["raw/u1.png", "raw/u2.png"]
    assert "left out 2 images answered in the corrections file already" in caplog.text
    # raw.csv without duplicate_of (no copies found): nothing is left out
    assert review_pool(dataset, unlabelled, 4, raw=raw[["path"]]).equals(blind)


def test_review_queue_reads_raw_and_corrections_to_leave_images_out(tmp_path, monkeypatch):
    """The workflow step passes raw.csv and the corrections file (label_issues_inputs.smk's
    review_inputs); a corrections path spelled with a trailing space still counts."""
    from labelflow.autolabel import review

    (tmp_path / "tag2cls.json").write_text(json.dumps({"cat": 0, "dog": 1}))
    (tmp_path / "metrics.json").write_text(json.dumps({"round": 2, "calibration": {"temperature": 1.5}}))
    pd.DataFrame({"path": ["clean/cat/a.png"], "label": ["cat"], "source": ["human"], "round": [-1], "confidence": [1.0]}).to_csv(
        tmp_path / "dataset.csv", index=False
    )
    paths = ["raw/c.png", "raw/u1.png", "raw/u2.png", "raw/u3.png"]
    pd.DataFrame({"path": paths, "label": "", "predicted": "cat", "confidence": [np.nan, 0.5, 0.6, 0.7]}).to_csv(
        tmp_path / "unlabelled.csv", index=False
    )
    pd.DataFrame({"path": paths, "duplicate_of": ["clean/cat/a.png;clean/dog/b.png", "", "", ""], "tag": ""}).to_csv(
        tmp_path / "raw.csv", index=False
    )
    (tmp_path / "corrections.csv").write_text("path,label\nraw/u1.png ,dog\nclean/cat/a.png,cat\n")
    seen = []

    def fake_outputs(checkpoint, root, pool_paths, *args):
        seen.extend(pool_paths)
        n = len(pool_paths)
        return np.tile([0.6, 0.4], (n, 1)), np.eye(n)

    monkeypatch.setattr(review, "pool_outputs", fake_outputs)
    inputs = {name: tmp_path / f"{name}.{ext}" for name, ext in
              [("dataset", "csv"), ("unlabelled", "csv"), ("metrics", "json"), ("tag2cls", "json"), ("raw", "csv"), ("corrections", "csv")]}  # fmt: skip
    inputs |= {"checkpoint": tmp_path / "unused.pt", "root": tmp_path}
    outputs = {"queue": tmp_path / "queue.csv", "tasks": tmp_path / "tasks.json", "label_config": tmp_path / "config.xml"}
    settings = review.ReviewSettings(size=5, pool=10, image_url_prefix="")
    queue = review.review_queue(inputs=inputs, outputs=outputs, data_cfg={}, settings=settings)
    assert seen == ["raw/u2.png", "raw/u3.png"] and sorted(queue["path"]) == seen
    # without the optional inputs (an older rule): every unlabelled image is a candidate
    seen.clear()
    review.review_queue(inputs={k: v for k, v in inputs.items() if k not in ("raw", "corrections")}, outputs=outputs,
                        data_cfg={}, settings=settings)  # fmt: skip
    assert seen == paths
