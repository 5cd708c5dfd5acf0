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
