"""Human corrections (labelflow.corrections) where they meet other tables: the raw copies of a
corrected clean image, a file holding rows of several tables, paths with spaces, answered raw
copies of clean images, and held-out (test) images."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import make_tiny_dataset
from labelflow.corrections import (
    HUMAN_CORRECTED,
    IN_TEST_SET,
    LEFT_OUT,
    apply_autolabel_corrections,
    apply_corrections,
    applying_rows_digest,
    read_corrections,
)
from labelflow.dataset import DEFAULT_DUPLICATES
from labelflow.heldout import HeldOutSettings, write_held_out_table
from labelflow.io import DatasetError
from workflow_helpers import job_counts, run_snakemake, write_tiny_config

TAG2CLS = {"cat": 0, "dog": 1, "fox": 2}


def corrections(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["path", "label"])


def piles() -> tuple[pd.DataFrame, pd.DataFrame]:
    """human.csv and raw.csv of an autolabel root: raw/a.png copies clean/cat/a.png, raw/ab.png
    copies two clean images (cat and dog: unlabelled), raw/ac.png two cats."""
    human = pd.DataFrame(
        {
            "path": ["clean/cat/a.png", "clean/cat/c.png", "clean/dog/b.png", "clean/fox/e.png"],
            "tag": ["cat", "cat", "dog", "fox"],
            "class": [0, 0, 1, 2],
            "fold": [0, 0, 1, 2],
            "sha1": ["a", "c", "b", "e"],
            "group": [0, 0, 1, 2],
        }
    )
    raw = pd.DataFrame(
        {
            "path": ["raw/a.png", "raw/ab.png", "raw/ac.png", "raw/new.png"],
            "sha1": ["ra", "rab", "rac", "rn"],
            "duplicate_of": ["clean/cat/a.png", "clean/cat/a.png;clean/dog/b.png", "clean/cat/a.png;clean/cat/c.png", None],
            "tag": ["cat", None, "cat", None],
        }
    )
    return human, raw


# --------------------------------------------------------------------------- bug 1


def test_raw_copies_follow_their_corrected_or_dropped_clean_images():
    human, raw = piles()
    _, out, _ = apply_autolabel_corrections(human, raw, corrections([("clean/cat/a.png", "dog")]), TAG2CLS)
    tags = out.set_index("path")["tag"].fillna("").to_dict()
    # the copy takes the new label; raw/ab.png's copies now agree (dog, dog); raw/ac.png's disagree
    assert tags == {"raw/a.png": "dog", "raw/ab.png": "dog", "raw/ac.png": "", "raw/new.png": ""}

    _, out, _ = apply_autolabel_corrections(human, raw, corrections([("clean/cat/a.png", "drop")]), TAG2CLS)
    rows = out.set_index("path").fillna("")
    # no clean copy left: unlabelled, and the dropped image is named nowhere
    assert rows.loc["raw/a.png", "tag"] == "" and rows.loc["raw/a.png", "duplicate_of"] == ""
    assert rows.loc["raw/ab.png", "tag"] == "dog" and rows.loc["raw/ab.png", "duplicate_of"] == "clean/dog/b.png"
    assert rows.loc["raw/ac.png", "tag"] == "cat" and rows.loc["raw/ac.png", "duplicate_of"] == "clean/cat/c.png"


def test_raw_copies_keep_their_tags_without_corrections_of_clean_images():
    human, raw = piles()
    _, out, _ = apply_autolabel_corrections(human, raw, corrections([("raw/new.png", "fox")]), TAG2CLS)
    assert out["tag"].fillna("").tolist() == ["cat", "", "cat", ""]
    assert out["duplicate_of"].fillna("").tolist() == raw["duplicate_of"].fillna("").tolist()


# --------------------------------------------------------------------------- bug 2


def test_one_file_holds_main_and_autolabel_rows_of_different_classes():
    """Each table checks the labels of its own rows only: the autolabel classes (from clean/)
    and the main dataset's differ."""
    main = pd.DataFrame({"path": ["wolf/1.png", "wolf/2.png"], "tag": ["wolf", "wolf"], "class": [0, 0], "fold": [0, 1]})
    human, raw = piles()
    both = corrections([("wolf/1.png", "bear"), ("clean/cat/a.png", "fox"), ("raw/new.png", "dog")])
    out, report = apply_corrections(main, both, {"wolf": 0, "bear": 1})
    assert out.set_index("path").loc["wolf/1.png", "tag"] == "bear"
    assert report.set_index("path")["action"].to_dict() == {
        "wolf/1.png": "relabelled", "clean/cat/a.png": "not found", "raw/new.png": "not found",
    }  # fmt: skip
    human_out, _, report = apply_autolabel_corrections(human, raw, both, TAG2CLS)
    assert human_out.set_index("path").loc["clean/cat/a.png", "tag"] == "fox"
    assert report.set_index("path").loc["wolf/1.png", "action"] == "not found"
    # a multilabel main dataset's row does not trip the autolabel piles' single-label check
    multi = corrections([("wolf/1.png", "bear;wolf"), ("clean/cat/a.png", "fox")])
    apply_autolabel_corrections(human, raw, multi, TAG2CLS)
    with pytest.raises(DatasetError, match="unknown class"):  # a found row's label is still checked
        apply_corrections(main, corrections([("wolf/1.png", "fox")]), {"wolf": 0, "bear": 1})


