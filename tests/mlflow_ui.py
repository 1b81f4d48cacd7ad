"""The MLflow UI as a reviewer meets it, checked in headless Chromium against a real `mlflow server` holding a
study that `ctvlab run` recorded (the two-node job test's smoke study, `tests/test_jobs.py`). The runs table
opens on the saved view "CTV review": the runs named by stage, each with its description, the CTV metrics as
columns; the evaluation run lists its figures and the study's report under Artifacts; the crowned model
version links to the evaluation run that crowned it.

The screenshots (`shots`) are those of docs/guides/mlflow-ui.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from tests.browser import CHROMIUM, open_page

# Resource errors MLflow 3.17.2's own pages log against a plain `mlflow server`, whatever the study:
# the UI asks who is logged in (no auth app: 404), and the model version page asks the server for the
# version's MLmodel, which a server proxying artifacts to `--artifacts-destination` with a SQLite backend
# fails to read (500, "an mlflow-artifacts URI was supplied, the tracking URI must be a valid http or
# https URI" in the server's log). Neither is content ctvlab writes; any other console error fails a check.
MLFLOW_OWN_FAILURES = ("/ajax-api/2.0/mlflow/users/current", "/model-versions/get-artifact?path=MLmodel")
TIMEOUT_MS = 30_000


def review_in_browser(tracker, registered_model: str, evaluation_summary: Path, shots: Path) -> None:
    """Every check below on one browser page; `tracker`: the study's experiment on the server. Without a
    Chromium the checks are left out with a warning (not a skip: the job test's other checks stand)."""
    import warnings

    from ctvlab.stages.registry import EVALUATION_RUN_TAG

    if not Path(CHROMIUM).is_file():
        warnings.warn(
            f"no Chromium at {CHROMIUM}: the MLflow UI was not checked (`make browser`)", stacklevel=2
        )
        return

    version = tracker.client.get_model_version_by_alias(registered_model, "champion")
    study = SimpleNamespace(
        tracker=tracker, uri=tracker.tracking_uri, model=registered_model, version=version.version,
        evaluation_run=version.tags[EVALUATION_RUN_TAG], train_run=version.run_id, shots=shots,
        model_pcc=float(pd.read_csv(evaluation_summary).set_index("ctv").loc["model", "pcc_mean"]),
    )  # fmt: skip
    shots.mkdir(parents=True, exist_ok=True)
    with open_page(1280, 800) as (page, errors):
        logged: list[tuple[str, str]] = []
        page.on(
            "console",
            lambda m: logged.append((m.text, m.location.get("url", ""))) if m.type == "error" else None,
        )
        browser = SimpleNamespace(page=page, errors=errors, logged=logged)
        for check in (runs_table, evaluation_artifacts, champion_version):
            check(study, page)
            assert not unexpected_errors(browser), (check.__name__, unexpected_errors(browser))


def unexpected_errors(browser) -> list[str]:
    """Console errors other than MLflow's own failed requests (`MLFLOW_OWN_FAILURES`), and every uncaught
    exception."""
    own = [text for text, url in browser.logged
           if text.startswith("Failed to load resource") and any(f in url for f in MLFLOW_OWN_FAILURES)]  # fmt: skip
    rest = list(browser.errors)
    for text in own:
        rest.remove(text)
    return rest


def close_assistant(page) -> None:
    """MLflow 3.17 opens its assistant panel beside the page on a first visit; a reviewer closes it."""
    question = page.get_by_placeholder(re.compile("Ask a question"))
    if question.count() and question.first.is_visible():
        page.get_by_role("button", name="Close").first.click()
        question.first.wait_for(state="hidden", timeout=TIMEOUT_MS)


def runs_table(study, page) -> None:
    """The runs table opens on the review view with the stages, their descriptions and the CTV metrics."""
    url = study.tracker.review_url()
    assert "workflowType=machine_learning" in url and "viewStateShareKey=ctvlab-review" in url
    page.goto(url)
    page.get_by_role("button", name=re.compile("CTV review")).wait_for(timeout=TIMEOUT_MS)
    close_assistant(page)
    for stage in ("split", "evaluate", "report"):  # the runs are named by stage
        page.get_by_role("link", name=stage, exact=True).first.wait_for(timeout=TIMEOUT_MS)
    header = page.locator(".ag-header-cell[role=columnheader][col-id='metrics.`model_pcc_mean`']")
    header.wait_for(timeout=TIMEOUT_MS)
    assert header.inner_text().strip() == "model_pcc_mean"
    assert (
        page.locator(".ag-header-cell[col-id='attributes.`Description`']").inner_text().strip()
        == "Description"
    )
    # The evaluation's row: its headline as the description, its mean model PCC in the metric column.
    row = page.locator(f'.ag-center-cols-container [row-id="{study.evaluation_run}"]')
    row.get_by_text(f"Model CTV PCC {study.model_pcc:.2f}").wait_for(timeout=TIMEOUT_MS)
    cells = row.locator('[col-id="metrics.`model_pcc_mean`"]')
    assert cells.count() == 1 and float(cells.inner_text()) == pytest.approx(study.model_pcc, abs=1e-9)
    # the voxel models' and the search's rows say their result first too
    page.get_by_text(re.compile(r"^NEL progression \(all\): ROC AUC \d\.\d\d")).first.wait_for(
        timeout=TIMEOUT_MS
    )
    page.get_by_text(re.compile(r"^Best of \d+ trials: validation Tversky")).first.wait_for(
        timeout=TIMEOUT_MS
    )
    train = page.locator(f'.ag-center-cols-container [row-id="{study.train_run}"]')
    assert train.get_by_text(re.compile(r"^Best epoch \d+ of \d+ by validation Tversky")).is_visible()
    page.screenshot(path=str(study.shots / "mlflow-runs-table.png"))


def evaluation_artifacts(study, page) -> None:
    """The evaluation run lists its figures and the study's report under Artifacts, one click away."""
    page.goto(study.tracker.run_url(study.evaluation_run))
    page.get_by_role("heading", name="evaluate").wait_for(timeout=TIMEOUT_MS)
    close_assistant(page)
    assert page.get_by_text(re.compile(r"^Model CTV PCC \d\.\d\d")).first.is_visible()  # its description
    page.get_by_role("tab", name="Artifacts").click()  # the one click from the run's page
    page.get_by_text("report.html", exact=True).wait_for(timeout=TIMEOUT_MS)
    page.get_by_text("figures", exact=True).click()
    page.get_by_text("fig3_metric_boxes.png", exact=True).wait_for(timeout=TIMEOUT_MS)
    page.get_by_text("fig3_metric_boxes.png", exact=True).click()
    page.locator("img[alt='figures/fig3_metric_boxes.png']").wait_for(timeout=TIMEOUT_MS)  # shown beside it
    page.screenshot(path=str(study.shots / "mlflow-evaluation-artifacts.png"))


def champion_version(study, page) -> None:
    """The champion version shows its alias and links to the evaluation that crowned it."""
    from ctvlab.stages.registry import EVALUATION_RUN_TAG
    from ctvlab.tracking import ui_url

    page.goto(ui_url(study.uri, f"models/{study.model}/versions/{study.version}"))
    page.get_by_text(f"Version {study.version}", exact=True).first.wait_for(timeout=TIMEOUT_MS)
    close_assistant(page)
    assert page.get_by_text("champion").first.is_visible()
    assert page.get_by_text(EVALUATION_RUN_TAG).first.is_visible()  # the version's tag naming the run
    link = page.get_by_role("link", name=study.evaluation_run, exact=True)
    link.wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=str(study.shots / "mlflow-model-version.png"))
    with page.context.expect_page() as opened:  # MLflow opens a description's links in a new tab
        link.click()
    run_page = opened.value
    run_page.get_by_role("heading", name="evaluate").wait_for(timeout=TIMEOUT_MS)
    assert study.evaluation_run in run_page.url and "workflowType=machine_learning" in run_page.url
    run_page.close()
