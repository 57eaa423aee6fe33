"""Choosing postprocessing on cross-validation results (nnU-Net's search): a step of
:mod:`medseg.inference.postprocess` is kept only where it raises the mean Dice over
out-of-fold predictions without lowering any class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.evaluation.metrics import dice
from medseg.inference.postprocess import keep_largest, keep_largest_foreground


def mean_dice_per_class(pairs: list[tuple[np.ndarray, np.ndarray]], classes: Sequence[int]) -> dict[int, float]:
    """Mean over cases of each class's Dice (cases where both are empty are left out)."""
    out = {}
    for c in classes:
        vals = [d for d in (dice(p == c, r == c) for p, r in pairs) if d == d]
        out[int(c)] = float(np.mean(vals)) if vals else float("nan")
    return out


def mean_dice_per_region(pairs: list[tuple[np.ndarray, np.ndarray]], regions) -> dict[str, float]:
    """Mean over cases of each region's Dice (a region: the union of its label values, on both sides)."""
    out = {}
    for r in regions:
        vals = [d for d in (dice(np.isin(p, r.labels), np.isin(q, r.labels)) for p, q in pairs) if d == d]
        out[r.name] = float(np.mean(vals)) if vals else float("nan")
    return out


def choose_postprocessing(pairs: list[tuple[np.ndarray, np.ndarray]], classes: Sequence[int],
                          min_gain: float = 0.0, score=None) -> tuple[dict[str, list[int]], dict]:
    """Pick postprocessing steps that help on ``(prediction, reference)`` pairs.

    First tries ``keep_largest_foreground`` over all ``classes``; then, on top of what was
    kept, ``keep_largest`` for each class separately. A step is kept when it raises the mean
    Dice over classes (``score(pairs)``: a dict of Dice per class or region; default per class) by more than
    ``min_gain`` and lowers none. Returns the chosen
    steps and a report with the Dice before and after each trial.
    """
    classes = [int(c) for c in classes]
    score = score or (lambda trial_pairs: mean_dice_per_class(trial_pairs, classes))
    base = score(pairs)
    report: dict = {"before": base, "trials": []}
    chosen: dict[str, list[int]] = {}

    def better(new: dict[int, float], old: dict[int, float]) -> bool:
        gain = np.nanmean(list(new.values())) - np.nanmean(list(old.values()))
        worse = any(new[c] < old[c] - 1e-12 for c in new if new[c] == new[c] and old[c] == old[c])
        return bool(gain > min_gain and not worse)

    current_pairs, current = pairs, base
    if len(classes) > 1:
        trial_pairs = [(keep_largest_foreground(p, classes), r) for p, r in current_pairs]
        trial = score(trial_pairs)
        ok = better(trial, current)
        report["trials"].append({"step": "keep_largest_foreground", "classes": classes, "dice": trial, "kept": ok})
        if ok:
            chosen["keep_largest_foreground"] = classes
            current_pairs, current = trial_pairs, trial
    keep = []
    for c in classes:
        trial_pairs = [(keep_largest(p, [c]), r) for p, r in current_pairs]
        trial = score(trial_pairs)
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
