"""Reading and writing volumes keeps geometry exactly; bad files give clear errors."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blob_label, image_from_label

from medseg.core.errors import (
    GeometryError,
    InputNotFoundError,
    OutputError,
    UnreadableFileError,
    UnsupportedInputError,
)
from medseg.io import Volume, check_same_grid, load_volume, save_volume


def write_nifti(path, array, affine, qform_code=1, sform_code=1):
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, qform_code)
    img.set_sform(affine, sform_code)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_roundtrip_keeps_geometry(tmp_path, geometry, suffix):
    name, shape, affine = geometry
    lab = blob_label(shape)
    src = tmp_path / f"in{suffix}"
    if suffix == ".nrrd":
        write_nifti(tmp_path / "tmp.nii.gz", lab, affine)
        sitk.WriteImage(sitk.ReadImage(str(tmp_path / "tmp.nii.gz")), str(src))
    else:
        write_nifti(src, lab, affine)
    vol = load_volume(src)
    assert vol.shape == shape
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(vol.array, lab)
    out = save_volume(vol.with_array(lab), tmp_path / "out" / f"x{suffix}", reference=vol)
    back = load_volume(out)
    np.testing.assert_array_equal(back.array, lab)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    # an independent reader agrees on spacing, origin and direction
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


def test_nifti_output_keeps_qform_and_sform(tmp_path):
    affine = np.array([[0.9, 0.1, 0, -10], [-0.1, 0.9, 0, 5], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    q_affine = affine.copy()
    q_affine[:3, 3] += 0.5  # a file whose qform and sform disagree: the sform wins, both are kept
    img = nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), affine)
    img.set_sform(affine, 2)
    img.set_qform(q_affine, 1)
    nib.save(img, str(tmp_path / "src.nii.gz"))
    vol = load_volume(tmp_path / "src.nii.gz")
    out = save_volume(vol.with_array(np.ones((5, 6, 7), np.uint8)), tmp_path / "o.nii.gz", reference=vol)
    hdr_in, hdr_out = nib.load(str(tmp_path / "src.nii.gz")).header, nib.load(str(out)).header
    for coded in ("get_sform", "get_qform"):
        m_in, c_in = getattr(hdr_in, coded)(coded=True)
        m_out, c_out = getattr(hdr_out, coded)(coded=True)
        assert int(c_in) == int(c_out)
        np.testing.assert_allclose(m_in, m_out, atol=1e-5)


def test_check_same_grid_rejects_shifted_output(tmp_path):
    ref = Volume(np.zeros((4, 4, 4)), np.eye(4), source="ref.nii.gz")
    moved = np.eye(4)
    moved[0, 3] = 0.5
    with pytest.raises(GeometryError, match="affine differs"):
        check_same_grid(Volume(np.zeros((4, 4, 4)), moved), ref)
    with pytest.raises(GeometryError, match="shape"):
        check_same_grid(Volume(np.zeros((4, 4, 5)), np.eye(4)), ref)
    with pytest.raises(GeometryError):
        save_volume(Volume(np.zeros((4, 4, 4)), moved), tmp_path / "x.nii.gz", reference=ref)
    assert not list(tmp_path.iterdir()), "nothing may be written when the grid check fails"


def test_missing_empty_truncated_and_unknown(tmp_path):
    with pytest.raises(InputNotFoundError, match="not found"):
        load_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="empty"):
        load_volume(tmp_path / "empty.nii.gz")
    good = write_nifti(tmp_path / "good.nii.gz", image_from_label(blob_label((20, 20, 20))), np.eye(4))
    data = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFileError, match="cannot read NIfTI"):
        load_volume(tmp_path / "cut.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(UnreadableFileError):
        load_volume(tmp_path / "junk.nii.gz")
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(UnsupportedInputError, match="unknown volume format"):
        load_volume(tmp_path / "x.png")


def test_4d_and_2d_are_refused_but_singleton_axes_squeezed(tmp_path):
    write_nifti(tmp_path / "t.nii.gz", np.zeros((4, 4, 4, 3), np.float32), np.eye(4))
    with pytest.raises(UnsupportedInputError, match="more than one channel"):
        load_volume(tmp_path / "t.nii.gz")
    write_nifti(tmp_path / "s.nii.gz", np.zeros((4, 4, 4, 1), np.float32), np.eye(4))
    assert load_volume(tmp_path / "s.nii.gz").shape == (4, 4, 4)
    write_nifti(tmp_path / "p.nii.gz", np.zeros((4, 4), np.float32), np.eye(4))
    with pytest.raises(UnsupportedInputError, match="2D"):
        load_volume(tmp_path / "p.nii.gz")


def test_zero_spacing_is_refused(tmp_path):
    affine = np.diag([1.0, 0.0, 1.0, 1.0])
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
    img.header.set_sform(affine, 1)
    nib.save(img, str(tmp_path / "z.nii.gz"))
    with pytest.raises(UnreadableFileError, match="spacing"):
        load_volume(tmp_path / "z.nii.gz")


def test_output_never_overwrites_input(tmp_path):
    src = write_nifti(tmp_path / "in.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    vol = load_volume(src)
    before = src.read_bytes()
    with pytest.raises(OutputError, match="equals the input"):
        save_volume(vol.with_array(np.ones((4, 4, 4), np.uint8)), src, reference=vol)
    assert src.read_bytes() == before


def test_atomic_write_leaves_no_partial_file(tmp_path):
    from medseg.io import atomic_write

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.nii.gz", boom)
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_normal_permissions(tmp_path):
    import stat

    from medseg.io import atomic_write

    from medseg.io import volume

    out = atomic_write(tmp_path / "a.txt", lambda p: p.write_text("x"))
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~volume._UMASK
