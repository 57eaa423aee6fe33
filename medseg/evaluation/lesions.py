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
    extra: dict = field(default_factory=dict, repr=False)
    """Free-form annotations (e.g. ``detected`` in an evaluation)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d["volume_ml"] = round(self.volume_ml, 6)
        d["diameter_mm"] = round(self.diameter_mm, 4)
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
        out.append(Lesion(
            label=int(label), name=name if name is not None else str(label), lesion=idx, voxels=count,
            volume_ml=count * voxel_ml, diameter_mm=diameter_of_points(ijk @ affine[:3, :3].T),
            centroid_ras=tuple(float(v) for v in ras), centroid_lps=tuple(float(v) for v in lps),
            bbox_min=tuple(int(s.start) for s in box), bbox_max=tuple(int(s.stop - 1) for s in box),
        ))
    return out


def lesion_table(labels: Volume, names: dict[int, str] | None = None, connectivity: int = 26,
                 classes: list[int] | None = None) -> list[Lesion]:
    """Every connected component of every non-zero label value (or of ``classes``), by label then size."""
    array = np.asarray(labels.array)
    if classes is None:
        classes = [int(v) for v in np.unique(array) if v != 0]
    names = names or {}
    table: list[Lesion] = []
    for value in classes:
        labelled, n = label_components(array == value, connectivity)
        table += describe_components(labelled, n, labels.affine, label=value, name=names.get(value))
    return table


def write_lesion_report(lesions: list[Lesion], path: str | Path) -> Path:
    """Write lesions to ``.csv`` (one flat row each) or ``.json`` (``{"lesions": [...]}``), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        payload = {"count": len(lesions), "units": {"volume": "mL", "diameter": "mm between voxel centres",
                                                    "centroid": "mm, RAS and LPS", "bbox": "voxel (i, j, k), inclusive"},
                   "lesions": [les.to_dict() for les in lesions]}
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


_EMPTY_ROW = Lesion(0, "", 0, 0, 0.0, 0.0, (0.0,) * 3, (0.0,) * 3, (0,) * 3, (0,) * 3).row()


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
