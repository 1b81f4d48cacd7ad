"""Image intensities as functions of tissue and tumour density: small pure functions over arrays.

Every function takes the fields of one grid (any shape): tissue fractions `gm`, `wm`, `csf` (of the
voxel, summing to the brain fraction), the tumour-cell density `u` (fraction of carrying capacity),
and the cavity / necrosis / enhancement indicators (0..1). Noise is added separately (`add_noise`).

What each map shows (what the study relies on, Introduction and Results):
- T1 (pre-contrast): the template's T1 contrast, darker in the lesion and in fluid.
- T1c: T1 plus enhancement where the blood-brain barrier is broken (the CEL).
- FLAIR: grey brighter than white matter, CSF nulled; bright where the lesion is visible (u ≥ the T2L
  threshold, tumour or oedema) and only subtly brighter below it (≤ 12% with faint oedema, ≤ 8% with
  invisible cells, fading with the level).
- ADC up and FA down with infiltration (oedema, loss of directionality), including the invisible part;
  ADC lower again in the hypercellular enhancing rim; ADC high, FA low in necrosis and fluid.
- MRSI: Cho up, NAA down (and Cre slightly down) with tumour-cell density; Lac and Lip in necrosis.
- White-matter hyperintensities (ageing, small-vessel disease): FLAIR up, ADC up, FA down, T1 slightly
  down, metabolism normal; in no mask. Confounders, as in real brains: FLAIR and diffusion abnormalities
  that are not tumour.
  The indices CNI, CCrI, CrNI are z-scores of the deviation from the patient's normal metabolite ratio.
- Vasogenic oedema (`oedema`, 0..1, visible at `OEDEMA_VISIBLE`): FLAIR and T1 like visible tumour, ADC
  up more than infiltration raises it, FA down; metabolites only diluted (Cho/NAA unchanged), so the
  choline indices tell oedema from tumour where FLAIR cannot.
Diffusion and metabolism respond to density through `infiltration_response`, a concave curve that is
already appreciable at densities far below the T2L threshold: the invisible infiltration that decides
where the tumour grows next. In the null cohort they see the visible lesion only: a fixed density over
the whole T2L, whatever lies in it (`NULL_DENSITY`).
"""

from __future__ import annotations

import numpy as np

from ctvlab.synth.tumour import OEDEMA_VISIBLE

# At this density the infiltration response reaches log(2)/log(1 + 1/U0) ≈ 0.16 of its maximum.
INFILTRATION_U0 = 0.015
# Below the visibility threshold FLAIR rises by up to 12% with faint oedema (water) but only 4% with
# infiltrating cells, which add little water: FLAIR's faint tail mostly shows oedema that never progresses.
HIDDEN_FLAIR_GAIN = 0.12
HIDDEN_FLAIR_CELLS = 0.08
NAV = {  # intensities of pure tissue (arbitrary scanner units; ADC in mm²/s)
    "flair": {"gm": 620.0, "wm": 480.0, "csf": 70.0},
    "adc": {"gm": 0.82e-3, "wm": 0.72e-3, "csf": 3.0e-3},
    "cho": {"gm": 1.0, "wm": 1.15, "csf": 0.0},
    "cre": {"gm": 1.35, "wm": 1.0, "csf": 0.0},
    "naa": {"gm": 1.9, "wm": 2.0, "csf": 0.0},
    "lac": {"gm": 0.06, "wm": 0.06, "csf": 0.0},
    "lip": {"gm": 0.08, "wm": 0.08, "csf": 0.0},
}
T1_SCALE = 1000.0  # the template's [0, 1] T1 contrast in scanner units
FLUID = {"t1": 220.0, "flair": 150.0, "adc": 2.9e-3, "fa": 0.06}  # resection cavity
NECROSIS = {"adc": 1.9e-3, "fa": 0.07, "lac": 1.2, "lip": 3.0}
# White-matter hyperintensities (small-vessel disease of ageing, gliosis): relative change at full burden.
# They look like infiltration on FLAIR and diffusion but are metabolically normal and never progress.
WMH_EFFECT = {"flair": 0.35, "t1": 0.05, "adc": 0.15, "fa": 0.2}
METABOLITE_EFFECT = {"cho": 1.6, "cre": -0.2, "naa": -0.75}  # relative change at full response
# Vasogenic oedema at full level: extracellular water raises ADC (to about 1.1e-3 mm²/s in white matter),
# lowers FA, and dilutes every metabolite alike.
OEDEMA_EFFECT = {"adc": 0.55, "fa": 0.3, "dilution": 0.15}
NULL_DENSITY = 0.3  # null cohort: the density diffusion and MRSI see over the whole T2L
LIPID_SKULL = {"level": 1.5, "depth_mm": 4.0}  # lipid signal bleeding in from the scalp, by depth
NOISE = {  # standard deviation at noise scale 1
    "anatomical": 0.025,  # fraction of the white-matter intensity
    "adc": 0.04 * 0.75e-3,
    "fa": 0.03,
    "metabolite": 0.07,  # fraction of the white-matter level
    "lac_lip": 0.03,
}
BIAS_AMPLITUDE = 0.05  # multiplicative receive-field inhomogeneity, ± at noise scale 1


