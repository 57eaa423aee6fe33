"""DICOM discovery at hospital scale: `inspect` and `batch` over a tree of many thousand files.

    python benchmarks/discovery.py --make 20000 --root /tmp/tree      # synthesise the tree (once)
    python benchmarks/discovery.py --root /tmp/tree                    # scan, inspect, batch discovery
    python benchmarks/discovery.py --root /tmp/tree --batch            # + a batch, then its re-run

The tree is made of copies of one real series (default ``../shared/data/dicom/mr_brain_study/11_HCropVolume``,
40 slices) given new Study, Series and SOP Instance UIDs, five series per study, so a 20,000-file tree holds 500
series in 100 studies. Each measurement runs in a fresh process (``/usr/bin/time``-style: wall time and peak RSS
from ``resource``). ``--batch`` segments the tree with ``hippocampus-fast`` and runs the same batch again, counting
the pixel-data reads of the re-run (``pydicom.dcmread`` without ``stop_before_pixels``): a re-run must read headers
only. Prints a table and one JSON line; the figures go into docs/benchmarks.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data")) / "dicom" / "mr_brain_study" / "11_HCropVolume"
SERIES_PER_STUDY = 5


def make_tree(root: Path, n_files: int, source: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted(p for p in source.iterdir() if p.is_file())
    datasets = [pydicom.dcmread(f) for f in files]
    n_series = max(1, n_files // len(files))
    t0 = time.perf_counter()
    for s in range(n_series):
        study_i = s // SERIES_PER_STUDY
        study_uid = generate_uid(entropy_srcs=["study", str(study_i)])
        series_uid = generate_uid(entropy_srcs=["series", str(s)])
        folder = root / f"patient{study_i:04d}" / f"study{study_i:04d}" / f"series{s % SERIES_PER_STUDY:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, ds in enumerate(datasets):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SeriesNumber = s % SERIES_PER_STUDY + 1
            uid = generate_uid(entropy_srcs=["sop", str(s), str(k)])
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
        if s % 50 == 0:
            print(f"  {s * len(datasets)} files, {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"made {n_series * len(datasets)} files in {n_series} series under {root}")


MEASURE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
what, root = sys.argv[1], sys.argv[2]
if what == "scan":
    from medseg.io.dicom import scan_dicom
    n = len(scan_dicom(root))
elif what == "discover":
    from medseg.apps.run import discover_inputs
    from medseg.models.loading import model_config
    items, skipped = discover_inputs([root], model_config("hippocampus-fast"), None, mirror_root=__import__("pathlib").Path(root))
    n = len(items)
elif what == "rerun":
    import pydicom
    reads = {"pixels": 0}
    original = pydicom.dcmread
    def counted(*a, **k):
        if not k.get("stop_before_pixels"):
            reads["pixels"] += 1
        return original(*a, **k)
    pydicom.dcmread = counted
    import medseg.io.dicom
    from medseg.apps.batch import run_batch
    res = run_batch(root, sys.argv[3], model="hippocampus-fast", device="cpu", progress=False)
    n = res.already_done
    print(json.dumps({"pixel_reads": reads["pixels"], "done": res.done}), file=sys.stderr)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"what": what, "n": n, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(rss)}))
"""


def measure(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            out.update(json.loads(line))
    return out


CLI = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run([sys.executable, "-m", "medseg", *sys.argv[1:]], capture_output=True, text=True)
if proc.returncode:
    sys.exit(proc.stderr[-3000:])
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(rss)}))
"""


def timed_cli(*args: str) -> dict:
    """Wall time and peak RSS of one ``medseg`` command (the only child of a fresh process, so its peak is the CLI's)."""
    proc = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--make", type=int, default=0, help="synthesise a tree of about this many files first")
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--batch", action="store_true", help="also run a batch and its re-run")
    args = ap.parse_args()
    if args.make:
        make_tree(args.root, args.make, args.source)
    n_files = sum(1 for _ in args.root.rglob("*.dcm"))
    rows = [measure("scan", str(args.root)), measure("discover", str(args.root))]
    rows.append({"what": "medseg inspect", **timed_cli("inspect", str(args.root))})
    if args.batch:
        out = args.root.parent / (args.root.name + "_out")
        rows.append({"what": "medseg batch (first run)", **timed_cli("batch", str(args.root), "-o", str(out),
                                                                      "--model", "hippocampus-fast")})
        rows.append(measure("rerun", str(args.root), str(out)))
    print(f"{n_files} files under {args.root}")
    for r in rows:
        print("  " + ", ".join(f"{k} {v}" for k, v in r.items()))
    print(json.dumps({"files": n_files, "rows": rows, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}))


if __name__ == "__main__":
    main()
