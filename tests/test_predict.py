"""Prediction writes labels on exactly the input grid, for every geometry trap and format."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import assert_clean_error, blob_label, image_from_label, run_cli, write_checkpoint

from medseg.core.errors import (
    ConfigError,
    InputNotFoundError,
    OutputError,
    UnknownModelError,
    UnsupportedInputError,
)
from medseg.inference.predictor import Predictor
from medseg.apps.run import predict
from medseg.models.loading import resolve_model
from medseg.io import Volume, load_volume, save_volume
from medseg.io.sources import discover


def _write(path, array, affine):
    vol = Volume(array, affine)
    if str(path).endswith(".nrrd"):
        return save_volume(vol, path)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_resampling_model(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("m") / "tiny.pt", spacing=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_output_grid_equals_input_grid(tmp_path, geometry, suffix, tiny_resampling_model):
    name, shape, affine = geometry
    src = _write(tmp_path / f"{name}{suffix}", image_from_label(blob_label(shape)), affine)
    [res] = predict([src], tmp_path / "out", model=tiny_resampling_model, device="cpu", progress=False)
    [out] = res.outputs
    assert out.name == f"{name}{suffix}"
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    lab = load_volume(out)
    assert lab.array.dtype == np.uint8
    assert set(np.unique(lab.array)) <= {0, 1, 2}
    if suffix == ".nii.gz":
        np.testing.assert_allclose(nib.load(str(out)).affine, nib.load(str(src)).affine, atol=1e-6)


@pytest.mark.parametrize("spacing", [None, [1.0, 1.0, 1.0]])
def test_known_model_puts_labels_back_in_place(tmp_path, geometry, threshold_model, spacing):
    """A model whose answer is known (class = nearest intensity) must reproduce the input labels."""
    name, shape, affine = geometry
    lab = blob_label(shape)
    ck = write_checkpoint(tmp_path / "t.pt", model_name=threshold_model, spacing=spacing, intensity="none")
    pred = Predictor(ck, device="cpu").predict_volume(Volume(lab.astype(np.float32), affine))
    assert pred.shape == shape and np.allclose(pred.affine, affine)
    if spacing is None:
        np.testing.assert_array_equal(pred.array, lab)
    else:
        for c in (1, 2):
            a, b = lab == c, pred.array == c
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > (0.55 if name == "anisotropic" else 0.8), (name, c)


def test_2d_model_predicts_volumes(tmp_path):
    ck = write_checkpoint(tmp_path / "u2.pt", model_name="unet2d", patch=(16, 16, 1))
    shape, affine = (20, 18, 7), np.diag([0.8, 0.8, 3.0, 1.0])
    out = Predictor(ck, device="cpu").predict_volume(Volume(image_from_label(blob_label(shape)), affine))
    assert out.shape == shape


def test_nan_input_refused(tmp_path, tiny_resampling_model):
    arr = image_from_label(blob_label((12, 12, 12)))
    arr[3, 3, 3] = np.nan
    with pytest.raises(UnsupportedInputError, match="NaN"):
        Predictor(tiny_resampling_model, device="cpu").predict_volume(Volume(arr, np.eye(4), source="x.nii.gz"))


def test_input_and_model_errors(tmp_path):
    with pytest.raises(InputNotFoundError):
        discover([tmp_path / "none.nii.gz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="no images found"):
        discover([tmp_path / "empty"])
    with pytest.raises(UnknownModelError, match="unknown model 'liverr'"):
        resolve_model("liverr")
    with pytest.raises(InputNotFoundError, match="model file not found"):
        resolve_model(tmp_path / "missing.pt")


def test_output_folder_equal_to_input_folder_refused(tmp_path, tiny_resampling_model):
    src = _write(tmp_path / "a.nii.gz", image_from_label(blob_label((12, 12, 12))), np.eye(4))
    before = src.read_bytes()
    with pytest.raises(OutputError, match="equals the input"):
        predict([src], tmp_path, model=tiny_resampling_model, device="cpu", progress=False)
    assert src.read_bytes() == before


def test_mirror_tta_uses_the_trained_flip_axes(tmp_path, threshold_model, hippo_data):
    # a mirror-equivariant model gives the same answer with and without TTA
    lab = blob_label((20, 18, 16))
    ck = write_checkpoint(tmp_path / "t.pt", model_name=threshold_model, intensity="none")
    vol = Volume(lab.astype(np.float32), np.diag([-1.0, 1.2, 0.8, 1.0]))
    with_tta = Predictor(ck, device="cpu", tta=True)
    assert with_tta.tta_axes == [0]
    np.testing.assert_array_equal(with_tta.predict_volume(vol).array, lab)
    # the bundled ensemble mirrors by default (its config says inference.tta: true), the default model does not;
    # TTA is a mirrored second pass, averaged, on the same grid
    img = load_volume(hippo_data / "imagesTr" / "hippocampus_015.nii.gz")
    assert Predictor(device="cpu").tta_axes == []
    plain, tta = Predictor("hippocampus-ensemble", device="cpu", tta=False), Predictor("hippocampus-ensemble", device="cpu")
    assert (plain.tta_axes, tta.tta_axes) == ([], [0])
    p0, p1 = plain.probabilities(img), tta.probabilities(img)
    assert p1.shape == p0.shape and torch.allclose(p1.sum(0), torch.ones_like(p1[0]), atol=1e-4)
    assert not torch.allclose(p0, p1)  # the mirrored pass did contribute


def test_tta_default_comes_from_the_model_config(tmp_path, threshold_model):
    # a model packed with inference.tta=true mirrors by default; --no-tta (tta=False) turns it off
    from medseg.models.checkpoint import pack

    ck = write_checkpoint(tmp_path / "t.pt", model_name=threshold_model, intensity="none")
    assert Predictor(ck, device="cpu").tta_axes == []
    packed = pack(ck, tmp_path / "tta.pt", inference=["inference.tta=true"])
    assert Predictor(packed, device="cpu").tta_axes == [0]
    assert Predictor(packed, device="cpu", tta=False).tta_axes == []
    with pytest.raises(ConfigError):
        pack(ck, tmp_path / "bad.pt", inference=["inference.tta=maybe"])


def test_overlap_outside_its_range_is_a_clean_error(tmp_path):
    (tmp_path / "in").mkdir()
    src = _write(tmp_path / "in" / "a.nii.gz", image_from_label(blob_label((12, 12, 12))), np.eye(4))
    with pytest.raises(ConfigError, match="overlap must be in"):
        Predictor(device="cpu", overlap=1.0)
    proc = run_cli("batch", src.parent, "-o", tmp_path / "out", "--device", "cpu", "--overlap", "1.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: " in proc.stderr and "overlap must be in [0, 1)" in proc.stderr and "found 1.5" in proc.stderr
    proc = run_cli("predict", src, "-o", tmp_path / "out2", "--device", "cpu", "--overlap", "-0.1")
    assert_clean_error(proc, "overlap must be in [0, 1)", "found -0.1")
