"""Tests for labelflow.training: schedules, optimizers, and run_stage end to end (with resume).

The run_stage tests train resnet18 (small_input) on 16 px images, batch 8, 1-3 epochs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import labelflow
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
FP = {"recipe": "r1", "data": "d1", "code": "c1"}  # a stage fingerprint: named parts
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
    # momentum 0 passes the schema; torch refuses Nesterov without momentum, so it is plain SGD
    plain = build_optimizer(model, stage_spec("s", epochs=1, lr=0.1, optimizer="sgd", momentum=0.0))
    assert plain.param_groups[0]["momentum"] == 0.0 and plain.param_groups[0]["nesterov"] is False
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


def test_autocast_precision_modes_on_the_cpu():
    from labelflow.device import autocast

    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    cpu = torch.device("cpu")
    dtypes = {}
    for precision in ("auto", "bf16", "fp32"):
        with autocast(cpu, precision):
            dtypes[precision] = conv(x).dtype
    assert dtypes == {"auto": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}
    with pytest.raises(ValueError, match=r"precision='half'; choose one of \('auto', 'bf16', 'fp32'\)"):
        autocast(cpu, "half")


def test_the_job_log_warns_when_bf16_runs_on_a_cpu_without_bf16_units(monkeypatch):
    import labelflow.device as device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: [])
    assert device.describe_precision(cpu, "bf16").startswith("bf16 autocast (WARNING: this CPU has no bf16 units")
    assert device.describe_precision(cpu, "auto") == "float32"
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: ["avx512_bf16"])
    assert device.describe_precision(cpu, "bf16") == "bf16 autocast"


def test_stage_precision_is_validated_by_the_schema():
    assert stage_spec("stage1", epochs=1, lr=0.1).precision == "auto"
    with pytest.raises(Exception, match="half"):
        stage_spec("stage1", epochs=1, lr=0.1, precision="half")


def test_select_device_cpu():
    assert select_device(False) == torch.device("cpu")


def test_digest_is_stable_and_sensitive():
    a = training.digest({"lr": 0.1, "epochs": 3}, "abc")
    assert a == training.digest({"epochs": 3, "lr": 0.1}, "abc")
    assert a != training.digest({"lr": 0.2, "epochs": 3}, "abc")
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
    tiny_table,
    tmp: Path,
    epochs: int,
    *,
    fp: dict | None = None,
    top_k: int = 3,
    name: str = "run",
    min_steps: int = 0,
    tiny_encoder: bool = False,
    state_every_seconds: float = 0.0,
    precision: str = "auto",
    on_model=None,
    tie_break: str = "first",
) -> dict:
    root, paths, targets, train, valid = tiny_table
    torch.manual_seed(SEED)
    if tiny_encoder:  # kilobyte checkpoints, for tests that script the epochs instead of training
        model = models.MultiHeadNet(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()), 4, _model_spec())
    else:
        model = create_model(_model_spec())
    train_ds = ImageTableDataset(
        root, [paths[i] for i in train], [targets[i] for i in train], 16, build_transform(AUGMENT, train=True)
    )
    valid_ds = ImageTableDataset(
        root, [paths[i] for i in valid], [targets[i] for i in valid], 16, build_transform(train=False)
    )
    if on_model is not None:
        on_model(model)
    spec = stage_spec("stage1", epochs=epochs, lr=1e-3, batch_size=8, top_k=top_k, min_steps=min_steps,
                      precision=precision, tie_break=tie_break)
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
        state_every_seconds=state_every_seconds,
        stage_fingerprint=fp or FP,
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


@pytest.mark.parametrize("precision, train_dtype", [("bf16", torch.bfloat16), ("auto", torch.float32)])
def test_stage_precision_sets_the_training_forward_only(tiny_table, tmp_path, caplog, precision, train_dtype):
    caplog.set_level(logging.INFO, logger="labelflow.training")
    seen: dict[bool, set] = {True: set(), False: set()}  # model.training -> embedding dtypes

    def record(model):
        model.register_forward_hook(lambda module, inputs, out: seen[module.training].add(out["embedding"].dtype))

    metrics = _run(tiny_table, tmp_path, epochs=1, precision=precision, on_model=record)
    assert seen[True] == {train_dtype}
    assert seen[False] == {torch.float32}  # evaluation runs as inference does
    assert metrics["spec"]["precision"] == precision
    assert f"training forward pass in {'bf16 autocast' if precision == 'bf16' else 'float32'}" in caplog.text
    assert math.isfinite(metrics["epochs"][0]["train"]["loss"])
    state = torch.load(tmp_path / "run" / "out" / "best.pt", weights_only=True)["model"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_run_stage_writes_outputs(two_epoch_run):
    out, returned = two_epoch_run
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage"] == "stage1"
    assert metrics["main_metric"] == "valid/accuracy"
    assert metrics["spec"]["epochs"] == 2
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    # the platform whose rounding the numbers carry: this CPU's kernels, this torch
    assert metrics["platform"] == {"torch": torch.__version__, "device": "cpu",
                                   "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    assert metrics["platform"]["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16", "AMX", "NEON", "SVE256", "ZVECTOR")
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
    _run(tiny_table, tmp_path, epochs=1, fp=FP)
    # published outputs are the record; the resume state (3x the model) is removed
    assert (tmp_path / "run" / "out" / "best.pt").is_file() and not state_dir.exists()

    # an interrupted stage keeps its state...
    real_train = _crash_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tiny_table, tmp_path, epochs=2, fp=FP)
    monkeypatch.setattr(training, "train_one_epoch", real_train)
    assert torch.load(state_dir / "state.pt", weights_only=True)["fingerprint"] == FP

    # ...but a rerun with another config or input does not resume into it
    stale = state_dir / "checkpoints" / "stale-marker.pt"
    stale.write_bytes(b"x")
    caplog.set_level(logging.INFO, logger="labelflow.training")
    metrics = _run(tiny_table, tmp_path, epochs=2, fp={**FP, "data": "d2", "code": "c2"})
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("starting stage stage1 fresh: data, code changed since the saved state") for m in messages)
    assert not any("resuming" in m for m in messages)
    assert sum("stage stage1 epoch 1/2" in m for m in messages) == 1  # trained again from epoch 1
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    assert not stale.exists() and not state_dir.exists()


# --------------------------------------------------------------------------- state, best.pt and top-k after a kill
#
# These tests script run_epoch instead of training: each epoch's valid accuracy is given, and the
# epoch writes its number into the class head's bias, so every checkpoint tells whose weights it
# holds. The epoch takes real optimizer and scheduler steps (the gradient of |w|²/2, so Adam's
# moments carry history), and its valid "loss" is a checksum of the weights it starts from, so a
# resume that loaded the wrong (or half of the) weights, optimizer or scheduler changes the metrics.

MARK = "heads.class.bias"
ACCS = (0.5, 0.8, 0.6, 0.7)  # best: epoch 2; top-3: epochs 2, 4, 3


def _srun(*args, **kwargs) -> dict:
    return _run(*args, tiny_encoder=True, **kwargs)


class Kill(Exception):
    """A simulated kill of the job at a fault point."""


def _script_epochs(monkeypatch, accuracies=ACCS, *, sigterm_at: int | None = None, kill_at: int | None = None):
    def run_epoch(model, loaders, criteria, optimizer, scheduler, device, *, epoch, progress_every, precision):
        if epoch == kill_at:
            raise Kill(f"killed in epoch {epoch}")
        lr = optimizer.param_groups[0]["lr"]
        for _ in range(len(loaders.train)):  # real optimizer and scheduler steps (gradient of |w|²/2)
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = param.detach().clone()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            checksum = sum(float(v.double().sum()) for v in model.state_dict().values() if v.is_floating_point())
            model.state_dict()[MARK].fill_(float(epoch))
        if epoch == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM does, in the middle of the epoch
        return {
            "epoch": epoch, "lr": lr, "seconds": 0.0,
            "train": {"loss": 1.0, "accuracy": 0.5}, "valid": {"loss": checksum, "accuracy": accuracies[epoch - 1]},
        }

    monkeypatch.setattr(training, "run_epoch", run_epoch)


def test_ties_at_the_best_metric_go_to_the_first_epoch_or_the_lowest_valid_loss():
    def record(epoch: int, accuracy: float, loss: float) -> dict:
        return {"epoch": epoch, "valid": {"accuracy": accuracy, "loss": loss}}

    epochs = [(1, 0.9, 0.5), (2, 1.0, 0.40), (3, 1.0, 0.20), (4, 0.95, 0.1), (5, 1.0, 0.30), (6, 1.0, 0.20)]
    first, by_loss = training.StageProgress(), training.StageProgress()
    for epoch in epochs:
        first.add(record(*epoch), "accuracy", top_k=3)
        by_loss.add(record(*epoch), "accuracy", top_k=3, tie_break="valid_loss")
    assert (first.best_epoch, [t["epoch"] for t in first.topk]) == (2, [2, 3, 5])
    # lowest loss among the tied epochs 2, 3, 5, 6: 3 and 6 tie again, the first of them wins
    assert (by_loss.best_epoch, [t["epoch"] for t in by_loss.topk]) == (3, [3, 6, 5])
    assert by_loss.best_value == 1.0
    with pytest.raises(ValueError, match="tie_break='last'"):
        training.StageProgress().add(record(1, 1.0, 0.1), "accuracy", top_k=1, tie_break="last")


def test_run_stage_breaks_ties_by_valid_loss_when_asked(tiny_table, tmp_path, monkeypatch):
    """Epochs 2-4 tie on accuracy with valid losses 0.6, 0.3, 0.4: valid_loss makes epoch 3
    best.pt and keeps 3 and 4 as the top 2; first keeps epoch 2 and 2, 3."""
    _script_epochs(monkeypatch, (0.5, 0.9, 0.9, 0.9))
    scripted = training.run_epoch

    def with_losses(*args, epoch, **kwargs):
        record = scripted(*args, epoch=epoch, **kwargs)
        return {**record, "valid": {**record["valid"], "loss": (0.1, 0.6, 0.3, 0.4)[epoch - 1]}}

    monkeypatch.setattr(training, "run_epoch", with_losses)
    first = _srun(tiny_table, tmp_path, epochs=4, top_k=2, name="first")
    by_loss = _srun(tiny_table, tmp_path, epochs=4, top_k=2, name="by_loss", tie_break="valid_loss")
    assert first["best"]["epoch"] == 2 and by_loss["best"]["epoch"] == 3
    assert _mark(models.load_checkpoint(tmp_path / "first" / "out" / "best.pt")) == 2
    assert _mark(models.load_checkpoint(tmp_path / "by_loss" / "out" / "best.pt")) == 3
    assert sorted(p.name[:9] for p in (tmp_path / "by_loss" / "out" / "checkpoints").iterdir()) == ["epoch=003", "epoch=004"]
    assert sorted(p.name[:9] for p in (tmp_path / "first" / "out" / "checkpoints").iterdir()) == ["epoch=002", "epoch=003"]


def _mark(checkpoint: dict) -> int:
    values = set(checkpoint["model"][MARK].tolist())
    assert len(values) == 1
    return int(values.pop())


def _outputs(out: Path) -> dict:
    """The published outputs, after checking that they agree with each other."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = json.loads((out / "metrics.json").read_text())
    values = {r["epoch"]: r["valid"]["accuracy"] for r in metrics["epochs"]}
    best = models.load_checkpoint(out / "best.pt")
    assert best["epoch"] == metrics["best"]["epoch"] == _mark(best)
    assert metrics["best"]["value"] == max(values.values()) == values[metrics["best"]["epoch"]]
    last = models.load_checkpoint(out / "last.pt")
    assert last["epoch"] == _mark(last) == max(values)
    checkpoints = {}
    for path in sorted((out / "checkpoints").iterdir()):
        ckpt = models.load_checkpoint(path)
        assert ckpt["epoch"] == _mark(ckpt) and ckpt["accuracy"] == values[ckpt["epoch"]]
        assert path.name == f"epoch={ckpt['epoch']:03d}-accuracy={values[ckpt['epoch']]:.4f}.pt"
        checkpoints[path.name] = ckpt["epoch"]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("stage1/valid/accuracy")] == sorted(values)  # each epoch once
    return {"epochs": _epochs_without_seconds(metrics), "best": metrics["best"], "checkpoints": checkpoints}


