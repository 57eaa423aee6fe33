"""DICOM through the user-facing paths: convert (vs dcm2niix), predict on a series, inspect and rules."""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, TEST_DATA, assert_clean_error, run_cli
from dicom_helpers import compare_with_reference
from dicom_helpers import convert as dcm2niix_convert
from test_dicom import SHARED_SERIES

from medseg.core.errors import ConfigError, UnsupportedInputError
from medseg.io.convert import convert
from medseg.io.rules import SelectionRules, load_rules, orientation_name, select_series

HCROP = TEST_DATA / "dicom" / "hcrop"


@pytest.mark.shared_data
@pytest.mark.parametrize("rel", SHARED_SERIES + ["geometry/ct_gantry_tilt"])
def test_convert_matches_dcm2niix(shared_data, dcm2niix, tmp_path, rel):
    """The written NIfTI (not just the in-memory volume) agrees with dcm2niix's."""
    src = shared_data / "dicom" / rel
    out, _ = convert(src, tmp_path / "ours.nii.gz")
    ours = nib.load(out)
    refs = dcm2niix_convert(dcm2niix, src, tmp_path / "ref")
    if "tilt" in rel:
        refs = [p for p in refs if "Tilt" in p.name]
        gram = nib.load(refs[0]).affine[:3, :3].T @ nib.load(refs[0]).affine[:3, :3]
        if np.abs(gram - np.diag(np.diag(gram))).max() > 1e-3:
            pytest.skip("this dcm2niix writes a non-orthogonal _Tilt_Eq affine; use a newer one")
    from medseg.io import Volume

    vol = Volume(np.asanyarray(ours.dataobj), ours.affine)
    a, b, affine_diff = compare_with_reference(vol, refs[0])
    assert affine_diff < 0.01
    if "tilt" in rel:
        assert np.abs(a - b).max() <= 1.01  # dcm2niix rounds to integers twice; see test_dicom
    else:
        assert np.array_equal(a, b)


def test_convert_cli_and_errors(tmp_path):
    proc = run_cli("convert", HCROP, tmp_path / "hcrop.nii.gz")
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = nib.load(tmp_path / "hcrop.nii.gz")
    assert img.shape == (34, 50, 40) and np.allclose(np.abs(np.diag(img.affine)[:3]), 1.0)
    assert_clean_error(run_cli("convert", HCROP, tmp_path / "x.png"), "unknown output format")
    assert_clean_error(run_cli("convert", HCROP, HCROP / "out.nii.gz"), "written into the input")
    assert_clean_error(run_cli("convert", tmp_path / "missing", tmp_path / "y.nii.gz"), "input not found")
    assert_clean_error(run_cli("convert", HCROP, tmp_path / "z.nii.gz", "--tilt", "ignore"), "unknown DICOM option")


def test_convert_refuses_a_study_with_several_series(tmp_path):
    with pytest.raises(UnsupportedInputError, match="holds 2 volumes"):
        convert(TEST_DATA / "dicom", tmp_path / "x.nii.gz")
    out, vol = convert(TEST_DATA / "dicom", tmp_path / "ct.nii.gz", rules=REPO / "configs" / "rules" / "hippocampus_crop.yaml")
    assert vol.meta["modality"] == "MR" and vol.shape == (34, 50, 40)


