"""Comparing predicted label volumes with references, per class and per lesion.

Per class and case: Dice, HD95 (mm), surface Dice at a tolerance (mm), average symmetric
surface distance (mm), volumes and their difference (mL, %), and lesion-wise detection
(sensitivity, precision, F1; see :class:`medseg.evaluation.lesions.LesionMatch` for the matching rule).

Surfaces are the mask voxels with a face neighbour outside the mask; distances run between
the centres of surface voxels, in mm through the voxel spacing (as MONAI's surface metrics
without sub-voxel areas).

Empty masks: with both prediction and reference empty every overlap and distance metric is
NaN; with exactly one empty, Dice and surface Dice are 0 and HD95 and ASSD are infinite.
:meth:`Evaluation.mean` skips NaN and infinite values; JSON shows them as null.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.core.errors import DataError, InputNotFoundError
from medseg.io.volume import (
    Volume,
    case_name,
    check_same_grid,
    load_volume,
    volume_suffix,
)
from medseg.evaluation.brats import lesionwise
from medseg.evaluation.distances import INF, NAN, assd, dice, hd95, surface_dice, surface_distances
from medseg.evaluation.lesions import LesionMatch, f1_score, match_lesions

__all__ = ["assd", "dice", "evaluate", "hd95", "score_case", "surface_dice", "surface_distances"]


def pair_by_name(preds: dict, refs: dict, pred_dir: Path, kind: str) -> list[str]:
    """The names found in both ``preds`` and ``refs`` (name -> path); an error when none pair
    or when a reference has no prediction (a partial folder would flatter the mean)."""
    common = sorted(set(preds) & set(refs))
    if not common:
        raise DataError("no predictions pair with a reference by file name", path=pred_dir,
                        expected=f"names like {', '.join(list(refs)[:3])}", found=", ".join(list(preds)[:3]) or f"no {kind}",
                        fix="predict into this folder with 'medseg predict', keeping the input names")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise DataError(f"{len(missing)} reference case(s) have no prediction", path=pred_dir,
                        expected="one prediction per reference", found="missing " + ", ".join(missing[:5]),
                        fix="predict the missing cases, or evaluate against a folder holding only the predicted cases")
    return common


@dataclass
class CaseScores:
    """Scores of one case, each a dict class -> value.

    ``avd_ml`` is the absolute volume difference ``|V_pred - V_ref|``; ``rvd_pct`` the signed
    relative difference ``100 (V_pred - V_ref) / V_ref`` (infinite for an empty reference with a
    non-empty prediction, NaN when both are empty).
    """

    case: str
    dice: dict[int, float]
    hd95: dict[int, float]
    surface_dice: dict[int, float] = field(default_factory=dict)
    assd: dict[int, float] = field(default_factory=dict)
    pred_volume_ml: dict[int, float] = field(default_factory=dict)
    ref_volume_ml: dict[int, float] = field(default_factory=dict)
    avd_ml: dict[int, float] = field(default_factory=dict)
    rvd_pct: dict[int, float] = field(default_factory=dict)
    lesions: dict[int, LesionMatch] = field(default_factory=dict)
    lesionwise: dict = field(default_factory=dict)
    """Regions: BraTS 2023 lesion-wise scores (:class:`medseg.evaluation.brats.LesionwiseScore`) per region."""

    def value(self, metric: str, cls: int) -> float:
        """A metric by name; ``lesion_sensitivity``, ``lesion_precision`` and ``lesion_f1`` read :attr:`lesions`,
        ``lesionwise_dice`` and ``lesionwise_hd95`` :attr:`lesionwise`."""
        if metric.startswith("lesionwise_"):
            score = self.lesionwise.get(cls)
            return NAN if score is None else float(getattr(score, metric[len("lesionwise_"):]))
        if metric.startswith("lesion_"):
            match = self.lesions.get(cls)
            return NAN if match is None else float(getattr(match, metric[len("lesion_"):]))
        return float(getattr(self, metric).get(cls, NAN))


def _clean(v: float):
    return None if (math.isnan(v) or math.isinf(v)) else round(v, 5)


CLASS_METRICS = {"dice": "dice", "hd95": "hd95_mm", "surface_dice": "surface_dice", "assd": "assd_mm",
                 "avd_ml": "avd_ml", "rvd_pct": "rvd_pct"}
REGION_METRICS = {"lesionwise_dice": "lesionwise_dice", "lesionwise_hd95": "lesionwise_hd95_mm"}
LESION_METRICS = ("lesion_sensitivity", "lesion_precision", "lesion_f1")


@dataclass
class Evaluation:
    classes: list[int]
    names: dict[int, str]
    cases: list[CaseScores] = field(default_factory=list)
    tolerance_mm: float = 1.0
    connectivity: int = 26
    min_iou: float = 0.0
    regions: dict[str, list[int]] = field(default_factory=dict)
    """Region name -> label values, when :attr:`classes` are regions (keys are then region names)."""

    def mean(self, metric: str, cls: int) -> float:
        """Mean over cases of a metric (``dice``, ``hd95``, ``surface_dice``, ``assd``, ``avd_ml``,
        ``rvd_pct``, ``lesion_sensitivity``...), skipping NaN and infinite values."""
        vals = [c.value(metric, cls) for c in self.cases]
        vals = [v for v in vals if not math.isnan(v) and not math.isinf(v)]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def mean_dice(self) -> float:
        vals = [self.mean("dice", c) for c in self.classes]
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")

    def lesion_totals(self, cls: int) -> dict:
        """Lesion counts pooled over all cases, with the pooled sensitivity, precision and F1."""
        matches = [c.lesions[cls] for c in self.cases if cls in c.lesions]
        n_ref, n_pred = sum(m.n_ref for m in matches), sum(m.n_pred for m in matches)
        det, tp = sum(m.detected for m in matches), sum(m.true_positive for m in matches)
        sens = det / n_ref if n_ref else NAN
        prec = tp / n_pred if n_pred else NAN
        return {"n_ref": n_ref, "n_pred": n_pred, "detected": det, "true_positive": tp,
                "sensitivity": sens, "precision": prec, "f1": f1_score(sens, prec, n_ref, n_pred)}

    def to_dict(self) -> dict:
        def name(c: int) -> str:
            return self.names.get(c, str(c))

        metrics = {**CLASS_METRICS, **(REGION_METRICS if self.regions else {})}

        def case_class(cs: CaseScores, c: int) -> dict:
            d = {key: _clean(cs.value(metric, c)) for metric, key in metrics.items()}
            d["pred_volume_ml"] = _clean(cs.pred_volume_ml.get(c, NAN))
            d["ref_volume_ml"] = _clean(cs.ref_volume_ml.get(c, NAN))
            m = cs.lesions.get(c)
            if m is not None:
                d["lesions"] = {"n_ref": m.n_ref, "n_pred": m.n_pred, "detected": m.detected,
                                "true_positive": m.true_positive, "sensitivity": _clean(m.sensitivity),
                                "precision": _clean(m.precision), "f1": _clean(m.f1),
                                "reference": [les.to_dict() for les in m.reference],
                                "false_positive": [les.to_dict() for les in m.false_positive]}
            return d

        return {
            "classes": {str(c): name(c) for c in self.classes},
            "settings": {"surface_dice_tolerance_mm": self.tolerance_mm, "lesion_connectivity": self.connectivity,
                         "lesion_match": "any overlap" if self.min_iou <= 0 else f"overlap with IoU > {self.min_iou:g}"},
            **({"regions": {k: list(v) for k, v in self.regions.items()}} if self.regions else {}),
            "mean": {
                name(c): {**{key: _clean(self.mean(metric, c)) for metric, key in metrics.items()},
                          **{m: _clean(self.mean(m, c)) for m in LESION_METRICS}}
                for c in self.classes
            },
            "lesions": {name(c): {k: (_clean(v) if isinstance(v, float) else v)
                                  for k, v in self.lesion_totals(c).items()} for c in self.classes},
            "mean_dice": _clean(self.mean_dice),
            "cases": [{"case": cs.case, **{name(c): case_class(cs, c) for c in self.classes}} for cs in self.cases],
        }


def score_case(pred: Volume, ref: Volume, classes: list, name: str, *, tolerance_mm: float = 1.0,
               lesions: bool = True, connectivity: int = 26, min_iou: float = 0.0,
               names: dict | None = None, regions: dict[str, list[int]] | None = None) -> CaseScores:
    """Every metric of one case; ``lesions=False`` skips the lesion-wise analysis. With ``regions`` (name ->
    label values) the ``classes`` are region names, each scored as the union of its labels, with the BraTS
    2023 lesion-wise Dice and HD95 besides."""
    check_same_grid(pred, ref, what="prediction")
    p, r = np.asarray(pred.array), np.asarray(ref.array)
    if r.dtype.kind == "f":
        r = np.rint(r).astype(np.int64)
    spacing = tuple(float(s) for s in ref.spacing)
    voxel_ml = ref.voxel_volume_ml
    cs = CaseScores(name, {}, {})
    for c in classes:
        if regions:
            pm, rm = np.isin(p, regions[c]), np.isin(r, regions[c])
            cs.lesionwise[c] = lesionwise(pm, rm, spacing)
        else:
            pm, rm = p == c, r == c
        d = surface_distances(pm, rm, spacing)
        cs.dice[c] = dice(pm, rm)
        cs.hd95[c] = hd95(pm, rm, spacing, distances=d)
        cs.surface_dice[c] = surface_dice(pm, rm, spacing, tolerance_mm, distances=d)
        cs.assd[c] = assd(pm, rm, spacing, distances=d)
        vp, vr = int(pm.sum()) * voxel_ml, int(rm.sum()) * voxel_ml
        cs.pred_volume_ml[c], cs.ref_volume_ml[c] = vp, vr
        cs.avd_ml[c] = abs(vp - vr)
        cs.rvd_pct[c] = 100.0 * (vp - vr) / vr if vr else (NAN if vp == 0 else INF)
        if lesions:
            cs.lesions[c] = match_lesions(pm, rm, ref.affine, connectivity=connectivity, min_iou=min_iou,
                                          label=0 if regions else c, name=(names or {}).get(c, str(c)))
    return cs


def _index(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputNotFoundError("folder not found", path=folder, expected="a folder of label volumes",
                                 fix="check the path")
    return {case_name(p): p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and volume_suffix(p)}


def evaluate(pred_dir: str | Path, ref_dir: str | Path, *, names: dict[int, str] | None = None,
             json_path: str | Path | None = None, progress: bool = True, tolerance_mm: float = 1.0,
             lesions: bool = True, connectivity: int = 26, min_iou: float = 0.0, regions=None) -> Evaluation:
    """Pair files by case name and score every foreground class found in the references.

    ``regions`` (``RegionConfig`` list or a mapping name -> label values): score those regions instead of
    the label values, each with the BraTS 2023 lesion-wise Dice and HD95 besides.

    ``tolerance_mm`` is the surface Dice tolerance; ``connectivity`` (6, 18, 26) and ``min_iou``
    define lesions and their matching (see :class:`medseg.evaluation.lesions.LesionMatch`).
    """
    from medseg.core.progress import progress_bar

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds, refs = _index(pred_dir), _index(ref_dir)
    common = pair_by_name(preds, refs, pred_dir, "volumes")
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
    region_map = _region_map(regions)
    if region_map:
        classes, names = list(region_map), {k: k for k in region_map}
    result = Evaluation(classes, dict(names or {}), tolerance_mm=tolerance_mm, connectivity=connectivity,
                        min_iou=min_iou, regions=region_map)
    with progress_bar("evaluate", total=len(loaded), enabled=progress) as advance:
        for key, pred, ref in loaded:
            result.cases.append(score_case(pred, ref, classes, key, tolerance_mm=tolerance_mm, lesions=lesions,
                                           connectivity=connectivity, min_iou=min_iou, names=result.names,
                                           regions=region_map or None))
            advance(key)
    if json_path:
        from medseg.io.volume import atomic_write

        atomic_write(json_path, lambda p: Path(p).write_text(json.dumps(result.to_dict(), indent=1)))
    return result


def _region_map(regions) -> dict[str, list[int]]:
    if not regions:
        return {}
    if isinstance(regions, dict):
        return {str(k): [int(v) for v in vals] for k, vals in regions.items()}
    return {r.name: [int(v) for v in r.labels] for r in regions}
