"""The manual (README.md and docs/) runs as written: the stage-by-stage session (on a small, coarse cohort)
and its continuation, every `ctvlab` line parses, the command table names every command, the job scripts the
cluster guide names exist, the generated reference pages are current, and `mkdocs build --strict` passes."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ctvlab.cli import app
from ctvlab.tracking import Tracker
from tests.test_stage_table import assert_one_vocabulary

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = REPO / "docs"
PAGES = {p.relative_to(DOCS).as_posix(): p.read_text() for p in sorted(DOCS.rglob("*.md"))}
MANUAL = "\n".join([README, *PAGES.values()])
SESSION_MARK = "A stage-by-stage session on a synthetic cohort"
PREDICT_MARK = "Continuing the stage-by-stage session"
PYTHON_MARK = "Loading it in Python"


def readme_block(mark: str) -> str:
    """The first code block after `mark` in the manual, without its fence line."""
    block = MANUAL.split(mark, 1)[1].split("```", 2)[1]
    return block.split("\n", 1)[1] if not block.startswith("\n") else block


def readme_session(mark: str = SESSION_MARK) -> list[list[str]]:
    return [shlex.split(line) for line in readme_block(mark).strip().splitlines()]


def test_every_command_in_the_table_exists():
    table = PAGES["reference/commands.md"].split("### ", 1)[0]
    named = set(re.findall(r"^\| `ctvlab ([a-z-]+)", table, flags=re.M))
    registered = set(typer.main.get_command(app).commands)
    assert named == registered  # every command documented, and no documented command missing
    for name in named:
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_the_job_scripts_the_readme_names_exist():
    section = PAGES["guides/cluster.md"].split("## Testing jobs on one machine", 1)[0]
    scripts = set(re.findall(r"`?(\w+\.py)`?", section))
    assert "run.py" in scripts
    for s in scripts:
        assert (REPO / "jobs" / s).is_file(), s


@pytest.mark.slow
@pytest.mark.ray
def test_stage_by_stage_session_runs_as_written(tmp_path, ray_local, monkeypatch, dciodvfy):
    """The README's session, exactly as written, in a folder laid out like the checkout (its `jobs/configs`
    and `jobs/series.yaml`),
    with its own MLflow store; then its continuation in "Using a trained model" (DICOM in, prediction,
    RTSTRUCT out) and the Python that loads the registered model."""
    import shutil

    shutil.copytree(REPO / "jobs" / "configs", tmp_path / "jobs" / "configs")
    shutil.copy(REPO / "jobs" / "series.yaml", tmp_path / "jobs" / "series.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the README's default store: ./mlflow.db

    commands = readme_session()
    assert [c[:2] for c in commands][:3] == [["ctvlab", "synth"]] * 2 + [["ctvlab", "validate"]]
    runner = CliRunner()
    for argv in commands:
        assert argv[0] == "ctvlab"
        result = runner.invoke(app, argv[1:])
        assert result.exit_code == 0, (argv, result.output[-3000:])

    work = tmp_path / "runs" / "mine"
    assert (work / "cohort" / "manifest.csv").is_file() and (work / "prep" / "dataset.json").is_file()
    results = work / "results"
    assert len(list((results / "voxel_models").glob("rf-*"))) == 6  # {nel, cel} x {all, early, late}
    assert (results / "stats" / "category_boxes.png").is_file()
    assert (results / "evaluate" / "summary.csv").is_file() and (results / "model" / "model.json").is_file()
    runs = [r for name in ("ctvlab-synthetic", "ctvlab-demo")
            for r in Tracker(name, f"sqlite:///{tmp_path / 'mlflow.db'}").find_runs()]  # fmt: skip
    assert {"split", "voxel-models", "stats", "tune", "tune-trial", "evaluate"} <= {
        r.data.tags.get("ctvlab.stage") for r in runs
    }
    assert_one_vocabulary(work, runs)  # the stage commands write under the stage table's names too
    # The demo's search uses ASHA, which ends trials from outside (here at max_t): none is left RUNNING.
    left_open = [
        (r.data.tags.get("ctvlab.stage"), r.info.run_name) for r in runs if r.info.status == "RUNNING"
    ]
    assert not left_open

    predict = readme_session(PREDICT_MARK)
    assert [c[1] for c in predict] == ["export-dicom", "import-dicom", "validate", "predict"]
    for argv in predict:
        result = runner.invoke(app, argv[1:])
        assert result.exit_code == 0, (argv, result.output[-3000:])
    ctv = tmp_path / "runs" / "new" / "ctv" / "SYN002"
    report = json.loads((ctv / "report.json").read_text())
    assert report["model_uri"] == "models:/ctvlab-unet@candidate" and report["rtstruct"]["rois"]
    check = subprocess.run([dciodvfy, str(ctv / "rtstruct.dcm")], capture_output=True, text=True)
    assert not [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]

    snippet = readme_block(PYTHON_MARK)
    assert "mlflow.pyfunc.load_model" in snippet
    scope: dict = {}
    exec(compile(snippet, "docs/guides/predict.md", "exec"), scope)
    assert scope["probability"].shape[:2] == (1, 1) and 0 <= scope["probability"].min() <= 1


def readme_ctvlab_commands() -> list[list[str]]:
    """Every `ctvlab …` line inside the manual's shell code blocks (comments dropped)."""
    commands, fence = [], None
    for line in MANUAL.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence not in ("", "sh", "bash"):  # outside a block, or a Python/YAML/ini block
            continue
        line = line.split("  #", 1)[0].strip()
        if line.startswith("ctvlab "):
            commands.append(shlex.split(line.replace("$PWD", "/abs")))
    return commands