def test_predict_on_a_dicom_series_segments_the_hippocampus(tmp_path):
    proc = run_cli("predict", HCROP, "-o", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    [out] = list((tmp_path / "out").glob("series-*.nii.gz"))
    convert(HCROP, tmp_path / "img.nii.gz")
    img, lab = nib.load(tmp_path / "img.nii.gz"), nib.load(out)
    assert lab.shape == img.shape and np.allclose(lab.affine, img.affine, atol=1e-5)
    arr = np.asanyarray(lab.dataobj)
    ml = {c: (arr == c).sum() * abs(np.linalg.det(lab.affine[:3, :3])) / 1000 for c in (1, 2)}
    # an adult hippocampus head and body/tail are each about 1-3 mL
    assert all(0.8 < v < 4.0 for v in ml.values()), ml


def test_inspect_lists_series_with_decisions():
    proc = run_cli("inspect", TEST_DATA / "dicom", "--rules", REPO / "configs" / "rules" / "hippocampus_crop.yaml")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "HippoCrop" in text and "selected: passes all rules" in text
    assert "not selected: modality CT not in ['MR']" in text
    assert "1 selected" in text


@dataclass
class FakeSeries:
    study_uid: str = "s1"
    modality: str = "MR"
    series_description: str = "T1 MPRAGE"
    body_part: str = "BRAIN"
    orientation: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    n_slices: int = 100
    slice_thickness: float | None = 1.0
    contrast: str = ""
    skip_reason: str | None = None
    tag: str = field(default="")


def test_rules_pick_the_series_the_model_expects(tmp_path):
    study = [FakeSeries(series_description="T1 MPRAGE", tag="t1"), FakeSeries(series_description="T2 TSE", tag="t2"),
             FakeSeries(series_description="FLAIR", tag="flair"), FakeSeries(series_description="T1 post", contrast="Gd", tag="t1c"),
             FakeSeries(series_description="localizer", n_slices=3, tag="loc"),
             FakeSeries(series_description="T1 sag", orientation=(0, 1, 0, 0, 0, -1), tag="t1sag")]
    rules_file = tmp_path / "r.yaml"
    rules_file.write_text("modality: MR\ndescription_include: '^t1'\norientation: [axial]\ncontrast: without\n"
                          "slice_thickness: [0.5, 2]\nmin_slices: 20\npick: largest\n")
    decisions = select_series(study, load_rules(rules_file))
    chosen = [d.series.tag for d in decisions if d.selected]
    assert chosen == ["t1"]
    reasons = {d.series.tag: "; ".join(d.reasons) for d in decisions}
    assert "description does not match" in reasons["t2"]
    assert "contrast agent recorded" in reasons["t1c"]
    assert "orientation sagittal not in ['axial']" in reasons["t1sag"]
    assert "3 slice(s) < min_slices 20" in reasons["loc"]
    # largest wins when several pass; 'all' keeps every passing series
    two = [FakeSeries(n_slices=50, tag="a"), FakeSeries(n_slices=120, tag="b"), FakeSeries(study_uid="s2", tag="c")]
    assert [d.series.tag for d in select_series(two, SelectionRules(pick="largest")) if d.selected] == ["b", "c"]
    assert len([d for d in select_series(two, SelectionRules(pick="all")) if d.selected]) == 3


def test_rules_errors_and_orientation_names(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("description_include: '(unclosed'\n")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        load_rules(bad)
    bad.write_text("orientaton: [axial]\n")
    with pytest.raises(ConfigError, match="did you mean 'orientation'"):
        load_rules(bad)
    assert orientation_name((1, 0, 0, 0, 1, 0)) == "axial"
    assert orientation_name((0, 1, 0, 0, 0, -1)) == "sagittal"
    assert orientation_name((1, 0, 0, 0, 0, -1)) == "coronal"
    assert orientation_name((1, 0, 0, 0, 0.7071, 0.7071)) == "oblique"


@pytest.mark.parametrize("syntax", ["jpeg-lossless", "rle"])
def test_compressed_transfer_syntaxes_decode_to_the_same_volume(tmp_path, syntax):
    """JPEG lossless (through GDCM) and RLE (pydicom) copies of a real series give identical voxels."""
    import gdcm
    import pydicom

    from medseg.io.dicom import load_dicom_series

    out = tmp_path / syntax
    out.mkdir()
    for f in sorted(HCROP.iterdir()):
        if f.suffix != ".dcm":
            continue
        if syntax == "rle":
            ds = pydicom.dcmread(f)
            ds.compress(pydicom.uid.RLELossless)
            ds.save_as(out / f.name)
            continue
        reader = gdcm.ImageReader()
        reader.SetFileName(str(f))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(out / f.name))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
    expected = {"jpeg-lossless": "1.2.840.10008.1.2.4.70", "rle": "1.2.840.10008.1.2.5"}[syntax]
    assert pydicom.dcmread(next(out.iterdir())).file_meta.TransferSyntaxUID == expected
    a, b = load_dicom_series(out), load_dicom_series(HCROP)
    assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine)


def test_predict_writes_every_format_on_the_source_grid(tmp_path):
    """One run, four files: NIfTI, Slicer .seg.nrrd, DICOM SEG and colour tables, all agreeing voxel for voxel."""
    slicerio = pytest.importorskip("slicerio")
    from medseg.io.dicom import scan_dicom
    from medseg.io.dicom_seg import read_dicom_seg
    from medseg.io.slicer_formats import read_seg_nrrd

    out = tmp_path / "out"
    proc = run_cli("predict", HCROP, "-o", out, "--device", "cpu", "--format", "nifti", "--format", "seg.nrrd",
                   "--format", "dicom-seg")
    assert proc.returncode == 0, proc.stderr[-2000:]
    [nii] = list(out.glob("series-*.nii.gz"))
    name = nii.name[: -len(".nii.gz")]
    labels = np.asanyarray(nib.load(nii).dataobj)
    seg_vol, infos = read_seg_nrrd(out / f"{name}.seg.nrrd")
    assert np.array_equal(seg_vol.array, labels) and np.allclose(seg_vol.affine, nib.load(nii).affine, atol=1e-5)
    seg = slicerio.read_segmentation(str(out / f"{name}.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["anterior", "posterior"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2]
    [info] = scan_dicom(HCROP)
    dcm_labels, meta = read_dicom_seg(out / f"{name}.dcm", list(info.files))
    assert np.array_equal(dcm_labels, labels)
    ctbl = (out / "labels.ctbl").read_text().splitlines()
    assert any(line.startswith("1 anterior 230 80 60") for line in ctbl)
    assert (out / "labels.csv").read_text().startswith("LabelValue,Name,Color_R,Color_G,Color_B,Color_A")


def test_dicom_seg_needs_a_dicom_input(tmp_path):
    src = TEST_DATA / "hippocampus" / "imagesTr" / "hippocampus_011.nii.gz"
    assert_clean_error(run_cli("predict", src, "-o", tmp_path / "o", "--device", "cpu", "--format", "dicom-seg"),
                       "DICOM SEG output needs a DICOM input series")
    assert_clean_error(run_cli("predict", src, "-o", tmp_path / "o", "--format", "png"), "unknown output format 'png'")
