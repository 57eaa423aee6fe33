"""Postprocessing of predicted label maps.

Two steps, as in nnU-Net's postprocessing search:

``keep_largest_foreground``
    Keep only the largest connected component of the listed classes taken together
    (e.g. both hippocampus parts as one structure); other voxels of those classes become background.
``keep_largest``
    For each listed class on its own, keep only its largest connected component.

:func:`medseg.evaluation.choose.choose_postprocessing` tries them on out-of-fold predictions and
keeps a step only where it raises the mean Dice without lowering any class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from medseg.core.config import POSTPROCESS_STEPS

_STRUCTURE = ndimage.generate_binary_structure(3, 3)  # 26-connectivity


def _structure(ndim: int) -> np.ndarray:
    return _STRUCTURE if ndim == 3 else ndimage.generate_binary_structure(ndim, ndim)


def largest_component_mask(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    if not mask.any():
        return mask
    comp, n = ndimage.label(mask, structure=_structure(mask.ndim))
    if n <= 1:
        return mask
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    return comp == int(sizes.argmax())


def keep_largest_foreground(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Remove all components of ``classes`` (taken together) except the largest one."""
    classes = [int(c) for c in classes]
    if not classes:
        return labels
    fg = np.isin(labels, classes)
    drop = fg & ~largest_component_mask(fg)
    if not drop.any():
        return labels
    out = labels.copy()
    out[drop] = 0
    return out


def keep_largest(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """For each class in ``classes``, keep only its largest connected component."""
    out = labels
    for c in classes:
        m = labels == int(c)
        drop = m & ~largest_component_mask(m)
        if drop.any():
            if out is labels:
                out = labels.copy()
            out[drop] = 0
    return out


_FUNCS: dict[str, Callable[[np.ndarray, Sequence[int]], np.ndarray]] = {
    "keep_largest_foreground": keep_largest_foreground,
    "keep_largest": keep_largest,
}


def apply_postprocessing(labels: np.ndarray, steps: dict[str, list[int]] | None) -> np.ndarray:
    """Apply the configured steps in the fixed order of :data:`POSTPROCESS_STEPS`."""
    if not steps:
        return labels
    for name in POSTPROCESS_STEPS:
        if steps.get(name):
            labels = _FUNCS[name](labels, steps[name])
    return labels
