"""Per-lesion statistics of a label volume, and lesion-wise matching of a prediction to a reference.

A *lesion* is one connected component of one label value. Conventions:

* Connectivity is counted on the voxel grid: 6 (faces), 18 (faces and edges) or 26
  (faces, edges and corners, the default).
* Components of a label are numbered from 1 by decreasing voxel count (ties in scan order).
* ``volume_ml`` is the voxel count times the voxel volume (``|det(affine)|``).
* ``diameter_mm`` is the longest distance between the **centres** of two voxels of the
  component, measured in world coordinates through the affine (so anisotropic, flipped and
  oblique grids are right). A single voxel has diameter 0, and a line of n voxels at spacing s
  has ``(n - 1) * s``; add about one voxel size to compare with a diameter measured between
  outer voxel edges.
* Centroids are the mean voxel centre in world mm, given both as RAS (NIfTI, nibabel) and as
  LPS (DICOM, ITK, 3D Slicer's "LPS" display).
* Bounding boxes are inclusive voxel indices ``(i, j, k)`` in file order.
* ``long_axis_mm`` and ``short_axis_mm`` are the RECIST 1.1 axes, measured in one acquisition
  slice, between voxel centres in world mm (same convention as ``diameter_mm``). The slices are
  taken across the voxel axis with the largest spacing (``plane_axis``: 0, 1, 2 for i, j, k); when
  the largest spacings tie within 1 %, the last of them (k for an isotropic grid, as files store
  slices along k). The long axis is the longest distance between two voxel centres of one slice,
  maximised over the slices; the short axis is the longest chord perpendicular to it, in the
  same slice, of the convex hull of that slice's voxel centres (exact, no binning; a slice of one
  row of voxels has short axis 0). When several slices (or several point pairs) share the longest
  long axis, the one with the longest short axis is reported.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import cdist

from medseg.core.errors import OutputError
from medseg.io.volume import LPS_TO_RAS, Volume, atomic_write

CONNECTIVITY = {6: 1, 18: 2, 26: 3}


def structure(connectivity: int = 26) -> np.ndarray:
    """The 3x3x3 neighbourhood for ``scipy.ndimage.label``: 6, 18 or 26 neighbours."""
    if connectivity not in CONNECTIVITY:
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity!r}")
    return ndimage.generate_binary_structure(3, CONNECTIVITY[connectivity])


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask, numbered 1..n by decreasing size (0 = background)."""
    labelled, n = ndimage.label(np.asarray(mask, bool), structure=structure(connectivity))
    if n > 1:
        sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
        order = np.argsort(-sizes, kind="stable")
        lut = np.zeros(n + 1, dtype=labelled.dtype)
        lut[order + 1] = np.arange(1, n + 1, dtype=labelled.dtype)
        labelled = lut[labelled]
    return labelled, int(n)


def _extreme_points(sub: np.ndarray) -> np.ndarray:
    """Voxel indices of the first and last voxel of every row along the longest axis of ``sub``.

    Every other voxel lies between two of these on a straight segment, so they have the same
    convex hull (and diameter) as the whole component, with far fewer points.
    """
    axis = int(np.argmax(sub.shape))
    rows = np.moveaxis(sub, axis, 0)
    first = rows.argmax(axis=0)
    last = rows.shape[0] - 1 - rows[::-1].argmax(axis=0)
    j, k = np.nonzero(rows.any(axis=0))
    pts = np.concatenate([np.stack([first[j, k], j, k], 1), np.stack([last[j, k], j, k], 1)])
    pts = np.unique(pts, axis=0)
    return pts[:, _axis_order(axis)]


def _axis_order(axis: int) -> list[int]:
    """Column order that puts (row, other, other) back into (i, j, k)."""
    return [[0, 1, 2], [1, 0, 2], [1, 2, 0]][axis]


def _max_pairwise(points: np.ndarray, chunk: int = 2048) -> float:
    best = 0.0
    for start in range(0, len(points), chunk):
        best = max(best, float(cdist(points[start:start + chunk], points[start:]).max()))
    return best