@pytest.fixture(scope="module")
def scripted_reference(tiny_table, tmp_path_factory):
    """The outputs of an uninterrupted scripted run of ACCS (4 epochs, top-3)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _script_epochs(monkeypatch)
        tmp = tmp_path_factory.mktemp("scripted")
        _srun(tiny_table, tmp, epochs=4, top_k=3)
    outputs = _outputs(tmp / "run" / "out")
    assert outputs["best"] == {"epoch": 2, "value": 0.8}
    assert sorted(outputs["checkpoints"].values()) == [2, 3, 4]
    return outputs


def _state(tmp: Path) -> dict:
    return torch.load(tmp / "run" / "state" / "state.pt", weights_only=True)


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def _trained_epochs(caplog) -> list[int]:
    return [int(m.split(" epoch ")[1].split("/")[0]) for m in _messages(caplog) if m.startswith("stage stage1 epoch ")]


def test_each_epoch_saves_its_state_before_its_checkpoints(tiny_table, tmp_path, monkeypatch):
    _script_epochs(monkeypatch, (0.5, 0.7, 0.6))
    writes = []
    real_state, real_checkpoint = training.save_state, training.save_checkpoint

    def save_state(path, fp, end):
        real_state(path, fp, end)
        writes.append(("state", end.epoch))

    def save_checkpoint(path, model, extra=None):
        saved = torch.load(tmp_path / "run" / "state" / "state.pt", weights_only=True)["epoch"]
        assert saved >= extra["epoch"], f"{path.name} of epoch {extra['epoch']} written before its state"
        real_checkpoint(path, model, extra)
        writes.append((path.parent.name if path.parent.name == "checkpoints" else path.name, extra["epoch"]))

    monkeypatch.setattr(training, "save_state", save_state)
    monkeypatch.setattr(training, "save_checkpoint", save_checkpoint)
    _srun(tiny_table, tmp_path, epochs=3, top_k=2)
    assert writes == [
        ("state", 1), ("best.pt", 1), ("checkpoints", 1),
        ("state", 2), ("best.pt", 2), ("checkpoints", 2),
        ("state", 3), ("checkpoints", 3),  # 0.6: not the best, but it pushes epoch 1 out of the top 2
        ("last.pt", 3),
    ]


def test_state_is_saved_for_checkpoint_epochs_and_the_last_and_otherwise_at_most_every_interval(
    tiny_table, tmp_path, monkeypatch
):
    _script_epochs(monkeypatch, (0.7, 0.5, 0.4, 0.45, 0.3))
    saved = []
    real_state = training.save_state
    monkeypatch.setattr(training, "save_state", lambda path, fp, end: (real_state(path, fp, end), saved.append(end.epoch)))
    throttled = _srun(tiny_table, tmp_path, epochs=5, top_k=0, state_every_seconds=3600)
    assert saved == [1, 5]  # epoch 1 writes best.pt; 2-4 write nothing; 5 is the last
    saved.clear()
    every = _srun(tiny_table, tmp_path, epochs=5, top_k=0, name="every")
    assert saved == [1, 2, 3, 4, 5]
    assert _epochs_without_seconds(throttled) == _epochs_without_seconds(every)

    # killed in epoch 4 with the state at epoch 1: the rerun replays 2-4 and ends the same
    _script_epochs(monkeypatch, (0.7, 0.5, 0.4, 0.45, 0.3), kill_at=4)
    with pytest.raises(Kill):
        _srun(tiny_table, tmp_path, epochs=5, top_k=0, name="killed", state_every_seconds=3600)
    assert torch.load(tmp_path / "killed" / "state" / "state.pt", weights_only=True)["epoch"] == 1
    _script_epochs(monkeypatch, (0.7, 0.5, 0.4, 0.45, 0.3))
    resumed = _srun(tiny_table, tmp_path, epochs=5, top_k=0, name="killed", state_every_seconds=3600)
    assert _epochs_without_seconds(resumed) == _epochs_without_seconds(every)


def _kill_at_best_pt(monkeypatch, epoch):
    real = training.save_checkpoint

    def save_checkpoint(path, model, extra=None):
        if path.name == "best.pt" and extra["epoch"] == epoch:
            raise Kill(f"killed before best.pt of epoch {epoch}")
        real(path, model, extra)

    monkeypatch.setattr(training, "save_checkpoint", save_checkpoint)


def _kill_after_state(monkeypatch, epoch):
    real = training.save_state

    def save_state(path, fp, end):
        real(path, fp, end)
        if end.epoch == epoch:
            raise Kill(f"killed after the state of epoch {epoch}")

    monkeypatch.setattr(training, "save_state", save_state)


def _kill_before_delete(monkeypatch, epoch):
    real = training.remove_unlisted_checkpoints

    def remove(state_dir, topk):
        if max(t["epoch"] for t in topk) == epoch:
            raise Kill(f"killed before deleting what fell out of the top k in epoch {epoch}")
        real(state_dir, topk)

    monkeypatch.setattr(training, "remove_unlisted_checkpoints", remove)


# fault point, then (best.pt's epoch, epochs of the files in checkpoints/) the kill leaves at epoch 4
KILLS = {
    "after-state": (_kill_after_state, 2, [2, 3]),
    "before-best": (_kill_at_best_pt, 2, [2, 3]),  # no new best at epoch 4: best.pt is still fine
    "before-delete": (_kill_before_delete, 2, [1, 2, 3, 4]),
}


@pytest.mark.parametrize("fault", KILLS)
def test_kill_between_state_and_checkpoints_is_reconciled_on_resume(
    fault, tiny_table, tmp_path, monkeypatch, caplog, scripted_reference
):
    kill, best_left, files_left = KILLS[fault]
    _script_epochs(monkeypatch)
    kill(monkeypatch, 4 if fault == "before-delete" else 2)
    with pytest.raises(Kill):
        _srun(tiny_table, tmp_path, epochs=4, top_k=3)
    state_dir = tmp_path / "run" / "state"
    state = _state(tmp_path)
    names = sorted(p.name for p in (state_dir / "checkpoints").iterdir())
    if fault == "before-delete":  # state and files of epoch 4 written, epoch 1's not yet deleted
        assert state["epoch"] == 4 and [t["epoch"] for t in state["topk"]] == [2, 4, 3]
        assert [int(n[6:9]) for n in names] == files_left
        assert models.load_checkpoint(state_dir / "best.pt")["epoch"] == best_left
    else:  # the state says epoch 2 is the best and in the top k; best.pt and its file lag behind
        assert state["epoch"] == 2 and state["best_epoch"] == 2
        assert [t["epoch"] for t in state["topk"]] == [2, 1]
        assert models.load_checkpoint(state_dir / "best.pt")["epoch"] == 1
        assert [int(n[6:9]) for n in names] == [1]

    monkeypatch.undo()
    _script_epochs(monkeypatch)
    caplog.set_level(logging.INFO, logger="labelflow.training")
    _srun(tiny_table, tmp_path, epochs=4, top_k=3)
    messages = _messages(caplog)
    if fault != "before-delete":
        assert "best.pt did not hold the saved best epoch 2: rewrote it from the saved state" in messages
        assert any(m.startswith("top-k checkpoint epoch=002-accuracy=0.8000.pt of the saved last epoch was missing") for m in messages)
        assert _trained_epochs(caplog) == [3, 4]
    else:
        assert _trained_epochs(caplog) == []  # all 4 epochs were saved: only publishing was left
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    assert _outputs(tmp_path / "run" / "out") == scripted_reference


def _stop_after_epoch_3(tiny_table, tmp_path, monkeypatch) -> Path:
    """A run of ACCS killed in epoch 4: state of epoch 3, best epoch 2, top-3 epochs 2, 3, 1."""
    _script_epochs(monkeypatch, kill_at=4)
    with pytest.raises(Kill):
        _srun(tiny_table, tmp_path, epochs=4, top_k=3)
    _script_epochs(monkeypatch)
    state_dir = tmp_path / "run" / "state"
    assert _state(tmp_path)["best_epoch"] == 2
    assert sorted(p.name[:9] for p in (state_dir / "checkpoints").iterdir()) == ["epoch=001", "epoch=002", "epoch=003"]
    return state_dir


def test_lost_checkpoint_files_are_rewritten_or_dropped_and_strays_removed(
    tiny_table, tmp_path, monkeypatch, caplog, scripted_reference
):
    state_dir = _stop_after_epoch_3(tiny_table, tmp_path, monkeypatch)
    checkpoints = state_dir / "checkpoints"
    (checkpoints / "epoch=001-accuracy=0.5000.pt").unlink()  # an older epoch: weights gone
    (checkpoints / "epoch=003-accuracy=0.6000.pt").unlink()  # the last epoch: the state has them
    (checkpoints / "stray.pt").write_bytes(b"x")
    (checkpoints / ".epoch=004-accuracy=0.7000.pt.tmp-0123").write_bytes(b"half")
    caplog.set_level(logging.INFO, logger="labelflow.training")
    _srun(tiny_table, tmp_path, epochs=4, top_k=3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"top-k checkpoint {checkpoints / 'epoch=001-accuracy=0.5000.pt'} is missing; dropped from the top-k list"]
    assert any(m.startswith("top-k checkpoint epoch=003-accuracy=0.6000.pt of the saved last epoch was missing") for m in _messages(caplog))
    assert _trained_epochs(caplog) == [4]
    # epoch 1 would have left the top 3 at epoch 4 anyway: the outputs are the uninterrupted ones
    assert _outputs(tmp_path / "run" / "out") == scripted_reference


@pytest.mark.parametrize("damage", ["missing", "garbled", "other-epoch"])
def test_best_pt_of_an_earlier_epoch_is_restored_from_its_topk_copy(
    damage, tiny_table, tmp_path, monkeypatch, caplog, scripted_reference
):
    state_dir = _stop_after_epoch_3(tiny_table, tmp_path, monkeypatch)
    best = state_dir / "best.pt"
    if damage == "missing":
        best.unlink()
    elif damage == "garbled":
        best.write_bytes(best.read_bytes()[:1000])
    else:
        shutil.copyfile(state_dir / "checkpoints" / "epoch=003-accuracy=0.6000.pt", best)
    caplog.set_level(logging.INFO, logger="labelflow.training")
    _srun(tiny_table, tmp_path, epochs=4, top_k=3)
    assert "best.pt did not hold the saved best epoch 2: rewrote it from epoch=002-accuracy=0.8000.pt" in _messages(caplog)
    assert _trained_epochs(caplog) == [4]
    assert _outputs(tmp_path / "run" / "out") == scripted_reference


def _fresh_start_warning(caplog, state_dir: Path, problem: str) -> Path:
    """The warning of a state moved aside; returns where it went."""
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    head = f"cannot resume stage stage1 from {state_dir / 'state.pt'}: "
    assert warnings[0].startswith(head) and problem in warnings[0], warnings[0]
    moved = Path(warnings[0].split("; moved it to ")[1].split(" and starting the stage fresh")[0])
    assert moved.parent == state_dir.parent and moved.name.startswith("state.state.pt.corrupt-")
    return moved


def test_state_whose_best_weights_are_lost_is_moved_aside(tiny_table, tmp_path, monkeypatch, caplog, scripted_reference):
    state_dir = _stop_after_epoch_3(tiny_table, tmp_path, monkeypatch)
    (state_dir / "best.pt").unlink()
    (state_dir / "checkpoints" / "epoch=002-accuracy=0.8000.pt").unlink()
    caplog.set_level(logging.INFO, logger="labelflow.training")
    _srun(tiny_table, tmp_path, epochs=4, top_k=3)
    moved = _fresh_start_warning(caplog, state_dir, "best.pt does not hold its best epoch 2 and no top-k copy of it is left")
    assert torch.load(moved, weights_only=True)["epoch"] == 3
    assert _trained_epochs(caplog) == [1, 2, 3, 4]
    assert _outputs(tmp_path / "run" / "out") == scripted_reference


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_state(edit):
    def apply(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)

    return apply


CORRUPTIONS = {
    "truncated": (_truncate, "cannot read it ("),
    "empty": (lambda p: p.write_bytes(b""), "cannot read it ("),
    "not-a-dict": (lambda p: torch.save(torch.zeros(3), p), "it holds a Tensor, not a state dict"),
    "missing-key": (_edit_state(lambda s: s.pop("optimizer")), "it lacks ['optimizer']"),
    "wrong-shape": (_edit_state(lambda s: s["model"].update({MARK: torch.zeros(5)})), f"its model tensor {MARK} has shape (5,)"),
    "missing-tensor": (_edit_state(lambda s: s["model"].pop(MARK)), "its model tensors are not this model's"),
    "optimizer": (_edit_state(lambda s: s["optimizer"]["param_groups"][0]["params"].pop()), "its optimizer has other parameter groups"),
    "optimizer-state": (
        _edit_state(lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(99))),
        "its optimizer exp_avg of parameter 0 has shape (99,)",
    ),
    "scheduler": (_edit_state(lambda s: s["scheduler"].pop("last_epoch")), "its scheduler state is not this scheduler's"),
    "history": (_edit_state(lambda s: s.update(epoch=7)), "does not run from 1 to its epoch 7"),
    "malformed": (_edit_state(lambda s: s.update(history=[{"no": "epoch"}])), "it is malformed (KeyError"),
    "topk-no-file": (_edit_state(lambda s: s["topk"][-1].pop("file")), "it is malformed (KeyError: 'file')"),
    "topk-epoch": (_edit_state(lambda s: s["topk"][-1].update(epoch=9)), "its top-k entry {'epoch': 9"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_unusable_state_is_moved_aside_and_the_stage_starts_fresh(
    corruption, tiny_table, tmp_path, monkeypatch, caplog, scripted_reference
):
    corrupt, problem = CORRUPTIONS[corruption]
    state_dir = _stop_after_epoch_3(tiny_table, tmp_path, monkeypatch)
    corrupt(state_dir / "state.pt")
    corrupted = (state_dir / "state.pt").read_bytes()
    caplog.set_level(logging.INFO, logger="labelflow.training")
    _srun(tiny_table, tmp_path, epochs=4, top_k=3)  # no crash: the second try is a fresh start
    moved = _fresh_start_warning(caplog, state_dir, problem)
    assert moved.read_bytes() == corrupted  # kept for inspection, beside the state folder
    assert _trained_epochs(caplog) == [1, 2, 3, 4]
    assert not any("resuming" in m for m in _messages(caplog))
    # nothing was loaded from it: the metrics (valid loss is a checksum of the weights) are a fresh run's
    assert _outputs(tmp_path / "run" / "out") == scripted_reference
    assert not state_dir.exists()


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_mid_epoch_stops_at_once_and_a_rerun_resumes(
    tiny_table, tmp_path, monkeypatch, caplog, scripted_reference
):
    before = signal.getsignal(signal.SIGTERM)
    _script_epochs(monkeypatch, sigterm_at=3)
    caplog.set_level(logging.INFO, logger="labelflow.training")
    with pytest.raises(SystemExit) as exit_info:
        _srun(tiny_table, tmp_path, epochs=4, top_k=3)
    assert exit_info.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == before
    state_dir = tmp_path / "run" / "state"
    assert (
        f"stage stage1 terminated by SIGTERM; epochs up to 2 are saved in {state_dir} and a rerun "
        "(snakemake --rerun-incomplete) resumes at epoch 3" in _messages(caplog)
    )
    assert _state(tmp_path)["epoch"] == 2 and _trained_epochs(caplog) == [1, 2]  # epoch 3 was cut off

    caplog.clear()
    _script_epochs(monkeypatch)
    _srun(tiny_table, tmp_path, epochs=4, top_k=3)
    assert "resuming stage stage1 at epoch 3 from " + str(state_dir / "state.pt") in _messages(caplog)
    assert _outputs(tmp_path / "run" / "out") == scripted_reference


def test_sigterm_while_the_state_is_written_lets_the_epoch_finish(
    tiny_table, tmp_path, monkeypatch, caplog, scripted_reference
):
    _script_epochs(monkeypatch)
    state_path = tmp_path / "run" / "state" / "state.pt"
    real_replace, saves = os.replace, []

    def replace(src, dst):  # the temp file of the state is written; SIGTERM before its rename
        if Path(dst) == state_path:
            saves.append(Path(src).stat().st_size)
            if len(saves) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    caplog.set_level(logging.INFO, logger="labelflow.training")
    with pytest.raises(SystemExit) as exit_info:
        _srun(tiny_table, tmp_path, epochs=4, top_k=3)
    assert exit_info.value.code == 143 and len(saves) == 2
    # the epoch's state and checkpoints were completed before the job stopped
    assert any(m.startswith("stage stage1 terminated by SIGTERM; epochs up to 2 are saved") for m in _messages(caplog))
    assert _state(tmp_path)["epoch"] == 2
    assert models.load_checkpoint(state_path.parent / "best.pt")["epoch"] == 2
    assert sorted(p.name[:9] for p in (state_path.parent / "checkpoints").iterdir()) == ["epoch=001", "epoch=002"]

    monkeypatch.setattr(os, "replace", real_replace)
    caplog.clear()
    _srun(tiny_table, tmp_path, epochs=4, top_k=3)
    assert _trained_epochs(caplog) == [3, 4]
    assert _outputs(tmp_path / "run" / "out") == scripted_reference


def test_sigterm_while_publishing_lets_the_stage_finish(tiny_table, tmp_path, monkeypatch, caplog, scripted_reference):
    _script_epochs(monkeypatch)
    real_publish = training.publish

    def publish(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        real_publish(*args, **kwargs)

    monkeypatch.setattr(training, "publish", publish)
    caplog.set_level(logging.INFO, logger="labelflow.training")
    metrics = _srun(tiny_table, tmp_path, epochs=4, top_k=3)  # returns: no SystemExit
    assert metrics["best"] == scripted_reference["best"]
    assert "SIGTERM arrived while stage stage1 was publishing its outputs; finished them first" in _messages(caplog)
    assert _outputs(tmp_path / "run" / "out") == scripted_reference
    assert not (tmp_path / "run" / "state").exists()


# --------------------------------------------------------------------------- fingerprint parts


def test_changed_parts_names_what_differs_in_order():
    now = {"recipe": "r", "data": "d2", "init": None, "folds": [0], "seed": 1, "code": "0.1.0+b"}
    assert training.changed_parts(dict(now), now) == []
    saved = {**now, "data": "d1", "code": "0.1.0+a", "folds": [0]}
    assert training.changed_parts(saved, now) == ["data", "code"]
    assert training.changed_parts({**now, "seed": 2, "extra": 1}, now) == ["seed", "extra"]
    assert training.changed_parts({k: v for k, v in now.items() if k != "init"}, now) == ["init"]
    assert training.changed_parts("0123456789abcdef", now) == ["fingerprint format"]  # older labelflow


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """dataset.csv (with each image's sha1), tag2cls.json and the image root of a tiny run."""
    from labelflow.dataset import split, tag2label
    from labelflow.io import write_csv_atomic, write_json_atomic

    base = tmp_path_factory.mktemp("run_inputs")
    root = make_tiny_dataset(base / "images", per_class=6)
    scanned = tag2label(root)
    table = split(scanned.dataset, scanned.tag2cls, n_folds=3, seed=SEED)
    table["sha1"] = scanned.dataset.set_index("path").loc[table["path"], "sha1"].to_numpy()
    write_csv_atomic(table, base / "dataset.csv")
    write_json_atomic(scanned.tag2cls, base / "tag2cls.json")
    return base, root


def test_stage_fingerprint_has_named_parts_and_each_input_changes_its_own(run_inputs, tmp_path):
    import copy

    import pandas as pd

    from conftest import validated_experiment
    from labelflow.experiment import StageSetup, prepare_stage
    from workflow_helpers import TINY_EXPERIMENT

    base, root = run_inputs
    experiment = validated_experiment(TINY_EXPERIMENT)
    setup = StageSetup(base / "dataset.csv", base / "tag2cls.json", root, experiment, "stage1", [0], SEED)
    prepared = prepare_stage(setup)
    fp = prepared.fingerprint
    assert list(fp) == ["recipe", "data", "init", "folds", "seed", "weights", "code"]
    assert (fp["init"], fp["folds"], fp["seed"]) == (None, {"valid": [0], "calibration_share": 0.0}, SEED)
    assert fp["weights"] == experiment["model"]["weights"] and fp["code"].startswith(f"{labelflow.__version__}+")

    def changed(lr: float | None = None, **changes) -> list[str]:
        return training.changed_parts(fp, prepare_stage(replace(setup, **changes), lr=lr).fingerprint)

    assert changed() == []
    assert changed(seed=SEED + 1) == ["seed"]
    assert changed(valid_folds=[1]) == ["folds"]
    assert changed(calibration_share=0.5) == ["folds"]
    assert changed(lr=0.123) == ["recipe"]  # an LR finder suggestion is part of the recipe
    other = copy.deepcopy(experiment)
    other["data"]["augmentations"] = []
    assert changed(experiment=other) == ["recipe"]
    # encoder weights from a file: its name and its bytes count
    weights = tmp_path / "encoder.pt"
    torch.save(prepared.model.encoder.state_dict(), weights)
    other = copy.deepcopy(experiment)
    other["model"]["weights"] = str(weights)
    assert changed(experiment=other) == ["weights"]
    with_file = prepare_stage(replace(setup, experiment=other)).fingerprint
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in prepared.model.encoder.state_dict().items()}, weights)
    assert training.changed_parts(with_file, prepare_stage(replace(setup, experiment=other)).fingerprint) == ["weights"]
    # an image replaced by other content (same path): its sha1 in the table, and so `data`, changes
    table = pd.read_csv(base / "dataset.csv", dtype=str)
    table.loc[0, "sha1"] = "0" * 40
    table.to_csv(tmp_path / "dataset.csv", index=False)
    assert changed(dataset_csv=tmp_path / "dataset.csv") == ["data"]
    models.save_checkpoint(tmp_path / "init.pt", prepared.model)
    assert changed(init_checkpoint=tmp_path / "init.pt") == ["init"]


