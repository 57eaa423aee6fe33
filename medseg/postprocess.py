"""Postprocessing of predicted label maps, and choosing it on cross-validation results.

Two steps, as in nnU-Net's postprocessing search:

``keep_largest_foreground``
    Keep only the largest connected component of the listed classes taken together
    (e.g. both hippocampus parts as one structure); other voxels of those classes become background.
``keep_largest``
    For each listed class on its own, keep only its largest connected component.

:func:`choose_postprocessing` tries them on out-of-fold predictions and keeps a step only
where it raises the mean Dice without lowering any class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

POSTPROCESS_STEPS = ("keep_largest_foreground", "keep_largest")

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


def mean_dice_per_class(pairs: list[tuple[np.ndarray, np.ndarray]], classes: Sequence[int]) -> dict[int, float]:
    """Mean over cases of each class's Dice (cases where both are empty are left out)."""
    from medseg.evaluation import dice

    out = {}
    for c in classes:
        vals = [d for d in (dice(p == c, r == c) for p, r in pairs) if d == d]
        out[int(c)] = float(np.mean(vals)) if vals else float("nan")
    return out


def choose_postprocessing(pairs: list[tuple[np.ndarray, np.ndarray]], classes: Sequence[int],
                          min_gain: float = 0.0) -> tuple[dict[str, list[int]], dict]:
    """Pick postprocessing steps that help on ``(prediction, reference)`` pairs.

    First tries ``keep_largest_foreground`` over all ``classes``; then, on top of what was
    kept, ``keep_largest`` for each class separately. A step is kept when it raises the mean
    Dice over classes by more than ``min_gain`` and lowers no class. Returns the chosen
    steps and a report with the Dice before and after each trial.
    """
    classes = [int(c) for c in classes]
    base = mean_dice_per_class(pairs, classes)
    report: dict = {"before": base, "trials": []}
    chosen: dict[str, list[int]] = {}

    def better(new: dict[int, float], old: dict[int, float]) -> bool:
        gain = np.nanmean(list(new.values())) - np.nanmean(list(old.values()))
        worse = any(new[c] < old[c] - 1e-12 for c in classes if new[c] == new[c] and old[c] == old[c])
        return bool(gain > min_gain and not worse)

    current_pairs, current = pairs, base
    if len(classes) > 1:
        trial_pairs = [(keep_largest_foreground(p, classes), r) for p, r in current_pairs]
        trial = mean_dice_per_class(trial_pairs, classes)
        ok = better(trial, current)
        report["trials"].append({"step": "keep_largest_foreground", "classes": classes, "dice": trial, "kept": ok})
        if ok:
            chosen["keep_largest_foreground"] = classes
            current_pairs, current = trial_pairs, trial
    keep = []
    for c in classes:
        trial_pairs = [(keep_largest(p, [c]), r) for p, r in current_pairs]
        trial = mean_dice_per_class(trial_pairs, classes)
        ok = better(trial, current)
        report["trials"].append({"step": "keep_largest", "classes": [c], "dice": trial, "kept": ok})
        if ok:
            keep.append(c)
            current_pairs, current = trial_pairs, trial
    if keep:
        chosen["keep_largest"] = keep
    report["after"] = current
    report["chosen"] = chosen
    return chosen, report
