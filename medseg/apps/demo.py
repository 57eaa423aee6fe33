"""``medseg demo``: segment the bundled real sample with the bundled model."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

from medseg.inference.predictor import Predictor
from medseg.models.loading import ASSETS
from medseg.io.volume import atomic_write, load_volume, save_volume
from medseg.io.visualize import label_volumes_ml, overlay_png

SAMPLE = ASSETS / "samples" / "hippocampus_001.nii.gz"
SAMPLE_REFERENCE = ASSETS / "samples" / "hippocampus_001_label.nii.gz"


@dataclass
class DemoResult:
    labels_path: Path
    overlay_path: Path
    table_path: Path
    volumes_ml: dict[str, float]
    reference_dice: dict[str, float]
    seconds: float


def run_demo(outdir: str | Path = "demo_output", device: str = "auto", model: str | None = None) -> DemoResult:
    from medseg.evaluation.metrics import dice

    t0 = time.perf_counter()
    outdir = Path(outdir)
    predictor = Predictor(model, device=device)
    image = load_volume(SAMPLE)
    labels = predictor.predict_volume(image)
    names = predictor.labels
    labels_path = save_volume(labels, outdir / "hippocampus_001_labels.nii.gz", reference=image)
    overlay_path = overlay_png(image, labels, outdir / "hippocampus_001_overlay.png", names, predictor.cfg.colors)
    volumes = label_volumes_ml(labels, names)
    table_path = outdir / "hippocampus_001_volumes.csv"

    def write_table(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["label", "name", "volume_ml"])
            for value, name in sorted(names.items()):
                if value:
                    w.writerow([value, name, f"{volumes[name]:.4f}"])

    atomic_write(table_path, write_table)
    ref = load_volume(SAMPLE_REFERENCE)
    ref_dice = {names[v]: dice(labels.array == v, ref.array == v) for v in sorted(names) if v}
    return DemoResult(labels_path, overlay_path, table_path, volumes, ref_dice, time.perf_counter() - t0)
