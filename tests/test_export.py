"""``medseg export`` and the onnxruntime / torchscript backends: same labels as torch, self-contained files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import FAST_MODEL, TEST_DATA, assert_clean_error, run_cli, write_checkpoint

from medseg.core.errors import CheckpointError, ConfigError
from medseg.models.loading import read_export_metadata
from medseg.inference.export import export_model
from medseg.inference.predictor import Predictor
from medseg.io import Volume, load_volume

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

HIPPO = TEST_DATA / "hippocampus" / "imagesTr"


def dice_per_class(a: np.ndarray, b: np.ndarray, classes) -> list[float]:
    out = []
    for c in classes:
        x, y = a == c, b == c
        denom = x.sum() + y.sum()
        out.append(1.0 if denom == 0 else 2.0 * (x & y).sum() / denom)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    onnx_path = export_model("hippocampus", folder / "hippocampus.onnx", "onnx")
    ts_path = export_model("hippocampus", folder / "hippocampus.ts", "torchscript")
    return onnx_path, ts_path


@pytest.mark.slow
def test_exported_models_give_the_torch_labels(exported):
    onnx_path, ts_path = exported
    torch_pred = Predictor("hippocampus", device="cpu", amp=False)  # fp32, as the exported files run
    ort_pred = Predictor(onnx_path, device="cpu")
    ts_pred = Predictor(ts_path, device="cpu", amp=False)
    assert (torch_pred.backend, ort_pred.backend, ts_pred.backend) == ("torch", "onnxruntime", "torchscript")
    for f in sorted(HIPPO.glob("*.nii.gz")):
        vol = load_volume(f)
        ref = torch_pred.predict_volume(vol).array
        for other in (ort_pred, ts_pred):
            got = other.predict_volume(vol)
            assert got.shape == vol.shape and np.allclose(got.affine, vol.affine)
            assert min(dice_per_class(ref, got.array, (1, 2))) >= 0.999, (f.name, other.backend)


def test_exported_file_carries_the_config_and_predicts_alone(exported, tmp_path):
    onnx_path, ts_path = exported
    for path in exported:
        meta = read_export_metadata(path)
        assert meta["config"]["labels"] == {0: "background", 1: "anterior", 2: "posterior"} or \
            {int(k): v for k, v in meta["config"]["labels"].items()} == {0: "background", 1: "anterior", 2: "posterior"}
        assert meta["config"]["preprocess"]["spacing"] == [1.0, 1.0, 1.0]
        assert meta["groups"] == 1  # the default model is one network (ensembles: test_ensemble_exports_every_member)
    alone = tmp_path / "elsewhere" / "model.onnx"
    alone.parent.mkdir()
    shutil.copy(onnx_path, alone)  # nothing else next to it
    out = tmp_path / "out"
    proc = run_cli("predict", HIPPO / "hippocampus_011.nii.gz", "-o", out, "--model", alone)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lab = load_volume(out / "hippocampus_011.nii.gz")
    assert set(np.unique(lab.array)) == {0, 1, 2}
    assert (out / "labels.ctbl").is_file()  # label names came from the ONNX metadata


@pytest.mark.slow
def test_cli_export_and_backend_flag_with_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    proc = run_cli("export", "hippocampus-fast", "-o", tmp_path / "h.onnx")  # the pair: test_ensemble_exports_every_member
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "h.onnx").stat().st_size > 1_000_000
    # --backend onnxruntime with the .pt: exported once into the cache, then reused
    for run in ("a", "b"):
        proc = run_cli("predict", HIPPO / "hippocampus_015.nii.gz", "-o", tmp_path / run, "--backend", "onnxruntime",
                       "--device", "cpu", *FAST_MODEL)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "cache" / "exports").glob("*.onnx"))) == 1
    a = load_volume(tmp_path / "a" / "hippocampus_015.nii.gz").array
    b = Predictor("hippocampus-fast", device="cpu").predict_volume(load_volume(HIPPO / "hippocampus_015.nii.gz")).array
    assert min(dice_per_class(a, b, (1, 2))) >= 0.999
    assert_clean_error(run_cli("predict", HIPPO / "hippocampus_015.nii.gz", "-o", tmp_path / "c", "--backend", "tensorrt"),
                       "unknown inference backend")
    assert_clean_error(run_cli("export", "hippocampus-fast", "-o", tmp_path / "h.onnx", "--format", "torchscript"),
                       "wrong suffix")


def test_backend_mismatch_and_foreign_files_are_refused(exported, tmp_path):
    onnx_path, _ = exported
    with pytest.raises(ConfigError, match="onnxruntime backend"):
        Predictor(onnx_path, device="cpu", backend="torch")
    import onnx

    model = onnx.load(str(onnx_path))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(CheckpointError, match="no medseg config"):
        Predictor(foreign, device="cpu")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError):
        Predictor(junk, device="cpu")


def test_ensemble_exports_every_member(tmp_path):
    from medseg.models.checkpoint import pack, state_digest

    cks = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ck = write_checkpoint(tmp_path / f"f{seed}.pt", spacing=[1.0, 1.0, 1.0])
        payload = torch.load(ck, weights_only=True)
        payload["state_dict"] = {k: v + 0.05 * seed * torch.randn_like(v) if v.is_floating_point() else v
                                 for k, v in payload["state_dict"].items()}
        payload["sha256"] = state_digest(payload["state_dict"])
        torch.save(payload, ck)
        cks.append(ck)
    packed = pack(cks, tmp_path / "ens.pt")
    onnx_path = export_model(packed, tmp_path / "ens.onnx", "onnx")
    assert read_export_metadata(onnx_path)["groups"] == 2
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(100, 30, (22, 20, 18)).astype(np.float32), np.diag([0.9, 1.1, 1.3, 1.0]))
    p_torch = Predictor(packed, device="cpu", amp=False).probabilities(vol)
    p_onnx = Predictor(onnx_path, device="cpu").probabilities(vol)
    assert torch.allclose(p_torch, p_onnx, atol=1e-4)
    assert torch.allclose(p_onnx.sum(0), torch.ones_like(p_onnx[0]), atol=1e-4)


def test_batch_runs_with_the_onnx_backend(tmp_path, exported):
    from medseg.apps.batch import run_batch

    root = tmp_path / "in"
    root.mkdir()
    for name in ("hippocampus_003", "hippocampus_007"):
        shutil.copy(HIPPO / f"{name}.nii.gz", root)
    res = run_batch(root, tmp_path / "out", model=str(exported[0]), device="cpu", progress=False,
                    runtime={"backend": "onnxruntime", "threads": 1})
    assert res.done == 2 and res.failed == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert all(r["status"] == "done" for r in rows)
