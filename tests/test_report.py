"""`ctvlab report`: one self-contained HTML file from the stages' outputs, each beside the study's value, with
outputs that are not current for the config marked stale and patient images left out of the shared copy."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctvlab.config import StudyConfig
from ctvlab.ctv.viewer import VIEWER_FOLDER, write_viewer_volumes
from ctvlab.pipeline import Stamps, current_stages, model_digest, stage_key
from ctvlab.splits import load_split
from ctvlab.stages.report import build_report as _build

pytestmark = pytest.mark.ray  # the prepared phantom is built with Ray Data

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
STALE = 'class="stale"'


def _study(tmp_path: Path, prepared_phantom: Path, phantom_cohort: Path) -> StudyConfig:
    cfg = StudyConfig(name="report", workdir=tmp_path / "work")
    cfg.cohort.raw_dir, cfg.cohort.source = phantom_cohort, "raw"
    cfg.workdir.mkdir()
    (cfg.workdir / "prep").symlink_to(prepared_phantom)
    res = cfg.results_dir
    ev = res / "evaluate"
    ev.mkdir(parents=True)
    pd.DataFrame([{"ctv": c, "n": 2, "sensitivity_mean": s, "sensitivity_sd": 0.1, "specificity_mean": 0.9,
                   "specificity_sd": 0.05, "pcc_mean": 0.7, "pcc_sd": 0.1}
                  for c, s in (("model", 0.876), ("rtog", 0.954))]).to_csv(ev / "summary.csv", index=False)  # fmt: skip
    pd.DataFrame(
        [{"metric": "pcc", "reference": "model", "other": "rtog", "n": 2, "p_value": 0.5, "p_holm": 1.0}]
    ).to_csv(ev / "wilcoxon.csv", index=False)
    (ev / "fig3_metric_boxes.png").write_bytes(PNG)
    (ev / "fig4_contours_pt-abc.png").write_bytes(PNG)
    ball = np.linalg.norm(np.indices((20, 24, 20)).transpose(1, 2, 3, 0) - [10, 12, 10], axis=-1)
    write_viewer_volumes(ev / VIEWER_FOLDER / "pt-abc", np.diag([3.0, 3, 3, 1]), {"t1c": 100 - ball}, ball < 9,
                         {"model": ball < 4, "progression": ball < 2})  # fmt: skip
    roc = res / "voxel_models" / "rf-cel-all"
    roc.mkdir(parents=True)
    (roc / "roc.json").write_text(
        json.dumps({"auc": 0.8, "auc_mean": 0.812, "auc_std": 0.05, "auc_distance": 0.9})
    )
    model = res / "model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"base_features": 4, "epoch": 3}))
    return cfg


def build_report(cfg: StudyConfig, *args, **kw) -> Path:
    """The report as `ctvlab report` writes it: with the stages' currency read from the working directory."""
    return _build(cfg, current_stages(cfg), *args, **kw)


def _text(path: Path) -> str:
    return re.sub(r"<[^>]+>", " ", path.read_text())


def test_report_puts_each_result_beside_the_study_and_marks_what_is_not_current(
    tmp_path, prepared_phantom, phantom_cohort
):
    cfg = _study(tmp_path, prepared_phantom, phantom_cohort)
    out = build_report(cfg)
    page = out.read_text()
    text = _text(out)
    assert out == cfg.results_dir / "report.html" and page.startswith("<!DOCTYPE html>")
    assert "0.88 ± 0.10 [0.92 ± 0.11]" in text  # the model's sensitivity beside the study's
    assert "0.95 ± 0.10 [0.95 ± 0.08]" in text  # RTOG's
    assert "0.81 ± 0.05" in text and "0.880" in text  # CEL AUC beside the study's 0.88
    assert (
        "N | " not in text and "Cohort (Table 1)" in text and "[101]" in text
    )  # Table 1 beside the study's N
    assert (
        page.count("<img alt=") == page.count('src="data:image/png;base64,') == 2
    )  # embedded: the file stands alone
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external resource: the file stands alone
    assert page.count('id="ctv-viewer"') == 1 and "NiiVue 0.69.0" in page
    assert "Not run" in text and "pipeline.loss_study" in text  # a section that never ran says how to run it
    # no stamps: every section with outputs is marked not current
    assert page.count(STALE) == 2

    # evaluation stamped with the key it has now: current; the voxel models stay stale
    split = load_split(cfg.prep_dir)
    inputs = {
        "dataset": split.dataset_digest,
        "split": split.digest,
        "model": model_digest(cfg.results_dir / "model"),
    }
    Stamps(cfg.workdir).write("evaluate", stage_key("evaluate", cfg, inputs))
    assert build_report(cfg).read_text().count(STALE) == 1
    # ... until its settings change: then it is stale again
    cfg.ctv.rtog_margin_mm = 25.0
    assert build_report(cfg).read_text().count(STALE) == 2


