"""The real ``medseg`` entry point: help for every command, clean one-line errors, exit codes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, assert_clean_error, run_cli, write_checkpoint

COMMANDS = ["train", "predict", "evaluate", "demo", "verify-data", "models", "pack-model"]


def test_help_lists_and_describes_every_command():
    top = run_cli("--help")
    assert top.returncode == 0
    for cmd in COMMANDS:
        assert cmd in top.stdout
        sub = run_cli(cmd, "--help")
        assert sub.returncode == 0, (cmd, sub.stderr)
        assert "Usage" in sub.stdout


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from medseg.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def test_models_lists_registry():
    out = run_cli("models")
    assert out.returncode == 0 and "unet3d" in out.stdout and "unet2d" in out.stdout
    assert "hippocampus (default)" in out.stdout and "hippocampus-fast" in out.stdout


def test_predict_missing_input(tmp_path):
    assert_clean_error(run_cli("predict", tmp_path / "nope.nii.gz", "-o", tmp_path / "o"), "nope.nii.gz", "input not found")


def test_predict_unknown_model(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "a.nii.gz"))
    assert_clean_error(run_cli("predict", tmp_path / "a.nii.gz", "-o", tmp_path / "o", "--model", "livr"),
                       "unknown model 'livr'", "fix:")
    assert not (tmp_path / "o").exists()


def test_predict_corrupt_file(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    ck = write_checkpoint(tmp_path / "m.pt")
    proc = run_cli("predict", tmp_path / "bad.nii.gz", "-o", tmp_path / "o", "--model", ck, "--device", "cpu")
    assert_clean_error(proc, "bad.nii.gz", "cannot read NIfTI", "fix:")
    assert not list((tmp_path / "o").glob("*")) if (tmp_path / "o").exists() else True


def test_predict_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "a.nii.gz"))
    ck = write_checkpoint(tmp_path / "m.pt")
    assert_clean_error(run_cli("predict", tmp_path / "a.nii.gz", "-o", tmp_path / "o", "--model", ck, "--device", "cuda"),
                       "CUDA requested", "--device cpu")


def test_train_bad_config_key(tmp_path):
    assert_clean_error(run_cli("train", REPO / "configs" / "hippocampus.yaml", "--set", "train.epoch=3"),
                       "unknown config key 'train.epoch'", "did you mean 'train.epochs'")


def test_train_missing_dataset(tmp_path):
    assert_clean_error(run_cli("train", REPO / "configs" / "hippocampus.yaml", "--set", f"data.root={tmp_path}/none",
                               "--set", f"train.output_dir={tmp_path}/run"),
                       "dataset folder not found", "data.root")


def test_train_geometry_mismatch_is_caught(tmp_path):
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    for i in range(3):
        nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), str(root / "imagesTr" / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 12), np.uint8), np.eye(4)), str(root / "labelsTr" / f"c{i}.nii.gz"))
    proc = run_cli("verify-data", root)
    assert proc.returncode == 1
    assert "shape (16, 16, 12) differs from image shape (16, 16, 16)" in " ".join(proc.stdout.split())
    assert "3 case(s) checked: 3 error(s)" in proc.stdout


def test_verify_data_clean_dataset(hippo_data):
    proc = run_cli("verify-data", hippo_data, "--config", REPO / "configs" / "hippocampus.yaml")
    assert proc.returncode == 0, proc.stdout
    assert "6 case(s) checked: 0 error(s), 0 warning(s)" in proc.stdout


def test_evaluate_unpaired_folders(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(tmp_path / "p" / "a.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(tmp_path / "r" / "b.nii.gz"))
    assert_clean_error(run_cli("evaluate", tmp_path / "p", tmp_path / "r"), "no predictions pair")


def test_evaluate_table_and_json(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:10, 5:10, 5:10] = 1
    ref[12:16, 12:16, 12:16] = 2
    pred = ref.copy()
    pred[5:10, 5:10, 5] = 0
    for d, arr in (("r", ref), ("p", pred)):
        nib.save(nib.Nifti1Image(arr, np.diag([2.0, 1.0, 1.0, 1.0])), str(tmp_path / d / "case.nii.gz"))
    proc = run_cli("evaluate", tmp_path / "p", tmp_path / "r", "--json", tmp_path / "s.json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["mean"]["1"]["dice"] == pytest.approx(2 * 100 / 225, abs=1e-4)
    assert data["mean"]["2"]["dice"] == 1.0 and data["mean"]["2"]["hd95_mm"] == 0.0
    assert "case" in proc.stdout and "mean" in proc.stdout


def test_predict_stats_writes_a_lesion_report(tmp_path, hippo_data):
    import csv

    proc = run_cli("predict", hippo_data / "imagesTr" / "hippocampus_011.nii.gz", "-o", tmp_path, "--device", "cpu",
                   "--stats", "csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "hippocampus_011.lesions.csv")))
    assert [r["name"] for r in rows][:2] == ["anterior", "posterior"] or {r["name"] for r in rows} == {"anterior", "posterior"}
    labels = nib.load(tmp_path / "hippocampus_011.nii.gz")
    arr = np.asanyarray(labels.dataobj)
    for name, value in (("anterior", 1), ("posterior", 2)):
        vol = sum(float(r["volume_ml"]) for r in rows if r["name"] == name)
        assert vol == pytest.approx((arr == value).sum() * abs(np.linalg.det(labels.affine[:3, :3])) / 1000)
        assert all(float(r["diameter_mm"]) < 60 for r in rows if r["name"] == name)
    assert_clean_error(run_cli("predict", hippo_data / "imagesTr" / "hippocampus_011.nii.gz", "-o", tmp_path / "x",
                               "--stats", "xml"), "unknown --stats format")
