"""No patient data leaks: a batch over real DICOM whose headers and folder names carry PHI writes
none of it into outputs, manifests, file names or logs; ``--anonymize`` de-identifies DICOM SEGs
consistently and keeps the UIDs that place them on their source images."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pydicom
import pytest
from conftest import FAST_MODEL, SHARED, TEST_DATA, run_cli
from pydicom.uid import generate_uid

from medseg.core.privacy import anonymize_dataset, path_token, pseudonym, redact

PHI = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "MRN7734211",
    "PatientBirthDate": "19450307",
    "AccessionNumber": "ACC99887766",
    "OtherPatientIDs": "OTHERID5544",
    "InstitutionName": "St Secretive Hospital",
    "ReferringPhysicianName": "Whoknows^Doctor",
    "PatientAddress": "12 Hidden Lane",
}
#: strings that must appear nowhere: header values, their parts, and the folder names built from them
NEEDLES = ["Doe^Jane", "Quincy", "MRN7734211", "19450307", "1945-03-07", "ACC99887766", "OTHERID5544",
           "Secretive", "Whoknows", "Hidden Lane", "DOE_JANE"]
KEY = "test-site-key"


def _with_phi(src: Path, dst: Path, *, truncate: int | None = None) -> list[Path]:
    dst.mkdir(parents=True)
    series_uid = generate_uid()
    out = []
    for i, f in enumerate(sorted(src.iterdir())):
        ds = pydicom.dcmread(f)
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        ds.SeriesInstanceUID = series_uid
        ds.save_as(dst / f.name)
        if truncate is not None and (i == truncate or truncate == -1):
            data = (dst / f.name).read_bytes()
            (dst / f.name).write_bytes(data[:-300])
        out.append(dst / f.name)
    return out


def make_phi_archive(root: Path, shared: Path | None) -> Path:
    patient = root / "DOE_JANE_MRN7734211" / "1945-03-07 ACC99887766"
    _with_phi(TEST_DATA / "dicom" / "hcrop", patient / "T1 hippocampus Doe^Jane")
    # every slice cut short (one cut slice alone is a missing slice, interpolated): a series that fails
    _with_phi(TEST_DATA / "dicom" / "hcrop", patient / "DOE_JANE broken", truncate=-1)
    if shared is not None:
        _with_phi(shared / "dicom" / "mr_brain_study" / "37830-T2reg-78532", patient / "T2 DOE_JANE")
    return root


def _texts(path: Path) -> list[str]:
    data = path.read_bytes()
    out = [data.decode("latin-1")]
    try:
        out.append(gzip.decompress(data).decode("latin-1"))  # NIfTI .gz headers, gzip-encoded NRRD payloads
    except (OSError, EOFError):
        pass
    return out


def assert_no_phi(texts: dict[str, str]) -> None:
    for where, text in texts.items():
        for needle in NEEDLES:
            assert needle.lower() not in text.lower(), f"{needle!r} leaked into {where}"


def _run_and_check(tmp_path: Path, shared: Path | None) -> Path:
    root = make_phi_archive(tmp_path / "archive", shared)
    out = tmp_path / "out"
    env_key = {"MEDSEG_ANON_KEY": KEY}
    old = {k: os.environ.get(k) for k in env_key}
    os.environ.update(env_key)
    try:
        proc = run_cli("batch", root, "-o", out, "--device", "cpu", "--format", "nifti", "--format", "seg.nrrd",
                       "--format", "dicom-seg", "--anonymize", *FAST_MODEL)
        rerun = run_cli("batch", root, "-o", out, "--device", "cpu", "--format", "nifti", "--format", "seg.nrrd",
                        "--format", "dicom-seg", "--anonymize", *FAST_MODEL)  # retries the failed series: more log lines
        inspect = run_cli("inspect", root)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["status"] for r in rows} == {"done", "failed"}
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and "slice" not in failed[0]["input"] and failed[0]["input"].startswith("sha256:")
    assert "pixel data" in failed[0]["reason"]  # the reason survives, the folder names do not
    texts = {"stdout": proc.stdout, "stderr": proc.stderr, "rerun stdout": rerun.stdout, "rerun stderr": rerun.stderr,
             "inspect": inspect.stdout + inspect.stderr}
    for p in out.rglob("*"):
        texts[f"name {p.relative_to(out)}"] = str(p.relative_to(out))
        if p.is_file():
            for i, t in enumerate(_texts(p)):
                texts[f"{p.relative_to(out)}#{i}"] = t
    assert_no_phi(texts)
    return out


def _check_segs(out: Path, sources: list[Path]) -> None:
    """Every SEG is de-identified, carries one pseudonym, still references its source series and reads back onto it;
    the first source's SEG holds labels."""
    from medseg.io.dicom_seg import read_dicom_seg

    segs = sorted(out.rglob("*.dcm"))
    assert len(segs) == len(sources)
    by_uid = {pydicom.dcmread(sorted(src.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID: src
              for src in sources}
    ids = set()
    for f in segs:
        seg = pydicom.dcmread(f)
        assert seg.PatientIdentityRemoved == "YES" and "medseg" in seg.DeidentificationMethod
        assert [c.CodeValue for c in seg.DeidentificationMethodCodeSequence] == ["113100", "113110"]
        assert seg.PatientID == pseudonym(PHI["PatientID"]) and str(seg.PatientName).startswith("ANON^")
        assert seg.PatientBirthDate == "" and "OtherPatientIDs" not in seg and "InstitutionName" not in seg
        ids.add(seg.PatientID)
        # geometry references kept: the SEG still points at its source series
        source = by_uid[seg.ReferencedSeriesSequence[0].SeriesInstanceUID]
        assert seg.FrameOfReferenceUID
        labels, info = read_dicom_seg(f, sorted(source.iterdir()))  # still a valid, readable SEG
        assert info["referenced_series_uids"] == [seg.ReferencedSeriesSequence[0].SeriesInstanceUID]
        assert labels.max() >= 1 or source != sources[0]
    assert len(ids) == 1  # one patient, one pseudonym, in every SEG


@pytest.mark.slow
def test_batch_over_real_dicom_with_phi_leaks_nothing(tmp_path, monkeypatch):
    """With a further real series (a full-head T2) from ../shared/data where it is present."""
    monkeypatch.setenv("MEDSEG_ANON_KEY", KEY)  # pseudonym() below uses the same key as the subprocess
    shared = SHARED if SHARED.is_dir() else None
    out = _run_and_check(tmp_path, shared)
    patient = tmp_path / "archive" / "DOE_JANE_MRN7734211" / "1945-03-07 ACC99887766"
    _check_segs(out, [patient / "T1 hippocampus Doe^Jane"] + ([patient / "T2 DOE_JANE"] if shared else []))


def test_without_anonymize_the_seg_keeps_its_patient_and_record_paths_is_opt_in(tmp_path):
    series = tmp_path / "in" / "DOE_JANE"
    _with_phi(TEST_DATA / "dicom" / "hcrop", series)
    out = tmp_path / "out"
    proc = run_cli("predict", series, "-o", out, "--device", "cpu", "--format", "dicom-seg")
    assert proc.returncode == 0, proc.stderr
    (seg,) = out.glob("*.dcm")
    assert "DOE_JANE" not in seg.name and "MRN" not in seg.name  # file names never carry patient data
    ds = pydicom.dcmread(seg)
    assert ds.PatientID == PHI["PatientID"]  # to be filed with its images in a PACS, by default
    proc = run_cli("batch", tmp_path / "in", "-o", tmp_path / "b", "--device", "cpu", "--record-paths")
    row = json.loads((tmp_path / "b" / "manifest.jsonl").read_text().splitlines()[0])
    assert row["input"] == "DOE_JANE"  # only when asked for


def test_anonymize_dataset_and_helpers(monkeypatch):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = "1.2.3.4"
    monkeypatch.delenv("MEDSEG_ANON_KEY", raising=False)
    a = pseudonym("MRN7734211")
    assert a == pseudonym("MRN7734211") and a != pseudonym("MRN7734212")  # consistent within a process
    monkeypatch.setenv("MEDSEG_ANON_KEY", "k1")
    b = pseudonym("MRN7734211")
    monkeypatch.setenv("MEDSEG_ANON_KEY", "k2")
    assert pseudonym("MRN7734211") != b  # keyed: not a plain hash anyone can recompute
    anonymize_dataset(ds)
    assert ds.StudyInstanceUID == "1.2.3.4" and ds.PatientIdentityRemoved == "YES"
    assert_no_phi({"dataset": str(ds)})
    assert path_token("a/b") == path_token(Path("a") / "b") and path_token("a/b").startswith("sha256:")
    assert redact("/r/x/DOE/f.dcm: bad", {"/r/x/DOE": "T", "/r": "ROOT"}) == "T/f.dcm: bad"

