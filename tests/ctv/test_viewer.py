"""The report's 3D viewer: the volumes it carries, and what a person sees in a real browser (headless
Chromium): it loads with no console error and no request off the page, each overlay appears where its mask
is and disappears when switched off, and the planes and patients switch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctvlab.ctv import viewer
from ctvlab.ctv.viewer import OVERLAYS, scaled_uint8, viewer_html, write_viewer_volumes
from tests.browser import open_page, screenshot

SHAPE = (40, 48, 40)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


def _ball(centre, radius) -> np.ndarray:
    grid = np.indices(SHAPE).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


def _patient(folder: Path, model_centre) -> Path:
    brain = _ball((20, 24, 20), 17)
    t1c = np.where(brain, 100.0 + np.indices(SHAPE)[0], 0.0)
    overlays = {
        "model": _ball(model_centre, 5),
        "rtog": _ball((20, 24, 20), 3),
        "progression": _ball((20, 30, 20), 2),
    }
    return write_viewer_volumes(folder, AFFINE, {"t1c": t1c, "flair": t1c[::-1]}, brain, overlays)


def test_the_volumes_are_small_labelled_and_scaled(tmp_path):
    folder = _patient(tmp_path / "pt-1", (20, 24, 20))
    names = {f"{k}.nii.gz" for k in ("t1c", "flair", "model", "rtog", "progression")}
    assert {p.name for p in folder.iterdir()} == names | {viewer.VIEW_FILE}
    # the viewer opens on the centre of what is drawn (mm): the balls at (20, 24, 20) with 5 and 3 voxels'
    # radius and the one at (20, 30, 20) with 2 pull it a little towards +y; x and z stay at 20 voxels
    centre = json.loads((folder / viewer.VIEW_FILE).read_text())["centre_mm"]
    assert centre[0] == centre[2] == 60.0 and 72.0 < centre[1] < 75.0, centre
    model = nib.load(folder / "model.nii.gz")
    assert model.header.get_intent()[0] == "label" and model.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(model.dataobj) > 0, _ball((20, 24, 20), 5))
    assert np.allclose(model.affine, AFFINE)
    t1c = np.asanyarray(nib.load(folder / "t1c.nii.gz").dataobj)
    assert t1c.dtype == np.uint8 and t1c.max() == 255 and t1c[0, 0, 0] == 0  # 0 outside the brain
    assert sum(p.stat().st_size for p in folder.iterdir()) < 40_000


def test_scaling_clips_at_the_brains_percentiles():
    image = np.arange(1000, dtype=float).reshape(10, 10, 10)
    brain = np.zeros_like(image, bool)
    brain[1:9] = True
    out = scaled_uint8(image, brain)
    values = image[brain]
    lo, hi = np.percentile(values, [0.5, 99.5])
    inside = image[2, 5, 5]
    assert out[2, 5, 5] == round((inside - lo) / (hi - lo) * 255)
    assert out[brain].min() == 0 and out[brain].max() == 255 and not out[~brain].any()


def test_an_unknown_layer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no layer named \\['ctv'\\]"):
        write_viewer_volumes(tmp_path / "x", AFFINE, {}, np.ones(SHAPE, bool), {"ctv": np.ones(SHAPE, bool)})
    assert not (tmp_path / "x").exists()


def test_no_volumes_no_viewer(tmp_path):
    (tmp_path / "empty").mkdir()
    assert viewer_html([tmp_path / "empty"]) == ""


def test_a_changed_niivue_is_refused(tmp_path, monkeypatch):
    assert hashlib.sha256(viewer.NIIVUE_JS.read_bytes()).hexdigest() == viewer.NIIVUE_SHA256
    changed = tmp_path / "niivue.umd.js"
    changed.write_bytes(viewer.NIIVUE_JS.read_bytes() + b"\n")
    monkeypatch.setattr(viewer, "NIIVUE_JS", changed)
    with pytest.raises(ValueError, match=r"not NiiVue 0\.69\.0 as vendored"):
        viewer.niivue_source()


def _red(rgb: np.ndarray) -> int:
    """Pixels the model's red colours: red well above both green and blue."""
    return int(((rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 50).sum())


def _magenta(rgb: np.ndarray) -> int:
    return int(((np.minimum(rgb[..., 0], rgb[..., 2]) - rgb[..., 1]) > 40).sum())


def _yellow(rgb: np.ndarray) -> int:
    return int(((np.minimum(rgb[..., 0], rgb[..., 1]) - rgb[..., 2]) > 40).sum())


def test_the_viewer_shows_each_overlay_and_switches_it_off_in_a_real_browser(tmp_path):
    folders = [_patient(tmp_path / "pt-a", (12, 24, 20)), _patient(tmp_path / "pt-b", (28, 24, 20))]
    page_file = tmp_path / "viewer.html"
    page_file.write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>{viewer_html(folders)}</body></html>'
    )
    with open_page() as (page, errors):
        off_page = []
        page.on(
            "request",
            lambda r: off_page.append(r.url) if not r.url.startswith(("file:", "data:", "blob:")) else None,
        )
        page.goto(page_file.as_uri())
        root = page.locator("#ctv-viewer")
        page.wait_for_function(
            "document.getElementById('ctv-viewer').dataset.ready === 'pt-a'", timeout=30_000
        )
        assert "patient pt-a · T1c" in page.locator(".viewer-status").inner_text()
        # the check boxes as OVERLAYS orders them, each with its label; lesion and iso-volume have no file here
        labels = page.locator("#ctv-viewer label:has(input[data-layer])").all_inner_texts()
        assert [t.strip() for t in labels] == [label for _, label, _, _ in OVERLAYS]
        assert page.locator('input[data-layer="lesion"]').is_disabled()
        canvas = page.locator("#ctv-viewer .viewer-canvas")
        page.click('button[data-plane="Axial"]')
        opened = screenshot(canvas, tmp_path / "opened.png")
        for key in ("rtog", "progression"):
            page.uncheck(f'input[data-layer="{key}"]')
        with_model = screenshot(canvas, tmp_path / "model_on.png")
        assert _magenta(opened) > 50 and _magenta(with_model) < 0.02 * _magenta(opened)  # the progression
        assert _yellow(opened) > 50 and _yellow(with_model) < 0.02 * _yellow(opened)  # RTOG
        page.uncheck('input[data-layer="model"]')
        without = screenshot(canvas, tmp_path / "model_off.png")
        assert _red(with_model) > 400 and _red(without) < 0.02 * _red(with_model), (
            _red(with_model),
            _red(without),
        )
        # the model's centre lies 16 voxels (48 mm) further along x in the second patient: on screen its red
        # moves right (NiiVue's default neurological view, x to the right) by 16 of the 48 rows' pixel pitch
        page.check('input[data-layer="model"]')
        a_cols = np.nonzero(
            ((with_model[..., 0] - np.maximum(with_model[..., 1], with_model[..., 2])) > 50).any(0)
        )[0]
        page.select_option('select[name="patient"]', "pt-b")
        page.wait_for_function(
            "document.getElementById('ctv-viewer').dataset.ready === 'pt-b'", timeout=30_000
        )
        b = screenshot(canvas, tmp_path / "patient_b.png")
        b_cols = np.nonzero(((b[..., 0] - np.maximum(b[..., 1], b[..., 2])) > 50).any(0))[0]
        pitch = b.shape[0] / SHAPE[1]  # the axial slice fills the canvas's height: 48 voxels along y
        assert abs((b_cols.mean() - a_cols.mean()) - 16 * pitch) < 2 * pitch, (
            a_cols.mean(),
            b_cols.mean(),
            pitch,
        )
        # FLAIR underneath, and all three planes
        page.select_option('select[name="background"]', "flair")
        page.wait_for_function(
            "document.querySelector('#ctv-viewer .viewer-status').textContent.includes('FLAIR')"
        )
        page.click('button[data-plane="Multiplanar"]')
        root.screenshot(path=str(tmp_path / "multiplanar.png"))
        assert errors == [] and off_page == []
