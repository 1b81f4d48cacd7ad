"""The report's interactive viewer: NiiVue, the WebGL NIfTI viewer, over a test patient's images and CTVs.

`write_viewer_volumes` (called by `ctvlab evaluate` for the patients it draws contour figures of) writes one
folder per patient, named by the patient's pseudonym, on the prepared grid the CTVs were scored on: the T1c
and FLAIR as the model saw them, scaled to 0–255 between the 0.5th and 99.5th percentiles inside the brain,
and each CTV, the pre-RT lesion and the new progression as a 0/1 label volume (NIfTI intent "label", which
NiiVue draws with an outline). Small files: about 30 kB a patient on the 3 mm grid.

`viewer_html` turns those folders into one HTML fragment that carries NiiVue itself (its UMD build,
vendored in `assets/`, BSD-2-Clause) and every volume as base64, so the report stays a single file that
opens offline. The fragment: a patient picker, T1c or FLAIR underneath, each overlay toggled by a check box,
axial / coronal / sagittal / all three planes; the mouse wheel scrolls through slices, a click moves the
crosshair. NiiVue is a few megabytes of script; it is written once per report, not once per patient.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).with_name("assets")
NIIVUE_JS = ASSETS / "niivue.umd.js"
NIIVUE_VERSION = "0.69.0"  # npm @niivue/niivue, file dist/niivue.umd.js, unchanged
NIIVUE_SHA256 = "47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af"

VIEWER_FOLDER = "viewer"  # under the evaluation's results: one folder per patient, named by pseudonym
VIEW_FILE = "view.json"  # beside the volumes: where the viewer opens (the centre of the overlays, mm)
BACKGROUNDS = {"t1c": "T1c", "flair": "FLAIR"}
# Overlays in drawing order: key, label, colour (RGB 0–255), shown when the viewer opens. The CTV colours
# are the contour figures' (model red, RTOG yellow, EORTC green).
OVERLAYS: tuple[tuple[str, str, tuple[int, int, int], bool], ...] = (
    ("progression", "progression (follow-up)", (230, 40, 230), True),
    ("lesion", "pre-RT lesion (CEL ∪ T2L)", (80, 200, 255), False),
    ("isovolume", "iso-volume margin", (70, 110, 255), False),
    ("eortc", "EORTC CTV", (40, 200, 60), True),
    ("rtog", "RTOG CTV", (255, 220, 0), True),
    ("model", "model CTV", (255, 30, 30), True),
)
FILL_OPACITY = 0.3  # each overlay is filled this opaque and outlined at full strength


def _save(data: np.ndarray, affine: np.ndarray, path: Path, label: bool) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=np.uint8), affine)
    img.header.set_xyzt_units("mm")
    if label:
        img.header.set_intent("label")  # NiiVue outlines label volumes
    else:
        img.header["cal_min"], img.header["cal_max"] = 0, 255
    nib.save(img, str(path))


def scaled_uint8(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """An image as 0–255 between its 0.5th and 99.5th percentiles inside the brain (0 outside it)."""
    values = image[brain > 0]
    if values.size == 0:
        return np.zeros(image.shape, np.uint8)
    lo, hi = np.percentile(values, [0.5, 99.5])
    scaled = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return np.where(brain > 0, np.rint(scaled), 0).astype(np.uint8)


def write_viewer_volumes(
    folder: Path,
    affine: np.ndarray,
    backgrounds: dict[str, np.ndarray],
    brain: np.ndarray,
    overlays: dict[str, np.ndarray],
) -> Path:
    """One patient's viewer volumes into `folder` (created): `backgrounds` keyed as `BACKGROUNDS`, `overlays`
    as `OVERLAYS` (boolean masks on the same grid). Unknown keys are refused, so the viewer shows every file."""
    unknown = (set(backgrounds) - set(BACKGROUNDS)) | (set(overlays) - {k for k, *_ in OVERLAYS})
    if unknown:
        raise ValueError(f"the viewer has no layer named {sorted(unknown)}")
    folder.mkdir(parents=True, exist_ok=True)
    for key, image in backgrounds.items():
        _save(scaled_uint8(image, brain), affine, folder / f"{key}.nii.gz", label=False)
    for key, mask in overlays.items():
        _save(np.asarray(mask, bool), affine, folder / f"{key}.nii.gz", label=True)
    # Where the viewer opens: the centre (mm) of everything drawn over the image, else of the brain.
    shown = np.any([np.asarray(m, bool) for m in overlays.values()], axis=0) if overlays else brain > 0
    voxels = np.argwhere(shown if shown.any() else np.ones(brain.shape, bool)).mean(axis=0)
    centre = (np.asarray(affine, float) @ np.append(voxels, 1.0))[:3]
    (folder / VIEW_FILE).write_text(json.dumps({"centre_mm": [round(float(c), 2) for c in centre]}))
    return folder


def niivue_source() -> str:
    """NiiVue's script, checked against the digest it was vendored with."""
    data = NIIVUE_JS.read_bytes()
    if hashlib.sha256(data).hexdigest() != NIIVUE_SHA256:
        raise ValueError(f"{NIIVUE_JS} is not NiiVue {NIIVUE_VERSION} as vendored (sha256 differs)")
    return data.decode("utf-8")