def test_infer_scores_the_rotation_heads_on_the_validation_images_and_codes_of_training(run_inputs, tmp_path):
    """With images held out for calibration, heads.csv still holds the valid images alone, each
    under the rotation code training validation gave it (codes are seeded by position)."""
    import pandas as pd

    from conftest import validated_experiment
    from labelflow.experiment import StageSetup, infer, prepare_stage
    from workflow_helpers import tiny_experiment

    base, root = run_inputs
    experiment = validated_experiment(tiny_experiment({"name": "class"}, {"name": "rotation"}))
    setup = StageSetup(base / "dataset.csv", base / "tag2cls.json", root, experiment, "stage1", [0], SEED,
                       calibration_share=0.5)  # fmt: skip
    prepared = prepare_stage(setup)
    valid = prepared.loaders.valid.dataset
    expected = [(str(valid.paths[i]), int(valid[i]["rotation"])) for i in range(len(valid))]
    models.save_checkpoint(tmp_path / "best.pt", prepared.model)
    infer(
        checkpoint=tmp_path / "best.pt", dataset_csv=base / "dataset.csv", tag2cls_json=base / "tag2cls.json", root=root,
        experiment=experiment, valid_folds=[0], seed=SEED, out_dir=tmp_path / "predictions", calibration_share=0.5,
    )
    predictions = pd.read_csv(tmp_path / "predictions/predictions.csv")
    assert (predictions["split"] == "calibration").any()
    heads = pd.read_csv(tmp_path / "predictions/heads.csv")
    assert list(zip(heads["path"], heads["true"])) == expected


