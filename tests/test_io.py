"""labelflow.io.atomic_directory: the target folder is never missing, whatever step a crash hits;
and read_table / read_csv: a malformed CSV is a DatasetError naming the file, never shifted columns.

A crash is simulated by making os.rename or shutil.rmtree raise at one chosen call. Where the
process would have died there (SIGKILL), the in-process clean-up is made to fail too, so the
leftovers are what a killed process leaves, and the next use must put them right.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

from labelflow.io import DatasetError, atomic_directory, normalise_paths, read_table, recover_directory


class Crash(BaseException):
    """A simulated kill: BaseException, so nothing on the way catches it as an ordinary error."""


def _tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture
def target(tmp_path: Path) -> Path:
    out = tmp_path / "out" / "tree"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "a.txt").write_text("old")
    return out


def _write_new(tmp: Path) -> None:
    (tmp / "b.txt").write_text("new")


def _failing_rename(monkeypatch, should_fail):
    """os.rename raises Crash on the calls for which should_fail(src, dst) is true."""
    real = os.rename

    def rename(src, dst):
        if should_fail(Path(src), Path(dst)):
            raise Crash(f"killed at rename {Path(src).name} -> {Path(dst).name}")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def test_success_replaces_the_folder_and_leaves_nothing_beside_it(target: Path) -> None:
    with atomic_directory(target) as tmp:
        _write_new(tmp)
    assert _tree(target) == {"b.txt": "new"}
    assert _siblings(target) == ["tree"]


def test_new_folder_where_none_was(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "new"
    with atomic_directory(out) as tmp:
        _write_new(tmp)
    assert _tree(out) == {"b.txt": "new"} and _siblings(out) == ["new"]


def test_file_or_symlink_in_the_way_is_replaced(tmp_path: Path) -> None:
    file_target = tmp_path / "f"
    file_target.write_text("a file")
    with atomic_directory(file_target) as tmp:
        _write_new(tmp)
    assert _tree(file_target) == {"b.txt": "new"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    with atomic_directory(link) as tmp:
        _write_new(tmp)
    assert not link.is_symlink() and _tree(link) == {"b.txt": "new"}
    assert _tree(elsewhere) == {"keep.txt": "keep"}  # the link's target is not touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "f", "link"]


def test_error_while_filling_leaves_the_old_folder(target: Path) -> None:
    with pytest.raises(OSError, match="disk full"), atomic_directory(target) as tmp:
        _write_new(tmp)
        raise OSError("disk full")
    assert _tree(target) == {"sub/a.txt": "old"}
    assert _siblings(target) == ["tree"]


def test_crash_renaming_the_old_folder_aside_leaves_it_in_place(target: Path, monkeypatch) -> None:
    _failing_rename(monkeypatch, lambda src, dst: src == target)
    with pytest.raises(Crash), atomic_directory(target) as tmp:
        _write_new(tmp)
    assert _tree(target) == {"sub/a.txt": "old"}
    assert _siblings(target) == ["tree"]


def test_failed_rename_of_the_new_folder_puts_the_old_one_back(target: Path, monkeypatch) -> None:
    _failing_rename(monkeypatch, lambda src, dst: dst == target and src.name.startswith(".tree.tmp-"))
    with pytest.raises(Crash), atomic_directory(target) as tmp:
        _write_new(tmp)
    assert _tree(target) == {"sub/a.txt": "old"}
    assert _siblings(target) == ["tree"]


def test_kill_between_the_two_renames_is_recovered_on_next_use(target: Path, monkeypatch) -> None:
    # The process dies after renaming the old folder aside: neither the new folder's rename nor
    # any clean-up runs (the roll-back rename and the temp folder's removal fail too).
    _failing_rename(monkeypatch, lambda src, dst: dst == target)
    monkeypatch.setattr(shutil, "rmtree", _raise_crash)
    with pytest.raises(Crash), atomic_directory(target) as tmp:
        _write_new(tmp)
    monkeypatch.undo()
    assert not target.exists()
    leftovers = _siblings(target)
    assert len(leftovers) == 2
    assert leftovers[0].startswith(".tree.old-") and leftovers[1].startswith(".tree.tmp-")

    # The next use renames the old folder back before anything else: a failing writer then
    # leaves the old content, exactly as if the killed run had never started.
    with pytest.raises(RuntimeError, match="second writer fails"), atomic_directory(target):
        raise RuntimeError("second writer fails")
    assert _tree(target) == {"sub/a.txt": "old"}
    assert _siblings(target) == ["tree"]


def test_kill_before_deleting_the_old_folder_keeps_the_new_one(target: Path, monkeypatch) -> None:
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(".tree.old-"):
            raise Crash("killed while deleting the old folder")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(Crash), atomic_directory(target) as tmp:
        _write_new(tmp)
    monkeypatch.undo()
    assert _tree(target) == {"b.txt": "new"}
    old = [name for name in _siblings(target) if name != "tree"]
    assert len(old) == 1 and old[0].startswith(".tree.old-")
    assert _tree(target.parent / old[0]) == {"sub/a.txt": "old"}

    recover_directory(target)  # what the next use does first
    assert _tree(target) == {"b.txt": "new"}
    assert _siblings(target) == ["tree"]


def test_recovery_ignores_other_folders_and_a_missing_parent(tmp_path: Path) -> None:
    recover_directory(tmp_path / "no" / "such" / "tree")  # nothing to do, no error
    out = tmp_path / "tree"
    for name in ("tree2", ".tree2.old-1", ".treehouse"):
        (tmp_path / name).mkdir()
    (tmp_path / ".tree.tmp-1.txt").write_text("x")  # an atomic_output temp file, not a folder
    recover_directory(out)
    # .tree2.old-1 belongs to tree2, a file named like a temp folder is not ours to delete
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tree.tmp-1.txt", ".tree2.old-1", ".treehouse", "tree2"]
    assert not out.exists()


def _raise_crash(*args, **kwargs):
    raise Crash("killed")


# --------------------------------------------------------------------------- CSV readers


def test_read_table_keeps_a_valid_table_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text('path,label,confidence\n"a,b.png",0,0.5\n\nc.png,NA,\n', encoding="utf-8")
    table = read_table(path)
    assert table["path"].tolist() == ["a,b.png", "c.png"] and table["label"].tolist() == ["0", "NA"]
    assert table.index.tolist() == [0, 1] and table["confidence"].isna().tolist() == [False, True]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("path,label\nb/1.png,a,x\nb/2.png,b,y\n", 2),  # every row: pandas would make `path` the index
        ("path,label\nb/1.png,a,\nb/2.png,b,\n", 2),  # trailing commas
        ("path,label\n\nb/1.png,a,x\nb/2.png,b\n", 3),  # the first row only, after a blank line
        ("path,label\nb/1.png,a\nb/2.png,b,y\n", 3),  # a later row
    ],
)
def test_read_table_refuses_rows_longer_than_the_header(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "corrections.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=rf"corrections\.csv.*line {line}.*quotes"):
        read_table(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'path,label\n"b/1.png,a\n', "EOF inside string"),
        (b"", "No columns"),
        (b"path,label\nb/caf\xe9.png,a\n", "'utf-8' codec"),  # Latin-1
    ],
)
def test_read_table_names_the_file_of_a_malformed_csv(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "corrections.csv"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=rf"corrections\.csv is not a readable CSV \(.*{problem}.*UTF-8"):
        read_table(path)
    with pytest.raises(FileNotFoundError):  # callers name their config key for a missing file
        read_table(tmp_path / "missing.csv")


def test_read_table_reads_a_first_field_longer_than_the_csv_modules_limit(tmp_path: Path) -> None:
    # duplicates.csv `members` of a large near-duplicate cluster, raw.csv `duplicate_of`
    members = ";".join(f"class_00/img_{i:06d}.png" for i in range(9000))  # about 200k characters
    path = tmp_path / "duplicates.csv"
    path.write_text(f"members,classes\n{members},class_00\nb.png,class_01\n", encoding="utf-8")
    table = read_table(path, text_columns=("members", "classes"))
    assert len(members) > 131072 and table["members"].tolist() == [members, "b.png"]


def test_read_table_reads_a_compressed_csv_by_its_extension(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv.gz"
    path.write_bytes(gzip.compress(b"path,label\na.png,0\nb.png,NA\n"))
    assert read_table(path).to_dict("list") == {"path": ["a.png", "b.png"], "label": ["0", "NA"]}
    path.write_bytes(gzip.compress(b"path,label\na.png,0,x\nb.png,NA\n"))
    with pytest.raises(DatasetError, match=r"labels\.csv\.gz: line 2 has 3 fields but the header has 2 \('path', 'label'\)"):
        read_table(path)


def test_read_table_skips_a_whitespace_line_before_a_longer_row_as_pandas_does(tmp_path: Path) -> None:
    path = tmp_path / "images.csv"
    path.write_text("path,label\n   \na.png,cat,extra\n")  # pandas skips the blank line: `extra` was lost
    with pytest.raises(DatasetError, match=r"images\.csv: line 3 has 3 fields but the header has 2.*quotes"):
        read_table(path)
    path.write_text("path,label\n   \na.png,cat\n")
    assert read_table(path).to_dict("list") == {"path": ["a.png"], "label": ["cat"]}


def test_read_truth_reads_a_gzipped_truth_table_and_normalises_its_paths(tmp_path: Path) -> None:
    from labelflow.autolabel.results import read_truth

    path = tmp_path / "truth.csv.gz"
    path.write_bytes(gzip.compress(b"path,label\n./a.png,cat\nb//c.png,dog\n"))
    assert read_truth(path)["path"].tolist() == ["raw/a.png", "raw/b/c.png"]
    path.write_bytes(gzip.compress(b"path,label\n./a.png,cat\na.png,dog\n"))
    with pytest.raises(DatasetError, match="lists an image twice"):
        read_truth(path)


def test_normalise_paths_spells_one_path_one_way() -> None:
    assert normalise_paths(["./a.png", "a//b.png", "a/./b.png", "", "a b/c.png"]) == [
        "a.png", "a/b.png", "a/b.png", "", "a b/c.png"
    ]


def test_source_digest_of_a_malformed_csv_digests_the_file_alone(tmp_path: Path) -> None:
    # at DAG time; the job's reader then names the file and line
    from labelflow import manifest

    (tmp_path / "b").mkdir()
    (tmp_path / "a.png").write_bytes(b"a")
    (tmp_path / "b" / "1.png").write_bytes(b"b")
    csv = tmp_path / "set.csv"
    csv.write_text("path,label\nb/1.png,a.png,x\n")  # pandas used to read path = a.png
    assert manifest.source_digest(csv) == manifest.files_digest([csv], tmp_path)
    csv.write_text("path,label\nb/1.png,a.png\n")
    assert manifest.source_digest(csv) == manifest.files_digest([csv, tmp_path / "b" / "1.png"], tmp_path)
