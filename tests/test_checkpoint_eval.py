"""Checkpoints load safely; metrics are right on shapes of known size; verify-data finds every problem."""

from __future__ import annotations

import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_cli, write_checkpoint

from medseg.preprocessing.verify import verify_dataset
from medseg.core.errors import CheckpointError
from medseg.evaluation.metrics import dice, hd95
from medseg.models.checkpoint import load_checkpoint, pack


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_roundtrip_and_pack(tmp_path):
    ck = write_checkpoint(tmp_path / "a.pt")
    payload = load_checkpoint(ck)
    assert payload["format"] == "medseg-checkpoint" and payload["config"]["model"]["name"] == "unet3d"
    small = pack(ck, tmp_path / "small.pt")
    p2 = load_checkpoint(small)
    assert all(v.dtype == torch.float16 for v in p2["state_dict"].values() if v.is_floating_point())


def test_foreign_and_tampered_checkpoints_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="cannot load model file safely"):
        load_checkpoint(evil)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a medseg checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    ck = write_checkpoint(tmp_path / "a.pt")
    payload = torch.load(ck, weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first] = payload["state_dict"][first] + 1
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "tampered.pt")
    (tmp_path / "trunc.pt").write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "trunc.pt")


def test_dice_and_hd95_on_known_shapes():
    a = np.zeros((40, 40, 40), bool)
    b = np.zeros_like(a)
    a[10:20, 10:20, 10:20] = True
    b[10:20, 10:20, 12:22] = True  # same cube moved 2 voxels along z
    assert dice(a, b) == pytest.approx(2 * 800 / 2000)
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(a, b, (1.0, 1.0, 2.5)) == pytest.approx(5.0)  # distances in mm
    assert hd95(a, a, (1, 1, 1)) == 0.0
    assert np.isnan(dice(np.zeros_like(a), np.zeros_like(a)))
    assert hd95(a, np.zeros_like(a), (1, 1, 1)) == float("inf")


def _pair(root, name, img, lab, affine=np.eye(4), lab_affine=None):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img, affine), str(root / "imagesTr" / f"{name}.nii.gz"))
    if lab is not None:
        nib.save(nib.Nifti1Image(lab, affine if lab_affine is None else lab_affine), str(root / "labelsTr" / f"{name}.nii.gz"))


def test_verify_data_reports_every_problem(tmp_path):
    ok_img = np.ones((8, 8, 8), np.float32)
    ok_lab = np.zeros((8, 8, 8), np.uint8)
    ok_lab[2:4, 2:4, 2:4] = 1
    _pair(tmp_path, "good", ok_img, ok_lab)
    _pair(tmp_path, "shape", ok_img, np.zeros((8, 8, 9), np.uint8))
    shifted = np.eye(4)
    shifted[0, 3] = 3.0
    _pair(tmp_path, "shifted", ok_img, ok_lab, lab_affine=shifted)
    nan_img = ok_img.copy()
    nan_img[0, 0, 0] = np.nan
    _pair(tmp_path, "nan", nan_img, ok_lab)
    bad_values = ok_lab.copy()
    bad_values[0, 0, 0] = 7
    _pair(tmp_path, "values", ok_img, bad_values)
    _pair(tmp_path, "empty", ok_img, np.zeros((8, 8, 8), np.uint8))
    _pair(tmp_path, "nolabel", ok_img, None)
    (tmp_path / "imagesTr" / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    nib.save(nib.Nifti1Image(ok_lab, np.eye(4)), str(tmp_path / "labelsTr" / "broken.nii.gz"))
    n, problems = verify_dataset(tmp_path, {0: "bg", 1: "fg"}, progress=False)
    text = "\n".join(map(str, problems))
    assert n == 7
    for needle in ["shape.nii.gz: shape", "shifted.nii.gz: geometry", "nan.nii.gz: 1 NaN/Inf", "values.nii.gz: label values [7]",
                   "warning: " , "empty.nii.gz: label is empty", "nolabel.nii.gz: no label file", "broken.nii.gz: cannot read"]:
        assert needle in text, (needle, text)
    assert "good.nii.gz" not in text


def test_pack_set_changes_prediction_settings_only(tmp_path):
    from medseg.core.errors import ConfigError

    ck = write_checkpoint(tmp_path / "a.pt")
    packed = pack(ck, tmp_path / "p.pt", inference=["inference.overlap=0.6", "inference.sw_batch_size=2"])
    cfg = load_checkpoint(packed)["config"]
    assert cfg["inference"]["overlap"] == 0.6 and cfg["inference"]["sw_batch_size"] == 2
    assert load_checkpoint(ck)["config"]["inference"]["overlap"] == 0.25  # the source is untouched
    with pytest.raises(ConfigError, match="prediction settings only"):
        pack(ck, tmp_path / "q.pt", inference=["train.epochs=3"])
    with pytest.raises(ConfigError, match="overlap"):
        pack(ck, tmp_path / "q.pt", inference=["inference.overlap=1.5"])
    assert not (tmp_path / "q.pt").exists()
    proc = run_cli("pack-model", ck, tmp_path / "r.pt", "--set", "model.channels=[4, 8]")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "inference.KEY=VALUE" in proc.stderr