# --------------------------------------------------------------------------- bug 3


def test_paths_with_leading_or_trailing_spaces_are_corrected(tmp_path):
    table = pd.DataFrame({"path": [" cat/a.png", "cat/b .png", "cat/c.png"], "tag": ["cat"] * 3, "class": [0] * 3})
    csv = tmp_path / "corrections.csv"
    csv.write_text("path,label\n cat/a.png, dog \ncat/b .png,fox\n./cat/c.png,drop\n")
    read = read_corrections(csv)
    assert read["path"].tolist() == [" cat/a.png", "cat/b .png", "cat/c.png"] and read["label"].tolist() == ["dog", "fox", "drop"]
    out, report = apply_corrections(table, read, TAG2CLS)
    assert out.set_index("path")["tag"].to_dict() == {" cat/a.png": "dog", "cat/b .png": "fox"}
    assert set(report["action"]) == {"relabelled", "dropped"}


# --------------------------------------------------------------------------- bug 4


def test_an_answered_copy_of_clean_images_takes_their_fold_and_group():
    human, raw = piles()
    fixes = corrections([("raw/a.png", "cat"), ("raw/ac.png", "dog"), ("raw/new.png", "fox")])
    human_out, raw_out, report = apply_autolabel_corrections(human, raw, fixes, TAG2CLS)
    rows = human_out.set_index("path")
    # validates (fold 0) and trains together with clean/cat/a.png, never while it validates
    assert rows.loc["raw/a.png", ["fold", "group", "source"]].tolist() == [0, 0, HUMAN_CORRECTED]
    assert rows.loc["raw/ac.png", ["tag", "fold", "group"]].tolist() == ["dog", 0, 0]
    # no clean copy: trains from round 0, never validates, a group of its own
    assert rows.loc["raw/new.png", ["fold", "group"]].tolist() == [-1, 3]
    assert human_out["fold"].dtype == "int64" and human_out["group"].dtype == "int64"
    assert raw_out.set_index("path")["tag"].fillna("").to_dict() == {"raw/a.png": "", "raw/ab.png": "", "raw/ac.png": "", "raw/new.png": ""}
    assert set(report["action"]) == {"relabelled"}


def test_an_answered_copy_of_clean_images_in_several_folds_is_left_out():
    human, raw = piles()
    human_out, raw_out, report = apply_autolabel_corrections(human, raw, corrections([("raw/ab.png", "dog")]), TAG2CLS)
    assert "raw/ab.png" not in set(human_out["path"])  # folds 0 and 1: it would leak into one of them
    assert report.set_index("path").loc["raw/ab.png", "action"] == LEFT_OUT
    assert raw_out.set_index("path").loc["raw/ab.png", "duplicate_of"] == "clean/cat/a.png;clean/dog/b.png"
    # its clean copies were dropped: nothing to leak into, so it trains (fold -1) with a group of its own
    fixes = corrections([("raw/ab.png", "dog"), ("clean/cat/a.png", "drop"), ("clean/dog/b.png", "drop")])
    human_out, _, report = apply_autolabel_corrections(human, raw, fixes, TAG2CLS)
    assert human_out.set_index("path").loc["raw/ab.png", ["fold", "group"]].tolist() == [-1, 3]
    assert report.set_index("path").loc["raw/ab.png", "action"] == "relabelled"


