"""Folders that cannot be written: a full disk, a used-up quota, no permission, a read-only mount. Each is
one line that names the folder as the user gave it and the cause, exit 4, and changes nothing; one place
(`ctvlab.errors.storage_error`) decides it for every writer."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctvlab.atomic import atomic_folder, atomic_path, write_text_atomic
from ctvlab.errors import StorageError, remember_given, shown, space_needed, storage_error, writing
from tests.conftest import read_only

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/prep/.tmp-1a2b-P1.npy"), "the disk is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/data/prep/.tmp-1a2b-P1.npy"), "quota is used up"),
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/prep/.tmp-1a2b-P1.npy"),
            "permission denied",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/data/prep/.tmp-1a2b-P1.npy"),
            "read-only file system",
        ),
        # numpy's short write carries no errno: a full disk all the same
        (OSError("2408448 requested and 1830784 written"), "the disk is full"),
    ],
)
def test_each_kind_of_unwritable_folder_is_named_for_what_it_is(error, cause):
    err = storage_error(error)
    assert isinstance(err, StorageError) and err.exit_code == 4
    assert cause in str(err) and "\n" not in str(err)
    if error.filename:
        assert err.folder == "/data/prep" and "cannot write to /data/prep:" in str(err)  # not the .tmp- name


@pytest.mark.parametrize(
    "error",
    [FileNotFoundError(errno.ENOENT, "No such file"), OSError(errno.EIO, "I/O error"), ValueError("x")],
)
def test_other_errors_are_not_storage_errors(error):
    assert storage_error(error) is None


def test_a_full_disk_says_what_the_stage_still_needs():
    needs = space_needed("the prepared dataset", 48e6, 4, 4)
    assert (
        needs
        == "the prepared dataset still needs about 48 MB more (12 MB per patient from the 4 written, 4 left)"
    )
    err = storage_error(OSError(errno.ENOSPC, "No space left on device", "/data/prep/x.npy"), needs=needs)
    assert "the disk is full; the prepared dataset still needs about 48 MB more" in str(err)
    # Pickled through a Ray task or a process pool with its fields.
    import pickle

    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.folder, back.errno, back.needs) == (str(err), err.folder, err.errno, err.needs)


def test_a_folder_is_named_as_the_user_gave_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "smoke" / "results").mkdir(parents=True)
    remember_given(Path("runs/demo"))
    assert shown(tmp_path / "runs" / "demo" / "smoke" / "results") == "runs/demo/smoke/results"
    assert shown("/elsewhere/results") == "/elsewhere/results"


def test_writing_turns_an_oserror_into_one_storage_error_and_lets_others_pass(tmp_path):
    full = pytest.raises(StorageError, match=r"cannot write to .*out: the disk is full; it still needs")
    with full, writing(tmp_path / "out", needs=lambda: "it still needs 1 MB"):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "f"))
    with pytest.raises(ValueError), writing(tmp_path):
        raise ValueError("not an I/O problem")


def test_atomic_writers_on_a_read_only_folder_raise_one_error_and_change_nothing(tmp_path):
    folder = tmp_path / "results"
    (folder / "evaluate").mkdir(parents=True)
    (folder / "evaluate" / "summary.csv").write_text("old\n")
    (folder / "report.html").write_text("old\n")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with read_only(folder):
        with pytest.raises(StorageError) as file_error, atomic_path(folder / "report.html") as tmp:
            tmp.write_text("new\n")
        with pytest.raises(StorageError) as folder_error, atomic_folder(folder / "evaluate") as tmp:
            (tmp / "summary.csv").write_text("new\n")
    for e in (file_error.value, folder_error.value):
        assert str(folder) in str(e) and e.exit_code == 4
        # The cleanup did not fail on top of the write (a second, chained error).
        assert not isinstance(e.__context__, StorageError)
        assert e.__cause__ is None or e.__cause__.__context__ is None
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert (folder / "report.html").read_text() == "old\n"


def test_an_unwritable_folder_inside_any_command_is_one_line_and_exit_4(tmp_path, monkeypatch, capsys):
    """Any writer ctvlab runs: the entry point turns the OSError into the same one line."""
    import ctvlab.cli as cli

    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out" / "x"))

    monkeypatch.setattr("ctvlab.schemas.write_schemas", denied)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["schemas", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "permission denied" in err and str(tmp_path / "out") in err


@pytest.fixture
def study_workdir(tmp_path) -> Path:
    """A working directory with a results folder (what a finished study leaves, enough for `report`)."""
    work = tmp_path / "work"
    (work / "results" / "evaluate").mkdir(parents=True)
    (work / "results" / "evaluate" / "summary.csv").write_text("ctv,n\nmodel,1\n")
    return work


def test_report_on_a_read_only_results_folder_is_one_line_exit_4_and_changes_nothing(study_workdir, tmp_path):
    results = study_workdir / "results"
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}
    with read_only(results):
        proc = subprocess.run(
            [sys.executable, "-m", "ctvlab.cli", "report", "--workdir", "work",
             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
        )  # fmt: skip
        after = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    assert proc.returncode == 4, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    # The folder as the user gave it (--workdir work), and the cause.
    assert "cannot write to work/results:" in lines[0]
    assert "permission denied" in lines[0] or "read-only file system" in lines[0]
    assert after == before and not list(results.glob(".tmp-*"))
    assert not (tmp_path / "mlflow.db").exists() or "report" not in _run_names(tmp_path / "mlflow.db")


def _run_names(db: Path) -> set[str]:
    import sqlite3

    with sqlite3.connect(db) as c:
        return {r[0] for r in c.execute("select name from runs")}


def test_a_writable_folder_is_written_as_before(tmp_path):
    write_text_atomic(tmp_path / "a" / "b.txt", "x")
    assert (tmp_path / "a" / "b.txt").read_text() == "x" and not list((tmp_path / "a").glob(".tmp-*"))
