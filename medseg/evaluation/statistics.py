"""Label statistics of a segmented case: per label its volume (mL) and, per sequence, the intensities inside it
(mean, standard deviation, percentiles), as radiomics tables start from. Written by ``--statistics`` in
``medseg predict`` and ``medseg batch`` (``<name>.statistics.csv`` and ``.json``; a batch also gets one table over
all its cases, ``statistics.csv``)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from medseg.io.volume import Volume, atomic_write

PERCENTILES = (5, 25, 50, 75, 95)
COLUMNS = ["label", "name", "voxels", "volume_ml", "sequence", "mean", "std", "min",
           *[f"p{p}" for p in PERCENTILES], "max"]


def label_statistics(image: Volume, labels: Volume, names: dict[int, str],
                     sequences: list[str] | None = None) -> list[dict]:
    """One row per label and sequence (labels with no voxels keep a row with volume 0 and empty intensities).
    ``image`` is the input on the labels' grid, one sequence or ``(X, Y, Z, C)`` for several."""
    lab = np.asarray(labels.array)
    img = np.asarray(image.array, dtype=np.float64)
    if img.ndim == 3:
        img = img[..., None]
    if img.shape[:3] != lab.shape:
        raise ValueError(f"image {img.shape[:3]} and labels {lab.shape} lie on different grids")
    seqs = list(sequences or [])
    seqs = seqs if len(seqs) == img.shape[3] else (["image"] if img.shape[3] == 1 else
                                                   [f"channel{c}" for c in range(img.shape[3])])
    vox_ml = labels.voxel_volume_ml
    rows = []
    for value in sorted(v for v in names if v != 0):
        mask = lab == value
        n = int(mask.sum())
        for c, seq in enumerate(seqs):
            row = {"label": int(value), "name": names[value], "voxels": n, "volume_ml": round(n * vox_ml, 4),
                   "sequence": seq}
            if n:
                x = img[..., c][mask]
                pct = np.percentile(x, PERCENTILES)
                row.update({"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
                            **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)}, "max": float(x.max())})
            else:
                row.update({k: None for k in COLUMNS[5:]})
            rows.append(row)
    return rows


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in columns})
    return buf.getvalue()


def write_statistics(rows: list[dict], base: Path) -> list[Path]:
    """``base.statistics.csv`` and ``base.statistics.json``."""
    csv_path = base.parent / f"{base.name}.statistics.csv"
    json_path = base.parent / f"{base.name}.statistics.json"
    doc = {"columns": COLUMNS, "percentiles": list(PERCENTILES), "rows": rows}
    return [atomic_write(csv_path, lambda tmp: Path(tmp).write_text(_csv_text(rows, COLUMNS))),
            atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1) + "\n"))]


def write_study_table(cases: list[tuple[str, Path]], path: Path) -> Path | None:
    """One table over many cases (``case`` first, then :data:`COLUMNS`) from their ``.statistics.json`` files;
    None when there are none."""
    rows = []
    for case, stats_json in cases:
        try:
            doc = json.loads(Path(stats_json).read_text())
        except (OSError, ValueError):
            continue
        rows += [{"case": case, **r} for r in doc.get("rows", [])]
    if not rows:
        return None
    return atomic_write(path, lambda tmp: Path(tmp).write_text(_csv_text(rows, ["case", *COLUMNS])))
