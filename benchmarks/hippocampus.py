"""Hippocampus accuracy benchmark (MSD Task04): Dice/HD95 per class on a held-out split, and time.

By default it loads the bundled model and scores the validation cases stored in its
checkpoint (cases it never trained on). ``--train`` retrains from the config first.

    python benchmarks/hippocampus.py                       # bundled model
    python benchmarks/hippocampus.py --model runs/hippocampus/best.pt
    python benchmarks/hippocampus.py --train --set train.epochs=50

Prints a table and one JSON line; the figures go into benchmarks/RESULTS.md by hand,
with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint or bundled name (default: bundled hippocampus)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hippocampus"), help="MSD Task04 folder")
    ap.add_argument("--train", action="store_true", help="train from --config first, then evaluate best.pt")
    ap.add_argument("--config", default=str(REPO / "configs" / "hippocampus.yaml"))
    ap.add_argument("--set", action="append", default=[], help="config override for --train")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    from medseg.config import load_config
    from medseg.evaluation import evaluate
    from medseg.inference.predictor import Predictor
    from medseg.io.volume import load_volume, save_volume
    from medseg.training.checkpoint import load_checkpoint

    data = Path(args.data)
    if not data.is_dir():
        print(f"hippocampus data not found at {data}; pass --data", file=sys.stderr)
        return 2
    train_seconds = None
    model = args.model
    if args.train:
        from medseg.training.trainer import train

        cfg = load_config(args.config, [f"data.root={data}", *args.set])
        res = train(cfg, progress=False)
        train_seconds = res.seconds
        model = str(res.best_checkpoint)

    pred = Predictor(model, device=args.device)
    split = load_checkpoint(pred.model_path).get("split") or {}
    names = split.get("validation") or []
    if not names:
        print("checkpoint has no stored validation split; nothing held out to score", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        pred_dir, ref_dir = Path(tmp) / "pred", Path(tmp) / "ref"
        ref_dir.mkdir()
        times = []
        for name in names:
            img = data / "imagesTr" / f"{name}.nii.gz"
            (ref_dir / img.name).symlink_to((data / "labelsTr" / img.name).resolve())
            t0 = time.perf_counter()
            vol = load_volume(img)
            save_volume(pred.predict_volume(vol), pred_dir / img.name, reference=vol)
            times.append(time.perf_counter() - t0)
        ev = evaluate(pred_dir, ref_dir, names=pred.labels, progress=False)
    result = {
        "model": str(pred.model_path.relative_to(REPO) if pred.model_path.is_relative_to(REPO) else pred.model_path),
        "cases": len(names),
        "dice": {pred.labels[c]: round(ev.mean("dice", c), 4) for c in ev.classes},
        "hd95_mm": {pred.labels[c]: round(ev.mean("hd95", c), 3) for c in ev.classes},
        "mean_dice": round(ev.mean_dice, 4),
        "predict_s_per_case": round(float(np.mean(times)), 3),
        "train_s": None if train_seconds is None else round(train_seconds, 1),
        "device": str(pred.device),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    print(f"held-out cases: {len(names)}   model: {result['model']}")
    for c in ev.classes:
        n = pred.labels[c]
        print(f"  {n:<10} Dice {result['dice'][n]:.4f}   HD95 {result['hd95_mm'][n]:.2f} mm")
    print(f"  mean Dice {result['mean_dice']:.4f}; predict {result['predict_s_per_case']:.2f} s/case on {result['device']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
