"""Peak resident memory of ``medseg predict`` on a CT-size volume with a 3D model.

    python benchmarks/memory_ct.py                          # 512x512x600, bundled hippocampus-fast, torch backend
    python benchmarks/memory_ct.py --backend onnxruntime --overlap 0.25

Writes a synthetic int16 CT volume (HU-like noise with a few bright blobs, 0.8x0.8x1.0 mm, so
preprocessing resamples it to the model's 1 mm grid: 410x410x600) to a temporary folder, runs
the real command line in a child process and reads the child's peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``): load, preprocess, sliding window, mapping back to the
source grid and writing, everything counted. Also prints medseg's own memory plan for it.
Speed does not matter here; ``--overlap`` only changes the number of windows, not the memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def write_ct(path: Path, shape) -> None:
    import nibabel as nib

    rng = np.random.default_rng(0)
    arr = rng.normal(40, 30, shape).astype(np.int16)
    arr[:, :, :] -= 1000 * (np.arange(shape[0]) < shape[0] // 8)[:, None, None].astype(np.int16)  # "air"
    for _ in range(6):
        c = rng.integers(64, np.array(shape) - 64)
        sl = tuple(slice(int(x) - 20, int(x) + 20) for x in c)
        arr[sl] += 400
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="512,512,600")
    ap.add_argument("--model", default="hippocampus-fast")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--overlap", type=float, default=0.0)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ct.nii.gz"
        write_ct(src, shape)
        from medseg.inference.predictor import Predictor
        from medseg.io import load_volume

        pred = Predictor(args.model, device="cpu", backend=args.backend, overlap=args.overlap)
        plan = pred.plan(load_volume(src))
        print("memory plan:", plan.describe(), flush=True)
        cmd = [sys.executable, "-m", "medseg", "predict", str(src), "-o", str(Path(tmp) / "out"), "--model", args.model,
               "--device", "cpu", "--backend", args.backend, "--overlap", str(args.overlap)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        out = load_volume(Path(tmp) / "out" / "ct.nii.gz")
        assert out.shape == shape
    res = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "volume": list(shape),
           "model": args.model, "backend": args.backend, "overlap": args.overlap,
           "peak_rss_gb": round(peak / 1024 ** 3, 3), "planned_host_peak_gb": round(plan.host_peak_bytes / 1024 ** 3, 3),
           "probabilities": str(plan.probs_dtype), "seconds": round(seconds, 1)}
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if peak < 4 * 1024 ** 3 else 1


if __name__ == "__main__":
    sys.exit(main())
