"""DICOM series reading: geometry agrees with dcm2niix, and every trap gives a right volume or a clear error.

Real series come from ../shared/data/dicom (``shared_data``); small anonymised copies in
tests/data/dicom always run. The traps (missing slices, uneven gaps, gantry tilt, mixed
orientations, 4D, localizers, SR, damaged files...) are written here with pydicom.
Geometric truth for resampled volumes comes from a field that is linear in patient
coordinates: linear interpolation reproduces it exactly, so every output voxel must hold
the field's value at the voxel's world position.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tracemalloc
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import TEST_DATA
from dicom_helpers import (
    AXIAL,
    BASIC_TEXT_SR,
    CT,
    ENHANCED_MR,
    LPS,
    canonical,
    check_linear_field,
    compare_with_reference,
    convert,
    dataset,
    linear_slices,
    no_secrets,
    plain_slices,
    set_pixels,
    write_series,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from medseg.core.errors import (
    ConfigError,
    InputNotFoundError,
    UnreadableFileError,
    UnsupportedInputError,
)
from medseg.io.dicom import (
    MultipleSeriesError,
    SeriesInfo,
    load_dicom_series,
    scan_dicom,
)

DICOM_DATA = TEST_DATA / "dicom"


# ---------------------------------------------------------------------------
# real series


SHARED_SERIES = ["mr_brain_study/11-T1post-18670", "mr_brain_study/26401-T1prereg-52906",
                 "mr_brain_study/36468-FLAIRreg-58706", "mr_brain_study/37830-T2reg-78532",
                 "mr_brain_study/11_HCropVolume", "ct_chest/series", "geometry/mr_sag_supine",
                 "geometry/mr_sag_prone"]


@pytest.mark.shared_data
@pytest.mark.parametrize("rel", SHARED_SERIES)
def test_shared_series_match_dcm2niix(shared_data, dcm2niix, tmp_path, rel):
    src = shared_data / "dicom" / rel
    vol = load_dicom_series(src)
    [nii] = convert(dcm2niix, src, tmp_path)
    ours, ref, affine_diff = compare_with_reference(vol, nii)
    assert affine_diff < 0.01
    assert np.array_equal(ours, ref)
    assert not vol.meta["resampled"] and not vol.meta["detilted"]


@pytest.mark.shared_data
def test_prone_and_supine_share_patient_geometry(shared_data):
    """Positions are in patient coordinates: the scanner already turned the prone images round."""
    supine, prone = (load_dicom_series(shared_data / "dicom" / "geometry" / f"mr_sag_{p}") for p in ("supine", "prone"))
    np.testing.assert_allclose(supine.affine, prone.affine)
    np.testing.assert_allclose(supine.affine[:3, :3] @ [0, 0, 1], [4.8, 0, 0], atol=1e-5)  # slices run left to right


@pytest.mark.shared_data
def test_gantry_tilt_ct_matches_dcm2niix_tilt_corrected(shared_data, dcm2niix, tmp_path):
    """GE head CT, 18.5 degree tilt, steps of 4.0, 1.08 and 7.0 mm along the normal.

    dcm2niix writes the sheared original (with a warning that its spacing varies) and a
    de-tilted, equalised ``_Tilt_Eq`` copy; both readers make the same grid. dcm2niix rounds
    to integers after de-tilting and again after equalising, we keep float32, so values
    differ by at most 1 (two roundings of at most 0.5), plus up to 0.01 because dcm2niix
    computes slice distances and weights in single precision (a weight off by 1e-6 across
    a 2500 HU edge).
    """
    src = shared_data / "dicom" / "geometry" / "ct_gantry_tilt"
    vol = load_dicom_series(src)
    assert vol.meta["detilted"] and vol.meta["resampled"]
    assert abs(vol.meta["gantry_tilt_deg"] - 18.5) < 0.01
    assert vol.shape == (512, 611, 56)
    direction = vol.affine[:3, :3] / vol.spacing
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-6)  # an orthogonal grid
    [nii] = [p for p in convert(dcm2niix, src, tmp_path) if "Tilt" in p.name]
    ref_direction = nib.load(nii).affine[:3, :3]
    gram = ref_direction.T @ ref_direction
    if np.abs(gram - np.diag(np.diag(gram))).max() > 1e-3:
        pytest.skip("this dcm2niix writes a non-orthogonal affine for its _Tilt_Eq output "
                    "(v1.0.20220720 scales a row of the sform instead of a column); use a newer one")
    ours, ref, affine_diff = compare_with_reference(vol, nii)
    assert affine_diff < 0.01
    assert np.abs(ours - ref).max() <= 1.01
    assert np.mean(np.round(ours) == ref) > 0.85  # most voxels agree exactly once ours is rounded


@pytest.mark.shared_data
def test_gantry_tilt_ct_refused_on_request(shared_data):
    src = shared_data / "dicom" / "geometry" / "ct_gantry_tilt"
    with pytest.raises(UnsupportedInputError, match=r"gantry tilt of about 18\.5 degrees"):
        load_dicom_series(src, tilt="error")
    with pytest.raises(UnsupportedInputError, match=r"uneven slice spacing: gap of 1\.08 mm.*14\.dcm, 15\.dcm"):
        load_dicom_series(src, uneven="error")


@pytest.mark.shared_data
def test_shared_study_lists_its_series(shared_data):
    study = shared_data / "dicom" / "mr_brain_study"
    series = scan_dicom(study)
    assert sorted(s.series_description for s in series) == ["FLAIR_reg", "HippoCrop", "T1post", "T1pre_reg", "T2_reg"]
    assert all(s.usable and s.n_files == s.n_slices for s in series)
    t1 = next(s for s in series if s.series_description == "T1post")
    assert (t1.modality, t1.series_number, t1.contrast, t1.rows, t1.cols) == ("MR", 11, "10ml multihance", 320, 280)
    assert t1.pixel_spacing == (0.6875, 0.6875) and t1.body_part == "BRAIN"
    with pytest.raises(MultipleSeriesError) as err:
        load_dicom_series(study)
    assert len(err.value.series) == 5 and "T2_reg" in str(err.value) and "pick one" in str(err.value)
    no_secrets(repr(series), str(err.value))


@pytest.mark.shared_data
def test_jpeg2000_copy_equals_the_shared_series(shared_data):
    full = load_dicom_series(shared_data / "dicom" / "ct_chest" / "series")
    part = load_dicom_series(DICOM_DATA / "ct_j2k")
    np.testing.assert_array_equal(part.array, full.array[:, :, -3:])
    np.testing.assert_allclose(part.affine[:3, :3], full.affine[:3, :3])
    np.testing.assert_allclose(part.affine[:3, 3], full.affine[:3, :] @ [0, 0, 17, 1], atol=1e-6)


# values from dcm2niix v1.0.20260724 (canonical RAS orientation), so these run without it
REFERENCES = {
    "hcrop": ((34, 50, 40), [[1, 0, 0, -33], [0, 1, 0, -49], [0, 0, 1, 1]], "dc405c4baeb3e758"),
    "ct_j2k": ((512, 512, 3), [[0.9765625, 0, 0, -249.51171875], [0, 0.9765625, 0, -61.51171875], [0, 0, 2, -770.5]],
               "fde9a45e07713faf"),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_small_copies_match_recorded_dcm2niix_output(name):
    shape, affine, digest = REFERENCES[name]
    vol = load_dicom_series(DICOM_DATA / name)
    data, aff = canonical(vol.array, vol.affine)
    assert data.shape == shape
    np.testing.assert_allclose(aff[:3], affine, atol=1e-4)
    assert hashlib.sha256(np.ascontiguousarray(data.astype(np.int64)).tobytes()).hexdigest()[:16] == digest


def test_ct_rescale_gives_float_hu_and_mr_keeps_integers():
    ct = load_dicom_series(DICOM_DATA / "ct_j2k")
    assert ct.array.dtype == np.float32 and ct.meta["rescaled"] and ct.array.min() == -1024.0
    assert ct.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.90" and ct.meta["modality"] == "CT"
    mr = load_dicom_series(DICOM_DATA / "hcrop", progress=True)
    assert mr.array.dtype == np.int16 and not mr.meta["rescaled"]
    assert mr.meta["n_slices"] == 40 and mr.meta["series_description"] == "HippoCrop"


def test_reversed_instance_numbers_give_the_same_volume(tmp_path):
    ref = load_dicom_series(DICOM_DATA / "hcrop")
    files = sorted(DICOM_DATA.joinpath("hcrop").iterdir(), key=lambda p: int(p.stem))
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = len(files) - k
        ds.save_as(tmp_path / f"{len(files) - k:03d}.dcm")
    vol = load_dicom_series(tmp_path)
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.affine, ref.affine)
    vol = load_dicom_series(list(reversed(sorted(tmp_path.iterdir()))))  # a list, in any order
    np.testing.assert_array_equal(vol.array, ref.array)


# ---------------------------------------------------------------------------
# synthetic geometry


def test_oblique_series_geometry_and_order(tmp_path, dcm2niix_optional):
    """An oblique series written in shuffled order: affine from IOP, IPP and PixelSpacing (rows, cols)."""
    a, b = np.deg2rad(20), np.deg2rad(-35)
    col_dir = np.array([np.cos(a), np.sin(a), 0.0])
    row_dir = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    normal = np.cross(col_dir, row_dir)
    origin, spacing, step = np.array([-40.0, 12.5, 30.0]), (1.25, 0.8), 2.2  # rows 1.25 mm apart, columns 0.8
    positions = [origin + k * step * normal for k in range(7)]
    slices = plain_slices(7, rows=9, cols=6)
    order = [3, 0, 6, 2, 5, 1, 4]
    write_series(tmp_path / "s", [slices[k] for k in order], [positions[k] for k in order],
                 tuple(col_dir) + tuple(row_dir), spacing, instances=[7 - k for k in order])
    vol = load_dicom_series(tmp_path / "s")
    assert vol.shape == (6, 9, 7)
    for k in range(7):
        np.testing.assert_array_equal(vol.array[:, :, k], slices[k].T)
    expected = np.eye(4)
    expected[:3, 0], expected[:3, 1], expected[:3, 2], expected[:3, 3] = (col_dir * 0.8, row_dir * 1.25,
                                                                          normal * step, origin)
    np.testing.assert_allclose(vol.affine, LPS @ expected, atol=1e-6)
    if dcm2niix_optional:
        [nii] = convert(dcm2niix_optional, tmp_path / "s", tmp_path / "nii")
        ours, ref, affine_diff = compare_with_reference(vol, nii)
        assert affine_diff < 0.01 and np.array_equal(ours, ref)




def test_missing_slice_resampled_or_refused(tmp_path):
    rows, cols, spacing = 8, 7, (1.0, 1.5)
    positions = [(-3.0, -4.0, 10.0 + 2.5 * k) for k in range(8)]
    del positions[4]
    write_series(tmp_path, linear_slices(positions, AXIAL, spacing, rows, cols), positions, AXIAL, spacing,
                 RescaleSlope=0.01, RescaleIntercept=0)
    with pytest.raises(UnsupportedInputError, match=r"gap of 5 mm between slices 3 and 4 \(slice003.dcm, slice004"):
        load_dicom_series(tmp_path, uneven="error")
    vol = load_dicom_series(tmp_path)
    assert vol.shape == (cols, rows, 8) and vol.meta["resampled"] and vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.spacing, [1.5, 1.0, 2.5])
    check_linear_field(vol, positions, AXIAL, spacing, rows, cols)


def test_uneven_gaps_resampled_on_the_smallest_step(tmp_path):
    rows, cols, spacing = 6, 6, (0.9, 0.9)
    iop = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # sagittal
    t = [0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 7.5, 9.5]
    positions = [(-20.0 + v, -5.0, 8.0) for v in t]
    write_series(tmp_path, linear_slices(positions, iop, spacing, rows, cols), positions, iop, spacing,
                 RescaleSlope=0.01, RescaleIntercept=0)
    vol = load_dicom_series(tmp_path)
    assert vol.meta["resampled"] and vol.shape[2] == 16  # 9.5 mm in steps of at most 0.5 mm, at most 2x8 slices
    assert vol.meta["slice_step_mm"] == pytest.approx(9.5 / 15)
    check_linear_field(vol, positions, iop, spacing, rows, cols)


def test_gantry_tilt_detilted_or_refused(tmp_path):
    """Slices tilted 15 degrees about the column axis, positions stepping along the table (z)."""
    tilt = np.deg2rad(15)
    iop = (1.0, 0.0, 0.0, 0.0, np.cos(tilt), -np.sin(tilt))
    rows, cols, spacing = 16, 10, (0.8, 1.1)
    positions = [(-5.0, -6.0, -4.0 + 3.0 * k) for k in range(8)]
    write_series(tmp_path, linear_slices(positions, iop, spacing, rows, cols), positions, iop, spacing,
                 sop_class=CT, RescaleSlope=0.01, RescaleIntercept=0, GantryDetectorTilt=15)
    with pytest.raises(UnsupportedInputError, match=r"gantry tilt of about 15\.0 degrees"):
        load_dicom_series(tmp_path, tilt="error")
    vol = load_dicom_series(tmp_path)
    assert vol.meta["detilted"] and not vol.meta["resampled"]
    drift_px = 7 * 3.0 * np.sin(tilt) / 0.8
    assert vol.shape == (cols, rows + int(np.ceil(drift_px)), 8)  # widened, nothing cut
    assert vol.meta["slice_step_mm"] == pytest.approx(3.0 * np.cos(tilt))
    direction = vol.affine[:3, :3] / vol.spacing
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-9)
    check_linear_field(vol, positions, iop, spacing, rows, cols)
    fill = vol.array.min()
    assert fill == -320.0 and np.all(vol.array[:, 0, -1] == fill)  # outside the acquired data
    assert np.any((vol.array > -319.99) & (vol.array < -60))  # linear blends of padding and data
    for f in tmp_path.iterdir():  # declared as PixelPaddingValue, the border is no longer blended with data
        ds = pydicom.dcmread(f)
        ds.add_new(0x00280120, "SS", -32000)  # PixelPaddingValue
        ds.save_as(f)
    padded = load_dicom_series(tmp_path)
    assert not np.any((padded.array > -319.99) & (padded.array < -60))
    check_linear_field(padded, positions, iop, spacing, rows, cols)


def test_enhanced_multiframe_equals_classic_series(tmp_path):
    a = np.deg2rad(10)
    iop = (1.0, 0.0, 0.0, 0.0, np.cos(a), np.sin(a))
    normal = np.cross(iop[:3], iop[3:])
    positions = [np.array([1.0, 2.0, 3.0]) + 1.7 * k * normal for k in range(5)]
    slices = plain_slices(5, rows=7, cols=4)
    write_series(tmp_path / "classic", slices, positions, iop, (0.5, 0.6), RescaleSlope=2, RescaleIntercept=-10)
    order = [2, 4, 0, 3, 1]
    ds = dataset(ENHANCED_MR, series_uid=generate_uid(), NumberOfFrames=5, InstanceNumber=1)
    set_pixels(ds, np.stack([slices[k] for k in order]))
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.5, 0.6]
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = list(iop)
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -10
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = [float(v) for v in positions[k]]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    (tmp_path / "enhanced").mkdir()
    ds.save_as(tmp_path / "enhanced" / "multi.dcm", enforce_file_format=True)
    [info] = scan_dicom(tmp_path / "enhanced")
    assert info.n_files == 1 and info.n_slices == 5 and info.usable
    classic, enhanced = load_dicom_series(tmp_path / "classic"), load_dicom_series(tmp_path / "enhanced" / "multi.dcm")
    assert enhanced.array.dtype == np.float32
    np.testing.assert_array_equal(enhanced.array, classic.array)
    np.testing.assert_allclose(enhanced.affine, classic.affine, atol=1e-9)


# ---------------------------------------------------------------------------
# several stacks in one folder, 4D, objects that are not images


def test_mixed_orientations_in_one_series_become_two_stacks(tmp_path):
    uid = generate_uid()
    write_series(tmp_path, plain_slices(5), [(0, 0, k) for k in range(5)], AXIAL, series_uid=uid,
                 names=[f"ax{k}" for k in range(5)])
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    write_series(tmp_path, plain_slices(4, seed=1), [(0, k, 0) for k in range(4)], coronal, series_uid=uid,
                 names=[f"cor{k}" for k in range(4)])
    stacks = scan_dicom(tmp_path)
    assert [(s.series_uid, s.stack_index, s.n_files) for s in stacks] == [(uid, 0, 4), (uid, 1, 5)]
    with pytest.raises(MultipleSeriesError, match="holds 2 image stacks") as err:
        load_dicom_series(tmp_path)
    assert "orientation 1,0,0,0,1,0" in str(err.value) and "orientation 1,0,0,0,0,-1" in str(err.value)
    shapes = sorted(load_dicom_series(s).shape for s in stacks)
    assert shapes == [(5, 6, 4), (5, 6, 5)]


def test_4d_series_refused_or_split_by_acquisition(tmp_path):
    positions = [(0, 0, 2.0 * k) for k in range(6)]
    uid = generate_uid()
    for t in (1, 2, 3):
        write_series(tmp_path / "same", plain_slices(6, seed=t), positions, series_uid=uid,
                     names=[f"t{t}_{k}.dcm" for k in range(6)], TemporalPositionIdentifier=t, AcquisitionNumber=1)
    with pytest.raises(UnsupportedInputError, match="4D series: 3 volumes at the same 6 slice positions"):
        load_dicom_series(tmp_path / "same")
    uid = generate_uid()
    for acq in (1, 2):
        write_series(tmp_path / "acq", plain_slices(6, seed=acq), positions, series_uid=uid,
                     names=[f"a{acq}_{k}.dcm" for k in range(6)], AcquisitionNumber=acq)
    stacks = scan_dicom(tmp_path / "acq")
    assert [s.stack_key for s in stacks] == ["orientation 1,0,0,0,1,0; acquisition 1",
                                             "orientation 1,0,0,0,1,0; acquisition 2"]
    with pytest.raises(MultipleSeriesError):
        load_dicom_series(tmp_path / "acq")
    second = load_dicom_series(stacks[1])
    np.testing.assert_array_equal(second.array[:, :, 0], plain_slices(6, seed=2)[0].T)


def test_echoes_split_into_stacks(tmp_path):
    uid = generate_uid()
    for echo in (1, 2):
        write_series(tmp_path, plain_slices(4, seed=echo), [(0, 0, k) for k in range(4)], series_uid=uid,
                     names=[f"e{echo}_{k}" for k in range(4)], EchoNumbers=echo)
    assert [s.stack_key.split("; ")[1] for s in scan_dicom(tmp_path)] == ["echo 1", "echo 2"]


def test_localizer_sr_and_other_files_are_skipped(tmp_path):
    uid = generate_uid()
    write_series(tmp_path, plain_slices(5), [(0, 0, k) for k in range(5)], series_uid=uid)
    for k, iop in enumerate([AXIAL, (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)]):
        write_series(tmp_path, plain_slices(1, seed=9), [(0, 0, 0)], iop, series_uid=uid, names=[f"loc{k}.dcm"],
                     ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    sr = dataset(BASIC_TEXT_SR, series_uid=generate_uid())
    sr.Modality = "SR"
    sr.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    dicomdir = dataset("1.2.840.10008.1.3.10", series_uid="")
    dicomdir.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    (tmp_path / "README").write_text("not dicom\n")
    (tmp_path / "info.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_bytes(b"\x08\x00 almost a raw dataset")
    stacks = scan_dicom(tmp_path)
    assert sorted((s.skip_reason or "") for s in stacks) == ["", "localizer", "not an image (SR document)"]
    vol = load_dicom_series(tmp_path)
    assert vol.shape == (5, 6, 5)
    assert vol.meta["ignored"] == {"localizer": 3, "not an image (SR document)": 1}


def test_single_slice_and_empty_folders(tmp_path):
    write_series(tmp_path / "one", plain_slices(1), [(0, 0, 0)])
    [info] = scan_dicom(tmp_path / "one")
    assert info.skip_reason == "single slice"
    with pytest.raises(UnsupportedInputError, match="single slice"):
        load_dicom_series(info)
    with pytest.raises(UnsupportedInputError, match="no loadable image series"):
        load_dicom_series(tmp_path / "one")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("x")
    with pytest.raises(InputNotFoundError, match="no DICOM files found"):
        load_dicom_series(tmp_path / "empty")
    with pytest.raises(InputNotFoundError):
        scan_dicom(tmp_path / "missing")
    with pytest.raises(ConfigError, match="uneven"):
        load_dicom_series(tmp_path / "one", uneven="drop")


def test_duplicate_copies_and_nested_folders(tmp_path):
    paths = write_series(tmp_path / "study" / "a" / "b", plain_slices(4), [(0, 0, k) for k in range(4)])
    shutil.copy(paths[1], tmp_path / "study" / "a" / "copy_of_slice1.dcm")
    write_series(tmp_path / "study" / "c", plain_slices(3, seed=4), [(0, 0, k) for k in range(3)])
    stacks = scan_dicom(tmp_path / "study")
    assert sorted(s.n_files for s in stacks) == [3, 4]
    vol = load_dicom_series(tmp_path / "study" / "a")
    assert vol.shape == (5, 6, 4)


# ---------------------------------------------------------------------------
# damaged files and patient data


def test_truncated_pixel_data_is_a_missing_slice(tmp_path):
    """A slice nobody else carries, whose pixels are cut short: left out and interpolated (named in the record) by
    default; refused by name with uneven='error'."""
    paths = write_series(tmp_path, plain_slices(4), [(0, 0, k) for k in range(4)])
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:-20])
    vol = load_dicom_series(tmp_path)
    assert vol.shape == (5, 6, 4) and vol.meta["resampled"]
    assert vol.meta["unreadable"][0][0] == "slice002.dcm" and "cannot decode pixel data" in vol.meta["unreadable"][0][1]
    with pytest.raises(UnreadableFileError, match="slice002.dcm: cannot decode pixel data"):
        load_dicom_series(tmp_path, uneven="error")


def test_damaged_jpeg2000_names_the_file(tmp_path):
    for f in sorted((DICOM_DATA / "ct_j2k").iterdir()):
        shutil.copy(f, tmp_path / f.name)
    data = (tmp_path / "02.dcm").read_bytes()
    (tmp_path / "02.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFileError, match=r"02\.dcm: file has no pixel data"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own note about the missing end of the pixel data
        load_dicom_series(tmp_path, uneven="error")
    data = bytearray((DICOM_DATA / "ct_j2k" / "02.dcm").read_bytes())
    start = data.find(b"\xff\x4f\xff\x51")  # JPEG 2000 codestream: SOC then SIZ marker
    data[start + 4:start + 60] = bytes(56)
    (tmp_path / "02.dcm").write_bytes(bytes(data))
    with pytest.raises(UnreadableFileError, match=r"02\.dcm: cannot decode pixel data"):
        load_dicom_series(tmp_path, uneven="error")


def test_missing_decoder_says_what_to_install(tmp_path, monkeypatch):
    import pydicom.pixels

    class Missing:
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Missing())
    with pytest.raises(UnsupportedInputError, match="JPEG 2000.*pip install python-gdcm pylibjpeg"):
        load_dicom_series(DICOM_DATA / "ct_j2k")


def test_damaged_header_is_reported(tmp_path, caplog):
    write_series(tmp_path, plain_slices(3), [(0, 0, k) for k in range(3)])
    (tmp_path / "broken.dcm").write_bytes(bytes(128) + b"DICM" + bytes(range(256)) * 2)
    with caplog.at_level(logging.WARNING, logger="medseg.io.dicom"):
        [info] = scan_dicom(tmp_path)
    assert info.n_files == 3 and "broken.dcm" in caplog.text
    vol = load_dicom_series(tmp_path)  # not needed: the three slices are all there; named in the record
    assert vol.shape[2] == 3 and not vol.meta["resampled"] and vol.meta["unreadable"][0][0] == "broken.dcm"
    (tmp_path / "slice000.dcm").rename(tmp_path / "only.dcm")
    for f in tmp_path.glob("slice*.dcm"):
        f.unlink()
    with pytest.raises(UnreadableFileError, match="broken.dcm"):  # one slice left: the damaged file is named
        load_dicom_series(tmp_path)


def test_no_patient_identifiers_anywhere(tmp_path, caplog):
    uid = generate_uid()
    write_series(tmp_path, plain_slices(4), [(0, 0, k) for k in range(4)], series_uid=uid, names=list("abcd"))
    write_series(tmp_path, plain_slices(4), [(0, k, 0) for k in range(4)], (1.0, 0, 0, 0, 0, -1.0), series_uid=uid,
                 names=list("efgh"))
    (tmp_path / "z.dcm").write_bytes(bytes(128) + b"DICM" + bytes(300))
    (tmp_path / "only_damaged").mkdir()
    (tmp_path / "only_damaged" / "z.dcm").write_bytes(bytes(128) + b"DICM" + bytes(300))
    with caplog.at_level(logging.DEBUG):
        stacks = scan_dicom(tmp_path)
        with pytest.raises(UnreadableFileError) as err:
            load_dicom_series(tmp_path / "only_damaged")
        (tmp_path / "z.dcm").unlink()
        with pytest.raises(MultipleSeriesError) as err2:
            load_dicom_series(tmp_path)
        vol = load_dicom_series(stacks[0])
    no_secrets(repr(stacks), str(err.value), str(err2.value), repr(vol.meta), caplog.text)
    assert isinstance(stacks[0], SeriesInfo) and "Patient" not in repr(vol.meta)


def test_tilt_edges_match_dcm2niix_tilt_1(dcm2niix, tmp_path):
    """A tilted CT with even steps, for which dcm2niix writes `_Tilt_1` (de-tilted, not equalised): every voxel as
    dcm2niix's, the edge rows of the shifted field of view included (dcm2niix rounds to integers: at most 0.5
    apart). The GE CT of ../shared covers `_Tilt_Eq` (test_gantry_tilt_ct_matches_dcm2niix_tilt_corrected)."""
    tilt = np.deg2rad(12)
    iop = (1.0, 0.0, 0.0, 0.0, np.cos(tilt), -np.sin(tilt))
    rng = np.random.default_rng(0)
    positions = [(-5.0, -6.0, -4.0 + 2.5 * k) for k in range(10)]
    slices = [(rng.integers(0, 2000, (40, 32)) + 100).astype(np.int16) for _ in positions]
    write_series(tmp_path / "s", slices, positions, iop, (0.9, 0.9), sop_class=CT, RescaleSlope=1,
                 RescaleIntercept=-1024, GantryDetectorTilt=12)
    [nii] = [p for p in convert(dcm2niix, tmp_path / "s", tmp_path / "ref") if "_Tilt_1" in p.name]
    vol = load_dicom_series(tmp_path / "s")
    assert vol.meta["detilted"] and not vol.meta["resampled"]
    ours, theirs, affine_diff = compare_with_reference(vol, nii)
    assert affine_diff < 1e-3
    assert np.abs(ours - theirs).max() <= 0.51
    # the rule itself: one row before the first source row takes its value, beyond the last row is outside
    fill = float(vol.array.min())
    assert (ours == fill).any() and (np.abs(theirs - fill) < 0.51).sum() == (ours == fill).sum()


def test_scan_keeps_a_few_hundred_bytes_per_file(tmp_path):
    """A scan holds what grouping needs per file (path, slice position, identity), the header values once per
    series: the memory a scan of a large tree needs grows slowly (docs/benchmarks.md measures 20,000 files).
    Keeping each file's header values made this about 4 KB per file."""
    for s in range(4):
        write_series(tmp_path / f"series{s}", plain_slices(100, 4, 4), [(0.0, 0.0, float(k)) for k in range(100)],
                     SeriesDescription="a description long enough to count", ImageType=["ORIGINAL", "PRIMARY", "M"],
                     AcquisitionNumber=1, EchoNumbers=1, BodyPartExamined="BRAIN")
    scan_dicom(tmp_path / "series0")  # imports and pydicom's caches, outside the measurement
    tracemalloc.start()
    try:
        stacks = scan_dicom(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [s.n_slices for s in stacks] == [100] * 4
    assert peak / 400 < 2000, f"{peak / 400:.0f} bytes per file"  # about 1,300 here, most of it the path
