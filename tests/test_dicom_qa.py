"""Series from dcm2niix's QA corpora (../shared/data/dicom_qa) against dcm2niix, the reference converter."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from dicom_helpers import canonical
from dicom_helpers import convert as dcm2niix_convert

from medseg.io.dicom import load_dicom_series, scan_dicom


@pytest.mark.shared_data
def test_enhanced_4d_in_several_files_gives_every_volume(shared_data, dcm2niix, tmp_path):
    """Siemens XA10: a 4D series as four enhanced multi-frame files, one volume each. Every volume is a stack of its
    own (told apart by AcquisitionNumber, as a classic series' volumes are), and each equals dcm2niix's volume."""
    src = shared_data / "dicom_qa" / "siemens_xa10_enhanced_4d"
    stacks = [s for s in scan_dicom(src) if s.usable]
    assert [s.stack_key.split("; ")[-1] for s in stacks] == [f"acquisition {k}" for k in range(1, 5)]
    (ref_path,) = dcm2niix_convert(dcm2niix, src, tmp_path / "ref")
    ref = nib.load(ref_path)
    assert ref.shape == (64, 64, 6, 4)
    volumes = []
    for t, stack in enumerate(stacks):
        vol = load_dicom_series(stack)
        ours, ours_affine = canonical(vol.array, vol.affine)
        theirs = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(ref.dataobj)[..., t], ref.affine))
        assert ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs.get_fdata())
        assert np.abs(ours_affine - theirs.affine).max() < 1e-3
        volumes.append(ours)
    assert not np.array_equal(volumes[0], volumes[3])  # four different volumes, not one four times
    from conftest import run_cli

    text = " ".join(run_cli("inspect", src).stdout.split())  # inspect names each volume's stack
    assert all(f"[acquisition {k}]" in text for k in range(1, 5)) and "4 selected" in text


MOSAIC = "siemens_mosaic_transfer_syntaxes"


@pytest.mark.shared_data
@pytest.mark.parametrize("name", [f"{k}.dcm" for k in range(1, 10)])
def test_siemens_mosaic_in_every_transfer_syntax_matches_dcm2niix(shared_data, dcm2niix, tmp_path, name):
    """A mosaic (35 slices of 64 x 64 tiled in one 384 x 384 image, slice count in the CSA header) is the volume it
    is, in each of nine encodings (little and big endian, RLE, JPEG lossless, JPEG-LS, JPEG 2000): the same voxels
    and affine as dcm2niix's."""
    import shutil

    src = shared_data / "dicom_qa" / MOSAIC / name
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(src, one / name)  # one file alone: the folder holds the same volume in nine encodings
    (info,) = [s for s in scan_dicom(one) if s.usable]
    assert (info.cols, info.rows, info.n_slices) == (64, 64, 35)
    vol = load_dicom_series(info)
    (ref_path,) = dcm2niix_convert(dcm2niix, one, tmp_path / "ref")
    ref = nib.as_closest_canonical(nib.load(ref_path))
    ours, ours_affine = canonical(vol.array, vol.affine)
    assert ours.shape == ref.shape == (64, 64, 35)
    np.testing.assert_array_equal(ours, ref.get_fdata())
    assert np.abs(ours_affine - ref.affine).max() < 1e-3


@pytest.mark.shared_data
def test_unreadable_mosaic_is_refused_with_the_reason(shared_data, tmp_path):
    import pydicom

    from medseg.core.errors import UnreadableFileError

    ds = pydicom.dcmread(shared_data / "dicom_qa" / MOSAIC / "1.dcm")
    del ds[0x00291010]  # the CSA image header that holds the slice count
    (tmp_path / "m").mkdir()
    ds.save_as(tmp_path / "m" / "mosaic.dcm")
    with pytest.raises(UnreadableFileError, match="mosaic.dcm.*Siemens mosaic whose CSA header cannot be read"):
        load_dicom_series(tmp_path / "m")


@pytest.mark.shared_data
@pytest.mark.parametrize("mode, flag", [("precise", "y"), ("display", "n")])
def test_philips_scaling_both_conventions_match_dcm2niix(shared_data, dcm2niix, tmp_path, mode, flag):
    """Philips 3D T1 whose private scale slope (2005,100E) differs from RescaleSlope: 'precise' (the default) gives
    dcm2niix's default values (-p y), 'display' its -p n values; the one applied is recorded."""
    import subprocess

    src = shared_data / "dicom_qa" / "philips_t1_3d"
    out = tmp_path / "ref"
    out.mkdir()
    subprocess.run([dcm2niix, "-z", "n", "-b", "n", "-p", flag, "-f", "out", "-o", str(out), str(src)], check=True,
                   capture_output=True, timeout=300)
    (ref_path,) = sorted(out.glob("*.nii"))
    ref = nib.as_closest_canonical(nib.load(ref_path))
    vol = load_dicom_series(src, philips=mode) if mode == "display" else load_dicom_series(src)
    assert vol.meta["philips_scaling"] == mode
    ours, ours_affine = canonical(vol.array, vol.affine)
    theirs = ref.get_fdata()
    assert ours.shape == theirs.shape == (170, 256, 256)
    assert np.abs(ours - theirs).max() <= 1e-6 * np.abs(theirs).max()  # float32 rounding only
    assert np.abs(ours_affine - ref.affine).max() < 1e-3
    if mode == "precise":  # the two conventions differ by RescaleSlope x ScaleSlope (0.0176 here)
        display = load_dicom_series(src, philips="display").array
        ratio = np.median(display[display > 0] / vol.array[display > 0])
        assert abs(ratio - 0.0176) < 0.0005
