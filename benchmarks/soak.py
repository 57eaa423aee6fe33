"""Soak test: ``medseg batch`` over a few hundred generated series, good and bad mixed.

    python benchmarks/soak.py --count 300 [--bad-fraction 0.25] [--workdir /tmp/soak] [--keep]

Generates small series (NIfTI volumes, DICOM series, and every broken kind of
tests/bad_inputs.py in turn), runs ``medseg batch`` on them in a subprocess with the bundled
model on the CPU, samples the process's resident memory (RSS) every 0.2 s, and reports:

* throughput (series per second, after model loading),
* failures by reason (the problem part of each manifest reason),
* peak RSS, and whether RSS grows with the number of series processed: a least-squares slope
  of RSS against the manifest row count over the second half of the run (MB per 100 series),
  plus the RSS at 25 %, 50 %, 75 % and 100 % of the series.

Prints a summary and writes ``soak.json`` into the work folder. Every generated bad series
must end up ``failed`` (or ``skipped`` for non-image objects) and every good one ``done``:
the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

SILENT = {"unknown-format", "dicom-zero-bytes"}  # not recognisable as images: batch records nothing for them


def generate(root: Path, count: int, bad_fraction: float) -> dict[str, str]:
    """``count`` series under ``root``; returns relative folder/file -> expected status."""
    from bad_inputs import BAD_INPUTS, good_dicom, good_nifti, make_bad

    kinds = [k for k in sorted(BAD_INPUTS) if k not in SILENT]
    expected: dict[str, str] = {}
    step = max(1, round(1 / bad_fraction)) if bad_fraction > 0 else 0
    for i in range(count):
        folder = root / f"p{i // 10:03d}" / f"s{i:04d}"
        if step and i % step == step - 1:  # every step-th series is broken, cycling through the kinds
            kind = kinds[(i // step) % len(kinds)]
            bad = make_bad(kind, folder)
            expected[bad.path.relative_to(root).as_posix()] = "skipped" if kind in (
                "dicom-sr", "dicom-pdf", "dicom-presentation-state", "dicom-single-slice") else "failed"
        elif i % 3 == 0:
            good_dicom(folder / "dicom", seed=i)
            expected[(folder / "dicom").relative_to(root).as_posix()] = "done"
        else:
            p = good_nifti(folder / f"vol{i:04d}.nii.gz", seed=i)
            expected[p.relative_to(root).as_posix()] = "done"
    return expected


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def problem(reason: str | None) -> str:
    """The problem of a one-line reason, without the path in front or the details behind."""
    text = (reason or "").split("; expected")[0].split("; found")[0].split("; fix")[0]
    return re.sub(r"^\S+: ", "", text).strip()


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--bad-fraction", type=float, default=0.25)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated archive and outputs")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medseg-soak-"))
    root, out = work / "archive", work / "out"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    expected = generate(root, args.count, args.bad_fraction)
    gen_s = time.perf_counter() - t0
    n_recorded = len(expected)

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "medseg", "batch", str(root), "-o", str(out), "--device", "cpu", "--record-paths"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []  # (seconds, rows in manifest, rss bytes)
    manifest = out / "manifest.jsonl"
    first_row_at = None
    while proc.poll() is None:
        n = len(manifest.read_text().splitlines()) if manifest.is_file() else 0
        if n and first_row_at is None:
            first_row_at = time.perf_counter() - start
        samples.append((time.perf_counter() - start, n, rss_bytes(proc.pid)))
        time.sleep(0.2)
    _, stderr = proc.communicate()
    total_s = time.perf_counter() - start
    if proc.returncode != 0:
        print(stderr[-3000:], file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    status = Counter(r["status"] for r in rows)
    reasons = Counter(problem(r["reason"]) for r in rows if r["status"] in ("failed", "skipped"))
    wrong = []
    for rel, want in expected.items():
        got = [r for r in rows if r["input"] == rel or r["input"].startswith(rel + "/")]
        if not got or any(r["status"] != want for r in got):
            wrong.append((rel, want, [r["status"] for r in got]))

    work_samples = [(t, n, m) for t, n, m in samples if n > 0]
    peak = max((m for _, _, m in samples), default=0)
    half = [(n, m) for _, n, m in work_samples if n >= len(rows) / 2]
    growth = slope([n for n, _ in half], [m / 2 ** 20 for _, m in half]) * 100  # MB per 100 series
    at = {}
    for q in (0.25, 0.5, 0.75, 1.0):
        target = q * len(rows)
        hit = next((m for _, n, m in work_samples if n >= target), work_samples[-1][2] if work_samples else 0)
        at[f"{int(q * 100)}%"] = round(hit / 2 ** 20, 1)
    steady_s = total_s - (first_row_at or 0)
    result = {
        "series": len(rows), "generated": args.count, "expected_rows": n_recorded, "status": dict(status),
        "failures_by_reason": dict(reasons.most_common()), "wrong_status": wrong[:20],
        "generate_s": round(gen_s, 1), "batch_s": round(total_s, 1),
        "first_row_s": round(first_row_at or 0, 1),
        "throughput_series_per_s": round(len(rows) / steady_s, 2) if steady_s > 0 else None,
        "peak_rss_mb": round(peak / 2 ** 20, 1), "rss_mb_at": at,
        "rss_slope_mb_per_100_series_second_half": round(growth, 2),
        "samples": len(samples), "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    (work / "soak.json").write_text(json.dumps(result, indent=1))
    print(f"{len(rows)} series in {total_s:.1f} s ({result['first_row_s']} s to the first row: start-up and model);"
          f" {result['throughput_series_per_s']} series/s after that")
    print("status: " + ", ".join(f"{k} {v}" for k, v in status.items()))
    print("failures by reason:")
    for reason, n in reasons.most_common():
        print(f"  {n:4d}  {reason}")
    print(f"peak RSS {result['peak_rss_mb']} MB; RSS at {at}; slope over the second half "
          f"{result['rss_slope_mb_per_100_series_second_half']} MB per 100 series")
    print(f"every series got the expected status: {not wrong}" + (f" (wrong: {wrong[:5]})" if wrong else ""))
    print(f"details: {work / 'soak.json'}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
