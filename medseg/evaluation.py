"""Comparing predicted label volumes with references: Dice and HD95 per class."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.errors import DataError, InputNotFoundError
from medseg.io.volume import (
    Volume,
    case_name,
    check_same_grid,
    load_volume,
    volume_suffix,
)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    denom = int(pred.sum()) + int(ref.sum())
    return float("nan") if denom == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / denom


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (max of both directed 95th percentiles).

    NaN when both masks are empty, infinity when exactly one is.
    """
    if not pred.any() and not ref.any():
        return float("nan")
    if not pred.any() or not ref.any():
        return float("inf")
    sp, sr = _surface(pred), _surface(ref)
    dist_to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(max(np.percentile(dist_to_ref[sp], 95), np.percentile(dist_to_pred[sr], 95)))


@dataclass
class CaseScores:
    case: str
    dice: dict[int, float]
    hd95: dict[int, float]


@dataclass
class Evaluation:
    classes: list[int]
    names: dict[int, str]
    cases: list[CaseScores] = field(default_factory=list)

    def mean(self, metric: str, cls: int) -> float:
        vals = [getattr(c, metric)[cls] for c in self.cases]
        vals = [v for v in vals if not math.isnan(v) and not math.isinf(v)]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def mean_dice(self) -> float:
        vals = [self.mean("dice", c) for c in self.classes]
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")

    def to_dict(self) -> dict:
        def clean(v: float):
            return None if (math.isnan(v) or math.isinf(v)) else round(v, 5)

        name = self.names.get
        return {
            "classes": {str(c): name(c, str(c)) for c in self.classes},
            "mean": {
                name(c, str(c)): {"dice": clean(self.mean("dice", c)), "hd95_mm": clean(self.mean("hd95", c))}
                for c in self.classes
            },
            "mean_dice": clean(self.mean_dice),
            "cases": [
                {"case": cs.case,
                 **{name(c, str(c)): {"dice": clean(cs.dice[c]), "hd95_mm": clean(cs.hd95[c])} for c in self.classes}}
                for cs in self.cases
            ],
        }


def score_case(pred: Volume, ref: Volume, classes: list[int], name: str) -> CaseScores:
    check_same_grid(pred, ref, what="prediction")
    p, r = np.asarray(pred.array), np.asarray(ref.array)
    spacing = tuple(float(s) for s in ref.spacing)
    return CaseScores(
        name,
        {c: dice(p == c, r == c) for c in classes},
        {c: hd95(p == c, r == c, spacing) for c in classes},
    )


def _index(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputNotFoundError("folder not found", path=folder, expected="a folder of label volumes",
                                 fix="check the path")
    return {case_name(p): p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and volume_suffix(p)}


def evaluate(pred_dir: str | Path, ref_dir: str | Path, *, names: dict[int, str] | None = None,
             json_path: str | Path | None = None, progress: bool = True) -> Evaluation:
    """Pair files by case name and score every foreground class found in the references."""
    from medseg.progress import progress_bar

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds, refs = _index(pred_dir), _index(ref_dir)
    common = sorted(set(preds) & set(refs))
    if not common:
        raise DataError("no predictions pair with a reference by file name", path=pred_dir,
                        expected=f"names like {', '.join(list(refs)[:3])}", found=", ".join(list(preds)[:3]) or "no volumes",
                        fix="predict into this folder with 'medseg predict', keeping the input names")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise DataError(f"{len(missing)} reference case(s) have no prediction", path=pred_dir,
                        expected="one prediction per reference", found="missing " + ", ".join(missing[:5]),
                        fix="predict the missing cases, or evaluate against a folder holding only the predicted cases")
    loaded = []
    for key in common:
        ref = load_volume(refs[key])
        pred = load_volume(preds[key])
        loaded.append((key, pred, ref))
    values: set[int] = set()
    for _, pred, ref in loaded:
        values |= set(np.unique(ref.array).astype(int).tolist()) | set(np.unique(pred.array).astype(int).tolist())
    classes = sorted(v for v in values if v != 0) or sorted(names or {1: "foreground"})
    classes = [c for c in classes if c != 0]
    result = Evaluation(classes, dict(names or {}))
    with progress_bar("evaluate", total=len(loaded), enabled=progress) as advance:
        for key, pred, ref in loaded:
            result.cases.append(score_case(pred, ref, classes, key))
            advance(key)
    if json_path:
        from medseg.io.volume import atomic_write

        atomic_write(json_path, lambda p: Path(p).write_text(json.dumps(result.to_dict(), indent=1)))
    return result
