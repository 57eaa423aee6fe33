"""Killed runs lose nothing.

* ``medseg batch`` over real DICOM series (and NIfTI) is SIGKILLed at random moments several times;
  after a final run, outputs and manifest equal an uninterrupted run's: NIfTI byte for byte, the
  manifest row for row (timings aside), seg.nrrd and DICOM SEG label for label (they carry a
  timestamp or fresh UIDs), and no temporary file is left.
* ``medseg train`` is SIGKILLed after its first checkpoint; ``--resume`` continues from the next
  epoch and finishes, and the checkpoint found at the moment of the kill is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from bad_inputs import good_nifti
from conftest import FAST_MODEL, REPO, SHARED, TEST_DATA, run_cli
from pydicom.uid import generate_uid

VOLATILE = {"load_s", "predict_s", "write_s", "finished_at"}
FORMATS = ["--format", "nifti", "--format", "seg.nrrd", "--format", "dicom-seg"]
FAST = ["--overlap", "0", *FAST_MODEL]  # one window per tile, one network: the bookkeeping is under test


def _copy_series(src: Path, dst: Path, k: int) -> None:
    """A copy of a real series as a new series (own UIDs) of a new study."""
    dst.mkdir(parents=True)
    series_uid, study_uid = generate_uid(), generate_uid(entropy_srcs=[f"study-{k}"])
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dst / f.name)


def make_root(root: Path, shared: Path | None) -> Path:
    for k in range(5):  # real MR series: the hippocampus crop, five times as five studies
        _copy_series(TEST_DATA / "dicom" / "hcrop", root / f"patient{k}" / "hcrop", k)
    shutil.copytree(TEST_DATA / "dicom" / "ct_j2k", root / "ct" / "j2k")  # real JPEG 2000 CT (3 slices)
    for name in ("hippocampus_011", "hippocampus_015"):
        shutil.copy(TEST_DATA / "hippocampus" / "imagesTr" / f"{name}.nii.gz", root / f"{name}.nii.gz")
    if shared is not None:
        shutil.copytree(shared / "dicom" / "mr_brain_study" / "37830-T2reg-78532", root / "shared" / "t2")
        shutil.copytree(shared / "dicom" / "mr_brain_study" / "11_HCropVolume", root / "shared" / "hcrop")
        for p in (root / "shared").rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def rows(manifest: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, manifest.read_text().splitlines())}


def compare_outputs(out: Path, ref: Path) -> None:
    from medseg.io.dicom_seg import read_dicom_seg
    from medseg.io.slicer_formats import read_seg_nrrd

    got, want = rows(out / "manifest.jsonl"), rows(ref / "manifest.jsonl")
    assert got.keys() == want.keys()
    for key, r in want.items():
        assert {k: v for k, v in got[key].items() if k not in VOLATILE} == {k: v for k, v in r.items() if k not in VOLATILE}
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    for rel in files:
        a, b = out / rel, ref / rel
        name = rel.name
        if name.endswith(".nii.gz") or name in ("labels.csv",):
            assert a.read_bytes() == b.read_bytes(), rel  # deterministic: byte for byte
        elif name == "labels.ctbl":  # its first line names the folder it was written to
            assert a.read_text().splitlines()[1:] == b.read_text().splitlines()[1:]
        elif name.endswith(".seg.nrrd"):  # pynrrd writes a timestamp comment
            va, vb = read_seg_nrrd(a)[0], read_seg_nrrd(b)[0]
            assert np.array_equal(va.array, vb.array) and np.allclose(va.affine, vb.affine), rel
        elif name.endswith(".dcm"):  # a SEG gets fresh UIDs and a creation time on every write
            la, lb = read_dicom_seg(a)[0], read_dicom_seg(b)[0]
            assert np.array_equal(la, lb), rel
        elif name != "manifest.jsonl":
            raise AssertionError(f"unexpected output {rel}")
    assert not [p for p in out.rglob("*") if ".part" in p.name]


def _kill_batch_repeatedly(root: Path, out: Path, kills: int, seed: int) -> list[int]:
    """Start the batch, SIGKILL it after a random delay (after start-up), ``kills`` times."""
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    seen = []
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-m", "medseg", "batch", str(root), "-o", str(out), "--device", "cpu",
                                 *FORMATS, *FAST], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        m = out / "manifest.jsonl"
        start_rows = len(m.read_text().splitlines()) if m.is_file() else 0
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # wait for progress, then a random extra moment
            if m.is_file() and len(m.read_text().splitlines()) > start_rows:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if m.is_file():
            rows(m)  # always valid JSON lines, never a torn row
            seen.append(len(m.read_text().splitlines()))
    return seen


def _run_kill_resume(tmp_path: Path, shared: Path | None, kills: int, seed: int) -> None:
    root = make_root(tmp_path / "archive", shared)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    ref = tmp_path / "reference"
    proc = run_cli("batch", root, "-o", ref, "--device", "cpu", *FORMATS, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(rows(ref / "manifest.jsonl"))
    out = tmp_path / "out"
    seen = _kill_batch_repeatedly(root, out, kills, seed)
    assert seen and min(seen) < n, f"every run finished before its kill: {seen}"
    final = run_cli("batch", root, "-o", out, "--device", "cpu", *FORMATS, *FAST)
    assert final.returncode == 0, final.stderr[-3000:]
    compare_outputs(out, ref)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # inputs never written


@pytest.mark.slow
def test_batch_killed_at_random_moments_equals_uninterrupted_run(tmp_path):
    """With two more real series from ../shared/data where it is present (a larger T2 and the HCrop original)."""
    _run_kill_resume(tmp_path, SHARED if SHARED.is_dir() else None, kills=3, seed=3)


# ---------------------------------------------------------------------------
# training


def _tiny_dataset(root: Path) -> Path:
    for i in range(4):
        img = good_nifti(root / "imagesTr" / f"c{i}.nii.gz", shape=(16, 16, 16), seed=i)
        lab = (nib.load(img).get_fdata() > 250).astype(np.uint8)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(lab, nib.load(img).affine), str(root / "labelsTr" / f"c{i}.nii.gz"))
    return root


@pytest.mark.slow
def test_train_killed_after_a_checkpoint_resumes_at_the_next_epoch(tmp_path):
    from medseg.models.checkpoint import load_checkpoint

    epochs = 20
    data, run = _tiny_dataset(tmp_path / "ds"), tmp_path / "run"
    sets = [f"data.root={data}", f"train.output_dir={run}", f"train.epochs={epochs}", "train.val_every=5",
            "data.val_fraction=0.25", "model.channels=[4,8]", "model.strides=[2]", "model.num_res_units=1",
            "patch.size=[16,16,16]", "train.batch_size=2", "data.cache=false", "augment.enabled=false",
            "preprocess.spacing=null", "train.threads=1"]
    args = ["train", str(REPO / "configs" / "hippocampus.yaml"), *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "medseg", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not last.is_file():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # right after the first checkpoint, whatever the machine's load
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    ck = load_checkpoint(last)  # complete and valid at the moment of the kill (atomic write)
    done = int(ck["epoch"])
    assert 1 <= done < epochs
    assert [h["epoch"] for h in ck["history"]] == list(range(1, done + 1))

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at epoch {done + 1} of {epochs}" in resumed.stderr
    ck = load_checkpoint(last)
    assert int(ck["epoch"]) == epochs
    assert [h["epoch"] for h in ck["history"]] == list(range(1, epochs + 1))  # every epoch once, none repeated
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert not [p for p in run.iterdir() if ".part" in p.name]  # a temp file of the killed write was removed
    assert load_checkpoint(run / "best.pt")["best_metric"] is not None
    # resuming a finished run is a no-op that still exits cleanly
    again = run_cli(*args, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
