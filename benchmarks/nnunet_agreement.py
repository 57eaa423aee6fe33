"""Does an nnU-Net model imported into medseg segment as nnU-Net's own predictor does?

nnU-Net pulls its own dependencies, so it runs in its own environment (``--nnunet-venv``), for example:

    python3 -m venv /tmp/nnunet-venv
    /tmp/nnunet-venv/bin/pip install torch==2.13.0 && /tmp/nnunet-venv/bin/pip install nnunetv2

    .venv/bin/python benchmarks/nnunet_agreement.py --results RESULTS/Dataset004_X/TRAINER__PLANS__3d_fullres \\
        --inputs IMAGES_DIR --nnunet-venv /tmp/nnunet-venv [--folds 0 1]

``IMAGES_DIR`` holds inputs named as nnU-Net wants them (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``…).
The script imports the results folder (``medseg import-model nnunet``), then predicts every case with
nnU-Net's ``nnUNetv2_predict_from_modelfolder`` (CPU) and with ``medseg predict``, both with and without
mirror TTA, and compares the label maps: Dice per class, the fraction of voxels that agree, and the output
grids. Prints a table and one JSON line; the figures go into docs/import-models.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def cases_of(folder: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in sorted(folder.glob("*_0000.nii.gz")):
        case = p.name[: -len("_0000.nii.gz")]
        out[case] = sorted(folder.glob(f"{case}_[0-9][0-9][0-9][0-9].nii.gz"))
    return out


def run(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


# nnU-Net's own entry point, run by its python. Beside a CPU build of torch, PyPI's torchvision does not import, and
# nnU-Net's trainer lookup imports every trainer module, the Primus one through timm and torchvision: an empty module
# stands in for that one (plain U-Net trainers are found as usual). Nothing of nnU-Net is changed.
LAUNCHER = """
import sys, types
name = 'nnunetv2.training.nnUNetTrainer.primus.primus_trainers'
sys.modules[name] = types.ModuleType(name)
from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder
sys.argv = ['nnUNetv2_predict_from_modelfolder'] + sys.argv[1:]
if __name__ == '__main__':
    sys.exit(predict_entry_point_modelfolder())
"""


def nnunet_predict(venv: Path, results: Path, inputs: Path, out: Path, folds: list[str], tta: bool) -> float:
    cmd = [str(venv / "bin" / "python"), "-c", LAUNCHER, "-i", str(inputs), "-o", str(out),
           "-m", str(results), "-f", *folds, "-device", "cpu", "-npp", "1", "-nps", "1"]
    if not tta:
        cmd.append("--disable_tta")
    env = {**os.environ, "nnUNet_raw": "/nonexistent", "nnUNet_preprocessed": "/nonexistent",
           "nnUNet_results": str(results.parent.parent)}
    return run(cmd, env)


def medseg_predict(model: Path, inputs: Path, out: Path, tta: bool) -> float:
    """One ``medseg predict`` over the folder: a model of one sequence names each output after its file
    (``CASE_0000.nii.gz``), one of several after the nnU-Net case (``CASE.nii.gz``)."""
    return run([sys.executable, "-m", "medseg", "predict", str(inputs), "-o", str(out), "--model", str(model),
                "--tta" if tta else "--no-tta"])


def ours(folder: Path, case: str) -> Path:
    one = folder / f"{case}_0000.nii.gz"
    return one if one.is_file() else folder / f"{case}.nii.gz"


def dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    x, y = a == c, b == c
    s = int(x.sum() + y.sum())
    return 1.0 if s == 0 else 2.0 * int((x & y).sum()) / s


def compare(ref_dir: Path, ours_dir: Path, cases, labels: dict[int, str]) -> dict:
    import nibabel as nib

    per_class = {name: [] for c, name in labels.items() if c}
    agree, grids = [], []
    for case in cases:
        r = nib.load(ref_dir / f"{case}.nii.gz")
        o = nib.load(ours(ours_dir, case))
        ra, oa = np.asarray(r.dataobj), np.asarray(o.dataobj)
        grids.append(ra.shape == oa.shape and np.allclose(r.affine, o.affine, atol=1e-4))
        agree.append(float((ra == oa).mean()))
        for c, name in labels.items():
            if c:
                per_class[name].append(dice(ra, oa, c))
    return {"dice_min": {k: round(min(v), 4) for k, v in per_class.items()},
            "dice_mean": {k: round(float(np.mean(v)), 4) for k, v in per_class.items()},
            "voxels_agree_min": round(min(agree), 5), "same_grid": all(grids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True, help="TRAINER__PLANS__CONFIGURATION folder")
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--nnunet-venv", type=Path, required=True)
    ap.add_argument("--folds", nargs="+", default=None, help="default: every fold_N in the folder")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nnunet-agreement-"))
    cases = cases_of(args.inputs)
    folds = args.folds or sorted(p.name[5:] for p in args.results.glob("fold_*") if p.name[5:].isdigit())
    model = work / "imported.pt"
    from medseg.models.loading import load_model
    from medseg.models.nnunet import import_nnunet

    import_nnunet(args.results, model, folds=[int(f) for f in folds])
    labels = load_model(model).cfg.labels
    rows = {}
    for tta in (False, True):
        tag = "tta" if tta else "no_tta"
        t_ref = nnunet_predict(args.nnunet_venv, args.results, args.inputs, work / f"nnunet_{tag}", folds, tta)
        t_ours = medseg_predict(model, args.inputs, work / f"medseg_{tag}", tta)
        rows[tag] = {**compare(work / f"nnunet_{tag}", work / f"medseg_{tag}", cases, labels),
                     "nnunet_s": round(t_ref, 1), "medseg_s": round(t_ours, 1)}
    print(f"{len(cases)} cases, folds {' '.join(folds)}; outputs in {work}")
    print(f"{'':8} {'min Dice per class':40} {'voxels agree (min)':>18} {'same grid':>9}")
    for tag, r in rows.items():
        d = ", ".join(f"{k} {v:.4f}" for k, v in r["dice_min"].items())
        print(f"{tag:8} {d:40} {r['voxels_agree_min']:>18.5f} {str(r['same_grid']):>9}")
    print(json.dumps({"cases": len(cases), "folds": folds, "results": args.results.name, **rows,
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores"}))


if __name__ == "__main__":
    main()
