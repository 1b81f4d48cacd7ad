"""The MLflow UI as a reviewer meets it, in headless Chromium against a real `mlflow server` on 127.0.0.1: a
tiny study (a 2-epoch training run, its evaluation, the champion crowned, the report) recorded there by
ctvlab's own stages, then the pages a reviewer opens first. The runs table opens on the saved view
"CTV review": the runs named by stage, each with its description, the CTV metrics as columns; the evaluation
run lists its figures and the study's report under Artifacts; the crowned model version links to the
evaluation run that crowned it.

The screenshots each test takes (in its temporary folder) are those of docs/guides/mlflow-ui.md.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from tests.browser import chromium_or_skip, open_page
from tests.conftest import start_mlflow_server, tiny_study

pytestmark = pytest.mark.ray  # training runs on the session's Ray

# Resource errors MLflow 3.17.2's own pages log against a plain `mlflow server`, whatever the study:
# the UI asks who is logged in (no auth app: 404), and the model version page asks the server for the
# version's MLmodel, which a server proxying artifacts to `--artifacts-destination` with a SQLite backend
# fails to read (500, "an mlflow-artifacts URI was supplied, the tracking URI must be a valid http or
# https URI" in the server's log). Neither is content ctvlab writes; any other console error fails a test.
MLFLOW_OWN_FAILURES = ("/ajax-api/2.0/mlflow/users/current", "/model-versions/get-artifact?path=MLmodel")
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def study(prepared_phantom, tmp_path_factory, ray_local):
    from ctvlab.pipeline import current_stages
    from ctvlab.stages.evaluate import evaluate_study
    from ctvlab.stages.registry import crown
    from ctvlab.stages.report import report_stage
    from ctvlab.stages.train import train_unet
    from ctvlab.tracking import tracker_for

    chromium_or_skip()
    root = tmp_path_factory.mktemp("mlflow_ui")
    with start_mlflow_server(root) as (uri, _):
        cfg = tiny_study(root / "work", uri, epochs=2, num_workers=1, cpus_per_worker=1)
        cfg.tracking.experiment = "glioma-ctv-review"
        trained = train_unet(cfg, prepared_phantom)
        evaluation = evaluate_study(cfg, prepared_phantom, model_uri=trained.model_uri, progress=False)
        tracker = tracker_for(cfg)
        version = crown(tracker, cfg, trained.model_uri, evaluation)
        # Evaluated just above, outside `ctvlab run`, which stamps the stage: the report reads it as current.
        report_stage(cfg, {**current_stages(cfg), "evaluate": True})
        (root / "shots").mkdir()
        yield SimpleNamespace(uri=uri, cfg=cfg, tracker=tracker, trained=trained, evaluation=evaluation,
                              version=version, shots=root / "shots")  # fmt: skip


@pytest.fixture(scope="module")
def browser(study):
    """One page for the module's tests, and every console error it logs with the address it came from."""
    with open_page(1280, 800) as (page, errors):
        logged: list[tuple[str, str]] = []
        page.on(
            "console",
            lambda m: logged.append((m.text, m.location.get("url", ""))) if m.type == "error" else None,
        )
        yield SimpleNamespace(page=page, errors=errors, logged=logged)


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


def test_the_runs_table_opens_on_the_review_view_with_stages_descriptions_and_ctv_metrics(study, browser):
    page = browser.page
    url = study.tracker.review_url()
    assert "workflowType=machine_learning" in url and "viewStateShareKey=ctvlab-review" in url
    page.goto(url)
    page.get_by_role("button", name=re.compile("CTV review")).wait_for(timeout=TIMEOUT_MS)
    close_assistant(page)
    for stage in ("train", "evaluate", "report"):  # the runs are named by stage
        page.get_by_role("link", name=stage, exact=True).wait_for(timeout=TIMEOUT_MS)
    header = page.locator(".ag-header-cell[role=columnheader][col-id='metrics.`model_pcc_mean`']")
    header.wait_for(timeout=TIMEOUT_MS)
    assert header.inner_text().strip() == "model_pcc_mean"
    assert (
        page.locator(".ag-header-cell[col-id='attributes.`Description`']").inner_text().strip()
        == "Description"
    )
    # The evaluation's row: its headline as the description, its mean model PCC in the metric column.
    pcc = float(study.evaluation.summary.set_index("ctv").loc["model", "pcc_mean"])
    row = page.locator(f'.ag-center-cols-container [row-id="{study.evaluation.run_id}"]')
    row.get_by_text(f"Model CTV PCC {pcc:.2f}").wait_for(timeout=TIMEOUT_MS)
    cells = row.locator('[col-id="metrics.`model_pcc_mean`"]')
    assert cells.count() == 1 and float(cells.inner_text()) == pytest.approx(pcc, abs=1e-9)
    train = page.locator(f'.ag-center-cols-container [row-id="{study.trained.run_id}"]')
    assert train.get_by_text("Best validation PCC").is_visible()
    page.screenshot(path=str(study.shots / "mlflow-runs-table.png"))
    assert not unexpected_errors(browser), unexpected_errors(browser)


def test_the_evaluation_run_lists_its_figures_and_the_report_under_artifacts(study, browser):
    page = browser.page
    page.goto(study.tracker.run_url(study.evaluation.run_id))
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
    assert not unexpected_errors(browser), unexpected_errors(browser)


def test_the_champion_version_links_to_the_evaluation_that_crowned_it(study, browser):
    from ctvlab.stages.registry import EVALUATION_RUN_TAG
    from ctvlab.tracking import ui_url

    page = browser.page
    name, run_id = study.cfg.unet.registered_model_name, study.evaluation.run_id
    assert study.version is not None
    page.goto(ui_url(study.uri, f"models/{name}/versions/{study.version}"))
    page.get_by_text(f"Version {study.version}", exact=True).first.wait_for(timeout=TIMEOUT_MS)
    close_assistant(page)
    assert page.get_by_text("champion").first.is_visible()
    assert page.get_by_text(EVALUATION_RUN_TAG).first.is_visible()  # the version's tag naming the run
    link = page.get_by_role("link", name=run_id, exact=True)
    link.wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=str(study.shots / "mlflow-model-version.png"))
    with page.context.expect_page() as opened:  # MLflow opens a description's links in a new tab
        link.click()
    run_page = opened.value
    run_page.get_by_role("heading", name="evaluate").wait_for(timeout=TIMEOUT_MS)
    assert run_id in run_page.url and "workflowType=machine_learning" in run_page.url
    run_page.close()
    assert not unexpected_errors(browser), unexpected_errors(browser)
