"""The README's commands run as written: the stage-by-stage session (on a small, coarse cohort), the
command table's commands exist, and every job script the cluster section names is there."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from ctvlab.cli import app
from ctvlab.config import apply_smoke_test, load_config
from ctvlab.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SESSION_MARK = "A stage-by-stage session on a synthetic cohort:"


def readme_session() -> list[list[str]]:
    block = README.split(SESSION_MARK, 1)[1].split("```", 2)[1]
    return [shlex.split(line) for line in block.strip().splitlines()]


def test_every_command_in_the_table_exists():
    table = README.split("## Commands", 1)[1].split("### ", 1)[0]
    named = set(re.findall(r"^\| `ctvlab ([a-z-]+)", table, flags=re.M))
    registered = set(typer.main.get_command(app).commands)
    assert named == registered  # every command documented, and no documented command missing
    for name in named:
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_the_job_scripts_the_readme_names_exist():
    section = README.split("## Running on a Ray cluster", 1)[1].split("\n## ", 1)[0]
    scripts = set(re.findall(r"`?(\w+\.py)`?", section))
    assert "run_study.py" in scripts
    for s in scripts:
        assert (REPO / "jobs" / s).is_file(), s


@pytest.mark.slow
@pytest.mark.ray
def test_stage_by_stage_session_runs_as_written(tmp_path, tracking_uri, ray_local, monkeypatch):
    """The README's session, verbatim except: 8 patients instead of 24, and the smoke-test settings of the
    demo config (coarse grids, a 4-feature U-Net, two trials) given to every command that takes one."""
    small = tmp_path / "small.yaml"
    cfg = apply_smoke_test(load_config(REPO / "jobs" / "configs" / "demo.yaml"))
    cfg.name = "readme-session"
    small.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    monkeypatch.chdir(tmp_path)

    commands = readme_session()
    assert [c[:2] for c in commands][:3] == [["ctvlab", "synth"]] * 2 + [["ctvlab", "validate"]]
    runner = CliRunner()
    for argv in commands:
        args = [str(small) if a == "jobs/configs/demo.yaml" else a for a in argv[1:]]
        if "--patients" in args:
            args[args.index("--patients") + 1] = "8"
        takes_config = args[0] in {"preprocess", "split", "rf-cv", "stats"} or "--out" in args
        if takes_config and "-c" not in args:
            args += ["--config", str(small)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (argv, result.output[-3000:])

    work = tmp_path / "runs" / "mine"
    assert (work / "cohort" / "manifest.csv").is_file() and (work / "prep" / "dataset.json").is_file()
    results = work / "results"
    assert len(list((results / "rf_cv").glob("rf-*"))) == 6  # {nel, cel} x {all, early, late}
    assert (results / "stats" / "category_boxes.png").is_file()
    assert (results / "evaluate" / "summary.csv").is_file() and (results / "model" / "model.json").is_file()
    runs = Tracker("readme-session", tracking_uri).find_runs()
    assert {"split", "rf-cv", "stats", "tune", "tune-trial", "evaluate"} <= {
        r.data.tags.get("ctvlab.stage") for r in runs
    }
    # The demo's search uses ASHA, which ends trials from outside (here at max_t): none is left RUNNING.
    left_open = [
        (r.data.tags.get("ctvlab.stage"), r.info.run_name) for r in runs if r.info.status == "RUNNING"
    ]
    assert not left_open