def diameter_of_points(points: np.ndarray) -> float:
    """Largest distance between two of ``points`` (n x 3, mm), via their convex hull.

    Flat (coplanar) and straight (collinear) sets, on which a 3D hull fails, are handled in
    their own plane or line.
    """
    points = np.asarray(points, dtype=np.float64)
    if len(points) < 2:
        return 0.0
    if len(points) <= 64:
        return _max_pairwise(points)
    centred = points - points.mean(axis=0)
    try:
        return _max_pairwise(points[ConvexHull(centred).vertices])
    except QhullError:
        pass
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    flat = centred @ vt[:2].T
    if s[1] > 1e-9 * max(s[0], 1.0):
        try:
            return _max_pairwise(points[ConvexHull(flat).vertices])
        except QhullError:
            pass
    return float(np.ptp(flat[:, 0]))  # collinear


def acquisition_axis(affine: np.ndarray) -> int:
    """The voxel axis (0, 1, 2 = i, j, k) across which a volume was sliced: the one with the largest
    spacing; when the largest spacings tie within 1 %, the last of them (k on an isotropic grid)."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    if not np.all(np.isfinite(spacing)) or not np.all(spacing > 0):
        raise ValueError(f"the affine has no valid voxel spacing: {spacing.tolist()}")
    return int(np.flatnonzero(spacing * 1.01 >= spacing.max())[-1])


_REL_TIE = 1e-9


def _farthest_pairs(points: np.ndarray) -> tuple[float, np.ndarray]:
    """Longest distance between two 2D ``points`` and every pair (``m x 2 x 2``) that attains it.

    Only the convex hull's vertices can be farthest apart; collinear sets, on which the hull
    fails, are searched whole (they are small: one or two points per voxel row)."""
    cand = points
    if len(points) > 3:
        try:
            cand = points[ConvexHull(points).vertices]
        except QhullError:
            pass
    d = cdist(cand, cand)
    best = float(d.max())
    i, j = np.nonzero(np.triu(d >= best * (1 - _REL_TIE) - 1e-12, 1))
    return best, np.stack([cand[i], cand[j]], 1)


def _hull_polygon(points: np.ndarray) -> np.ndarray | None:
    """Vertices of the 2D convex hull in order, or None when the points are collinear."""
    if len(points) < 3:
        return None
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:
        return None


def _perpendicular_chord(polygon: np.ndarray | None, p: np.ndarray, q: np.ndarray) -> float:
    """Longest chord of a convex polygon perpendicular to the segment ``p``-``q``.

    With u along ``p``-``q`` and v across it, the chord length at u is a concave piecewise-linear
    function whose corners lie at the vertices' u, so its maximum is at one of them.
    """
    if polygon is None:
        return 0.0
    e = (q - p) / np.linalg.norm(q - p)
    u = polygon @ e
    v = polygon @ np.array([-e[1], e[0]])
    u0, v0 = u, v
    u1, v1 = np.roll(u, -1), np.roll(v, -1)  # edges (vertex n, vertex n + 1)
    du = u1 - u0
    eps = 1e-9 * max(1.0, float(np.ptp(u)))
    at = u[:, None]
    inside = (at >= np.minimum(u0, u1) - eps) & (at <= np.maximum(u0, u1) + eps)
    safe = np.where(np.abs(du) > eps, du, 1.0)
    t = np.clip(np.where(np.abs(du) > eps, (at - u0) / safe, 0.0), 0.0, 1.0)
    cross = np.where(inside, v0 + t * (v1 - v0), np.nan)
    return float(np.nanmax(np.nanmax(cross, 1) - np.nanmin(cross, 1)))


def _recist(mask: np.ndarray, linear: np.ndarray, plane: int) -> tuple[float, float]:
    """RECIST long and short axes (mm) of a non-empty 3D boolean mask sliced across ``plane``."""
    a, b = [ax for ax in range(3) if ax != plane]
    # distances within a slice: the in-plane columns of the affine, in an orthonormal basis of their plane
    r = np.linalg.qr(linear[:, [a, b]])[1]
    m = np.moveaxis(mask, plane, 0)  # (slice, a, b)
    present = m.any(axis=2)
    first = m.argmax(axis=2)
    last = m.shape[2] - 1 - m[:, :, ::-1].argmax(axis=2)
    s_idx, a_idx = np.nonzero(present)  # sorted by slice
    # the first and last voxel of each row of each slice: the same convex hull as the whole slice
    ends = np.stack([a_idx, first[s_idx, a_idx], a_idx, last[s_idx, a_idx]], 1).reshape(-1, 2)
    pts = ends @ r.T  # 2D mm, grouped by slice (two points per row)
    starts = 2 * np.flatnonzero(np.diff(s_idx, prepend=-1))
    stops = np.append(starts[1:], len(pts))
    lo = np.minimum.reduceat(pts, starts)
    hi = np.maximum.reduceat(pts, starts)
    bound = np.linalg.norm(hi - lo, axis=1)  # no two points of a slice are farther apart than its box diagonal
    best_long, best_short = -1.0, 0.0
    for n in np.argsort(-bound, kind="stable"):
        if bound[n] < best_long * (1 - _REL_TIE) - 1e-12:
            break
        sp = np.unique(pts[starts[n]:stops[n]], axis=0)
        if len(sp) < 2:
            long, pairs = 0.0, np.zeros((0, 2, 2))
        else:
            long, pairs = _farthest_pairs(sp)
        if long < best_long * (1 - _REL_TIE) - 1e-12:
            continue
        if long > best_long * (1 + _REL_TIE) + 1e-12:
            best_long, best_short = long, 0.0
        polygon = _hull_polygon(sp)
        for p, q in pairs:
            best_short = max(best_short, _perpendicular_chord(polygon, p, q))
    return max(best_long, 0.0), best_short


def recist_axes(mask: np.ndarray, affine: np.ndarray, plane_axis: int | None = None) -> tuple[float, float, int]:
    """RECIST 1.1 long and short axes in mm of a 3D mask, and the voxel axis the slices cross.

    Slices cross ``plane_axis`` (default: :func:`acquisition_axis` of the affine). The long axis is
    the longest distance between two voxel centres in one slice, over all slices; the short axis
    the longest chord perpendicular to it in that slice (see the module notes). An empty mask
    gives ``(0.0, 0.0, plane_axis)``.
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 3:
        raise ValueError(f"recist_axes needs a 3D mask, not shape {mask.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    plane = acquisition_axis(affine) if plane_axis is None else int(plane_axis)
    if plane not in (0, 1, 2):
        raise ValueError(f"plane_axis must be 0, 1 or 2, not {plane_axis!r}")
    if not mask.any():
        return 0.0, 0.0, plane
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    long, short = _recist(mask[box], affine[:3, :3], plane)
    return long, short, plane


def longest_diameter_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    """Longest distance in mm between the centres of two voxels of ``mask`` (any shape of mask)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0.0
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    offset = np.array([s.start for s in box])
    ijk = _extreme_points(mask[box]) + offset
    return diameter_of_points(ijk @ np.asarray(affine, float)[:3, :3].T)


@dataclass
class Lesion:
    label: int
    name: str
    lesion: int
    """Component number within its label, 1 = largest."""
    voxels: int
    volume_ml: float
    diameter_mm: float
    """Longest distance between two voxel centres of the component."""
    centroid_ras: tuple[float, float, float]
    centroid_lps: tuple[float, float, float]
    bbox_min: tuple[int, int, int]
    bbox_max: tuple[int, int, int]
    """Inclusive."""
    long_axis_mm: float = 0.0
    """RECIST long axis: longest distance between two voxel centres within one slice."""
    short_axis_mm: float = 0.0
    """RECIST short axis: longest chord perpendicular to the long axis, in the same slice."""
    plane_axis: int = -1
    """Voxel axis (0, 1, 2 = i, j, k) the slices of the RECIST axes cross; -1 when not measured."""
    extra: dict = field(default_factory=dict, repr=False)
    """Free-form annotations (e.g. ``detected`` in an evaluation)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d["volume_ml"] = round(self.volume_ml, 6)
        d["diameter_mm"] = round(self.diameter_mm, 4)
        d["long_axis_mm"] = round(self.long_axis_mm, 4)
        d["short_axis_mm"] = round(self.short_axis_mm, 4)
        # the RECIST axes next to the diameter (the fields come last only to keep constructor calls working)
        recist = {k: d.pop(k) for k in ("long_axis_mm", "short_axis_mm", "plane_axis")}
        ordered = {}
        for k, v in d.items():
            ordered[k] = v
            if k == "diameter_mm":
                ordered.update(recist)
        d = ordered
        for key in ("centroid_ras", "centroid_lps"):
            d[key] = [round(float(v), 4) for v in d[key]]
        d["bbox_min"], d["bbox_max"] = list(self.bbox_min), list(self.bbox_max)
        return {**d, **extra}

    def row(self) -> dict:
        """Flat dict for a CSV row."""
        d = self.to_dict()
        flat = {k: v for k, v in d.items() if not isinstance(v, list)}
        for key, axes in (("centroid_ras", "RAS"), ("centroid_lps", "LPS")):
            flat.update({f"{key}_{a}": v for a, v in zip(axes, d[key])})
        for key in ("bbox_min", "bbox_max"):
            flat.update({f"{key}_{a}": v for a, v in zip("ijk", d[key])})
        return flat


def describe_components(labelled: np.ndarray, n: int, affine: np.ndarray, *, label: int = 1,
                        name: str | None = None) -> list[Lesion]:
    """One :class:`Lesion` per component ``1..n`` of a labelled array (as from :func:`label_components`)."""
    affine = np.asarray(affine, dtype=np.float64)
    plane = acquisition_axis(affine)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3])) / 1000.0)
    out = []
    for idx, box in enumerate(ndimage.find_objects(labelled, max_label=n), start=1):
        if box is None:
            continue
        sub = labelled[box] == idx
        offset = np.array([s.start for s in box])
        count = int(sub.sum())
        centre = np.array(ndimage.center_of_mass(sub)) + offset
        ras = affine[:3, :3] @ centre + affine[:3, 3]
        lps = LPS_TO_RAS[:3, :3] @ ras
        ijk = _extreme_points(sub) + offset
        long, short = _recist(sub, affine[:3, :3], plane)
        out.append(Lesion(
            label=int(label), name=name if name is not None else str(label), lesion=idx, voxels=count,
            volume_ml=count * voxel_ml, diameter_mm=diameter_of_points(ijk @ affine[:3, :3].T),
            centroid_ras=tuple(float(v) for v in ras), centroid_lps=tuple(float(v) for v in lps),
            bbox_min=tuple(int(s.start) for s in box), bbox_max=tuple(int(s.stop - 1) for s in box),
            long_axis_mm=long, short_axis_mm=short, plane_axis=plane,
        ))
    return out


