"""medseg off the beaten path: folder names with spaces and non-ASCII letters, no ``fcntl``
(Windows), the PACS extra not installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import FAST_MODEL, REPO, assert_clean_error, run_cli

from medseg.apps.batch import _Lock
from medseg.core.errors import MissingDependencyError, OutputError

SAMPLE = REPO / "medseg" / "assets" / "samples" / "hippocampus_001.nii.gz"
ODD = "Patient Ölçüm 患者 01"


def _check_label_volume(out: Path, ref: Path) -> None:
    assert out.is_file(), out
    got, src = nib.load(out), nib.load(ref)
    assert got.shape == src.shape
    np.testing.assert_allclose(got.affine, src.affine, atol=1e-4)


def test_predict_and_batch_in_folders_with_spaces_and_non_ascii_names(tmp_path):
    src_dir = tmp_path / ODD
    src_dir.mkdir()
    src = src_dir / "hippocampus_001.nii.gz"
    shutil.copy(SAMPLE, src)

    out = tmp_path / "Ergebnis Ölçüm 結果 01"
    proc = run_cli("predict", src, "-o", out, *FAST_MODEL, "--device", "cpu", timeout=600)
    assert proc.returncode == 0, proc.stderr
    _check_label_volume(out / "hippocampus_001.nii.gz", src)

    bout = tmp_path / "Stapel Ölçüm 批处理 01"
    proc = run_cli("batch", src_dir, "-o", bout, *FAST_MODEL, "--device", "cpu", timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (bout / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1 and rows[0]["status"] == "done", rows
    _check_label_volume(bout / rows[0]["output"], src)
    assert (bout / ".manifest.jsonl.lock").exists()  # the lock file keeps its name


NO_FCNTL = textwrap.dedent("""
    import sys

    class RefuseFcntl:  # as on Windows: there is no fcntl module
        def find_spec(self, name, path=None, target=None):
            if name == "fcntl":
                raise ModuleNotFoundError("No module named 'fcntl'", name="fcntl")
            return None

    sys.modules.pop("fcntl", None)
    sys.meta_path.insert(0, RefuseFcntl())

    from pathlib import Path

    import medseg.apps.batch as batch
    from medseg.core.errors import OutputError

    assert "fcntl" not in sys.modules
    folder = Path(sys.argv[1])
    batch._fsync_dir(folder)
    with batch._Lock(folder / ".manifest.jsonl.lock"):
        try:
            with batch._Lock(folder / ".manifest.jsonl.lock"):
                raise SystemExit("a second lock on the same folder was granted")
        except OutputError as exc:
            assert "another medseg batch is writing to this output folder" in str(exc), exc
    with batch._Lock(folder / ".manifest.jsonl.lock"):  # released: free again
        pass
    assert "fcntl" not in sys.modules
    print("ok")
""")


def test_batch_imports_and_locks_without_fcntl(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", NO_FCNTL, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.stdout, proc.stderr)


def test_second_lock_on_one_folder_is_refused(tmp_path):
    lock = tmp_path / ".manifest.jsonl.lock"
    with _Lock(lock):
        with pytest.raises(OutputError) as err:
            with _Lock(lock):
                pass
        assert "another medseg batch is writing to this output folder" in str(err.value)
        assert str(tmp_path) in str(err.value)
    with _Lock(lock):  # released on exit
        pass


def test_second_batch_process_is_refused_at_once(tmp_path):
    """A lock held by this process refuses a batch started in another one, without waiting."""
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    shutil.copy(SAMPLE, src_dir / "hippocampus_001.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    with _Lock(out / ".manifest.jsonl.lock"):
        proc = run_cli("batch", src_dir, "-o", out, *FAST_MODEL, "--device", "cpu", timeout=300)
    assert_clean_error(proc, "another medseg batch is writing to this output folder")
    assert not (out / "manifest.jsonl").exists()


def test_pacs_without_its_extra_is_one_clear_line(monkeypatch, tmp_path):
    from medseg.apps import pacs

    monkeypatch.setitem(sys.modules, "dicomweb_client", None)  # "import dicomweb_client" now fails
    with pytest.raises(MissingDependencyError) as err:
        pacs.DicomWeb("http://127.0.0.1:9/dicom-web")
    msg = str(err.value)
    assert "\n" not in msg and 'pip install "medseg[pacs]"' in msg and "dicomweb_client" in msg, msg
    with pytest.raises(MissingDependencyError):
        pacs.download_studies("http://127.0.0.1:9/dicom-web", {}, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_pacs_cli_without_its_extra_is_one_clear_line():
    code = ("import sys; sys.modules['dicomweb_client'] = None; sys.argv = ['medseg', *sys.argv[1:]]; "
            "from medseg.cli import main; main()")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", code, "pacs", "list", "--url", "http://127.0.0.1:9/dicom-web"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert_clean_error(proc, "PACS (DICOMweb) support is not installed", 'pip install "medseg[pacs]"')
