"""IoU for 2D masks: per-class intersection over union from a confusion matrix pooled over images.

Pooling over the whole set (not averaging per image) is how Pascal VOC, Cityscapes and
CamVid report IoU. Pixels whose reference is ``ignore_index`` (void, borders) are left out.
Every class counts, class 0 included (in VOC "background" is one of the 21 classes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.core.errors import GeometryError, InputNotFoundError


def confusion_matrix(pred: np.ndarray, ref: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``(num_classes, num_classes)`` counts, rows = reference class, columns = predicted class."""
    pred, ref = np.asarray(pred).ravel().astype(np.int64), np.asarray(ref).ravel().astype(np.int64)
    keep = (ref != ignore_index) & (ref >= 0) & (ref < num_classes)
    p = np.clip(pred[keep], 0, num_classes - 1)
    return np.bincount(ref[keep] * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class; NaN for a class absent from both reference and prediction."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)


def mean_iou(cm: np.ndarray) -> float:
    iou = iou_per_class(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


@dataclass
class Evaluation2D:
    classes: list[int]
    names: dict[int, str]
    confusion: np.ndarray
    cases: list[str] = field(default_factory=list)
    per_image_miou: dict[str, float] = field(default_factory=dict)

    @property
    def iou(self) -> dict[int, float]:
        vals = iou_per_class(self.confusion)
        return {c: float(vals[c]) for c in self.classes}

    @property
    def mean_iou(self) -> float:
        vals = [v for v in self.iou.values() if not math.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def pixel_accuracy(self) -> float:
        return pixel_accuracy(self.confusion)

    def share(self, cls: int) -> float:
        total = self.confusion.sum()
        return float(self.confusion[cls].sum() / total) if total else float("nan")

    def to_dict(self) -> dict:
        def clean(v: float):
            return None if math.isnan(v) else round(v, 5)

        return {"classes": {str(c): self.names.get(c, str(c)) for c in self.classes},
                "iou": {self.names.get(c, str(c)): clean(v) for c, v in self.iou.items()},
                "mean_iou": clean(self.mean_iou), "pixel_accuracy": clean(self.pixel_accuracy),
                "reference_share": {self.names.get(c, str(c)): clean(self.share(c)) for c in self.classes},
                "images": len(self.cases), "per_image_mean_iou": {k: clean(v) for k, v in self.per_image_miou.items()}}


def _masks(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputNotFoundError("folder not found", path=folder, expected="a folder of mask PNGs", fix="check the path")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() == ".png"
            and not p.name.startswith(".")}


def is_mask_folder(folder: str | Path) -> bool:
    """True for a folder holding PNG masks and no volumes (what 'medseg evaluate' treats as 2D)."""
    from medseg.io.volume import volume_suffix

    folder = Path(folder)
    if not folder.is_dir():
        return False
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return any(p.suffix.lower() == ".png" for p in files) and not any(volume_suffix(p) for p in files)


def evaluate_masks(pred_dir: str | Path, ref_dir: str | Path, *, names: dict[int, str] | None = None,
                   ignore_index: int = 255, json_path: str | Path | None = None) -> Evaluation2D:
    """Pair mask PNGs by name stem and pool their confusion matrix; classes are the config's
    (``names``) or every value found."""
    from medseg.seg2d.images import read_mask
    from medseg.evaluation.metrics import pair_by_name

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds, refs = _masks(pred_dir), _masks(ref_dir)
    common = pair_by_name(preds, refs, pred_dir, "PNGs")
    pairs = []
    for key in common:
        p, r = read_mask(preds[key]), read_mask(refs[key])
        if p.shape != r.shape:
            raise GeometryError("predicted and reference mask sizes differ", path=preds[key],
                                expected=f"{r.shape[1]}x{r.shape[0]} pixels", found=f"{p.shape[1]}x{p.shape[0]}",
                                fix="predict on the original images; masks are never resized")
        pairs.append((key, p, r))
    values: set[int] = set()
    for _, p, r in pairs:
        values |= set(np.unique(r).tolist()) | set(np.unique(p).tolist())
    values.discard(ignore_index)
    classes = sorted(set(names or {}) | values)
    n = max(classes) + 1
    cm = np.zeros((n, n), np.int64)
    result = Evaluation2D(classes, dict(names or {}), cm)
    for key, p, r in pairs:
        one = confusion_matrix(p, r, n, ignore_index)
        cm += one
        result.cases.append(key)
        present = [c for c in classes if one[c].sum() or one[:, c].sum()]
        vals = iou_per_class(one)[present]
        result.per_image_miou[key] = float(np.nanmean(vals)) if len(vals) else float("nan")
    if json_path:
        from medseg.io.volume import atomic_write

        atomic_write(json_path, lambda t: Path(t).write_text(json.dumps(result.to_dict(), indent=1)))
    return result


def settings_from(path: str | Path | None) -> tuple[dict[int, str] | None, int]:
    """Class names and the ignore value from a config YAML or a .pt model (``None``: every value found, 255)."""
    if path is None:
        return None, 255
    path = Path(path)
    if path.suffix == ".pt":
        from medseg.models.checkpoint import load_checkpoint

        cfg = load_checkpoint(path)["config"]
        return {int(k): v for k, v in cfg["labels"].items()}, int(cfg.get("data", {}).get("ignore_index", 255))
    from medseg.core.config import load_config

    cfg = load_config(path)
    return dict(cfg.labels), int(cfg.data.ignore_index)
