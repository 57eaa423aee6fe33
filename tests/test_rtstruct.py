"""RTSTRUCT output: read back by readers that are not medseg's, rasterised onto the source slices and compared with
the label map; conformance checked with dciodvfy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.core.labels import label_infos
from medseg.io.dicom import load_dicom_series, scan_dicom
from medseg.io.rtstruct import RTSTRUCT_SOP_CLASS, write_rtstruct
from conftest import SHARED, TEST_DATA, rotation
from dicom_helpers import AXIAL, dciodvfy_errors, plain_slices, write_series

INFOS = label_infos({0: "background", 1: "liver", 2: "lesion", 3: "vessel"})


def _series(root: Path):
    (info,) = [s for s in scan_dicom(root) if s.usable]
    return list(info.files), load_dicom_series(info)


def raster_even_odd(rt_path: Path, files) -> dict[str, np.ndarray]:
    """A reader independent of medseg's writer: every ROI's contours, matched to their slices by the SOP instance
    they reference, filled by the even-odd rule at pixel centres (matplotlib), as ``(column, row, slice)`` masks in
    the order of ``files``. The published readers do not run here: dicompyler-core 0.5.6 and dcmrtstruct2nii 5
    import pydicom functions that pydicom 3 removed, and rt-utils 1.2.7 transposes non-square images (every series of
    the shared MR study is 320 x 280) and installs a top-level ``tests`` package over this one; docs/predict.md has
    what rt-utils read back on a square series."""
    from matplotlib.path import Path as Polygon

    rt = pydicom.dcmread(rt_path)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    # the shared CT's export blanked SOPInstanceUID in the data set; its file meta keeps it
    index = {str(h.get("SOPInstanceUID") or h.file_meta.MediaStorageSOPInstanceUID): k for k, h in enumerate(headers)}
    names = {int(r.ROINumber): str(r.ROIName) for r in rt.StructureSetROISequence}
    h0 = headers[0]
    rows, cols = int(h0.Rows), int(h0.Columns)
    cc, rr = np.meshgrid(np.arange(cols), np.arange(rows), indexing="ij")
    centres = np.stack([cc.ravel(), rr.ravel()], 1).astype(float)
    out = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros((cols, rows, len(files)), bool)
        for c in getattr(roi, "ContourSequence", []):
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            k = index[str(c.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            h = headers[k]
            iop = np.array(h.ImageOrientationPatient, float)
            ipp = np.array(h.ImagePositionPatient, float)
            dr, dc = (float(v) for v in h.PixelSpacing)
            pts = np.array(c.ContourData, float).reshape(-1, 3) - ipp
            assert len(pts) == int(c.NumberOfContourPoints)
            normal = np.cross(iop[:3], iop[3:])
            assert np.abs(pts @ normal).max() < 1e-3  # in the plane of the slice it references
            poly = Polygon(np.stack([pts @ iop[:3] / dc, pts @ iop[3:] / dr], 1))
            mask[..., k] ^= poly.contains_points(centres).reshape(cols, rows)
        out[names[int(roi.ReferencedROINumber)]] = mask
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def blobs(shape, seed=0) -> np.ndarray:
    """Irregular structures of three labels, one with a hole, some touching the image edge."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), 2.0)
    lab = np.zeros(shape, np.uint8)
    lab[field > np.percentile(field, 60)] = 1
    lab[field > np.percentile(field, 90)] = 2
    lab[2:5, :, :] = np.where(lab[2:5, :, :] == 0, 3, lab[2:5, :, :])  # a band along the image's edge
    lab[tuple(s // 2 for s in shape)] = 0  # a one-pixel hole
    return lab


@pytest.mark.parametrize("kind", ["axial", "oblique", "sagittal"])
def test_round_trip_on_synthetic_series(tmp_path, kind):
    if kind == "axial":
        iop, positions, spacing = AXIAL, [(-3.0, 4.0, 2.5 * k) for k in range(6)], (0.8, 1.2)
    elif kind == "oblique":
        rot = rotation(20, 15, 5)
        iop = list(rot[:, 0]) + list(rot[:, 1])
        positions = [np.array([-12.0, 30.0, 5.0]) + 2.2 * k * rot[:, 2] for k in range(6)]
        spacing = (0.9, 0.7)
    else:
        iop, positions, spacing = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), [(x, -20.0, 40.0) for x in (-4.0, -2.5, -1.0, 0.5)], (1.5, 0.7)
    write_series(tmp_path / "src", plain_slices(len(positions), 30, 22), positions, iop, spacing,
                 FrameOfReferenceUID="1.2.3.4.5.6")
    files, vol = _series(tmp_path / "src")
    lab = blobs(vol.shape, seed=len(kind))
    out = write_rtstruct(vol.with_array(lab), files, tmp_path / "out" / "rt.dcm", INFOS, model_name="test")
    assert dciodvfy_errors(out) == []
    back = raster_even_odd(out, files)
    for info in INFOS:
        np.testing.assert_array_equal(back[info.name], lab == info.value)  # every labelled pixel, holes too
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == RTSTRUCT_SOP_CLASS and ds.Modality == "RTSTRUCT"
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    ref = ds.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == src.FrameOfReferenceUID
    series = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == src.SeriesInstanceUID and len(series.ContourImageSequence) == len(files)
    assert [tuple(r.ROIDisplayColor) for r in ds.ROIContourSequence] == [tuple(i.color) for i in INFOS]


def _shared_check(tmp_path, folder: Path, lab_of) -> dict[str, float]:
    files, vol = _series(folder)
    lab = lab_of(vol)
    out = write_rtstruct(vol.with_array(lab), files, tmp_path / "rt.dcm", INFOS[: int(lab.max())])
    assert dciodvfy_errors(out) == []
    back = raster_even_odd(out, files)
    scores = {}
    for info in INFOS[: int(lab.max())]:
        ref = lab == info.value
        ml = ref.sum() * vol.voxel_volume_ml
        scores[info.name] = dice(back[info.name], ref)
        assert scores[info.name] >= (0.95 if ml >= 5 else 0.90), (info.name, ml, scores[info.name])
    return scores


@pytest.mark.shared_data
def test_shared_mr_study(tmp_path):
    """The T1 of the shared MR study (320 x 280, oblique rows): structures from an intensity partition."""
    from scipy import ndimage

    folder = SHARED / "dicom" / "mr_brain_study" / "11-T1post-18670"
    if not folder.is_dir():
        pytest.skip("../shared/data is not present in this checkout")

    def lab_of(vol):
        img = ndimage.gaussian_filter(vol.array.astype(np.float32), 1.0)
        lab = np.zeros(vol.shape, np.uint8)
        lab[img > np.percentile(img, 70)] = 1
        lab[img > np.percentile(img, 95)] = 2
        return lab

    scores = _shared_check(tmp_path, folder, lab_of)
    assert min(scores.values()) > 0.99


@pytest.mark.shared_data
def test_shared_ct_with_its_segmentation(tmp_path):
    """The JPEG 2000 chest CT of ../shared with the segmentation a model made of it (its labels, renumbered)."""
    from medseg.io.volume import load_volume

    folder = SHARED / "dicom" / "ct_chest" / "series"
    if not folder.is_dir():
        pytest.skip("../shared/data is not present in this checkout")
    ref = load_volume(SHARED / "dicom" / "ct_chest" / "reference_seg.nii.gz")

    def lab_of(vol):
        assert ref.shape == vol.shape
        values = [v for v in np.unique(ref.array) if v][:3]
        lab = np.zeros(vol.shape, np.uint8)
        for n, v in enumerate(values, start=1):
            lab[ref.array == v] = n
        return lab

    _shared_check(tmp_path, folder, lab_of)


def test_predict_cli_writes_rtstruct(tmp_path):
    from conftest import run_cli

    proc = run_cli("predict", str(TEST_DATA / "dicom" / "hcrop"), "-o", str(tmp_path / "out"), "--model",
                   "hippocampus-fast", "--format", "rtstruct")
    assert proc.returncode == 0, proc.stderr
    (rt,) = list((tmp_path / "out").glob("*.rtstruct.dcm"))
    ds = pydicom.dcmread(rt)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["anterior", "posterior"]
    proc = run_cli("predict", str(REPO_SAMPLE), "-o", str(tmp_path / "out2"), "--model", "hippocampus-fast",
                   "--format", "rtstruct")
    assert proc.returncode == 2 and "needs a DICOM input series" in proc.stderr


REPO_SAMPLE = Path(__file__).resolve().parent.parent / "medseg" / "assets" / "samples" / "hippocampus_001.nii.gz"