def test_a_resumed_stage_draws_its_batches_as_the_saved_epochs_did(run_inputs, tmp_path, monkeypatch, caplog):
    """data.num_workers: auto plans workers from the job's threads (and cache: auto from the
    memory it finds), so a rerun can plan otherwise than the killed job did; the resumed epochs
    still replay the uninterrupted run: the state records how batches were drawn."""
    import cv2

    from conftest import validated_experiment
    from labelflow import device
    from labelflow.experiment import StageSetup, train_stage
    from workflow_helpers import TINY_EXPERIMENT

    base, root = run_inputs
    experiment = validated_experiment({**TINY_EXPERIMENT, "data": {**TINY_EXPERIMENT["data"], "cache": False},
                                       "stages": {**TINY_EXPERIMENT["stages"], "stage2": {"epochs": 3, "lr": 0.003, "batch_size": 4}}})  # fmt: skip
    assert experiment["data"]["num_workers"] == "auto"
    setup = StageSetup(base / "dataset.csv", base / "tag2cls.json", root, experiment, "stage2", [0], SEED)
    before, before_cv2 = torch.get_num_threads(), cv2.getNumThreads()
    monkeypatch.setattr(device, "_job_threads", None)
    caplog.set_level(logging.INFO)

    def train(name: str, threads: int) -> dict:
        device.set_job_threads(threads)  # 4 threads: 2 workers + 2 compute; 2 threads: no workers + 2
        return train_stage(setup, out_dir=tmp_path / name / "out", state_dir=tmp_path / name / "state")

    try:
        full = train("full", 4)
        assert "2 worker process(es), 2 compute thread(s)" in caplog.text
        real_train = _crash_in_epoch(monkeypatch, 3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train("killed", 4)
        saved = torch.load(tmp_path / "killed/state/state.pt", weights_only=True)
        assert saved["batch_order"] == "seeded"
        assert training.saved_batch_order(tmp_path / "killed/state", saved["fingerprint"]) == "seeded"
        assert training.saved_batch_order(tmp_path / "killed/state", {**saved["fingerprint"], "seed": SEED + 1}) is None
        monkeypatch.setattr(training, "train_one_epoch", real_train)
        caplog.clear()
        resumed = train("killed", 2)  # planned afresh: no workers (2 threads)
    finally:
        torch.set_num_threads(before)
        cv2.setNumThreads(before_cv2)
    assert "resuming stage stage2 at epoch 3" in caplog.text
    assert "0 worker process(es), 2 compute thread(s)" in caplog.text and "seeded batches as in the saved epochs" in caplog.text
    assert _epochs_without_seconds(resumed) == _epochs_without_seconds(full)
    full_last = models.load_checkpoint(tmp_path / "full/out/last.pt")["model"]
    for key, value in models.load_checkpoint(tmp_path / "killed/out/last.pt")["model"].items():
        assert torch.equal(full_last[key], value), key


def test_resuming_a_state_whose_batches_were_drawn_otherwise_warns(tiny_table, tmp_path, monkeypatch, caplog):
    """run_stage called directly with a loader that draws its batches otherwise than the saved
    epochs did (the workflow never does: prepare_stage reads the saved order first) resumes,
    and the log says the result will differ from an uninterrupted run's."""
    _script_epochs(monkeypatch, (0.5, 0.6, 0.7), kill_at=3)
    with pytest.raises(Kill):
        _srun(tiny_table, tmp_path, epochs=3, top_k=1, name="killed")
    state_path = tmp_path / "killed" / "state" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["batch_order"] == "sampler"  # _run's loaders have no workers
    torch.save({**state, "batch_order": "seeded"}, state_path)
    _script_epochs(monkeypatch, (0.5, 0.6, 0.7))
    caplog.set_level(logging.INFO, logger="labelflow.training")
    resumed = _srun(tiny_table, tmp_path, epochs=3, top_k=1, name="killed")
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("drew their batches as 'seeded', the resumed ones draw them as 'sampler'" in w for w in warnings)


def test_resuming_a_state_saved_on_another_platform_warns(tiny_table, tmp_path, monkeypatch, caplog):
    """A state saved on another CPU kind (or torch) resumes, and the log names what differs:
    the resumed epochs round differently, so no uninterrupted run gives the same result."""
    _script_epochs(monkeypatch, (0.5, 0.6, 0.7), kill_at=3)
    with pytest.raises(Kill):
        _srun(tiny_table, tmp_path, epochs=3, top_k=1, name="killed")
    state_path = tmp_path / "killed" / "state" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    here = state["platform"]
    assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    torch.save({**state, "platform": {**here, "cpu_capability": "OTHER"}}, state_path)
    _script_epochs(monkeypatch, (0.5, 0.6, 0.7))
    caplog.set_level(logging.INFO, logger="labelflow.training")
    resumed = _srun(tiny_table, tmp_path, epochs=3, top_k=1, name="killed")
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3] and resumed["platform"] == here
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"saved epochs ran on another platform (cpu_capability OTHER -> {here['cpu_capability']})" in w
               for w in warnings), warnings
    # the same platform (or a state from before platforms were saved) resumes without it
    caplog.clear()
    _script_epochs(monkeypatch, (0.5, 0.6, 0.7), kill_at=3)
    with pytest.raises(Kill):
        _srun(tiny_table, tmp_path, epochs=3, top_k=1, name="again")
    state_path = tmp_path / "again" / "state" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "platform"}, state_path)
    _script_epochs(monkeypatch, (0.5, 0.6, 0.7))
    _srun(tiny_table, tmp_path, epochs=3, top_k=1, name="again")
    assert not any("another platform" in r.getMessage() for r in caplog.records)
