"""``medseg batch --engine ray`` on a local Ray cluster: same outputs and manifest as the local engine."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from conftest import TEST_DATA, assert_clean_error, run_cli

from medseg.apps.batch import run_batch
from medseg.core.errors import ConfigError, MissingDependencyError
from medseg.io import load_volume

HIPPO = TEST_DATA / "hippocampus" / "imagesTr"


def _archive(root):
    for sub, names in (("a", ("hippocampus_003", "hippocampus_004")), ("b", ("hippocampus_007", "hippocampus_011"))):
        (root / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(HIPPO / f"{n}.nii.gz", root / sub / f"{n}.nii.gz")
    (root / "b" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return root


def _rows(path):
    return {r["key"]: r for r in (json.loads(x) for x in path.read_text().splitlines())}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_batch_equals_local_batch_and_resumes(tmp_path, ray_cluster):
    root = _archive(tmp_path / "in")
    local = run_batch(root, tmp_path / "local", model="hippocampus", device="cpu", progress=False)
    res = run_batch(root, tmp_path / "ray", model="hippocampus", device="cpu", progress=False, engine="ray", workers=2,
                    runtime={"threads": 1})
    assert (res.done, res.failed) == (local.done, local.failed) == (4, 1)
    lrows, rrows = _rows(tmp_path / "local" / "manifest.jsonl"), _rows(tmp_path / "ray" / "manifest.jsonl")
    assert set(lrows) == set(rrows)
    for key, row in rrows.items():
        assert row["status"] == lrows[key]["status"]
        if row["status"] == "done":
            assert row["outputs"] == lrows[key]["outputs"] and row["input_hash"] == lrows[key]["input_hash"]
            a = load_volume(tmp_path / "local" / row["output"])
            b = load_volume(tmp_path / "ray" / row["output"])
            np.testing.assert_array_equal(a.array, b.array)
            assert np.allclose(a.affine, b.affine)
        else:
            assert "cannot read" in row["reason"] and str(root) not in row["reason"]
    assert (tmp_path / "ray" / "labels.ctbl").is_file()
    again = run_batch(root, tmp_path / "ray", model="hippocampus", device="cpu", progress=False, engine="ray",
                      workers=2, retry_failed=False)
    assert (again.done, again.already_done) == (0, 5)


def test_ray_engine_from_the_cli_with_a_bad_model_is_a_clean_error(tmp_path):
    root = _archive(tmp_path / "in")
    proc = run_cli("batch", root, "-o", tmp_path / "out", "--engine", "ray", "--model", "hipocampus")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown model 'hipocampus'")
    assert_clean_error(run_cli("batch", root, "-o", tmp_path / "out", "--engine", "spark"), "unknown batch engine")


def test_missing_ray_and_unknown_engine_are_clear_errors(tmp_path, monkeypatch):
    from medseg.apps.ray_engine import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match="pip install 'medseg\\[ray\\]'"):
        import_ray()
    root = _archive(tmp_path / "in")
    with pytest.raises(MissingDependencyError, match="Ray is not installed"):
        run_batch(root, tmp_path / "out", device="cpu", progress=False, engine="ray")
    with pytest.raises(ConfigError, match="unknown batch engine"):
        run_batch(root, tmp_path / "out2", device="cpu", progress=False, engine="spark")