def test_the_shared_copy_leaves_out_patient_images(tmp_path, prepared_phantom, phantom_cohort):
    cfg = _study(tmp_path, prepared_phantom, phantom_cohort)
    shared = build_report(cfg, tmp_path / "shared.html", patient_images=False, local_paths=False)
    assert shared.read_text().count("<img alt=") == 1  # Fig. 3 only, not the contour figure
    assert str(tmp_path) not in shared.read_text()  # no local folder named
    assert str(cfg.workdir) in build_report(cfg).read_text()
    assert "left out of this copy" in _text(shared)
    assert 'id="ctv-viewer"' not in shared.read_text()  # the 3D viewer shows anatomy too
    assert not list(tmp_path.glob(".tmp-*"))  # written to a temporary name, then renamed


def test_report_command_refuses_a_missing_working_directory(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ctvlab.cli", "report", "--workdir", str(tmp_path / "nowhere")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0 and "does not exist" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_an_unreadable_output_spoils_its_section_only(tmp_path, prepared_phantom, phantom_cohort):
    cfg = _study(tmp_path, prepared_phantom, phantom_cohort)
    (cfg.results_dir / "evaluate" / "summary.csv").write_text("x\n1\n")  # not an evaluation table
    text = _text(build_report(cfg))
    assert "could not be read" in text and "KeyError" in text
    assert "0.81 ± 0.05" in text and "Provenance" in text  # the other sections are there


def test_the_coverage_section_shows_target_against_achieved_the_curve_and_the_control(
    tmp_path, prepared_phantom, phantom_cohort
):
    cfg = _study(tmp_path, prepared_phantom, phantom_cohort)
    ev = cfg.results_dir / "evaluate"
    pd.DataFrame([{"ctv": "cov95", "target": 0.95, "threshold": 0.12, "miss": 0.043, "volume_cm3": 180.0},
                  {"ctv": "rtog", "target": None, "threshold": None, "miss": 0.02, "volume_cm3": 250.0}]).to_csv(
        ev / "coverage.csv", index=False)  # fmt: skip
    pd.DataFrame([{"volume": "model CTV", "map": "model", "gain": 0.031, "ceiling": 0.094}]).to_csv(
        ev / "control.csv", index=False
    )
    (ev / "coverage_volume.png").write_bytes(PNG)
    (ev / "reliability.png").write_bytes(PNG)
    out = build_report(cfg)
    text, page = _text(out), out.read_text()
    assert "Coverage: guaranteed CTVs" in text and "cov95" in text and "0.043" in text
    assert "Positive control" in text and "0.094" in text  # the ceiling beside the model's gain
    assert page.count("<img alt=") == 4  # + the curve and the reliability diagram


def test_the_report_opens_in_a_browser_with_its_viewer_and_nothing_from_the_network(
    tmp_path, prepared_phantom, phantom_cohort
):
    from tests.browser import open_page

    out = build_report(_study(tmp_path, prepared_phantom, phantom_cohort))
    with open_page() as (page, errors):
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(out.as_uri())
        page.wait_for_function(
            "document.getElementById('ctv-viewer').dataset.ready === 'pt-abc'", timeout=30_000
        )
        assert "patient pt-abc · T1c" in page.locator(".viewer-status").inner_text()
        assert errors == []
        assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == []
