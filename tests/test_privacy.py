"""What may reach the tracking store, and the secret that keeps patients pseudonymous."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from ctvlab.errors import DataError
from ctvlab.splits import SALT_HEX_CHARS, ensure_salt, pseudonymise
from ctvlab.tracking import Tracker


def test_salt_is_created_private_and_stable(tmp_path):
    salt = ensure_salt(tmp_path)
    path = tmp_path / "pseudonym_salt"
    assert len(salt) * 2 == SALT_HEX_CHARS
    assert path.stat().st_mode & 0o777 == 0o600
    assert ensure_salt(tmp_path) == salt  # read back, not re-drawn
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_concurrent_first_use_gets_one_salt(tmp_path):
    salts, barrier = [], threading.Barrier(8)

    def draw():
        barrier.wait()
        salts.append(ensure_salt(tmp_path))

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(salts)) == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.chmod(0o644), "accessible to other users"),
        (lambda p: p.chmod(0o660), "accessible to other users"),
        (lambda p: p.write_text("abc\n"), "not a pseudonym salt"),
        (lambda p: p.write_text("zz" * (SALT_HEX_CHARS // 2) + "\n"), "not a pseudonym salt"),
        (lambda p: p.write_text(""), "not a pseudonym salt"),
    ],
    ids=["world-readable", "group-writable", "short", "not-hex", "empty"],
)
def test_a_damaged_salt_is_refused_not_replaced(tmp_path, damage, message):
    ensure_salt(tmp_path)
    path = tmp_path / "pseudonym_salt"
    damage(path)
    if "other users" not in message:
        path.chmod(0o600)
    before = path.read_bytes()
    with pytest.raises(DataError, match=message):
        pseudonymise(tmp_path, ["P001"])
    assert path.read_bytes() == before  # a new salt would silently re-key every pseudonym


def test_dataset_inputs_reach_the_store_by_logical_name_only(tmp_path):
    secret_dir = tmp_path / "hospital" / "GBM_cohort_P001" / "prep"
    secret_dir.mkdir(parents=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("ctvlab-privacy", uri)
    with tracker.run("split") as run:
        run.dataset("prepared", "ab" * 32, str(secret_dir), context="split")
    stored = tracker.client.get_run(run.run_id).inputs.dataset_inputs[0].dataset
    assert stored.name == "prepared" and stored.digest.startswith("abab")
    con = sqlite3.connect(tmp_path / "mlflow.db")
    dump = "\n".join(con.iterdump())
    con.close()
    assert str(secret_dir) not in dump and "GBM_cohort_P001" not in dump
    assert os.fspath(tmp_path / "hospital") not in dump


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DataError: /data/hospital/cohort/P001/flair.nii.gz is truncated",
         "DataError: <path>/flair.nii.gz is truncated"),
        ("patient P001 and P0011 failed", "patient pt-aaa and pt-bbb failed"),
        ("volumes/P0011_masks.npy missing", "volumes/pt-bbb_masks.npy missing"),
        ("see '/tmp/run 1/x'", "see '<path>/run 1/x'"),
        ("ratio 3/4 at http://host:5000/api", "ratio 3/4 at http://host:5000/api"),
    ],
)  # fmt: skip
def test_scrub_text_replaces_ids_and_absolute_paths(text, expected):
    from ctvlab.tracking import scrub_text

    names = {"P001": "pt-aaa", "P0011": "pt-bbb"}
    assert scrub_text(text, names) == expected


def test_a_search_state_others_can_write_is_not_restored(tmp_path):
    from ctvlab.errors import CtvlabError
    from ctvlab.unet.search import check_private_state

    state = tmp_path / "search-1"
    (state / "trial").mkdir(parents=True)
    (state / "trial" / "state.pkl").write_bytes(b"\x80\x04N.")
    for p in (state, state / "trial"):
        p.chmod(0o755)
    (state / "trial" / "state.pkl").chmod(0o644)
    check_private_state(state)  # private: accepted
    (state / "trial" / "state.pkl").chmod(0o666)
    with pytest.raises(CtvlabError, match=r"state\.pkl is writable by others"):
        check_private_state(state)
