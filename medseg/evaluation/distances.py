"""Overlap and surface-distance primitives shared by the per-class metrics and the lesion-wise scores.

For HD95 and ASSD, surfaces are the mask voxels with a face neighbour outside the mask and distances run
between the centres of surface voxels, in mm through the voxel spacing; surface Dice weights each piece of
surface by its area, as published figures do (:func:`surface_dice`). With both masks empty the metrics are
NaN; with exactly one empty, Dice and surface Dice are 0 and HD95 and ASSD are infinite.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

NAN, INF = float("nan"), float("inf")


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    denom = int(pred.sum()) + int(ref.sum())
    return float("nan") if denom == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / denom


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray] | None:
    """Distances (mm) from each surface voxel of ``pred`` to the surface of ``ref``, and back.

    None when either mask is empty. Work is done on the bounding box of both masks only.
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() or not ref.any():
        return None
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    sp, sr = _surface(pred[box]), _surface(ref[box])
    dist_to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return dist_to_ref[sp], dist_to_pred[sr]


def _empty_value(pred: np.ndarray, ref: np.ndarray, one_empty: float) -> float:
    return NAN if not pred.any() and not ref.any() else one_empty


def hd95(pred: np.ndarray, ref: np.ndarray, spacing, *, distances=None) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (max of both directed 95th percentiles).

    NaN when both masks are empty, infinity when exactly one is.
    """
    d = distances if distances is not None else surface_distances(pred, ref, spacing)
    if d is None:
        return _empty_value(pred, ref, INF)
    return float(max(np.percentile(d[0], 95), np.percentile(d[1], 95)))


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float = 1.0, *, distances=None) -> float:
    """Normalised surface Dice (Nikolov et al. 2021) as published figures compute it: the area of both surfaces
    lying within ``tolerance_mm`` of the other surface, over their total area, with surfaces made of the
    sub-voxel faces of the masks (MONAI's ``compute_surface_dice(..., use_subvoxels=True)``, the method of
    DeepMind's ``surface-distance``; ``tests/test_metrics_reference.py`` holds it to that package). NaN when both
    masks are empty, 0 when one is. ``distances`` is accepted for the callers that share them with HD95 and ASSD
    (they are voxel-centre distances; the area weighting needs its own)."""
    import torch
    from monai.metrics import compute_surface_dice

    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() or not ref.any():
        return _empty_value(pred, ref, 0.0)
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box)
    p, r = pred[box], ref[box]
    if any(n < 2 for n in p.shape):  # the sub-voxel surface needs at least two voxels along each axis: pad
        p, r = np.pad(p, 1), np.pad(r, 1)

    def onehot(m: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(m))
        return torch.stack([~t, t])[None].float()

    value = compute_surface_dice(onehot(p), onehot(r), [float(tolerance_mm)], include_background=False,
                                 spacing=[float(s) for s in spacing], use_subvoxels=True)
    return float(value.reshape(-1)[0])


def assd(pred: np.ndarray, ref: np.ndarray, spacing, *, distances=None) -> float:
    """Average symmetric surface distance in mm: the mean over the surface voxels of both masks of
    their distance to the other surface. NaN when both masks are empty, infinity when one is."""
    d = distances if distances is not None else surface_distances(pred, ref, spacing)
    if d is None:
        return _empty_value(pred, ref, INF)
    return float((d[0].sum() + d[1].sum()) / (d[0].size + d[1].size))
