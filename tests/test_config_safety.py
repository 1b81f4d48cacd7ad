"""Configs and path arguments that cannot hurt: a YAML whose aliases expand, a config that is not UTF-8
text, and a file given for a folder (or a folder for a file) each end in one message naming the file, a
non-zero exit and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dicom.test_dicom import ctvlab

REPO = Path(__file__).resolve().parents[1]

# Nine anchors, each nine aliases of the one before: a few hundred bytes that expand to 9^9 strings.
BOMB = "\n".join(
    [f"n0: &n0 [{', '.join(['lol'] * 9)}]"]
    + [f"n{k}: &n{k} [{', '.join([f'*n{k - 1}'] * 9)}]" for k in range(1, 9)]
    + ["name: *n8", ""]
)


def run_cli(*args: str, timeout: float = 60) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{REPO}", "COLUMNS": "500"}
    out = subprocess.run([sys.executable, "-m", "ctvlab.cli", *args], capture_output=True, text=True, env=env,
                         timeout=timeout)  # fmt: skip
    return out.returncode, " ".join((out.stdout + out.stderr).split())


def test_a_yaml_bomb_is_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 500
    code, text = run_cli("validate", "--config", str(bomb), timeout=30)
    assert code == 2 and "Traceback" not in text, text
    assert str(bomb) in text and "alias" in text


@pytest.mark.parametrize(
    "text, words",
    [
        ("a: &a [*a]\nname: x\n", ["refers to itself"]),
        ("name: " + "[" * 5000 + "]" * 5000 + "\n", ["nested"]),
    ],
    ids=["recursive alias", "deep nesting"],
)
def test_a_yaml_that_cannot_be_a_config_is_a_message(tmp_path, capsys, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code, out = ctvlab(capsys, "validate", "--config", str(path))
    assert code == 2 and "Traceback" not in out and str(path) in out, out
    for w in words:
        assert w in out, out


def test_a_config_that_is_not_utf8_is_a_message(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: étude\n".encode("latin-1"))
    code, out = ctvlab(capsys, "validate", "--config", str(path))
    assert code == 2 and "Traceback" not in out, out
    assert str(path) in out and "UTF-8" in out and "line 1" in out


def test_a_huge_config_is_refused_before_it_is_read(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text("name: x\n" + "# padding\n" * 300_000)
    code, out = ctvlab(capsys, "validate", "--config", str(path))
    assert code == 2 and "Traceback" not in out and str(path) in out and "MiB" in out, out


def test_set_values_are_bounded_too(capsys):
    code, out = ctvlab(
        capsys, "validate", "--set", "name=[&a [1,2,3,4,5,6,7,8,9], [*a,*a,*a,*a,*a,*a,*a,*a,*a]]"
    )
    assert code == 2 and "Traceback" not in out, out  # small: a type error, quickly
    code, out = ctvlab(capsys, "validate", "--set", "name=&a [*a]")
    assert code == 2 and "Traceback" not in out and "refers to itself" in out, out


@pytest.fixture
def afile(tmp_path):
    f = tmp_path / "afile"
    f.write_text("not a folder\n")
    return f


@pytest.mark.parametrize(
    "args",
    [
        ["split", "--workdir", "{afile}"],
        ["stats", "--workdir", "{afile}"],
        ["run", "--smoke-test", "--workdir", "{afile}"],
        ["split", "--workdir", "{afile}/sub"],
        ["preprocess", "--workdir", "{afile}"],
        ["split", "--data", "{afile}"],
        ["preprocess", "--raw", "{afile}", "--out", "{tmp}/prep"],
        ["preprocess", "--raw", "{tmp}", "--out", "{afile}"],
        ["validate", "--config", "{tmp}"],
        ["export-dicom", "{afile}", "--out", "{tmp}/dicom"],
        ["import-dicom", "{afile}", "--out", "{tmp}/c", "--series", "{series}"],
        ["import-dicom", "{tmp}", "--out", "{tmp}/c", "--series", "{tmp}"],
        ["import-dicom", "{tmp}", "--out", "{tmp}/c", "--series", "{series}", "--clinical", "{tmp}"],
        ["import-dicom", "{tmp}", "--out", "{tmp}/c", "--series", "{series}", "--clinical", "{afile}"],
        ["predict", "{tmp}", "--out", "{afile}", "--model", "{tmp}"],
        ["predict", "{tmp}", "--out", "{tmp}/o", "--model", "{tmp}", "--rtstruct", "--dicom-ref", "{afile}"],
        ["report", "--workdir", "{tmp}", "--out", "{tmp}", "--no-log"],
    ],
    ids=lambda a: " ".join(a).replace("{", "").replace("}", ""),
)
def test_a_path_of_the_wrong_kind_is_a_message(tmp_path, afile, capsys, args):
    series = REPO / "jobs" / "series.yaml"
    filled = [a.format(afile=afile, tmp=tmp_path, series=series) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out = ctvlab(capsys, *filled)
    assert code == 2 and "Traceback" not in out, out
    named = [
        a for a in filled if a.startswith(str(tmp_path)) and (a.startswith(str(afile)) or Path(a).is_dir())
    ]
    assert any(n in out or Path(n).name in out for n in named), out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert afile.read_text() == "not a folder\n"


def test_a_workdir_in_the_config_that_is_a_file_is_a_message(tmp_path, afile, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"workdir: {afile}\n")
    code, out = ctvlab(capsys, "split", "--config", str(cfg))
    assert code == 2 and "Traceback" not in out and str(afile) in out, out
