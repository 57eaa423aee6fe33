"""DICOM SEG output: round trips on real and synthetic series, codes, references and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.core.errors import GeometryError, MedsegError, OutputError
from medseg.io.dicom import load_dicom_series, scan_dicom
from medseg.io.dicom_seg import (
    SEG_SOP_CLASS,
    read_dicom_seg,
    source_grid,
    write_dicom_seg,
)
from medseg.core.labels import Code, label_infos
from tests.conftest import TEST_DATA, rotation
from tests.dicom_helpers import AXIAL, SECRETS, dciodvfy_errors, no_secrets, plain_slices, write_series

HCROP = TEST_DATA / "dicom" / "hcrop"
INFOS = label_infos({0: "background", 1: "anterior", 2: "posterior"}, model_name="hippocampus")
HIPPOCAMPUS = Code("SCT", "5001000", "Hippocampus")


def _series(root: Path):
    (info,) = [s for s in scan_dicom(root) if s.usable]
    return info, list(info.files)


def _labels(shape, seed=0) -> np.ndarray:
    """Random labels 0..2 with one empty slice, so empty frames are left out."""
    rng = np.random.default_rng(seed)
    arr = (rng.random(shape) < 0.3).astype(np.uint8) * rng.integers(1, 3, shape).astype(np.uint8)
    arr[..., 1] = 0
    return arr


def _round_trip(tmp_path: Path, files, arr, vol, infos=INFOS):
    out = write_dicom_seg(vol.with_array(arr), files, tmp_path / "out" / "seg.dcm", infos,
                          model_name="hippocampus", model_version="2.0")
    got, info = read_dicom_seg(out, files)
    np.testing.assert_array_equal(got, arr)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for pos, k, ref in zip(info["frame_positions"], info["frame_slices"], info["frame_sources"]):
        np.testing.assert_allclose(pos, np.array(headers[k].ImagePositionPatient, float), atol=1e-6)
        assert ref == headers[k].SOPInstanceUID
    filled = [k for k in range(arr.shape[2]) for v in (1, 2) if (arr[..., k] == v).any()]
    assert sorted(info["frame_slices"]) == sorted(filled)  # non-empty frames only
    ds = pydicom.dcmread(out)
    frames = ds.pixel_array.reshape(len(info["frame_slices"]), ds.Rows, ds.Columns)
    for f, (k, number) in enumerate(zip(info["frame_slices"], info["frame_segments"])):
        # checked without highdicom: frame pixel (row r, column c) is voxel (i=c, j=r) of slice k
        np.testing.assert_array_equal(frames[f], (arr[..., k] == number).T)
    assert ds.SOPClassUID == SEG_SOP_CLASS and ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == headers[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    assert info["referenced_series_uids"] == [headers[0].SeriesInstanceUID]
    assert sorted(info["referenced_instances"]) == sorted(h.SOPInstanceUID for h in headers)
    assert [p.name for p in out.parent.iterdir()] == ["seg.dcm"]
    return out, info


def _synthetic(folder: Path, iop, positions, spacing=(0.8, 1.2), instances=None, rows=7, cols=5):
    write_series(folder, plain_slices(len(positions), rows, cols), positions, iop, spacing, instances=instances,
                 FrameOfReferenceUID="1.2.3.4.5.6")
    info, files = _series(folder)
    return files, load_dicom_series(info)


def test_hcrop_round_trip_codes_and_references(tmp_path):
    info, files = _series(HCROP)
    vol = load_dicom_series(info)
    assert not vol.meta["resampled"]
    arr = _labels(vol.shape)
    out, seg = _round_trip(tmp_path, files, arr, vol)
    assert {n: s["label"] for n, s in seg["segments"].items()} == {1: "anterior", 2: "posterior"}
    first, second = seg["segments"][1], seg["segments"][2]
    assert first["type"] == second["type"] == HIPPOCAMPUS
    assert first["category"] == Code("SCT", "123037004", "Anatomical Structure")
    assert first["modifier"] == Code("SCT", "255549009", "Anterior")
    assert second["modifier"] == Code("SCT", "255551008", "Posterior")
    assert first["algorithm_type"] == "AUTOMATIC" and first["algorithm_name"] == "medseg hippocampus"
    assert first["algorithm_version"] == "2.0" and len(first["cielab"]) == 3
    ds = pydicom.dcmread(out)
    assert ds.Manufacturer == "medseg" and ds.SeriesDescription == "medseg segmentation"
    # without the source files: only slices holding a segment, in order along the normal
    got, bare = read_dicom_seg(out)
    filled = [k for k in range(arr.shape[2]) if arr[..., k].any()]
    np.testing.assert_array_equal(got, arr[..., filled])
    source_positions = [pydicom.dcmread(files[k], stop_before_pixels=True).ImagePositionPatient for k in filled]
    np.testing.assert_allclose(bare["slice_positions"], np.array(source_positions, float), atol=1e-6)


def test_hcrop_bundled_model_prediction(tmp_path):
    from medseg.inference.predictor import Predictor
    from medseg.core.labels import infos_from_config

    info, files = _series(HCROP)
    vol = load_dicom_series(info)
    predictor = Predictor(device="cpu")
    labels = predictor.predict_volume(vol)
    assert set(np.unique(labels.array)) == {0, 1, 2}
    out = write_dicom_seg(labels, files, tmp_path / "pred.dcm", infos_from_config(predictor.cfg),
                          model_name=predictor.cfg.name)
    got, seg = read_dicom_seg(out, files)
    np.testing.assert_array_equal(got, labels.array)
    assert seg["segments"][1]["modifier"] == Code("SCT", "255549009", "Anterior")
    assert dciodvfy_errors(out) == []


def test_jpeg2000_ct_with_blank_sop_uids(tmp_path):
    """Compressed source whose SOPClassUID/SOPInstanceUID are blank in the dataset (kept in the file meta)."""
    info, files = _series(TEST_DATA / "dicom" / "ct_j2k")
    vol = load_dicom_series(info)
    arr = np.zeros(vol.shape, np.uint8)
    arr[100:200, 150:300, 1] = 1
    arr[300:310, 20:40, 2] = 2
    out = write_dicom_seg(vol.with_array(arr), files, tmp_path / "ct.dcm", label_infos({1: "liver", 2: "spleen"}))
    got, seg = read_dicom_seg(out, files)
    np.testing.assert_array_equal(got, arr)
    metas = [pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in files]
    assert seg["frame_sources"] == [metas[1], metas[2]]
    assert seg["segments"][1]["type"] == Code("SCT", "10200004", "Liver") and seg["segments"][2]["modifier"] is None
    assert dciodvfy_errors(out) == []


def test_flipped_series_reversed_on_disk(tmp_path):
    z = [20.0, 17.5, 15.0, 12.5, 10.0, 7.5]  # decreasing positions, InstanceNumber reversed
    files, vol = _synthetic(tmp_path / "src", AXIAL, [(-3.0, 4.0, v) for v in z], instances=[6, 5, 4, 3, 2, 1])
    assert [f.name for f in files] == [f"slice{k:03d}.dcm" for k in range(5, -1, -1)]
    _round_trip(tmp_path, files, _labels(vol.shape, 1), vol)
    # files in disk order give the same SEG frames, labels re-ordered like the files
    got, _ = read_dicom_seg(tmp_path / "out" / "seg.dcm", files[::-1])
    np.testing.assert_array_equal(got, _labels(vol.shape, 1)[..., ::-1])


def test_oblique_series(tmp_path):
    rot = rotation(20, 20, 0)
    iop = list(rot[:, 0]) + list(rot[:, 1])
    normal = rot[:, 2]
    origin = np.array([-12.0, 30.0, 5.0])
    files, vol = _synthetic(tmp_path / "src", iop, [origin + 2.2 * k * normal for k in range(5)])
    assert not vol.meta["resampled"] and not vol.meta["detilted"]
    _round_trip(tmp_path, files, _labels(vol.shape, 2), vol)


def test_sagittal_series(tmp_path):
    iop = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    files, vol = _synthetic(tmp_path / "src", iop, [(x, -20.0, 40.0) for x in (-4.0, -2.5, -1.0, 0.5)],
                            spacing=(1.5, 0.7), rows=6, cols=9)
    _round_trip(tmp_path, files, _labels(vol.shape, 3), vol)


def test_source_grid_matches_loader(tmp_path):
    info, files = _series(HCROP)
    sorted_files, _, affine = source_grid(files[::-1])
    assert sorted_files == files
    np.testing.assert_allclose(affine, load_dicom_series(info).affine, atol=1e-6)


def _world_labels(vol, centre) -> np.ndarray:
    """Labels as a function of patient position (:func:`world_function`), at every voxel of ``vol``."""
    ii, jj, kk = np.meshgrid(*[np.arange(n, dtype=float) for n in vol.shape], indexing="ij")
    xyz = np.einsum("ab,bijk->aijk", vol.affine[:3, :3], np.stack([ii, jj, kk])) + vol.affine[:3, 3, None, None, None]
    return world_function(xyz, centre)


def world_function(xyz, centre) -> np.ndarray:
    """A ball (2) of radius 5 mm at ``centre`` over a half-space (1) beyond it along x."""
    c = np.asarray(centre, float).reshape(3, *([1] * (xyz.ndim - 1)))
    lab = np.zeros(xyz.shape[1:], np.uint8)
    lab[xyz[0] > c[0]] = 1
    lab[((xyz - c) ** 2).sum(0) < 5.0 ** 2] = 2
    return lab


def _pixel_world(files) -> np.ndarray:
    """Patient (RAS) position of every pixel of the source slices, ``(3, cols, rows, n)`` in ``files`` order."""
    from medseg.io.dicom_seg import source_slices

    _, headers, affines = source_slices(files)
    cols, rows = int(headers[0].Columns), int(headers[0].Rows)
    ii, jj = np.meshgrid(np.arange(cols, dtype=float), np.arange(rows, dtype=float), indexing="ij")
    return np.stack([np.einsum("ab,bij->aij", a[:3, :3], np.stack([ii, jj, np.zeros_like(ii)])) +
                     a[:3, 3, None, None] for a in affines], axis=-1)


@pytest.mark.parametrize("trap", ["missing_slice", "tilt"])
def test_resampled_series_mapped_back_to_original_slices(tmp_path, trap):
    """A series the loader resampled (a missing slice) or de-tilted: labels predicted on the loaded grid are written
    on the original slices, each pixel from the nearest voxel; DICOM SEG and RTSTRUCT alike."""
    from medseg.io.rtstruct import write_rtstruct
    from tests.test_rtstruct import raster_even_odd

    if trap == "missing_slice":
        positions = [(0.0, 0.0, z) for z in (0.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0)]
    else:
        positions = [(0.0, 0.6 * k, 1.5 * k) for k in range(9)]
    files, vol = _synthetic(tmp_path / "src", AXIAL, positions, spacing=(0.8, 0.8), rows=24, cols=20)
    assert vol.meta["resampled" if trap == "missing_slice" else "detilted"]
    world = _pixel_world(files)
    centre = world.reshape(3, -1).mean(1)
    truth = world_function(world, centre)  # the labels at the original pixels' own positions
    labels = vol.with_array(_world_labels(vol, centre))
    for unflagged in (False, True):  # also labels that lost the loader's flags (e.g. read back from NIfTI)
        lab = type(vol)(labels.array, vol.affine) if unflagged else labels
        seg = write_dicom_seg(lab, files, tmp_path / f"seg{unflagged}.dcm", INFOS)
        got, info = read_dicom_seg(seg, files)
        rt = write_rtstruct(lab, files, tmp_path / f"rt{unflagged}.dcm", INFOS)
        back = raster_even_odd(rt, files)
        for value in (1, 2):
            ref = truth == value
            if trap == "missing_slice":  # the original slices are planes of the even grid: nothing is interpolated
                np.testing.assert_array_equal(got == value, ref)
            else:
                assert 2 * ((got == value) & ref).sum() / ((got == value).sum() + ref.sum()) > 0.9
            np.testing.assert_array_equal(back[INFOS[value - 1].name], got == value)
        assert dciodvfy_errors(seg) == [] and dciodvfy_errors(rt) == []
        assert sorted(info["referenced_instances"]) == sorted(
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)  # the original slices


def test_flagged_labels_on_a_regular_series(tmp_path):
    """Labels the loader marked resampled, on a series that is regular after all: mapped, which here is the identity."""
    files, vol = _synthetic(tmp_path / "src", AXIAL, [(0.0, 0.0, z) for z in range(4)])
    arr = _labels(vol.shape)
    out = write_dicom_seg(vol.with_array(arr, resampled=True), files, tmp_path / "s.dcm", INFOS)
    got, _ = read_dicom_seg(out, files)
    np.testing.assert_array_equal(got, arr)


def test_refuses_grid_mismatch(tmp_path):
    info, files = _series(HCROP)
    vol = load_dicom_series(info)
    out = tmp_path / "out"
    arr = _labels(vol.shape)
    shifted = vol.with_array(arr)
    shifted.affine[:3, 3] += [0.0, 0.0, 0.5]
    with pytest.raises(GeometryError, match="differs from the source slices by 0.5"):
        write_dicom_seg(shifted, files, out / "a.dcm", INFOS)
    with pytest.raises(GeometryError, match="slice count"):
        write_dicom_seg(type(vol)(arr[..., :-1], vol.affine), files, out / "b.dcm", INFOS)
    with pytest.raises(GeometryError, match="slice count"):
        write_dicom_seg(vol.with_array(arr), files[:-1], out / "c.dcm", INFOS)
    with pytest.raises(GeometryError, match="shape"):
        write_dicom_seg(type(vol)(arr.transpose(1, 0, 2).copy(), vol.affine), files, out / "d.dcm", INFOS)
    with pytest.raises(OutputError, match="without a description"):
        write_dicom_seg(vol.with_array(arr * 2), files, out / "e.dcm", INFOS)
    assert not out.exists() or not any(out.iterdir())


def test_no_patient_data_in_errors(tmp_path):
    files, vol = _synthetic(tmp_path / "src", AXIAL, [(0.0, 0.0, z) for z in range(4)])
    with pytest.raises(MedsegError) as err:
        write_dicom_seg(type(vol)(np.zeros((2, 2, 2), np.uint8), vol.affine), files, tmp_path / "x.dcm", INFOS)
    no_secrets(str(err.value))
    # the SEG copies the patient module from its source, as DICOM requires
    arr = np.zeros(vol.shape, np.uint8)
    arr[1:3, 2:4, 2] = 1
    ds = pydicom.dcmread(write_dicom_seg(vol.with_array(arr), files, tmp_path / "ok.dcm", INFOS))
    assert (str(ds.PatientName), ds.PatientID) == SECRETS[:2]


def test_source_deidentified_without_method(tmp_path):
    """A source whose export set PatientIdentityRemoved YES but left DeidentificationMethod out (as the shared tilted
    CT does): the outputs say the method was not recorded, and pass dciodvfy."""
    from medseg.core.privacy import SOURCE_DEIDENTIFIED
    from medseg.io.rtstruct import write_rtstruct

    write_series(tmp_path / "src", plain_slices(4, 12, 10), [(0.0, 0.0, z) for z in range(4)], AXIAL, (1.0, 1.0),
                 FrameOfReferenceUID="1.2.3.4.5.6", PatientIdentityRemoved="YES")
    info, files = _series(tmp_path / "src")
    vol = load_dicom_series(info)
    arr = _labels(vol.shape)
    for out in (write_dicom_seg(vol.with_array(arr), files, tmp_path / "seg.dcm", INFOS),
                write_rtstruct(vol.with_array(arr), files, tmp_path / "rt.dcm", INFOS)):
        ds = pydicom.dcmread(out, stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod == SOURCE_DEIDENTIFIED
        assert dciodvfy_errors(out) == []