def test_an_answered_copy_of_clean_images_in_several_groups_of_one_fold_is_left_out():
    """Joining one of its clean copies' groups, the answer could sit on one side of the
    checkpoint-selection/calibration split while another group's copy sits on the other."""
    human, raw = piles()
    extra = {"path": "clean/cat/d.png", "tag": "cat", "class": 0, "fold": 0, "sha1": "d", "group": 3}  # fold 0, group 3
    human = pd.concat([human, pd.DataFrame([extra])], ignore_index=True)
    copy = {"path": "raw/ad.png", "sha1": "rad", "duplicate_of": "clean/cat/a.png;clean/cat/d.png", "tag": "cat"}
    raw = pd.concat([raw, pd.DataFrame([copy])], ignore_index=True)
    fixes = corrections([("raw/ad.png", "dog"), ("raw/ac.png", "dog")])
    human_out, raw_out, report = apply_autolabel_corrections(human, raw, fixes, TAG2CLS)
    action = report.set_index("path")["action"]
    assert "raw/ad.png" not in set(human_out["path"]) and action["raw/ad.png"] == LEFT_OUT
    assert raw_out.set_index("path").loc["raw/ad.png", ["tag", "duplicate_of"]].tolist() == ["cat", copy["duplicate_of"]]
    # raw/ac.png's copies share fold 0 and group 0: it joins them
    assert action["raw/ac.png"] == "relabelled" and human_out.set_index("path").loc["raw/ac.png", ["fold", "group"]].tolist() == [0, 0]
    # once one group is left (clean/cat/d.png dropped), the answer joins it
    fixes = corrections([("raw/ad.png", "dog"), ("clean/cat/d.png", "drop")])
    human_out, _, report = apply_autolabel_corrections(human, raw, fixes, TAG2CLS)
    assert human_out.set_index("path").loc["raw/ad.png", ["tag", "fold", "group"]].tolist() == ["dog", 0, 0]
    assert report.set_index("path").loc["raw/ad.png", "action"] == "relabelled"


# --------------------------------------------------------------------------- path spellings


def test_corrections_paths_are_normalised_and_a_stray_space_falls_back_to_the_stripped_path(tmp_path, caplog):
    csv = tmp_path / "corrections.csv"
    csv.write_text("path,label\ncat//a.png,dog\n./cat/./b.png,fox\ncat/c.png ,dog\n cat/d.png,fox\ncat/e.png ,drop\n")
    read = read_corrections(csv)
    assert read["path"].tolist() == ["cat/a.png", "cat/b.png", "cat/c.png ", " cat/d.png", "cat/e.png "]
    # "cat/e.png " is a file of its own (exact match first); the others exist only without spaces
    names = ["cat/a.png", "cat/b.png", "cat/c.png", "cat/d.png", "cat/e.png", "cat/e.png "]
    table = pd.DataFrame({"path": names, "tag": "cat", "class": 0, "fold": 0})
    with caplog.at_level("WARNING", logger="labelflow.corrections"):
        out, report = apply_corrections(table, read, TAG2CLS)
    assert out.set_index("path")["tag"].to_dict() == {
        "cat/a.png": "dog", "cat/b.png": "fox", "cat/c.png": "dog", "cat/d.png": "fox", "cat/e.png": "cat",
    }  # fmt: skip
    assert report["path"].tolist() == ["cat/a.png", "cat/b.png", "cat/c.png", "cat/d.png", "cat/e.png "]  # as the table spells them
    assert report["action"].tolist() == ["relabelled"] * 4 + ["dropped"]
    assert "2 correction paths match only without their leading or trailing spaces" in caplog.text
    # one image named twice, once with a stray space: as ambiguous as a path listed twice
    with pytest.raises(DatasetError, match="twice"):
        apply_corrections(table, corrections([("cat/a.png", "dog"), ("cat/a.png ", "fox")]), TAG2CLS)
    csv.write_text("path,label\ncat//a.png,dog\ncat/a.png,fox\n")
    with pytest.raises(DatasetError, match="more than once"):
        read_corrections(csv)
    # a held-out image so spelled is the test set's, in the training report and in the test table
    _, report = apply_corrections(table, corrections([("cat/t1.png ", "dog")]), TAG2CLS, test_paths={"cat/t1.png"})
    assert report[["path", "action"]].values.tolist() == [["cat/t1.png", IN_TEST_SET]]
    test = _write_test(tmp_path, _held_out_tables(tmp_path), corrections([("cat/t1.png ", "dog")]))
    assert test.set_index("path").loc["cat/t1.png", "tag"] == "dog"
    # and the autolabel piles: a clean image, an answered raw image, a dropped one
    human, raw = piles()
    fixes = corrections([("clean/dog/b.png ", "fox"), ("raw/new.png\t", "fox"), (" raw/ab.png", "drop"), ("raw/zz.png ", "dog")])
    human_out, raw_out, report = apply_autolabel_corrections(human, raw, fixes, TAG2CLS)
    rows = human_out.set_index("path")
    assert rows.loc["clean/dog/b.png", "tag"] == "fox" and rows.loc["raw/new.png", ["tag", "source"]].tolist() == ["fox", HUMAN_CORRECTED]
    assert "raw/ab.png" not in set(raw_out["path"])
    assert report.set_index("path")["action"].to_dict() == {
        "clean/dog/b.png": "relabelled", "raw/ab.png": "dropped", "raw/new.png": "relabelled", "raw/zz.png ": "not found",
    }  # fmt: skip


