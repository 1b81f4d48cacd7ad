"""Invasion routes that follow the white matter, and the invisible foci seeded along them.

Glioma cells migrate along white-matter bundles (Giese et al.; Swanson's D_white ≫ D_grey), and a
recurrence beyond the irradiated margin often lies along such a bundle. The cohort's default routes are
straight half-lines from the seed (`ctvlab.synth.tumour.route_field`), which leave the white matter within a
few centimetres. A *channelled* tumour (`TumourSpec.channelling > 0`) instead invades along paths that keep
to the white matter: the cheapest path through the tissue from its seed towards a drawn direction, a step
costing its length over the white-matter fraction (plus a floor), so that the path runs through white
matter as a bundle does and crosses grey matter only where it must.

Along each route a tumour may carry an invisible focus (`route_foci`): cells that migrated ahead of the
bulk and settled far out on the bundle, below the T2/FLAIR threshold, where diffusion and metabolism see
them and the visible edge does not. After RT such a focus grows into a recurrence far from the lesion.

Everything here works on the growth grid (template space, isotropic spacing `h` mm): paths are arrays of
cell indices (n, 3), seed first.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

ROUTE_COST_FLOOR = 0.1  # a step costs 1/(wm + 0.1): ~0.9 per mm in white matter, 10 per mm in grey
# Each undirected step of the 26-neighbourhood once (the half with a positive first non-zero offset).
NEIGHBOURS = np.array(
    [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if (i, j, k) > (0, 0, 0)]
)
STRAIGHT_STEP = 0.5  # sampling of a straight route, in cells


def tissue_graph(domain: np.ndarray, step_cost: np.ndarray, h: float):
    """The 26-neighbour graph of the `domain` cells, a step weighted by its length (mm) times the mean
    `step_cost` of its two cells.

    Returns:
        (a scipy CSR matrix over the domain cells, the cells (n, 3), an index array of `domain`'s shape
        holding each cell's row, -1 outside the domain).
    """
    from scipy.sparse import coo_matrix

    shape = np.asarray(domain.shape)
    index = np.full(domain.shape, -1, dtype=np.int64)
    cells = np.argwhere(domain)
    index[tuple(cells.T)] = np.arange(len(cells))
    cost = step_cost[tuple(cells.T)].astype(np.float64)
    rows, cols, weights = [], [], []
    for offset in NEIGHBOURS:
        nb = cells + offset
        ok = ((nb >= 0) & (nb < shape)).all(1)
        j = np.full(len(cells), -1, dtype=np.int64)
        j[ok] = index[tuple(nb[ok].T)]
        ok = j >= 0
        step_mm = h * float(np.sqrt((offset**2).sum()))
        rows.append(np.flatnonzero(ok))
        cols.append(j[ok])
        weights.append(0.5 * step_mm * (cost[ok] + cost[j[ok]]))  # trapezoid over the step
    n = len(cells)
    graph = coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return graph.tocsr(), cells, index


def geodesic_mm(domain: np.ndarray, seed: np.ndarray, h: float) -> np.ndarray:
    """Distance (mm) from the seed through `domain` (26-neighbour paths; inf outside it or where no path
    leads): how far cells spreading from the seed travel, never across CSF or the ventricles."""
    from scipy.sparse.csgraph import dijkstra

    graph, cells, index = tissue_graph(domain, np.ones(domain.shape, dtype=np.float32), h)
    out = np.full(domain.shape, np.inf)
    out[tuple(cells.T)] = dijkstra(graph, directed=False, indices=int(index[tuple(seed)]))
    return out


def white_matter_paths(
    wm: np.ndarray,
    domain: np.ndarray,
    seed: np.ndarray,
    directions: np.ndarray,
    reach_mm: tuple[float, float],
    h: float,
) -> list[np.ndarray]:
    """Routes that keep to the white matter: for each unit direction, the cheapest path through `domain`
    from the seed to a white-matter cell (wm ≥ 0.5), a step costing its length over (white-matter fraction
    + ROUTE_COST_FLOOR). The end is the white-matter cell between `reach_mm` = (near, far) from the seed
    (straight line) that lies closest to the direction (largest cosine), so that the route is long
    enough however near the brain's surface the direction points; the farthest white-matter cell if none
    lies that far.

    Args:
        wm: white-matter fraction per cell (X, Y, Z).
        domain: cells the tumour may occupy (boolean); the seed must be one of them.
        seed: the seed cell (3,) int.
        directions: (n, 3) unit vectors.
        reach_mm: (near, far): how far from the seed (mm) a route's end may lie.
        h: grid spacing, mm.

    Returns:
        one (m, 3) array of cells per direction, from the seed to the route's end.

    Raises:
        ValueError: the seed lies outside the domain.
    """
    from scipy.sparse.csgraph import dijkstra

    directions = np.atleast_2d(directions)
    if directions.size == 0:
        return []
    graph, cells, index = tissue_graph(domain, 1.0 / (wm + ROUTE_COST_FLOOR), h)
    source = int(index[tuple(seed)])
    if source < 0:
        raise ValueError("white_matter_paths: the seed lies outside the domain")
    dist, pred = dijkstra(graph, directed=False, indices=source, return_predecessors=True)
    white = np.flatnonzero((wm[tuple(cells.T)] >= 0.5) & np.isfinite(dist))
    if white.size == 0:
        return [cells[[source]] for _ in directions]
    offset = (cells[white] - seed) * h
    length = np.sqrt((offset**2).sum(1))
    within = (length >= reach_mm[0]) & (length <= reach_mm[1])
    if not within.any():
        within = length == length.max()
    candidates, offset, length = white[within], offset[within], length[within]
    paths = []
    for v in directions:
        end = int(candidates[np.argmax(offset @ v / np.maximum(length, 1e-9))])
        chain = [end]
        while chain[-1] != source:
            chain.append(int(pred[chain[-1]]))
        paths.append(cells[np.array(chain[::-1])])
    return paths


def straight_paths(domain: np.ndarray, seed: np.ndarray, directions: np.ndarray) -> list[np.ndarray]:
    """The cells of the default straight routes (half-lines from the seed) up to where each first leaves
    `domain`: where a focus can sit on an unchannelled route."""
    shape = np.asarray(domain.shape)
    steps = np.arange(0.0, float(shape.max()) * 2.0, STRAIGHT_STEP)
    paths = []
    for v in np.atleast_2d(directions):
        pts = np.rint(seed[None, :] + steps[:, None] * v[None, :]).astype(int)
        pts = pts[((pts >= 0) & (pts < shape)).all(1)]
        out = np.flatnonzero(~domain[tuple(pts.T)])
        pts = pts[: out[0]] if out.size else pts
        keep = np.ones(len(pts), dtype=bool)
        keep[1:] = (np.diff(pts, axis=0) != 0).any(1)  # each cell once
        paths.append(pts[keep] if len(pts) else seed[None, :].astype(int))
    return paths


def path_tubes(shape: tuple[int, ...], paths: list[np.ndarray], width_mm: float, h: float) -> np.ndarray:
    """1 on the paths, falling off across them as a Gaussian of SD `width_mm` (zeros without paths)."""
    on = np.zeros(shape, dtype=bool)
    for p in paths:
        on[tuple(p.T)] = True
    if not on.any():
        return np.zeros(shape, dtype=np.float32)
    d = ndi.distance_transform_edt(~on, sampling=h)
    return np.exp(-0.5 * (d / width_mm) ** 2).astype(np.float32)


def focus_centre(path: np.ndarray, dist_mm: np.ndarray, target_mm: float) -> np.ndarray:
    """The cell of `path` whose distance from the lesion (`dist_mm`, per cell) is nearest `target_mm`, up
    to where the route first gets that far (its farthest cell if it never does)."""
    along = dist_mm[tuple(path.T)]
    reached = np.flatnonzero(along >= target_mm)
    if reached.size == 0:
        return path[int(np.argmax(along))]
    upto = along[: reached[0] + 1]
    return path[int(np.argmin(np.abs(upto - target_mm)))]


def route_foci(
    allowed: np.ndarray,
    dist_mm: np.ndarray,
    paths: list[np.ndarray],
    foci_mm: tuple[float, ...],
    peak: float,
    radius_mm: float,
    h: float,
) -> np.ndarray:
    """Invisible foci on the routes: focus j (when `foci_mm[j]` > 0) on path j, `foci_mm[j]` beyond the
    lesion (`focus_centre`): a ball of radius `radius_mm` at the uniform density `peak` (a settled colony,
    not a Gaussian, so that it turns visible whole as it grows); the maximum over the foci, zero outside
    `allowed`.

    Args:
        allowed: cells that may hold tumour (boolean).
        dist_mm: distance of every cell from the pre-RT T2L, mm.
        paths: the routes (`white_matter_paths` or `straight_paths`).
        foci_mm: one distance per route, mm (0: no focus on that route).
        peak: the foci's density (fraction of the carrying capacity), below the T2L threshold.
        radius_mm: the foci's radius, mm.
        h: grid spacing, mm.
    """
    out = np.zeros(dist_mm.shape, dtype=np.float32)
    idx = None
    for path, target in zip(paths, foci_mm, strict=False):
        if target <= 0 or len(path) == 0:
            continue
        if idx is None:
            idx = np.indices(dist_mm.shape, dtype=np.float32)
        centre = focus_centre(path, dist_mm, target).astype(np.float32)
        r2 = (((idx - centre.reshape(3, 1, 1, 1)) * h) ** 2).sum(0)
        out[r2 <= radius_mm**2] = peak
    return np.where(allowed, out, 0.0).astype(np.float32)