def infiltration_response(u: np.ndarray) -> np.ndarray:
    """Concave response in [0, 1] to tumour-cell density: log(1 + u/U0) / log(1 + 1/U0).

    0.12 at u = 0.01, 0.35 at 0.05, 0.68 at the T2L threshold: diffusion and metabolism sense the
    infiltration well before FLAIR shows it.
    """
    u = np.clip(u, 0.0, 1.0)
    return (np.log1p(u / INFILTRATION_U0) / np.log1p(1.0 / INFILTRATION_U0)).astype(np.float32)


def visibility(u: np.ndarray, threshold: float, width: float = 0.2) -> np.ndarray:
    """0 below and 1 above `threshold`, with a linear ramp of ±width·threshold: the visible lesion."""
    lo, hi = threshold * (1 - width), threshold * (1 + width)
    return np.clip((u - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def lesion_visibility(u: np.ndarray, t2l_density: float, oedema: np.ndarray | None) -> np.ndarray:
    """Visible T2/FLAIR lesion, tumour or oedema alike (0..1)."""
    vis = visibility(u, t2l_density)
    return vis if oedema is None else np.maximum(vis, visibility(oedema, OEDEMA_VISIBLE))


def tissue_mix(values: dict[str, float], gm: np.ndarray, wm: np.ndarray, csf: np.ndarray) -> np.ndarray:
    """Partial-volume weighted intensity of a voxel from its tissue fractions."""
    return (values["gm"] * gm + values["wm"] * wm + values["csf"] * csf).astype(np.float32)


def t1_images(
    t1_template: np.ndarray,
    u: np.ndarray,
    cavity: np.ndarray,
    necrosis: np.ndarray,
    enhancing: np.ndarray,
    wmh: np.ndarray,
    t2l_density: float,
    oedema: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(T1, T1c) in scanner units.

    Args:
        t1_template: the template's T1 contrast in [0, 1] (0 outside the brain).
        u: tumour-cell density; cavity, necrosis, enhancing: indicators in [0, 1].
        wmh: white-matter hyperintensity burden in [0, 1] (see `ctvlab.synth.anatomy`).
        oedema: vasogenic oedema level (T1-dark where visible, like tumour).
    """
    vis = lesion_visibility(u, t2l_density, oedema)
    t1 = T1_SCALE * t1_template * (1.0 - 0.22 * vis) * (1.0 - 0.3 * necrosis) * (1.0 - WMH_EFFECT["t1"] * wmh)
    t1 = t1 * (1.0 - cavity) + FLUID["t1"] * cavity * (t1_template > 0)
    t1c = t1 * (1.0 + 0.8 * enhancing * (1.0 - necrosis) * (1.0 - cavity))
    return t1.astype(np.float32), t1c.astype(np.float32)


def flair_image(
    gm: np.ndarray,
    wm: np.ndarray,
    csf: np.ndarray,
    u: np.ndarray,
    cavity: np.ndarray,
    wmh: np.ndarray,
    t2l_density: float,
    oedema: np.ndarray | None = None,
) -> np.ndarray:
    """FLAIR: bright in the visible lesion (tumour or oedema alike), subtly brighter with faint oedema (≤ 12%)
    or invisible infiltration (≤ 8%), and bright in white-matter hyperintensities, which belong to no
    lesion mask."""
    base = tissue_mix(NAV["flair"], gm, wm, csf) * (1.0 + WMH_EFFECT["flair"] * wmh)
    # the hyperintensity fades beyond the contour instead of stopping at it: the T2L is a threshold on
    # a gradient, whose faint tail is the invisible infiltration (or oedema)
    tail = HIDDEN_FLAIR_CELLS * np.clip(infiltration_response(u) / infiltration_response(t2l_density), 0, 1)
    if oedema is not None:
        tail = np.maximum(tail, HIDDEN_FLAIR_GAIN * np.clip(oedema / OEDEMA_VISIBLE, 0, 1))
    hidden = tail
    lesion = 1.0 + 0.9 * lesion_visibility(u, t2l_density, oedema) + hidden
    brain = gm + wm + csf
    return (base * lesion * (1.0 - cavity) + FLUID["flair"] * cavity * (brain > 0)).astype(np.float32)


def diffusion_maps(
    gm: np.ndarray,
    wm: np.ndarray,
    csf: np.ndarray,
    u: np.ndarray,
    cavity: np.ndarray,
    necrosis: np.ndarray,
    enhancing: np.ndarray,
    wmh: np.ndarray,
    oedema: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(ADC in mm²/s, FA) of a voxel.

    Args:
        u: the density the diffusion maps sense (the null cohort: NULL_DENSITY over the T2L).
        wmh: white-matter hyperintensity burden: ADC up and FA down, like infiltration but unrelated to
            the tumour.
        oedema: vasogenic oedema level (none in the null cohort).
    """
    r = infiltration_response(u)
    e = np.zeros_like(r) if oedema is None else np.clip(oedema, 0.0, 1.0)
    brain = gm + wm + csf
    adc = tissue_mix(NAV["adc"], gm, wm, csf) * (1.0 + 0.45 * r) * (1.0 - 0.2 * enhancing)
    adc = adc * (1.0 + WMH_EFFECT["adc"] * wmh) * (1.0 + OEDEMA_EFFECT["adc"] * e)
    # FA from the white-matter fraction: partial volume with grey matter and CSF lowers it
    fa_tissue = 0.12 * gm + (0.25 + 0.3 * wm) * wm + 0.04 * csf
    fa = fa_tissue * (1.0 - 0.45 * r) * (1.0 - WMH_EFFECT["fa"] * wmh) * (1.0 - OEDEMA_EFFECT["fa"] * e)
    adc = adc * (1.0 - necrosis) + NECROSIS["adc"] * necrosis * (brain > 0)
    fa = fa * (1.0 - necrosis) + NECROSIS["fa"] * necrosis * (brain > 0)
    adc = adc * (1.0 - cavity) + FLUID["adc"] * cavity * (brain > 0)
    fa = fa * (1.0 - cavity) + FLUID["fa"] * cavity * (brain > 0)
    return adc.astype(np.float32), fa.astype(np.float32)


def metabolite_maps(
    gm: np.ndarray,
    wm: np.ndarray,
    csf: np.ndarray,
    u: np.ndarray,
    cavity: np.ndarray,
    necrosis: np.ndarray,
    oedema: np.ndarray | None = None,
    depth_mm: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Cho, Cre, NAA, Lac, Lip concentrations at points (before voxel averaging and noise).

    Args:
        u: the density the spectra sense (the null cohort: NULL_DENSITY over the T2L).
        oedema: vasogenic oedema level: dilutes every metabolite alike (none in the null cohort).
        depth_mm: depth below the brain's surface: lipid from the scalp contaminates the outer voxels.
    """
    r = infiltration_response(u)
    live = (1.0 - cavity) * (1.0 - necrosis)
    dilution = 1.0 if oedema is None else 1.0 - OEDEMA_EFFECT["dilution"] * np.clip(oedema, 0.0, 1.0)
    out = {}
    for name in ("cho", "cre", "naa"):
        out[name] = tissue_mix(NAV[name], gm, wm, csf) * (1.0 + METABOLITE_EFFECT[name] * r) * live * dilution
    tissue = gm + wm
    out["lac"] = NAV["lac"]["wm"] * tissue * live + 0.3 * u**2 * live + NECROSIS["lac"] * necrosis
    out["lip"] = NAV["lip"]["wm"] * tissue * live + 0.1 * r * live + NECROSIS["lip"] * necrosis + 0.3 * cavity
    if depth_mm is not None:
        out["lip"] = out["lip"] + LIPID_SKULL["level"] * np.exp(
            -np.clip(depth_mm, 0.0, None) / LIPID_SKULL["depth_mm"]
        )
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def metabolite_index(y: np.ndarray, x: np.ndarray, iterations: int = 5, cutoff: float = 2.0) -> np.ndarray:
    """z-score of y's deviation from its normal proportion to x (the UCSF Cho-to-NAA index method).

    The normal proportion y ≈ a·x is fitted on the voxels judged normal, iteratively: fit on all, keep
    the voxels within `cutoff` robust SDs of the line, refit. The index is the residual divided by the
    SD of the normal voxels' residuals, so normal tissue has index ≈ 0 ± 1 and tumour is positive for
    CNI (y = Cho, x = NAA), CCrI (Cho, Cre) and CrNI (Cre, NAA).

    Args:
        y, x: metabolite values of the voxels (any shape, NaN where missing).
    """
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
    out = np.full(y.shape, np.nan, dtype=np.float32)
    if ok.sum() < 3:
        return out
    xs, ys = x[ok].astype(np.float64), y[ok].astype(np.float64)
    keep = np.ones(xs.shape, dtype=bool)
    a, sd = 1.0, 1.0
    for _ in range(iterations):
        a = float((xs[keep] * ys[keep]).sum() / max((xs[keep] ** 2).sum(), 1e-12))
        res = ys - a * xs
        mad = np.median(np.abs(res[keep] - np.median(res[keep])))
        sd = max(1.4826 * mad, 1e-6)
        new_keep = np.abs(res) <= cutoff * sd
        if new_keep.sum() < 3 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    sd = max(float(np.std(ys[keep] - a * xs[keep])), 1e-6)
    out[ok] = ((ys - a * xs) / sd).astype(np.float32)
    return out


def bias_field(shape: tuple[int, ...], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Smooth multiplicative inhomogeneity 1 + amplitude·B(x), B a random quadratic with max |B| = 1."""
    if amplitude == 0:
        return np.ones(shape, dtype=np.float32)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    c = rng.normal(size=len(terms)).astype(np.float32)
    b = sum(ci * t for ci, t in zip(c, terms, strict=True))
    b = np.broadcast_to(b, shape)
    b = b - b.mean()
    return (1.0 + amplitude * b / max(float(np.abs(b).max()), 1e-6)).astype(np.float32)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator, support: np.ndarray) -> np.ndarray:
    """Gaussian noise of SD `sigma` inside `support` (a boolean mask); outside stays as it is."""
    if sigma == 0:
        return image
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return np.where(support, image + noise, image).astype(np.float32)
