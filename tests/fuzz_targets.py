"""Property-based fuzz targets: medseg either reads a file correctly or raises a MedsegError, nothing else.

Shared by ``tests/test_fuzz.py`` (a few seconds, derandomized, in every test run) and
``benchmarks/fuzz.py`` (as many examples as asked for). Each ``check_*`` function writes one
fuzzed file into a fresh temporary folder and reads it with the public loader.
"""

from __future__ import annotations

import gzip
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from medseg.core.errors import MedsegError

# ---------------------------------------------------------------------------
# what a successful read must look like


def assert_sane_volume(vol) -> None:
    """A volume medseg accepted: 3D, finite affine, positive spacing, invertible direction."""
    assert vol.array.ndim == 3 and all(s >= 1 for s in vol.array.shape), vol.array.shape
    assert np.all(np.isfinite(vol.affine)), vol.affine
    assert np.all(vol.spacing > 0) and abs(np.linalg.det(vol.affine[:3, :3])) > 0, vol.affine


def expect_volume_or_medseg_error(read):
    """Run ``read()``; it must return a sane volume or raise a MedsegError (whose message is one line)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            vol = read()
        except MedsegError:
            return None
    assert_sane_volume(vol)
    return vol


# ---------------------------------------------------------------------------
# DICOM headers

_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([0.0, -1.0, 1e-9, 1e9, 0.5, 1.0, 2.5]))
_JUNK_TEXT = st.text(alphabet="0123456789.-+eE\\ abcNn", max_size=12)
_DS = st.one_of(_FLOATS.map(lambda v: repr(float(v))), _JUNK_TEXT)


def _ds_multi(n_choices=(1, 2, 3, 6, 7)):
    return st.one_of(st.sampled_from(n_choices).flatmap(lambda n: st.lists(_DS, min_size=n, max_size=n)),
                     st.lists(_DS, max_size=8))


_SOP_CLASSES = ["1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4.1",
                "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.11.1",
                "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.481.3", "1.2.3.4", ""]
_TRANSFER = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.90",
             "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "9.9.9"]

#: keyword -> (VR, strategy of raw values)
DICOM_FIELDS = {
    "PixelSpacing": ("DS", _ds_multi((2, 1, 3))),
    "ImagePositionPatient": ("DS", _ds_multi((3, 2, 4))),
    "ImageOrientationPatient": ("DS", _ds_multi((6, 5, 3))),
    "SliceThickness": ("DS", _DS),
    "RescaleSlope": ("DS", _DS),
    "RescaleIntercept": ("DS", _DS),
    "Rows": ("US", st.integers(0, 70)),
    "Columns": ("US", st.integers(0, 70)),
    "BitsAllocated": ("US", st.sampled_from([0, 1, 8, 12, 16, 32, 64])),
    "BitsStored": ("US", st.integers(0, 40)),
    "HighBit": ("US", st.integers(0, 40)),
    "PixelRepresentation": ("US", st.integers(0, 3)),
    "SamplesPerPixel": ("US", st.integers(0, 4)),
    "PhotometricInterpretation": ("CS", st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB", "PALETTE COLOR", "",
                                                         "YBR_FULL"])),
    "NumberOfFrames": ("IS", st.one_of(st.integers(-1, 5).map(str), _JUNK_TEXT)),
    "InstanceNumber": ("IS", st.one_of(st.integers(-5, 5).map(str), _JUNK_TEXT)),
    "SeriesNumber": ("IS", st.one_of(st.integers(-5, 5).map(str), _JUNK_TEXT)),
    "SOPClassUID": ("UI", st.sampled_from(_SOP_CLASSES)),
    "SeriesInstanceUID": ("UI", st.sampled_from(["", "1.2.3", "1.2.3.4.5.6"])),
    "ImageType": ("CS", st.lists(st.sampled_from(["ORIGINAL", "DERIVED", "LOCALIZER", "PRIMARY", ""]), max_size=3)),
    "PixelPaddingValue": ("SS", st.integers(-32768, 32767)),
}
_PIXEL_EDITS = st.sampled_from(["keep", "truncate", "extend", "empty", "delete"])


@st.composite
def dicom_cases(draw):
    """A 4-slice series and edits: per edit, which slices (all or one), a field and a raw value (or deletion)."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        keyword = draw(st.sampled_from(sorted(DICOM_FIELDS)))
        values = DICOM_FIELDS[keyword][1]
        value = None if draw(st.booleans()) and draw(st.integers(0, 5)) == 0 else draw(values)
        edits.append((draw(st.sampled_from(["all", 0, 2])), keyword, value))
    return {"edits": edits, "pixels": draw(_PIXEL_EDITS), "transfer": draw(st.sampled_from(_TRANSFER))}