def _payload(folders: list[Path]) -> dict:
    patients = {}
    for folder in folders:
        files = {
            p.name.removesuffix(".nii.gz"): base64.b64encode(p.read_bytes()).decode("ascii")
            for p in sorted(folder.glob("*.nii.gz"))
        }
        if any(k in files for k in BACKGROUNDS):
            view = folder / VIEW_FILE
            files["centre_mm"] = json.loads(view.read_text())["centre_mm"] if view.is_file() else None
            patients[folder.name] = files
    return {
        "patients": patients,
        "backgrounds": BACKGROUNDS,
        "overlays": [
            {"key": k, "label": label, "rgb": list(rgb), "on": on} for k, label, rgb, on in OVERLAYS
        ],
        "opacity": FILL_OPACITY,
    }


VIEWER_JS = """
(function () {
  const root = document.getElementById('ctv-viewer');
  const data = JSON.parse(document.getElementById('ctv-viewer-data').textContent);
  const pick = root.querySelector('select[name=patient]');
  const back = root.querySelector('select[name=background]');
  const status = root.querySelector('.viewer-status');
  const nv = new niivue.Niivue({backColor: [0, 0, 0, 1], crosshairColor: [0.3, 0.7, 1, 0.5], crosshairWidth: 1,
                                show3Dcrosshair: false, isColorbar: false, dragAndDropEnabled: false});
  const attached = nv.attachToCanvas(root.querySelector('canvas')).then(() => nv.setAtlasOutline(1));
  const checked = key => root.querySelector('input[data-layer="' + key + '"]').checked;
  function visibility() {
    nv.volumes.forEach(v => { if (v.layer) nv.setOpacity(nv.volumes.indexOf(v), checked(v.layer) ? data.opacity : 0); });
  }
  async function show() {
    await attached;
    const files = data.patients[pick.value];
    root.dataset.ready = '';
    while (nv.volumes.length) nv.removeVolume(nv.volumes[0]);
    const base = files[back.value] ? back.value : Object.keys(data.backgrounds).find(k => files[k]);
    const bg = await niivue.NVImage.loadFromBase64({base64: files[base], name: base + '.nii.gz', colormap: 'gray',
                                                    cal_min: 0, cal_max: 255});
    nv.addVolume(bg);
    // NiiVue skips a transparent overlay except the first, whose label outline it draws at any opacity:
    // a transparent copy of the image takes that place, so every overlay below can be switched off.
    const spacer = bg.clone();
    spacer.opacity = 0;
    nv.addVolume(spacer);
    for (const o of data.overlays) {
      if (!files[o.key]) { root.querySelector('input[data-layer="' + o.key + '"]').disabled = true; continue; }
      const img = await niivue.NVImage.loadFromBase64({base64: files[o.key], name: o.key + '.nii.gz',
                                                       cal_min: 0, cal_max: 1});
      img.setColormapLabel({R: [0, o.rgb[0]], G: [0, o.rgb[1]], B: [0, o.rgb[2]], A: [0, 255], I: [0, 1],
                            labels: ['', o.label]});
      img.layer = o.key;
      nv.addVolume(img);
    }
    if (files.centre_mm) nv.scene.crosshairPos = nv.mm2frac(files.centre_mm);
    visibility();
    status.textContent = 'patient ' + pick.value + ' · ' + data.backgrounds[base] + ' · scroll: slices, click: move the crosshair';
    root.dataset.ready = pick.value;
  }
  root.querySelectorAll('input[data-layer]').forEach(box => box.addEventListener('change', visibility));
  root.querySelectorAll('button[data-plane]').forEach(b => b.addEventListener('click',
    () => nv.setSliceType(nv['sliceType' + b.dataset.plane])));
  pick.addEventListener('change', show);
  back.addEventListener('change', show);
  show().catch(e => { status.textContent = 'the viewer could not load: ' + e; console.error(e); });
})();
"""