def lesion_table(labels: Volume, names: dict[int, str] | None = None, connectivity: int = 26,
                 classes: list[int] | None = None, regions=None) -> list[Lesion]:
    """Every connected component of every non-zero label value (or of ``classes``), by label then size.

    ``regions`` (``RegionConfig`` list, e.g. whole tumour, tumour core, enhancing tumour): the components of
    each region instead (the union of its label values), each named after its region, with ``label`` the
    value the region writes."""
    array = np.asarray(labels.array)
    if regions:
        from medseg.core.regions import region_values

        table = []
        for r, value in zip(regions, region_values(regions)):
            labelled, n = label_components(np.isin(array, r.labels), connectivity)
            table += describe_components(labelled, n, labels.affine, label=value, name=r.name)
        return table
    if classes is None:
        classes = [int(v) for v in np.unique(array) if v != 0]
    names = names or {}
    table: list[Lesion] = []
    for value in classes:
        labelled, n = label_components(array == value, connectivity)
        table += describe_components(labelled, n, labels.affine, label=value, name=names.get(value))
    return table


def write_lesion_report(lesions: list[Lesion], path: str | Path, summary: dict | None = None) -> Path:
    """Write lesions to ``.csv`` (one flat row each) or ``.json`` (``{"lesions": [...]}``, with ``summary``
    when given), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        payload = {"count": len(lesions), "units": {"volume": "mL", "diameter": "mm between voxel centres",
                                                    "centroid": "mm, RAS and LPS", "bbox": "voxel (i, j, k), inclusive",
                                                    "long_axis/short_axis": "RECIST, mm between voxel centres in one slice across plane_axis"},
                   "lesions": [les.to_dict() for les in lesions]}
        if summary is not None:
            payload["summary"] = summary
        return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1) + "\n"))
    if suffix == ".csv":
        rows = [les.row() for les in lesions]
        header = list(rows[0]) if rows else list(_EMPTY_ROW)
        for r in rows[1:]:
            header += [k for k in r if k not in header]

        def write(tmp):
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=header)
                writer.writeheader()
                writer.writerows(rows)

        return atomic_write(path, write)
    raise OutputError("unknown lesion report format", path=path, expected=".csv or .json", found=repr(path.suffix),
                      fix="name the report file .csv or .json")


_EMPTY_ROW = Lesion(0, "", 0, 0, 0.0, 0.0, (0.0,) * 3, (0.0,) * 3, (0,) * 3, (0,) * 3, 0.0, 0.0, -1).row()


# ---------------------------------------------------------------------------
# lesion-wise detection


@dataclass
class LesionMatch:
    """Lesion-wise detection of one class in one case.

    Rule: a predicted and a reference component *match* when they share at least one voxel and
    their IoU exceeds ``min_iou`` (default 0: any overlap). A reference lesion is *detected* when
    some predicted component matches it; a predicted component is a *true positive* when it
    matches some reference lesion. Both sides are counted on their own, so one prediction
    covering two reference lesions detects both, and two predictions on one lesion are both true
    positives.

    sensitivity = detected / n_ref (NaN without reference lesions);
    precision = true_positive / n_pred (NaN without predicted lesions);
    f1 = 2PR / (P + R); 0 when exactly one side has lesions, NaN when neither has.
    """

    n_ref: int
    n_pred: int
    detected: int
    true_positive: int
    reference: list[Lesion] = field(default_factory=list)
    """Reference lesions, each with ``extra["detected"]`` and ``extra["best_iou"]``."""
    false_positive: list[Lesion] = field(default_factory=list)
    """Predicted components that match no reference lesion."""

    @property
    def sensitivity(self) -> float:
        return self.detected / self.n_ref if self.n_ref else float("nan")

    @property
    def precision(self) -> float:
        return self.true_positive / self.n_pred if self.n_pred else float("nan")

    @property
    def f1(self) -> float:
        return f1_score(self.sensitivity, self.precision, self.n_ref, self.n_pred)


def f1_score(sensitivity: float, precision: float, n_ref: int, n_pred: int) -> float:
    if not n_ref and not n_pred:
        return float("nan")
    if not n_ref or not n_pred or sensitivity + precision == 0:
        return 0.0
    return 2 * sensitivity * precision / (sensitivity + precision)


def match_lesions(pred: np.ndarray, ref: np.ndarray, affine: np.ndarray, *, connectivity: int = 26,
                  min_iou: float = 0.0, label: int = 1, name: str | None = None) -> LesionMatch:
    """Match the components of two boolean masks (see :class:`LesionMatch` for the rule)."""
    pl, n_pred = label_components(pred, connectivity)
    rl, n_ref = label_components(ref, connectivity)
    both = (pl > 0) & (rl > 0)
    pairs, inter = np.unique(np.stack([pl[both], rl[both]]), axis=1, return_counts=True)
    p_size = np.bincount(pl.ravel(), minlength=n_pred + 1)
    r_size = np.bincount(rl.ravel(), minlength=n_ref + 1)
    iou = inter / (p_size[pairs[0]] + r_size[pairs[1]] - inter) if inter.size else np.zeros(0)
    ok = iou > min_iou
    best_iou = np.zeros(n_ref + 1)
    np.maximum.at(best_iou, pairs[1], iou)
    matched_ref = set(pairs[1][ok].tolist())
    matched_pred = set(pairs[0][ok].tolist())
    reference = describe_components(rl, n_ref, affine, label=label, name=name)
    for les in reference:
        les.extra = {"detected": les.lesion in matched_ref, "best_iou": round(float(best_iou[les.lesion]), 4)}
    unmatched = [i for i in range(1, n_pred + 1) if i not in matched_pred]
    false_positive = []
    if unmatched:
        fp = np.where(np.isin(pl, unmatched), pl, 0)
        false_positive = describe_components(fp, n_pred, affine, label=label, name=name)
    return LesionMatch(n_ref, n_pred, len(matched_ref), len(matched_pred), reference, false_positive)


def tumour_summary(labels: Volume, names: dict[int, str], regions, connectivity: int = 26) -> dict:
    """One case's tumour figures: volume (mL) and lesion count of each region, volume of each label, and the
    share of each region taken by each label inside it (e.g. necrosis / tumour core)."""
    array = np.asarray(labels.array)
    ml = labels.voxel_volume_ml
    counts = {int(v): int(c) for v, c in zip(*np.unique(array, return_counts=True))}
    out: dict = {"regions": {}, "labels": {}, "fractions": {}}
    for r in regions:
        mask = np.isin(array, r.labels)
        _, n = label_components(mask, connectivity)
        vox = int(mask.sum())
        out["regions"][r.name] = {"volume_ml": round(vox * ml, 4), "lesions": n}
        for v in r.labels:
            if len(r.labels) > 1:
                out["fractions"][f"{names.get(v, str(v))} / {r.name}"] = round(counts.get(v, 0) / vox, 4) if vox else None
    for v, name in names.items():
        if v:
            out["labels"][name] = round(counts.get(int(v), 0) * ml, 4)
    return out
