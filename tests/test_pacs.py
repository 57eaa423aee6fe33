"""A real PACS round trip: Orthanc with its DICOMweb plugin on localhost, started by these tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_DATA, assert_clean_error, run_cli

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "medseg-test", "pw-Z7q!never-printed"
HCROP = TEST_DATA / "dicom" / "hcrop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if not (os.access(ORTHANC, os.X_OK) and PLUGIN.is_file()):
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    import requests

    work = tmp_path_factory.mktemp("orthanc")
    http = _free_port()
    config = {"Name": "medseg-test", "HttpPort": http, "DicomPort": _free_port(), "DicomServerEnabled": False,
              "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
              "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (work / "orthanc.json").write_text(json.dumps(config))
    log = open(work / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http}"
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    deadline = time.time() + 60
    while True:
        try:
            if session.get(f"{base}/system", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"Orthanc did not start: {(work / 'orthanc.log').read_text()[-2000:]}")
        time.sleep(0.2)
    for f in sorted(HCROP.glob("*.dcm")):
        r = session.post(f"{base}/instances", data=f.read_bytes(), timeout=30)
        r.raise_for_status()
    yield {"base": base, "url": f"{base}/dicom-web", "session": session}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _env():
    return {"MEDSEG_DICOMWEB_USER": USER, "MEDSEG_DICOMWEB_PASSWORD": PASSWORD}


def _study_series(orthanc):
    import pydicom

    ds = pydicom.dcmread(sorted(HCROP.glob("*.dcm"))[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _seg_series(orthanc, study):
    r = orthanc["session"].get(f"{orthanc['url']}/studies/{study}/series", params={"Modality": "SEG"}, timeout=30)
    r.raise_for_status()
    return r.json() if r.content else []


def run_with_env(*args, env):
    os.environ.update(env)
    try:
        return run_cli(*args)
    finally:
        for k in env:
            os.environ.pop(k, None)


@pytest.mark.slow
def test_pacs_predict_round_trip(orthanc, tmp_path):
    from medseg.inference.predictor import Predictor
    from medseg.io.dicom import load_dicom_series
    from medseg.io.dicom_seg import read_dicom_seg

    study, series = _study_series(orthanc)
    proc = run_with_env("pacs", "predict", "--url", orthanc["url"], "--study", study, "--series", series,
                        "--device", "cpu", "-o", tmp_path / "kept", env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert PASSWORD not in proc.stdout + proc.stderr
    [seg_series] = _seg_series(orthanc, study)
    seg_uid = seg_series["0020000E"]["Value"][0]
    # pull the stored SEG back over WADO-RS and compare with a local prediction on the same series
    from medseg.apps.pacs import Credentials, DicomWeb

    web = DicomWeb(orthanc["url"], Credentials(USER, PASSWORD))
    [seg_file] = web.download_series(study, seg_uid, tmp_path / "seg")
    files = sorted(HCROP.glob("*.dcm"))
    from medseg.io.dicom import scan_dicom

    [info] = scan_dicom(HCROP)
    labels, meta = read_dicom_seg(seg_file, list(info.files))
    expected = Predictor(device="cpu").predict_volume(load_dicom_series(HCROP)).array
    assert np.array_equal(labels, expected)
    assert len(files) == 40


def test_pacs_predict_stores_rtstruct(orthanc, tmp_path):
    study, series = _study_series(orthanc)
    proc = run_with_env("pacs", "predict", "--url", orthanc["url"], "--study", study, "--series", series,
                        "--device", "cpu", "--model", "hippocampus-fast", "--format", "rtstruct", env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = orthanc["session"].get(f"{orthanc['url']}/studies/{study}/series", params={"Modality": "RTSTRUCT"},
                               timeout=30)
    r.raise_for_status()
    assert len(r.json()) == 1


@pytest.mark.slow
def test_batch_from_dicomweb_stores_once(orthanc, tmp_path):
    study, _ = _study_series(orthanc)
    before = len(_seg_series(orthanc, study))
    out = tmp_path / "out"
    args = ("batch", "--from-dicomweb", orthanc["url"], "--query", "ModalitiesInStudy=MR", "-o", out,
            "--device", "cpu", "--rules", Path(__file__).resolve().parent.parent / "configs" / "rules" / "hippocampus_crop.yaml")
    first = run_with_env(*args, env=_env())
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    done = [r for r in rows if r["status"] == "done"]
    assert len(done) == 1 and done[0]["stored"] is True
    assert any(o.endswith(".dcm") for o in done[0]["outputs"])
    assert len(_seg_series(orthanc, study)) == before + 1
    again = run_with_env(*args, env=_env())
    assert again.returncode == 0 and "already done 1" in again.stdout
    assert len(_seg_series(orthanc, study)) == before + 1  # nothing stored twice


def test_pacs_errors_are_clear(orthanc, tmp_path):
    study, series = _study_series(orthanc)
    no_creds = run_cli("pacs", "predict", "--url", orthanc["url"], "--study", study, "--device", "cpu")
    assert_clean_error(no_creds, "HTTP 401", "MEDSEG_DICOMWEB_USER")
    url_creds = orthanc["url"].replace("http://", f"http://{USER}:{PASSWORD}@")
    proc = run_cli("pacs", "predict", "--url", url_creds, "--study", study)
    assert_clean_error(proc, "credentials in the URL are not accepted")
    assert PASSWORD not in proc.stdout + proc.stderr
    dead = run_with_env("pacs", "list", "--url", f"http://127.0.0.1:{_free_port()}/dicom-web", env=_env())
    assert_clean_error(dead, "cannot reach the DICOMweb server")
    cred_file = tmp_path / "c.json"
    cred_file.write_text(json.dumps({"username": USER, "password": PASSWORD}))
    listing = run_cli("pacs", "list", "--url", orthanc["url"], "--credentials", cred_file)
    assert listing.returncode == 0 and study in "".join(listing.stdout.split())
    assert PASSWORD not in listing.stdout + listing.stderr