def _raw_value(vr: str, value):
    if isinstance(value, list):
        return "\\".join(str(v) for v in value).encode("latin-1")
    if vr in ("US", "SS"):
        return int(value).to_bytes(2, "little", signed=vr == "SS") if -32768 <= int(value) < 65536 else b"\0\0"
    return str(value).encode("latin-1")


def write_fuzzed_series(folder: Path, case: dict) -> Path:
    from dicom_helpers import plain_slices, write_series
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.uid import UID

    paths = write_series(folder, plain_slices(4, rows=6, cols=5), [(0.0, 0.0, 2.0 * k) for k in range(4)],
                         series_uid="1.2.826.0.1.3680043.8.498.1")
    import pydicom

    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        for target, keyword, value in case["edits"]:
            if target != "all" and target != k:
                continue
            tag = tag_for_keyword(keyword)
            vr = DICOM_FIELDS[keyword][0]
            if value is None:
                if tag in ds:
                    del ds[tag]
                continue
            raw = _raw_value(vr, value)
            if len(raw) % 2:
                raw += b" " if vr not in ("UI",) else b"\0"
            ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
        if k == 1:
            data = ds.get("PixelData") or b""
            if case["pixels"] == "truncate":
                ds.PixelData = data[: len(data) // 2]
            elif case["pixels"] == "extend":
                ds.PixelData = data + b"\0\0" * 7
            elif case["pixels"] == "empty":
                ds.PixelData = b""
            elif case["pixels"] == "delete" and "PixelData" in ds:
                del ds.PixelData
        ds.file_meta.TransferSyntaxUID = UID(case["transfer"])
        ds.is_little_endian, ds.is_implicit_VR = True, False
        try:
            ds.save_as(path, enforce_file_format=False)
        except Exception:  # noqa: BLE001, S112 - pydicom refuses to write some edits; keep the file as it was
            continue
    return folder


def check_dicom(case: dict) -> None:
    """Both entry points: the series loader and the discover/load path used by predict and batch."""
    from medseg.io.dicom import load_dicom_series
    from medseg.io.sources import discover

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_fuzzed_series(Path(tmp) / "series", case)
        expect_volume_or_medseg_error(lambda: load_dicom_series(folder))

        def via_discover():
            items, _ = discover([folder])
            for it in items:
                expect_volume_or_medseg_error(it.load)
            raise MedsegError("checked")  # the items were checked above

        expect_volume_or_medseg_error(via_discover)


# ---------------------------------------------------------------------------
# NIfTI headers and affines

_NIFTI_DTYPES = [2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 128, 2304, 32, 0, 7, 9999]


@st.composite
def nifti_cases(draw):
    ndim = draw(st.integers(0, 8))
    dims = [draw(st.integers(-1, 6)) for _ in range(7)]
    return {
        "dim": [ndim] + dims,
        "datatype": draw(st.sampled_from(_NIFTI_DTYPES)),
        "pixdim": [draw(st.sampled_from([1.0, -1.0, 0.0]))] + [draw(_FLOATS) for _ in range(7)],
        "qform_code": draw(st.integers(-1, 5)),
        "sform_code": draw(st.integers(-1, 5)),
        "quatern": [draw(_FLOATS) for _ in range(6)],
        "srow": [draw(_FLOATS) for _ in range(12)],
        "scl": [draw(_FLOATS), draw(_FLOATS)],
        "vox_offset": draw(st.sampled_from([352.0, 0.0, 348.0, 1e9, -5.0, 353.0])),
        "extra_bytes": draw(st.integers(-200, 400)),
        "gzip": draw(st.booleans()),
        "magic": draw(st.sampled_from([b"n+1\0", b"ni1\0", b"xxx\0"])),
    }


def write_fuzzed_nifti(path: Path, case: dict) -> Path:
    import nibabel as nib

    hdr = nib.Nifti1Header()
    raw = bytearray(hdr.binaryblock)

    def put(offset, fmt, values):
        arr = np.asarray(values, dtype=fmt)
        raw[offset: offset + arr.nbytes] = arr.tobytes()

    put(40, "<i2", case["dim"])
    put(70, "<i2", [case["datatype"]])
    put(72, "<i2", [{2: 8, 4: 16, 8: 32, 16: 32, 64: 64, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64, 128: 24,
                     2304: 32, 32: 64}.get(case["datatype"], 8)])
    put(76, "<f4", case["pixdim"])
    put(108, "<f4", [case["vox_offset"]])
    put(112, "<f4", case["scl"])
    put(252, "<i2", [case["qform_code"], case["sform_code"]])
    put(256, "<f4", case["quatern"])
    put(280, "<f4", case["srow"])
    raw[344:348] = case["magic"]
    n = 1
    for d in case["dim"][1: 1 + max(0, min(7, case["dim"][0]))]:
        n *= max(d, 0)
    size = max(0, min(n * 8, 20000) + case["extra_bytes"])
    data = bytes(raw) + b"\0" * 4 + np.random.default_rng(0).bytes(size)
    path.write_bytes(gzip.compress(data) if case["gzip"] else data)
    return path


def check_nifti(case: dict) -> None:
    from medseg.io.volume import load_volume

    with tempfile.TemporaryDirectory() as tmp:
        path = write_fuzzed_nifti(Path(tmp) / ("f.nii.gz" if case["gzip"] else "f.nii"), case)
        expect_volume_or_medseg_error(lambda: load_volume(path))


_AFFINE_VALUES = st.one_of(st.floats(-1e4, 1e4, allow_nan=False, width=32), st.sampled_from([0.0, 1.0, -1.0, 1e-7]),
                           st.floats(allow_nan=True, allow_infinity=True, width=32))


@st.composite
def affine_cases(draw):
    kind = draw(st.sampled_from(["random", "rotation", "degenerate"]))
    if kind == "random":
        a = np.array([[draw(_AFFINE_VALUES) for _ in range(4)] for _ in range(3)], dtype=np.float64)
    else:
        angles = [draw(st.floats(-math.pi, math.pi)) for _ in range(3)]
        from scipy.spatial.transform import Rotation

        rot = Rotation.from_euler("xyz", angles).as_matrix()
        spacing = [draw(st.floats(1e-3, 20)) for _ in range(3)]
        if kind == "degenerate":
            spacing[draw(st.integers(0, 2))] = draw(st.sampled_from([0.0, -1.0, 1e-9, float("nan")]))
        a = np.concatenate([rot * np.asarray(spacing), np.array([[draw(_AFFINE_VALUES)] for _ in range(3)])], axis=1)
    affine = np.vstack([a, [0, 0, 0, 1]])
    return {"affine": affine.tolist(), "codes": (draw(st.integers(0, 4)), draw(st.integers(0, 4))),
            "format": draw(st.sampled_from(["nifti", "nrrd"]))}


def check_affine(case: dict) -> None:
    """Write an image with a fuzzed affine (with nibabel or SimpleITK), read it, and if medseg
    accepts it, write a label volume back on exactly its grid: never anything but a MedsegError."""
    import nibabel as nib

    from medseg.io.volume import load_volume, save_volume

    affine = np.asarray(case["affine"])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / ("img.nii.gz" if case["format"] == "nifti" else "img.nrrd")
        try:
            if case["format"] == "nifti":
                img = nib.Nifti1Image(np.ones((4, 5, 3), np.float32), affine)
                img.set_sform(affine, case["codes"][0])
                img.set_qform(affine, case["codes"][1])
                nib.save(img, str(src))
            else:
                import SimpleITK as sitk

                from medseg.io.volume import LPS_TO_RAS

                lps = LPS_TO_RAS @ affine
                spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
                img = sitk.GetImageFromArray(np.ones((3, 5, 4), np.float32))
                img.SetSpacing([float(s) for s in spacing])
                img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).reshape(-1)])
                img.SetOrigin([float(v) for v in lps[:3, 3]])
                sitk.WriteImage(img, str(src))
        except Exception:  # noqa: BLE001 - the writer itself refuses this affine: nothing to read
            return
        vol = expect_volume_or_medseg_error(lambda: load_volume(src))
        if vol is None:
            return
        labels = vol.with_array(np.zeros(vol.shape, np.uint8))
        for suffix in (".nii.gz", ".nrrd"):
            out = Path(tmp) / f"out{suffix}"
            try:
                save_volume(labels, out, reference=vol)
            except MedsegError:
                assert not out.exists()
                continue
            back = load_volume(out)
            assert back.shape == vol.shape
            assert np.allclose(back.affine, vol.affine, atol=1e-3 * max(1.0, float(np.abs(vol.affine).max()))), \
                (back.affine, vol.affine)