def _digest_inputs(tmp_path):
    """A dataset folder with a held-out and a training image, split's tables, a corrections path."""
    root = tmp_path / "data"
    for path in ("cat/t1.png", "cat/train.png"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"x")
    held_out = _held_out_tables(tmp_path)
    csv = tmp_path / "corrections.csv"
    return root, held_out, csv


def test_digest_takes_a_path_with_a_stray_space_as_the_apply_functions_do(tmp_path):
    root, held_out, csv = _digest_inputs(tmp_path)

    def digests(text):
        csv.write_text("path,label\n" + text)
        return applying_rows_digest(csv, root, held_out), applying_rows_digest(csv, root, held_out, test=True), applying_rows_digest(csv)

    train, test, autolabel = digests("cat/x.png,dog\n")  # no such image: no table's row
    spaced = digests("cat/x.png,dog\ncat/train.png ,fox\n")
    assert spaced[0] != train and spaced[1:] == (test, autolabel)  # the training table's row
    spaced = digests("cat/x.png,dog\ncat/t1.png ,fox\n")
    assert spaced[1] != test and (spaced[0], spaced[2]) == (train, autolabel)  # the test table's row
    spaced = digests("cat/x.png,dog\n raw/a.png,fox\n")
    assert spaced[2] != autolabel and spaced[:2] == (train, test)  # the autolabel piles' row


# --------------------------------------------------------------------------- bug 5


def _held_out_tables(tmp_path):
    held = pd.DataFrame(
        {"path": ["cat/t1.png", "dog/t2.png", "fox/t3.png"], "tag": ["cat", "dog", "fox"], "sha1": ["1", "2", "3"], "group": [0, 1, 2]}
    )
    held.to_csv(tmp_path / "held_out.csv", index=False)
    return tmp_path / "held_out.csv"


def _write_test(tmp_path, held_out, fixes):
    return write_held_out_table(
        settings=HeldOutSettings(0.2, None), held_out=held_out, raw_csv=tmp_path / "unused.csv", tag2cls=TAG2CLS,
        duplicates=DEFAULT_DUPLICATES, train_root=tmp_path, out_csv=tmp_path / "test.csv",
        out_skipped=tmp_path / "test_skipped.csv", corrections=fixes,
        out_report=tmp_path / "test_corrections_applied.csv",
    )  # fmt: skip


def test_corrections_of_held_out_images_reach_the_test_table(tmp_path):
    held_out = _held_out_tables(tmp_path)
    _write_test(tmp_path, held_out, None)
    plain = (tmp_path / "test.csv").read_text()
    assert plain.splitlines()[0] == "path,tag,class,sha1,group"  # without corrections: as before
    fixes = corrections([("cat/t1.png", "dog"), ("fox/t3.png", "drop"), ("cat/train.png", "fox"), ("raw/x.png", "zebra")])
    _write_test(tmp_path, held_out, fixes)
    test = pd.read_csv(tmp_path / "test.csv").set_index("path")
    assert test.loc["cat/t1.png", ["tag", "class", "source"]].tolist() == ["dog", 1, HUMAN_CORRECTED]
    assert test.loc["dog/t2.png", "source"] == "given" and "fox/t3.png" not in test.index
    skipped = pd.read_csv(tmp_path / "test_skipped.csv")
    assert skipped.to_dict("records") == [{"path": "fox/t3.png", "reason": "dropped by a correction"}]
    # the test set's own report, as corrections_applied.csv: only its rows
    report = pd.read_csv(tmp_path / "test_corrections_applied.csv")
    assert report.to_dict("records") == [
        {"path": "cat/t1.png", "given": "cat", "correction": "dog", "action": "relabelled"},
        {"path": "fox/t3.png", "given": "fox", "correction": "drop", "action": "dropped"},
    ]
    _write_test(tmp_path, held_out, corrections([("dog/t2.png", "dog"), ("cat/train.png", "fox")]))
    assert pd.read_csv(tmp_path / "test_corrections_applied.csv")["action"].tolist() == ["confirmed"]
    for none in (None, corrections([("cat/train.png", "fox")])):  # corrections off, or none of the test set
        _write_test(tmp_path, held_out, none)
        assert (tmp_path / "test_corrections_applied.csv").read_text() == "path,given,correction,action\n"
    # the training table reports them as the test set's, not as typos
    train = pd.DataFrame({"path": ["cat/train.png"], "tag": ["cat"], "class": [0], "fold": [0]})
    _, report = apply_corrections(train, fixes, TAG2CLS, test_paths={"cat/t1.png", "dog/t2.png", "fox/t3.png"})
    assert report.set_index("path")["action"].to_dict() == {
        "cat/t1.png": IN_TEST_SET, "fox/t3.png": IN_TEST_SET, "cat/train.png": "relabelled", "raw/x.png": "not found",
    }  # fmt: skip


