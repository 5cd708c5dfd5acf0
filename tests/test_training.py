"""Tests for labelflow.training: schedules, optimizers, and run_stage end to end (with resume).

The run_stage tests train resnet18 (small_input) on 16 px images, batch 8, 1-3 epochs.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import labelflow.models as models
import labelflow.training as training
from conftest import make_tiny_dataset, stage_spec
from labelflow.loaders import ImageTableDataset, build_transform, make_loader
from labelflow.models import HeadSpec, ModelSpec, create_model, load_model
from labelflow.device import select_device
from labelflow.training import (
    StageLoaders,
    StageSpec,
    build_optimizer,
    build_scheduler,
    lr_factor,
    run_stage,
)

SEED = 7
AUGMENT = [{"name": "HorizontalFlip", "params": {"p": 0.5}}]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# --------------------------------------------------------------------------- schedules


def test_cosine_starts_at_one_and_ends_near_zero():
    spec = stage_spec("stage1", epochs=10, lr=0.1, scheduler="cosine")
    factors = [lr_factor(spec, s, 5) for s in range(50)]
    assert factors[0] == 1.0
    assert factors[25] == pytest.approx(0.5)
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 49 / 50)))
    assert factors[-1] < 0.01
    assert all(a > b for a, b in zip(factors, factors[1:]))


def test_warmup_ramps_linearly_then_cosine_starts_at_one():
    spec = stage_spec("stage1", epochs=10, lr=0.1, scheduler="cosine", warmup_epochs=2)
    warm = [lr_factor(spec, s, 5) for s in range(10)]  # 2 epochs x 5 steps of warmup
    assert warm == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(spec, 10, 5) == 1.0  # first step after warmup
    assert lr_factor(spec, 49, 5) < 0.01


def test_step_schedule_multiplies_by_gamma_every_step_epochs():
    spec = stage_spec("stage1", epochs=30, lr=0.1, scheduler="step", step_epochs=10, step_gamma=0.5)
    steps = 4
    assert lr_factor(spec, 0, steps) == 1.0
    assert lr_factor(spec, 10 * steps - 1, steps) == 1.0  # last step of epoch 10
    assert lr_factor(spec, 10 * steps, steps) == pytest.approx(0.5)
    assert lr_factor(spec, 20 * steps - 1, steps) == pytest.approx(0.5)
    assert lr_factor(spec, 20 * steps, steps) == pytest.approx(0.25)


def test_min_steps_adds_epochs_only_on_a_small_loader():
    spec = stage_spec("stage2", epochs=12, lr=0.1, min_steps=300)
    assert spec.for_loader(3).epochs == 100  # 144 images, batch 64: 3 steps per epoch
    assert spec.for_loader(7).epochs == 43  # rounded up: 301 steps
    assert spec.for_loader(25).epochs == 12  # 300 steps already
    assert spec.for_loader(3).min_steps == 300 and spec.epochs == 12  # a copy; spec unchanged
    assert stage_spec("s", epochs=5, lr=0.1).for_loader(1).epochs == 5  # default: no minimum


def test_constant_and_onecycle():
    const = stage_spec("s", epochs=3, lr=0.1, scheduler="constant")
    assert {lr_factor(const, s, 4) for s in range(12)} == {1.0}
    one = stage_spec("s", epochs=10, lr=0.1, scheduler="onecycle")
    assert lr_factor(one, 0, 10) == pytest.approx(1 / 25)
    assert lr_factor(one, 30, 10) == pytest.approx(1.0)  # peak after 30 % of 100 steps
    assert lr_factor(one, 99, 10) < 1e-3


def test_unknown_scheduler_names_the_setting():
    spec = replace(stage_spec("stage2", epochs=3, lr=0.1), scheduler="exponential")
    with pytest.raises(ValueError, match=r"stages\.stage2\.scheduler") as info:
        lr_factor(spec, 0, 4)
    assert "cosine" in str(info.value)
    with pytest.raises(ValueError, match=r"stages\.stage2\.scheduler"):
        build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), spec, 4)


def test_unknown_scheduler_with_warmup_fails_before_training():
    spec = replace(stage_spec("stage2", epochs=3, lr=0.1, warmup_epochs=1), scheduler="exponential")
    with pytest.raises(ValueError, match=r"stages\.stage2\.scheduler"):
        build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), spec, 4)


def test_build_scheduler_sets_optimizer_lr():
    spec = stage_spec("s", epochs=2, lr=0.2, scheduler="cosine", warmup_epochs=0.5)
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=spec.lr)
    scheduler = build_scheduler(optimizer, spec, 4)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.2 * lr_factor(spec, s, 4) for s in range(8)])
    assert seen[:2] == pytest.approx([0.1, 0.2])  # warmup of 2 steps


def test_build_optimizer_kinds_and_unknown():
    torch.manual_seed(0)
    model = create_model(_model_spec())
    assert isinstance(build_optimizer(model, stage_spec("s", epochs=1, lr=0.1, optimizer="adam")), torch.optim.Adam)
    assert isinstance(build_optimizer(model, stage_spec("s", epochs=1, lr=0.1, optimizer="adamw")), torch.optim.AdamW)
    sgd = build_optimizer(model, stage_spec("s", epochs=1, lr=0.1, optimizer="sgd", momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["nesterov"] is True
    with pytest.raises(ValueError, match=r"stages\.s\.optimizer='lamb'"):
        build_optimizer(model, replace(stage_spec("s", epochs=1, lr=0.1), optimizer="lamb"))


def test_build_optimizer_skips_frozen_encoder():
    torch.manual_seed(0)
    model = create_model(_model_spec())
    model.freeze_encoder(True)
    optimizer = build_optimizer(model, stage_spec("s", epochs=1, lr=0.1))
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in params for p in model.encoder.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(trainable) > 0


def test_stage_spec_takes_its_defaults_from_the_schema():
    spec = stage_spec("stage1", epochs=4, lr=0.01, scheduler="step")
    assert (spec.name, spec.epochs, spec.lr, spec.scheduler) == ("stage1", 4, 0.01, "step")
    assert (spec.optimizer, spec.batch_size, spec.top_k, spec.min_steps) == ("adam", 64, 3, 0)
    with pytest.raises(ValueError, match=r"stages\.stage1 lacks .*validate the experiment"):
        StageSpec.from_dict("stage1", {"epochs": 4, "lr": 0.01})


def test_select_device_cpu():
    assert select_device(False) == torch.device("cpu")


def test_fingerprint_is_stable_and_sensitive():
    a = training.fingerprint({"lr": 0.1, "epochs": 3}, "abc")
    assert a == training.fingerprint({"epochs": 3, "lr": 0.1}, "abc")
    assert a != training.fingerprint({"lr": 0.2, "epochs": 3}, "abc")
    assert len(a) == 16


# --------------------------------------------------------------------------- run_stage


def _model_spec() -> ModelSpec:
    return ModelSpec(arch="resnet18", heads=[HeadSpec("class", 3)], embedding_size=16, small_input=True)


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    root = make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", n_classes=3, per_class=8, size=16)
    paths = sorted(str(p.relative_to(root)) for p in root.glob("class_*/*.png"))
    targets = [int(Path(p).parent.name.split("_")[1]) for p in paths]
    train = [i for i in range(len(paths)) if i % 3 != 0]  # 16 train, 8 valid
    valid = [i for i in range(len(paths)) if i % 3 == 0]
    return root, paths, targets, train, valid


def _run(
    tiny_table, tmp: Path, epochs: int, *, fp: str = "fp-1", top_k: int = 3, name: str = "run", min_steps: int = 0
) -> dict:
    root, paths, targets, train, valid = tiny_table
    torch.manual_seed(SEED)
    model = create_model(_model_spec())
    train_ds = ImageTableDataset(
        root, [paths[i] for i in train], [targets[i] for i in train], 16, build_transform(AUGMENT, train=True)
    )
    valid_ds = ImageTableDataset(
        root, [paths[i] for i in valid], [targets[i] for i in valid], 16, build_transform(train=False)
    )
    spec = stage_spec("stage1", epochs=epochs, lr=1e-3, batch_size=8, top_k=top_k, min_steps=min_steps)
    return run_stage(
        model,
        StageLoaders(
            make_loader(train_ds, batch_size=8, shuffle=True, seed=SEED),
            make_loader(valid_ds, batch_size=8, shuffle=False, seed=SEED),
        ),
        spec,
        out_dir=tmp / name / "out",
        state_dir=tmp / name / "state",
        device=torch.device("cpu"),
        seed=SEED,
        stage_fingerprint=fp,
    )


def _epochs_without_seconds(metrics: dict) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in metrics["epochs"]]


@pytest.fixture(scope="module")
def two_epoch_run(tiny_table, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_epochs")
    metrics = _run(tiny_table, tmp, epochs=2, top_k=3)
    return tmp / "run" / "out", metrics


def test_run_stage_trains_min_steps(tiny_table, tmp_path):
    # 16 train images, batch 8: 2 steps per epoch, so 5 steps need 3 epochs
    metrics = _run(tiny_table, tmp_path, epochs=1, min_steps=5)
    assert metrics["spec"]["epochs"] == 3 and metrics["spec"]["min_steps"] == 5
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3]
    # the cosine runs over the 6 steps trained, not the 2 of the configured epoch
    assert [r["lr"] for r in metrics["epochs"]] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in (0, 2, 4)])


def test_run_stage_writes_outputs(two_epoch_run):
    out, returned = two_epoch_run
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage"] == "stage1"
    assert metrics["main_metric"] == "valid/accuracy"
    assert metrics["spec"]["epochs"] == 2
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    for record in metrics["epochs"]:
        for split in ("train", "valid"):
            values = record[split]
            assert math.isfinite(values["loss"]) and values["loss"] > 0
            assert 0.0 <= values["accuracy"] <= 1.0
            assert values["class_loss"] == pytest.approx(values["loss"])  # one head of weight 1
            # accuracies are fractions of 16 train / 8 valid images
            n = 16 if split == "train" else 8
            assert values["accuracy"] * n == pytest.approx(round(values["accuracy"] * n))
    assert metrics["epochs"][0]["lr"] == pytest.approx(1e-3)  # cosine, no warmup: base lr first
    assert metrics["epochs"][1]["lr"] == pytest.approx(0.5e-3)  # cosine half-way: 2 of 4 steps
    assert _epochs_without_seconds(metrics) == _epochs_without_seconds(returned)

    accs = [r["valid"]["accuracy"] for r in metrics["epochs"]]
    assert metrics["best"]["value"] == max(accs)
    assert metrics["best"]["epoch"] == accs.index(max(accs)) + 1

    # Top-k checkpoints (k=3 > 2 epochs: both kept), named with the metric value.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"epoch={e:03d}-accuracy={a:.4f}.pt" for e, a in zip((1, 2), accs)]
    ckpt = models.load_checkpoint(out / "checkpoints" / names[0])
    assert ckpt["epoch"] == 1 and ckpt["accuracy"] == accs[0]

    best = models.load_checkpoint(out / "best.pt")
    assert best["epoch"] == metrics["best"]["epoch"] and best["accuracy"] == max(accs)
    assert models.load_checkpoint(out / "last.pt")["epoch"] == 2
    assert isinstance(load_model(out / "last.pt"), models.MultiHeadNet)

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_run_stage_tensorboard_holds_the_metrics(two_epoch_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, metrics = two_epoch_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("stage1/valid/loss")]
    assert [s for s, _ in loss] == [1, 2]
    assert [v for _, v in loss] == pytest.approx([r["valid"]["loss"] for r in metrics["epochs"]], rel=1e-6)


def test_same_seed_gives_identical_metrics(two_epoch_run, tiny_table, tmp_path):
    _out, first = two_epoch_run
    second = _run(tiny_table, tmp_path, epochs=2, top_k=3)
    assert _epochs_without_seconds(second) == _epochs_without_seconds(first)
    on_disk = json.loads((tmp_path / "run" / "out" / "metrics.json").read_text())
    assert _epochs_without_seconds(on_disk) == _epochs_without_seconds(first)


def _crash_in_epoch(monkeypatch, epoch: int):
    """Make the n-th call of train_one_epoch raise; returns the real function to restore."""
    real_train = training.train_one_epoch
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise RuntimeError(f"simulated crash in epoch {epoch}")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", crashing)
    return real_train


def test_resume_after_crash_replays_exactly(tiny_table, tmp_path, monkeypatch, caplog):
    # top_k=1 also exercises dropping a worse checkpoint when a better epoch arrives.
    full = _run(tiny_table, tmp_path, epochs=3, top_k=1, name="A")

    real_train = _crash_in_epoch(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tiny_table, tmp_path, epochs=3, top_k=1, name="B")
    state = torch.load(tmp_path / "B" / "state" / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert not (tmp_path / "B" / "out" / "metrics.json").exists()  # outputs only at the end
    monkeypatch.setattr(training, "train_one_epoch", real_train)

    caplog.set_level(logging.INFO, logger="labelflow.training")
    resumed = _run(tiny_table, tmp_path, epochs=3, top_k=1, name="B")
    assert any("resuming stage stage1 at epoch 3" in r.getMessage() for r in caplog.records)
    trained = [r.getMessage() for r in caplog.records if "stage stage1 epoch" in r.getMessage()]
    assert len(trained) == 1 and "epoch 3/3" in trained[0]  # only epoch 3 was trained again

    assert [r["epoch"] for r in resumed["epochs"]] == [1, 2, 3]
    assert _epochs_without_seconds(resumed) == _epochs_without_seconds(full)
    assert resumed["best"] == full["best"]
    a_out, b_out = tmp_path / "A" / "out", tmp_path / "B" / "out"
    a_ckpts = sorted(p.name for p in (a_out / "checkpoints").iterdir())
    assert len(a_ckpts) == 1  # top_k=1
    assert a_ckpts[0] == f"epoch={full['best']['epoch']:03d}-accuracy={full['best']['value']:.4f}.pt"
    assert sorted(p.name for p in (b_out / "checkpoints").iterdir()) == a_ckpts
    a_last = models.load_checkpoint(a_out / "last.pt")["model"]
    b_last = models.load_checkpoint(b_out / "last.pt")["model"]
    for key, value in a_last.items():
        assert torch.equal(b_last[key], value), key


def test_finished_stage_leaves_no_state_and_changed_fingerprint_starts_fresh(
    tiny_table, tmp_path, monkeypatch, caplog
):
    state_dir = tmp_path / "run" / "state"
    _run(tiny_table, tmp_path, epochs=1, fp="old")
    # published outputs are the record; the resume state (3x the model) is removed
    assert (tmp_path / "run" / "out" / "best.pt").is_file() and not state_dir.exists()

    # an interrupted stage keeps its state...
    real_train = _crash_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tiny_table, tmp_path, epochs=2, fp="old")
    monkeypatch.setattr(training, "train_one_epoch", real_train)
    assert torch.load(state_dir / "state.pt", weights_only=True)["fingerprint"] == "old"

    # ...but a rerun with another config or input does not resume into it
    stale = state_dir / "checkpoints" / "stale-marker.pt"
    stale.write_bytes(b"x")
    caplog.set_level(logging.INFO, logger="labelflow.training")
    metrics = _run(tiny_table, tmp_path, epochs=2, fp="new")
    messages = [r.getMessage() for r in caplog.records]
    assert any("fresh" in m and "old" in m and "new" in m for m in messages)
    assert not any("resuming" in m for m in messages)
    assert sum("stage stage1 epoch 1/2" in m for m in messages) == 1  # trained again from epoch 1
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    assert not stale.exists() and not state_dir.exists()
