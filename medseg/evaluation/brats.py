"""Lesion-wise Dice and HD95 as scored by the BraTS 2023 challenges.

Source: the official evaluation code, https://github.com/rachitsaluja/BraTS-2023-Metrics
(``eval.py`` and ``brats_2023_metrics/surface_distance/brats_metrics.py``,
``get_lesion_wise_score`` / ``get_lesion_wise_results``), also used by the Synapse workflow
https://github.com/Sage-Bionetworks-Challenges/brats2023. For one region mask (WT, TC or ET):

1. The reference is dilated (``scipy.ndimage.binary_dilation`` with the 18-neighbourhood,
   ``generate_binary_structure(3, 2)``, ``dilation`` iterations: 3 for BraTS-GLI, -SSA and -PED,
   1 for -MEN and -MET). Each 26-connected component of the dilated mask is one reference
   *lesion*: the reference voxels inside it (the reference itself is not changed, the dilation
   only joins nearby pieces).
2. The prediction is split into 26-connected components.
3. For each reference lesion, every predicted component that touches the lesion's dilated
   extent is merged, and the lesion's Dice and HD95 (mm, through the voxel spacing) are taken
   between the lesion and that merged prediction. No such component: Dice 0 and HD95 infinite,
   which is replaced by the penalty of 374 mm.
4. A reference lesion of ``min_voxels`` voxels or fewer is left out of the score (the official
   code keeps a lesion when its volume is *greater than* the threshold, 50 for GLI, SSA, MEN and
   PED, 2 for MET). The predicted components that touch it are still not false positives: they
   are simply ignored.
5. Every predicted component that touches no reference lesion's dilated extent is a false
   positive, scoring Dice 0 and HD95 374 mm.
6. Lesion-wise Dice = (sum of the kept lesions' Dice) / (kept lesions + false positives);
   lesion-wise HD95 = (sum of their HD95 + 374 * false positives) / (the same count).
   0 / 0 (both masks empty, or only left-out lesions and predictions touching them) scores
   Dice 1 and HD95 0; an empty reference with a non-empty prediction scores 0 and 374.

Differences from the official code (all nil on BraTS's 1 mm isotropic grids, except the last):

* The size threshold counts voxels; the official code compares ``voxels * sx * sy * sz`` (mm^3)
  with the same number.
* HD95 is :func:`medseg.evaluation.distances.hd95`: the larger of the two directed 95th
  percentiles of the distances between the centres of the masks' surface voxels (face
  neighbours outside the mask). The official code uses DeepMind's ``surface-distance``
  (``compute_robust_hausdorff(..., 95)``), whose percentiles are weighted by surface-element
  area on the voxel-corner grid, so per-lesion HD95 values can differ by about a voxel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from medseg.evaluation.distances import dice, hd95, surface_distances

BRATS_HD95_PENALTY_MM = 374.0
"""HD95 given to a missed reference lesion and to each false-positive component."""
BRATS_MIN_LESION_VOXELS = 50
"""Reference lesions of this many voxels or fewer are left out (BraTS-GLI/SSA/MEN/PED 2023)."""
BRATS_DILATION = 3
"""Dilation iterations that join nearby reference pieces into one lesion (BraTS-GLI/SSA/PED 2023)."""

#: challenge -> (dilation iterations, lesion size threshold), as in the official code.
BRATS_2023_PARAMETERS = {
    "BraTS-GLI": (3, 50),
    "BraTS-SSA": (3, 50),
    "BraTS-MEN": (1, 50),
    "BraTS-PED": (3, 50),
    "BraTS-MET": (1, 2),
}

_CONNECT_26 = ndimage.generate_binary_structure(3, 3)
_DILATE_18 = ndimage.generate_binary_structure(3, 2)


@dataclass
class LesionwiseScore:
    """Lesion-wise scores of one region in one case (see the module notes for the rule)."""

    dice: float
    hd95: float
    """mm, with the penalty for missed lesions and false positives."""
    n_ref: int
    """Reference lesions that count (larger than the size threshold)."""
    n_pred_fp: int
    """Predicted components touching no reference lesion."""
    per_lesion: list[dict] = field(default_factory=list)
    """One dict per reference lesion (``kind`` "reference", ``counted`` False when left out for its
    size) and per false positive (``kind`` "false_positive"), with ``voxels``, ``dice``, ``hd95``."""


def _union(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def lesionwise(pred: np.ndarray, ref: np.ndarray, spacing, *, dilation: int = BRATS_DILATION,
               min_voxels: int = BRATS_MIN_LESION_VOXELS,
               penalty_mm: float = BRATS_HD95_PENALTY_MM) -> LesionwiseScore:
    """BraTS 2023 lesion-wise Dice and HD95 of the boolean masks of one region.

    ``spacing`` is the voxel size in mm along the three array axes. ``dilation`` (iterations of
    the 18-neighbourhood; 0 for none) decides which reference voxels form one lesion and which
    predicted components touch it; reference lesions of ``min_voxels`` voxels or fewer are left
    out. :data:`BRATS_2023_PARAMETERS` lists both per challenge.
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"lesionwise needs two 3D masks of one shape, not {pred.shape} and {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, not {spacing}")
    if dilation < 0:
        raise ValueError(f"dilation must be 0 or more iterations, not {dilation}")

    pred_cc, n_pred = ndimage.label(pred, structure=_CONNECT_26)
    pred_boxes = ndimage.find_objects(pred_cc)
    pred_sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    extent = ndimage.binary_dilation(ref, structure=_DILATE_18, iterations=dilation) if dilation else ref
    # A lesion's own dilation is exactly its component of the dilated reference (each voxel's
    # dilation is connected), so the components serve as the extents the official code dilates again.
    extent_cc, _ = ndimage.label(extent, structure=_CONNECT_26)

    touched = np.zeros(n_pred + 1, bool)
    per_lesion: list[dict] = []
    dices: list[float] = []
    hds: list[float] = []
    for idx, box in enumerate(ndimage.find_objects(extent_cc), start=1):
        region = extent_cc[box] == idx
        voxels = int((region & ref[box]).sum())
        hits = np.unique(pred_cc[box][region])
        hits = hits[hits > 0]
        touched[hits] = True
        entry = {"kind": "reference", "lesion": idx, "voxels": voxels, "counted": voxels > min_voxels,
                 "pred_components": hits.tolist(), "pred_voxels": int(pred_sizes[hits].sum())}
        if not entry["counted"]:
            per_lesion.append({**entry, "dice": None, "hd95": None})
            continue
        full = box
        for h in hits:
            full = _union(full, pred_boxes[h - 1])
        lesion = (extent_cc[full] == idx) & ref[full]
        merged = np.isin(pred_cc[full], hits) if hits.size else np.zeros_like(lesion)
        d = dice(merged, lesion)
        dist = surface_distances(merged, lesion, spacing)
        hd = penalty_mm if dist is None else hd95(merged, lesion, spacing, distances=dist)
        if not math.isfinite(hd):
            hd = penalty_mm
        dices.append(d)
        hds.append(hd)
        per_lesion.append({**entry, "dice": d, "hd95": hd})

    fp = [i for i in range(1, n_pred + 1) if not touched[i]]
    for i in fp:
        per_lesion.append({"kind": "false_positive", "lesion": i, "voxels": int(pred_sizes[i]), "counted": True,
                           "pred_components": [i], "pred_voxels": int(pred_sizes[i]), "dice": 0.0, "hd95": penalty_mm})
    count = len(dices) + len(fp)
    if count == 0:
        return LesionwiseScore(1.0, 0.0, 0, 0, per_lesion)
    return LesionwiseScore(dice=float(sum(dices)) / count, hd95=(float(sum(hds)) + penalty_mm * len(fp)) / count,
                           n_ref=len(dices), n_pred_fp=len(fp), per_lesion=per_lesion)