@pytest.mark.parametrize("argv", readme_ctvlab_commands(), ids=lambda a: " ".join(a[1:3]))
def test_every_readme_command_is_accepted_as_written(argv):
    """Each command line of the README parses against the command's real options and arguments (a renamed
    or removed option fails here); the session above also runs its commands."""
    command = typer.main.get_command(app).commands[argv[1]]
    try:
        command.make_context(argv[1], argv[2:])
    except typer.Exit:
        pass  # --help and friends
    except Exception as e:  # typer's own click raises its UsageError subclasses here
        message = e.format_message() if hasattr(e, "format_message") else repr(e)
        pytest.fail(f"README: `{' '.join(argv)}`: {message}")


def test_own_cohort_block_runs_as_written(phantom_cohort, tmp_path):
    """The "Using your own cohort" block in bash, with its placeholder `/data/mycohort` pointing at a phantom
    cohort: validation and the config file run as written. Its last line, `ctvlab run`, runs the study at the
    study's scale (a 48-feature network for 150 epochs, hours on GPUs); here it is checked to parse, and the
    config the block wrote is loaded and points at the cohort."""
    import os
    import sys

    from ctvlab.config import load_config

    block = (
        PAGES["guides/own-cohort.md"]
        .split("## Using your own cohort", 1)[1]
        .split("\nThen:\n", 1)[1]
        .split("```", 2)[1]
    )
    lines = block.strip("\n").splitlines()
    assert lines[-1] == "ctvlab run --config mystudy.yaml"
    script = "set -euo pipefail\n" + "\n".join(lines[:-1]).replace("/data/mycohort", str(phantom_cohort))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "4 valid, 0 invalid" in done.stdout
    cfg = load_config(tmp_path / "mystudy.yaml")
    assert cfg.name == "my-study" and Path(cfg.cohort.raw_dir) == phantom_cohort
    assert cfg.cohort.source == "raw" and Path(cfg.workdir) == Path("runs/my-study")


def test_the_readme_fits_on_a_screen_or_two_and_its_links_resolve():
    assert len(README.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#\s]+)", README):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target


def test_the_generated_reference_is_current():
    """docs/reference/cli.md and config-keys.md are rendered from the command line and the config schema:
    `make docs-reference` after changing either."""
    from ctvlab.docsgen import render_all

    for name, text in render_all().items():
        assert PAGES[f"reference/{name}"] == text, (
            f"docs/reference/{name} is out of date: run `make docs-reference`"
        )


def test_the_manual_builds_strictly(tmp_path):
    """Every page in the nav, every link and anchor resolving: `mkdocs build --strict` as CI would."""
    import os
    import sys

    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
