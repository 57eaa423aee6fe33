"""End-to-end predict speed: medseg versus the plain MONAI script, side by side in one run.

    python benchmarks/speed.py                      # all three cases, 2 repeats, JSON to speed.json
    python benchmarks/speed.py --cases hippo,batch --hippo 20

Both tools run the same network with the same weights (the bundled hippocampus-fast model) and the
same preprocessing; every timing is load + preprocess + infer + map back + write. Runs of the
tools alternate (A B B A …) so that a busy machine slows both alike; medians are reported.

* ``hippo``: hippocampus volumes, one at a time in one process, model loaded once (per volume);
* ``ct``: a synthetic 512x512x300 int16 CT volume at 0.8x0.8x1.0 mm (resampled to 1 mm);
* ``batch``: 50 small volumes as a whole process each (``medseg predict DIR`` versus
  ``python benchmarks/monai_plain.py DIR``): start-up and model load amortised over the batch.

medseg also runs with ``--backend onnxruntime`` (exported once beforehand, not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
SHARED = REPO.parent / "shared" / "data" / "hippocampus" / "imagesTr"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores usable, torch {torch.__version__}"


def inputs(n: int) -> list[Path]:
    src = SHARED if SHARED.is_dir() else REPO / "tests" / "data" / "hippocampus" / "imagesTr"
    files = sorted(src.glob("*.nii.gz"))
    return (files * (n // len(files) + 1))[:n]


def write_ct(path: Path, shape) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from memory_ct import write_ct as _write

    _write(path, shape)


def med(xs) -> float:
    return round(statistics.median(xs), 4)


def in_process(files, tools: dict, repeats: int) -> dict:
    """tools: name -> fn(path); alternating order per file and repeat."""
    times = {k: [] for k in tools}
    names = list(tools)
    for r in range(repeats):
        for i, f in enumerate(files):
            order = names if (i + r) % 2 == 0 else names[::-1]
            for name in order:
                t0 = time.perf_counter()
                tools[name](f)
                times[name].append(time.perf_counter() - t0)
    return times


def whole_process(cmds: dict, repeats: int) -> dict:
    times = {k: [] for k in cmds}
    names = list(cmds)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            proc = subprocess.run(cmds[name], capture_output=True, text=True, cwd=REPO)
            times[name].append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} failed: {proc.stderr[-2000:]}")
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="hippo,ct,batch")
    ap.add_argument("--hippo", type=int, default=65, help="hippocampus volumes for the per-volume case")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--ct-shape", default="512,512,300")
    ap.add_argument("--ct-overlap", type=float, default=0.25, help="sliding-window overlap for the CT case (both tools)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ct-repeats", type=int, default=1)
    ap.add_argument("--json", default="speed.json")
    args = ap.parse_args(argv)
    cases = args.cases.split(",")

    from monai_plain import build, make_predict

    from medseg.inference.export import export_model
    from medseg.inference.predictor import Predictor

    model_pt = REPO / "medseg" / "assets" / "models" / "hippocampus-fast.pt"  # one network, as plain MONAI runs it
    res: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "cases": {}}
    print(res["machine"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx_path = export_model(model_pt, tmp / "hippocampus.onnx", "onnx")

        def tools(overlap: float):
            pred = Predictor(model_pt, device="cpu", overlap=overlap)
            ort = Predictor(onnx_path, device="cpu", overlap=overlap)
            net, pre, roi = build(model_pt)
            monai = make_predict(net, pre, roi, tmp / "monai", overlap=overlap)
            return {"monai": monai,
                    "medseg": lambda f: pred.predict_file(f, tmp / "medseg" / Path(f).name),
                    "medseg_onnx": lambda f: ort.predict_file(f, tmp / "onnx" / Path(f).name)}

        if "hippo" in cases:
            files = inputs(args.hippo)
            t = tools(0.5)
            for f in files[:2]:  # warm-up
                for fn in t.values():
                    fn(f)
            times = in_process(files, t, args.repeats)
            res["cases"]["hippocampus_per_volume_s"] = {k: med(v) for k, v in times.items()} | {"n": len(files)}
            print("hippocampus:", res["cases"]["hippocampus_per_volume_s"], flush=True)
        if "ct" in cases:
            shape = tuple(int(s) for s in args.ct_shape.split(","))
            ct = tmp / "ct" / "ct.nii.gz"
            ct.parent.mkdir()
            write_ct(ct, shape)
            t = tools(args.ct_overlap)
            times = in_process([ct], t, args.ct_repeats)
            res["cases"]["ct_per_volume_s"] = {k: med(v) for k, v in times.items()} | {
                "shape": list(shape), "overlap": args.ct_overlap, "runs": {k: [round(x, 1) for x in v] for k, v in times.items()}}
            print("ct:", res["cases"]["ct_per_volume_s"], flush=True)
        if "batch" in cases:
            folder = tmp / "batch_in"
            folder.mkdir()
            for i, f in enumerate(inputs(args.batch)):
                shutil.copy(f, folder / f"case_{i:03d}.nii.gz")
            py = sys.executable
            medseg = [py, "-m", "medseg", "predict", str(folder), "--device", "cpu", "-o"]
            cmds = {"monai": [py, str(REPO / "benchmarks" / "monai_plain.py"), str(folder), str(tmp / "b_monai")],
                    "medseg": medseg + [str(tmp / "b_medseg")],
                    "medseg_onnx": medseg[:-1] + ["--model", str(onnx_path), "-o", str(tmp / "b_onnx")]}
            times = whole_process(cmds, args.repeats)
            res["cases"]["batch_of_small_volumes_total_s"] = {k: med(v) for k, v in times.items()} | {"n": args.batch}
            print("batch:", res["cases"]["batch_of_small_volumes_total_s"], flush=True)
    for case in res["cases"].values():
        if "monai" in case:
            case["speedup_vs_monai"] = {k: round(case["monai"] / case[k], 2) for k in ("medseg", "medseg_onnx")}
    print(json.dumps(res, indent=1))
    Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
