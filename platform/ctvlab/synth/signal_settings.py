"""The cohort's signal settings applied to each drawn tumour (`SynthConfig.channelling`, `seeding`,
`determinism`): how far the infiltration and the recurrence depart from near-isotropic growth, so that the
true pre-RT density (and what diffusion and MRSI see of it) tells where the tumour recurs. All three are 0
by default, when `with_signal` returns the drawn tumour unchanged. What each does and what it gives is
measured in docs/synthetic-cohort-ceiling.md; the physics is in `ctvlab.synth.tumour` and
`ctvlab.synth.routes`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ctvlab.synth.tumour import TumourSpec

if TYPE_CHECKING:
    from ctvlab.config import SynthConfig

# At full channelling D off the routes is this fraction of D on them (√0.01: the invisible tail reaches a
# tenth as far off a route as along it).
CHANNELLED_OFF_ROUTE = 0.01
# At full determinism D after RT is this fraction of D before: the recurrence regrows where the pre-RT
# cells are instead of invading new ground, so it is written in the pre-RT density.
POST_RT_MIGRATION_MIN = 0.05
# Seeded foci: density as a fraction of the T2L threshold (0.10–0.125 at 0.25: well below the 0.2 where T1
# and FLAIR begin to show the lesion); radius FOCI_RADIUS route widths, at most FOCI_MAX_FRACTION of the
# drawn recurrence distance; the far edge at that distance (FOCI_GAP_MM short of it: negative, half a cell
# past it). A uniform focus turns visible whole, its edge last, so the recurrence reaches the drawn
# distance as the focus becomes a lesion: short of it, the growth would go on until the rest of the
# tumour got there; well past it, it would stop at the focus's first visible cell.
FOCI_DENSITY = (0.4, 0.5)
FOCI_RADIUS = 2.0
FOCI_MAX_FRACTION = 0.4
FOCI_GAP_MM = -1.5


def with_signal(
    spec: TumourSpec, cfg: SynthConfig, route_draws: np.ndarray, density_draw: float, satellite_draw: float
) -> TumourSpec:
    """`spec` moved by the cohort's signal settings (unchanged at their defaults, 0).

    - channelling c: the routes follow the white matter and D off them falls from `off` to
      off^(1−c)·CHANNELLED_OFF_ROUTE^c (see `TumourSpec.channelling`);
    - seeding s: each route carries an invisible focus with probability s (`route_draws[j] < s`), its far
      edge at the drawn recurrence distance, none for CEL-only progression; and the default cohort's
      satellite (at a random white-matter cell that far out, off the routes) is kept with probability
      1 − s (`satellite_draw ≥ s`): the foci on the routes take its place;
    - determinism d: what happens after RT follows the pre-RT tumour: the invasiveness field's correlation
      r → r + d(1 − r) (so the recurrence also escapes along a new route less often), the unimaged
      radio-resistance kill × (1 − d), and D after RT × (1 − d(1 − POST_RT_MIGRATION_MIN)).

    Args:
        route_draws: uniforms in [0, 1), one per possible route (`clinical.ROUTES[1]`).
        density_draw: a uniform in [0, 1) for the foci's density within FOCI_DENSITY.
        satellite_draw: a uniform in [0, 1): whether the default satellite stays.
    """
    c, s, d = cfg.channelling, cfg.seeding, cfg.determinism
    if c == 0 and s == 0 and d == 0:
        return spec
    foci: tuple[float, ...] = ()
    if s > 0 and spec.advance_mm > 0 and spec.routes > 0:
        radius = min(FOCI_RADIUS * spec.route_width_mm, FOCI_MAX_FRACTION * spec.advance_mm)
        at = spec.advance_mm - FOCI_GAP_MM - radius
        foci = tuple(at if route_draws[j] < s else 0.0 for j in range(spec.routes))
        foci = foci if any(foci) else ()
    lo, hi = FOCI_DENSITY
    r = spec.post_rt_correlation
    return replace(
        spec,
        channelling=c,
        off_route_invasion=spec.off_route_invasion ** (1.0 - c) * CHANNELLED_OFF_ROUTE**c,
        foci_mm=foci,
        foci_density=(lo + (hi - lo) * density_draw) * cfg.t2l_density if foci else 0.0,
        foci_radius_mm=radius if foci else 0.0,
        satellite_mm=spec.satellite_mm if satellite_draw >= s else 0.0,
        post_rt_correlation=r + d * (1.0 - r),
        rt_kill=spec.rt_kill * (1.0 - d),
        post_rt_migration=1.0 - d * (1.0 - POST_RT_MIGRATION_MIN),
    )


def signal_params(spec: TumourSpec) -> dict[str, object]:
    """What a tumour's signal settings made of it, for synth_params.json: empty for the default cohort's
    tumours, so that a default cohort's file stays what it was."""
    if spec.channelling == 0 and not spec.foci_mm and spec.post_rt_migration == 1.0:
        return {}
    return {
        "channelling": round(spec.channelling, 3),
        "off_route_invasion": round(spec.off_route_invasion, 4),
        "foci_mm": [round(f, 2) for f in spec.foci_mm],
        "foci_density": round(spec.foci_density, 3),
        "post_rt_migration": round(spec.post_rt_migration, 3),
    }
