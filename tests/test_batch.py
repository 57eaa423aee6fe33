"""``medseg batch`` over a mixed archive: outputs, manifest, failure isolation, resume, shards, kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import FAST_MODEL, REPO, TEST_DATA, assert_clean_error, run_cli, write_checkpoint
from dicom_helpers import BASIC_TEXT_SR, dataset
from pydicom.uid import generate_uid

from medseg.apps.batch import parse_shard
from medseg.core.errors import ConfigError
from medseg.io import load_volume

HIPPO = TEST_DATA / "hippocampus" / "imagesTr"
FAST = [*FAST_MODEL, "--overlap", "0"]  # statuses, records and files are under test here, not labels


def make_archive(root: Path) -> Path:
    """Two patients: a real DICOM hippocampus crop, a broken series (every slice's pixel data cut short: one cut slice
    alone would be a missing slice, interpolated), an SR report, stray files, NIfTI volumes."""
    series = root / "patient_a" / "study_1" / "hcrop"
    shutil.copytree(TEST_DATA / "dicom" / "hcrop", series)
    broken = root / "patient_a" / "study_1" / "broken"
    broken.mkdir(parents=True)
    uid = generate_uid()
    for i, f in enumerate(sorted((TEST_DATA / "dicom" / "hcrop").iterdir())[:4]):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.save_as(broken / f.name)
        data = (broken / f.name).read_bytes()
        (broken / f.name).write_bytes(data[:-500])  # pixel data shorter than the header says
    sr = dataset(BASIC_TEXT_SR, series_uid=generate_uid())
    sr.Modality = "SR"
    sr.save_as(root / "patient_a" / "study_1" / "report.dcm", enforce_file_format=True)
    (root / "patient_a" / "notes.txt").write_text("not an image\n")
    nifti = root / "patient_b" / "nifti"
    nifti.mkdir(parents=True)
    for name in ("hippocampus_011", "hippocampus_015"):
        shutil.copy(HIPPO / f"{name}.nii.gz", nifti / f"{name}.nii.gz")
    return root


def manifest_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_status(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["status"], []).append(r)
    return groups


@pytest.mark.slow
def test_batch_mixed_archive_resume_and_shards(tmp_path):
    root = make_archive(tmp_path / "archive")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    proc = run_cli("batch", root, "-o", out, "--device", "cpu", *FAST, "--record-paths")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = manifest_rows(out / "manifest.jsonl")
    groups = by_status(rows)
    assert len(rows) == 5 and len({r["key"] for r in rows}) == 5
    assert len(groups["done"]) == 3 and len(groups["failed"]) == 1 and len(groups["skipped"]) == 1
    assert "broken" in groups["failed"][0]["input"] and "pixel data" in groups["failed"][0]["reason"]
    assert "SR document" in groups["skipped"][0]["reason"]
    for r in groups["done"]:
        assert (out / r["output"]).is_file() and len(r["input_hash"]) == 64
        if r["kind"] == "dicom":
            assert "patient" not in r["output"]  # DICOM outputs are named by study/series hashes
    dicom_done = [r for r in groups["done"] if r["kind"] == "dicom"]
    assert dicom_done[0]["output"].startswith("study-") and "/series-" in dicom_done[0]["output"]
    nifti_done = sorted(r["output"] for r in groups["done"] if r["kind"] == "volume")
    assert nifti_done == ["patient_b/nifti/hippocampus_011.nii.gz", "patient_b/nifti/hippocampus_015.nii.gz"]
    for name in ("hippocampus_011", "hippocampus_015"):
        src, lab = load_volume(HIPPO / f"{name}.nii.gz"), load_volume(out / "patient_b" / "nifti" / f"{name}.nii.gz")
        assert lab.shape == src.shape and np.allclose(lab.affine, src.affine)
    assert "failed: " in proc.stdout and "broken" in proc.stdout
    # inputs untouched, nothing written into the archive
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before

    # re-run: finished work is skipped, the failed series is retried (and fails again), nothing duplicated
    mtimes = {r["output"]: (out / r["output"]).stat().st_mtime_ns for r in groups["done"]}
    again = run_cli("batch", root, "-o", out, "--device", "cpu", *FAST)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already done 3" in again.stdout and "failed 1" in again.stdout
    assert {r["output"]: (out / r["output"]).stat().st_mtime_ns for r in groups["done"]} == mtimes
    assert len(manifest_rows(out / "manifest.jsonl")) == 5
    again = run_cli("batch", root, "-o", out, "--device", "cpu", *FAST, "--no-retry-failed")
    assert "done 0, failed 0, skipped 1, already done 4" in again.stdout

    # shards split the work without overlap and cover all of it
    keys = set()
    for i in range(2):
        shard = run_cli("batch", root, "-o", tmp_path / "sharded", "--device", "cpu", *FAST, "--shard", f"{i}/2")
        assert shard.returncode == 0, shard.stderr[-3000:]
        part = {r["key"] for r in manifest_rows(tmp_path / "sharded" / f"manifest.shard-{i}-of-2.jsonl")}
        assert not keys & part
        keys |= part
    assert keys == {r["key"] for r in rows}


def test_batch_refuses_output_inside_input_and_bad_shard(tmp_path):
    (tmp_path / "in").mkdir()
    assert_clean_error(run_cli("batch", tmp_path / "in", "-o", tmp_path / "in" / "out"), "inside the input folder")
    with pytest.raises(ConfigError):
        parse_shard("2/2")
    assert parse_shard("1/3") == (1, 3)


@pytest.mark.slow
def test_batch_killed_midway_resumes_to_the_same_result(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    for k in range(4):  # 24 small volumes, enough for the run to be killed part-way
        for f in sorted(HIPPO.iterdir()):
            shutil.copy(f, root / f"k{k}_{f.name}")
    n = len(list(root.iterdir()))
    reference = tmp_path / "reference"
    ref = run_cli("batch", root, "-o", reference, "--device", "cpu", *FAST_MODEL)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for kill_after_rows in (3, 12):
        proc = subprocess.Popen([sys.executable, "-m", "medseg", "batch", str(root), "-o", str(out), "--device", "cpu",
                                 *FAST_MODEL], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            m = out / "manifest.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= kill_after_rows:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows = manifest_rows(out / "manifest.jsonl")  # always valid JSON, never a torn line
        assert kill_after_rows <= len(rows) < n, "the run must have been killed part-way"
    final = run_cli("batch", root, "-o", out, "--device", "cpu", *FAST_MODEL)
    assert final.returncode == 0, final.stderr[-3000:]
    rows = manifest_rows(out / "manifest.jsonl")
    assert len(rows) == n and {r["status"] for r in rows} == {"done"}
    ref_rows = {r["key"]: r for r in manifest_rows(reference / "manifest.jsonl")}
    for r in rows:
        assert r["input_hash"] == ref_rows[r["key"]]["input_hash"] and r["output"] == ref_rows[r["key"]]["output"]
        a, b = load_volume(out / r["output"]), load_volume(reference / r["output"])
        assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine)
    leftovers = [p.name for p in out.rglob(".*") if ".part" in p.name]
    assert not leftovers
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in reference.iterdir() if not p.name.startswith("."))


@pytest.mark.slow
@pytest.mark.shared_data
def test_batch_on_the_shared_dicom_archive_with_kill(shared_data, tmp_path):
    """A copy of ../shared/data/dicom plus a truncated slice (a missing slice: interpolated, named in the record), an SR
    report and a PDF; killed once, then resumed.
    Reading, routing and bookkeeping are under test, not labels: a tiny real network on each series' own grid
    predicts a full head in about 0.5 s instead of 8 s for the bundled hippocampus-fast."""
    tiny = ["--model", str(write_checkpoint(tmp_path / "tiny.pt", patch=(32, 32, 16)))]
    root = tmp_path / "archive"
    shutil.copytree(shared_data / "dicom", root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    victim = sorted((root / "mr_brain_study" / "37830-T2reg-78532").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:40000])
    sr = dataset(BASIC_TEXT_SR, series_uid=generate_uid())
    sr.Modality = "SR"
    sr.save_as(root / "mr_brain_study" / "report.dcm", enforce_file_format=True)
    (root / "mr_brain_study" / "scan.pdf").write_bytes(b"%PDF-1.4 not dicom")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "medseg", "batch", str(root), "-o", str(out), "--device", "cpu",
                             "--overlap", "0", *tiny], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        m = out / "manifest.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(manifest_rows(out / "manifest.jsonl")) < 11
    final = run_cli("batch", root, "-o", out, "--device", "cpu", "--record-paths", "--overlap", "0", *tiny)
    assert final.returncode == 0, final.stderr[-3000:]
    rows = manifest_rows(out / "manifest.jsonl")
    status = by_status(rows)
    # 9 DICOM image series + 1 NIfTI (ct_chest/reference_seg.nii.gz); the SR is skipped; the T2's truncated slice,
    # which nobody else carries, is a missing slice: interpolated, and named in the T2's row
    assert len(rows) == 11 and len({r["key"] for r in rows}) == 11
    assert len(status["done"]) == 10 and len(status["skipped"]) == 1 and not status.get("failed")
    (t2,) = [r for r in rows if r["input"] == "mr_brain_study/37830-T2reg-78532"]
    assert [u[0] for u in t2["unreadable"]] == ["000005.dcm"] and "pixel data" in t2["unreadable"][0][1]
    for r in status["done"]:
        assert (out / r["output"]).is_file()
    assert not [p for p in out.rglob(".*") if ".part" in p.name]