VIEWER_CSS = (
    "#ctv-viewer .viewer-canvas{width:100%;height:480px;background:#000}"
    "#ctv-viewer .viewer-controls{display:flex;flex-wrap:wrap;gap:.4em 1em;align-items:center;margin:.4em 0}"
    "#ctv-viewer label{white-space:nowrap}#ctv-viewer .swatch{display:inline-block;width:.9em;height:.9em;"
    "border:1px solid #555;margin-right:.25em;vertical-align:-.1em}"
)


def viewer_html(folders: list[Path]) -> str:
    """The viewer for these patients' folders (`write_viewer_volumes`) as one self-contained HTML fragment;
    empty when no folder holds a background image."""
    payload = _payload(folders)
    if not payload["patients"]:
        return ""
    options = "".join(
        f'<option value="{html.escape(n)}">{html.escape(n)}</option>' for n in payload["patients"]
    )
    backs = "".join(f'<option value="{k}">{v}</option>' for k, v in BACKGROUNDS.items())
    boxes = "".join(
        f'<label><input type="checkbox" data-layer="{k}"{" checked" if on else ""}>'
        f'<span class="swatch" style="background:rgb{rgb}"></span>{html.escape(label)}</label>'
        for k, label, rgb, on in OVERLAYS
    )
    planes = "".join(
        f'<button type="button" data-plane="{p}">{t}</button>'
        for p, t in (
            ("Axial", "axial"),
            ("Coronal", "coronal"),
            ("Sagittal", "sagittal"),
            ("Multiplanar", "all three"),
        )
    )
    # NiiVue sizes the canvas to its parent and paints the parent black: the canvas gets a box of its own.
    # JSON inside a script element: "</" could close it, so it is escaped (valid JSON either way).
    data = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    return (
        f"<style>{VIEWER_CSS}</style>"
        f'<div id="ctv-viewer" data-ready="">'
        f'<div class="viewer-controls"><label>patient <select name="patient">{options}</select></label>'
        f'<label>image <select name="background">{backs}</select></label>{planes}</div>'
        f'<div class="viewer-controls">{boxes}</div><div class="viewer-canvas"><canvas></canvas></div><p class="note viewer-status">loading…</p></div>'
        f'<script type="application/json" id="ctv-viewer-data">{data}</script>'
        f"<script>/* NiiVue {NIIVUE_VERSION}, BSD-2-Clause, https://github.com/niivue/niivue */\n{niivue_source()}</script>"
        f"<script>{VIEWER_JS}</script>"
    )