# ---------------------------------------------------------------------------
# NRRD headers


@st.composite
def nrrd_cases(draw):
    lines = ["NRRD0004"]
    fields = {
        "type": st.sampled_from(["float", "short", "uchar", "double", "int", "block", "junk"]),
        "dimension": st.sampled_from(["3", "2", "4", "0", "-1", "x"]),
        "sizes": st.sampled_from(["4 5 3", "4 5", "4 5 3 2", "0 5 3", "-4 5 3", "4 5 x", "3 4 5 3"]),
        "encoding": st.sampled_from(["raw", "gzip", "ascii", "bzip2", "nope"]),
        "endian": st.sampled_from(["little", "big", "middle"]),
        "space": st.sampled_from(["left-posterior-superior", "right-anterior-superior", "3D-right-handed", "what"]),
        "space directions": st.sampled_from(["(1,0,0) (0,1,0) (0,0,1)", "(0,0,0) (0,1,0) (0,0,1)",
                                             "(nan,0,0) (0,1,0) (0,0,1)", "(1,0,0) (0,1,0)", "none (1,0,0) (0,1,0) (0,0,1)",
                                             "(1,0,0) (1,0,0) (0,0,1)", "(1e30,0,0) (0,1,0) (0,0,1)"]),
        "space origin": st.sampled_from(["(0,0,0)", "(nan,0,0)", "(1,2)", "(inf,0,0)"]),
        "kinds": st.sampled_from(["domain domain domain", "vector domain domain domain", "RGB-color domain domain"]),
    }
    for key, strategy in fields.items():
        if draw(st.integers(0, 5)):
            lines.append(f"{key}: {draw(strategy)}")
    return {"header": "\n".join(lines) + "\n\n", "data": draw(st.integers(0, 600))}


def check_nrrd(case: dict) -> None:
    from medseg.io.volume import load_volume

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.nrrd"
        path.write_bytes(case["header"].encode() + np.random.default_rng(1).bytes(case["data"]))
        expect_volume_or_medseg_error(lambda: load_volume(path))


#: name -> (strategy, check) for every target.
TARGETS = {
    "dicom": (dicom_cases(), check_dicom),
    "nifti": (nifti_cases(), check_nifti),
    "affine": (affine_cases(), check_affine),
    "nrrd": (nrrd_cases(), check_nrrd),
}