def test_digest_parts_held_out_rows_from_training_rows(tmp_path):
    root, held_out, csv = _digest_inputs(tmp_path)

    def digests(text):
        csv.write_text("path,label\n" + text)
        return applying_rows_digest(csv, root, held_out), applying_rows_digest(csv, root, held_out, test=True)

    train, test = digests("cat/train.png,dog\ncat/t1.png,dog\n")
    train_after, test_after = digests("cat/train.png,dog\ncat/t1.png,fox\n")  # a test-set correction
    assert train_after == train and test_after != test  # only the test table
    train_after, test_after = digests("cat/train.png,fox\ncat/t1.png,dog\n")  # a training image's
    assert train_after != train and test_after == test  # only the training table
    # before split has run (no held_out.csv) every dataset row counts for the training table
    csv.write_text("path,label\ncat/train.png,dog\ncat/t1.png,dog\n")
    assert applying_rows_digest(csv, root, tmp_path / "missing.csv") == applying_rows_digest(csv, root)


@pytest.mark.e2e
def test_a_test_set_correction_reruns_the_test_table_and_not_the_training(tmp_path):
    """Real snakemake (tag2label, split, test_table, apply_corrections on 36 tiny images): a
    correction of a held-out image changes test.csv and its own report
    (test_corrections_applied.csv); only test_table reruns for it, and only apply_corrections for
    a training image's."""
    dataset = make_tiny_dataset(tmp_path / "images", per_class=12)
    fixes = tmp_path / "corrections.csv"
    fixes.write_text("path,label\n")
    workdir = tmp_path / "work"
    config = write_tiny_config(workdir, dataset, corrections=str(fixes), test_fraction=0.25)
    targets = ["results/data/test.csv", "results/data/dataset_corrected.csv"]
    done = run_snakemake(workdir, *targets, "--configfile", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    test = pd.read_csv(workdir / "results/data/test.csv")
    train = pd.read_csv(workdir / "results/data/dataset.csv")
    held, kept = test.loc[test["tag"] == "class_00", "path"].iloc[0], train.loc[train["tag"] == "class_00", "path"].iloc[0]
    test_report = workdir / "results/data/test_corrections_applied.csv"
    assert test_report.read_text() == "path,given,correction,action\n"  # nothing corrected yet

    fixes.write_text(f"path,label\n{held},class_01\n")
    dry = run_snakemake(workdir, *targets, "-n", "--configfile", str(config))
    assert job_counts(dry.stdout + dry.stderr) == {"test_table": 1}, dry.stdout[-3000:]
    done = run_snakemake(workdir, *targets, "--configfile", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    row = pd.read_csv(workdir / "results/data/test.csv").set_index("path").loc[held]
    assert row[["tag", "class", "source"]].tolist() == ["class_01", 1, HUMAN_CORRECTED]
    applied = [{"path": held, "given": "class_00", "correction": "class_01", "action": "relabelled"}]
    assert pd.read_csv(test_report).to_dict("records") == applied  # a file says so, not only the log

    fixes.write_text(f"path,label\n{held},class_01\n{kept},class_02\n")
    dry = run_snakemake(workdir, *targets, "-n", "--configfile", str(config))
    assert job_counts(dry.stdout + dry.stderr) == {"apply_corrections": 1}, dry.stdout[-3000:]
    done = run_snakemake(workdir, *targets, "--configfile", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    report = pd.read_csv(workdir / "results/data/corrections_applied.csv").set_index("path")["action"]
    assert report[held] == "in the test set" and report[kept] != "not found"  # the training table's report
    assert pd.read_csv(test_report).to_dict("records") == applied  # only the test set's rows
