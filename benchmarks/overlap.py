"""What the sliding window's overlap costs in accuracy on inputs larger than the window (hippocampus).

    python benchmarks/overlap.py                                   # the default model
    python benchmarks/overlap.py --model hippocampus-fast --overlaps 0,0.25,0.5

Hippocampus crops (at most 43x58x47 voxels) fit one or two windows of 40x56x40, placed the same at every overlap
up to 0.9, so the cases alone cannot show what a lighter overlap costs on a larger volume. Here the model's
unseen cases are tiled, eight at a time, into mosaics of 2x2x2 tiles (each crop z-scored on its own, then
zero-padded to the tile, 48x64x48: 96x128x96 voxels) and each mosaic is predicted whole, so that windows straddle
crops; ``--shifts`` puts empty space before the mosaic, each shift one more prediction. Dice is scored per crop
against its manual label and averaged as ``benchmarks/hippocampus.py`` does, beside the score of the same crops
predicted one by one. Prints one row per overlap: windows per mosaic (mean over shifts), mean Dice per shift and
over the shifts, the change against the largest overlap, and seconds.

What it showed for the default (docs/benchmarks.md, 2026-12-07): mean Dice over four shifts 0.6016 at overlap 0,
0.6969 at 0.1, 0.7861 at 0.25 and 0.8593 at 0.5, against 0.8904 crop by crop; at shift 0 alone the four were
0.8826, 0.8736, 0.8603 and 0.8804. A model trained on whole crops fails where a window holds only part of one beside
empty space, and more overlap averages those windows away: on such inputs a lighter overlap costs accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hippocampus")
    ap.add_argument("--overlaps", default="0,0.1,0.25,0.5")
    ap.add_argument("--tile", default="48,64,48")
    ap.add_argument("--shifts", default="0,10,20,30", help="voxels of zeros put before each mosaic along every "
                    "axis, one prediction per shift: where the windows fall against the crops changes with it")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hippocampus"))
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not (data / "imagesTr").is_dir():
        print(f"hippocampus data not found at {data}; pass --data", file=sys.stderr)
        return 2

    from medseg.evaluation.metrics import dice
    from medseg.inference.engine import window_starts
    from medseg.inference.predictor import Predictor
    from medseg.io.volume import Volume, load_volume
    from medseg.models.checkpoint import load_checkpoint

    tile = [int(v) for v in args.tile.split(",")]
    overlaps = sorted(float(v) for v in args.overlaps.split(","))
    shifts = [int(v) for v in args.shifts.split(",")]
    first = Predictor(args.model, device="cpu")
    split = load_checkpoint(first.model_path).get("split") or {}
    names = split.get("test") or split.get("validation") or []
    if not names:
        print(f"{args.model} stores no unseen cases", file=sys.stderr)
        return 2
    images, labels, singles = [], [], []
    for name in names:
        vol = load_volume(data / "imagesTr" / f"{name}.nii.gz")
        ref = load_volume(data / "labelsTr" / f"{name}.nii.gz").array
        if any(s > t for s, t in zip(vol.shape, tile)):
            raise SystemExit(f"{name}: {vol.shape} exceeds the tile {tile}; pass a larger --tile")
        arr = vol.array.astype(np.float32)
        images.append((arr - arr.mean()) / max(float(arr.std()), 1e-6))
        labels.append(ref)
        singles.append([dice(first.predict_volume(vol).array == c, ref == c) for c in (1, 2)])
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    mosaics = []  # (array, [(case index, corner)])
    for g in range(0, len(names), 8):
        arr = np.zeros([2 * t for t in tile], np.float32)
        places = []
        for k, i in enumerate(range(g, min(g + 8, len(names)))):
            corner = [(k >> a & 1) * tile[a] for a in range(3)]
            s = images[i].shape
            arr[corner[0]:corner[0] + s[0], corner[1]:corner[1] + s[1], corner[2]:corner[2] + s[2]] = images[i]
            places.append((i, corner))
        mosaics.append((arr, places))

    def pooled(scores) -> float:  # mean over cases per class, then over classes (as benchmarks/hippocampus.py)
        return float(np.mean([np.mean([s[c] for s in scores]) for c in range(2)]))

    roi = first.cfg.inference.roi_size or first.cfg.patch.size
    print(f"model {first.model_path.name}; {len(names)} unseen cases in {len(mosaics)} mosaics of "
          f"{[2 * t for t in tile]} voxels; window {list(roi)}")
    print(f"one crop at a time (the model's own use): mean Dice {pooled(singles):.4f}")
    rows = []
    for overlap in overlaps:
        pred = Predictor(args.model, device="cpu", overlap=overlap)
        per_shift, times, windows = [], [], []
        for shift in shifts:
            scores = [None] * len(names)
            for arr, places in mosaics:
                arr = np.pad(arr, [(shift, 0)] * 3)
                windows.append(len(window_starts(arr.shape, roi, overlap)))
                t0 = time.perf_counter()
                out = pred.predict_volume(Volume(arr, affine)).array
                times.append(time.perf_counter() - t0)
                for i, corner in places:
                    a, s = [c + shift for c in corner], labels[i].shape
                    crop = out[a[0]:a[0] + s[0], a[1]:a[1] + s[1], a[2]:a[2] + s[2]]
                    scores[i] = [dice(crop == c, labels[i] == c) for c in (1, 2)]
            per_shift.append(pooled(scores))
        rows.append((overlap, statistics.mean(windows), per_shift, statistics.median(times)))
    top = statistics.mean(rows[-1][2])
    print(f"shifts {shifts}: mean Dice per shift, their mean, its change against overlap {rows[-1][0]:g}")
    print(f"{'overlap':>8} {'windows':>8} {'per shift':>{8 * len(shifts)}} {'mean':>7} {'change':>8} {'s/mosaic':>9}")
    for overlap, windows, per_shift, t in rows:
        d = statistics.mean(per_shift)
        print(f"{overlap:>8g} {windows:>8.1f} {''.join(f'{v:>8.4f}' for v in per_shift)} {d:>7.4f} {d - top:>+8.4f} "
              f"{t:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
