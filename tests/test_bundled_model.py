"""The bundled model: accuracy on cases it never saw, a stored reference prediction, and the demo."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import TEST_DATA, run_cli
from PIL import Image

from medseg.evaluation.metrics import dice
from medseg.inference.predictor import Predictor
from medseg.models.loading import bundled_models
from medseg.io import load_volume
from medseg.models.checkpoint import load_checkpoint

REFERENCES = TEST_DATA / "reference"
# the default model (one network distilled from the ensemble, flat kernels at its two finest levels), the ensemble
# (two networks, mirror TTA on) and a single network trained on the manual labels alone; the mean Dice each must
# reach on the 39 cases none saw (measured: 0.8904, 0.8912 and 0.8878)
TARGETS = {"hippocampus": 0.89, "hippocampus-ensemble": 0.89, "hippocampus-fast": 0.88}


@pytest.fixture(scope="module", params=list(TARGETS))
def predictor(request):
    return Predictor(request.param, device="cpu")


def held_out(ck: dict) -> list[str]:
    """Cases the model never trained on and its checkpoint was not chosen on: the cases its config set aside
    (``data.test_fraction``), else its validation split."""
    return ck["split"].get("test") or ck["split"].get("validation") or []


@pytest.mark.parametrize("name", list(TARGETS))
def test_bundled_model_is_small_and_complete(name):
    path = bundled_models()[name]
    assert path.stat().st_size < 8_000_000
    ck = load_checkpoint(path)
    assert ck["config"]["labels"] == {0: "background", 1: "anterior", 2: "posterior"}
    assert len(held_out(ck)) == 39 and not set(held_out(ck)) & set(ck["split"]["train"])
    assert not set(held_out(ck)) & set(ck["split"].get("validation") or [])


def _net(ck: dict) -> dict:
    """The network a checkpoint's config describes (settings added to the schema later read as unset)."""
    return {k: v for k, v in ck["config"]["model"].items() if v is not None}


def test_default_model_is_one_network_distilled_from_the_ensemble_and_all_set_aside_the_same_cases():
    default, pair, fast = (load_checkpoint(bundled_models()[n]) for n in TARGETS)
    assert not default.get("ensemble") and default["config"]["inference"]["tta"] is False
    net = _net(default)  # the fast model's network with 3x1x3 kernels at the two finest levels: a third less work
    assert net.pop("kernel_sizes") == [[3, 1, 3], [3, 1, 3], [3, 3, 3], [3, 3, 3]]
    assert net == _net(fast)
    assert default["config"]["train"]["teacher"] == "hippocampus-ensemble" and default["config"]["train"]["distill"] > 0
    assert pair["config"]["inference"]["tta"] is True and len(pair["ensemble"]) == 1
    assert pair["ensemble_models"][0]["channels"] == [24, 48, 96, 192]
    assert _net(pair) == _net(fast)  # its first member is the fast model's network
    assert held_out(default) == held_out(pair) == held_out(fast)


@pytest.mark.parametrize("case", ["hippocampus_011", "hippocampus_015"])
def test_unseen_cases(predictor, hippo_data, case):
    ck = load_checkpoint(predictor.model_path)
    assert case in held_out(ck) and case not in ck["split"]["train"]
    img = load_volume(hippo_data / "imagesTr" / f"{case}.nii.gz")
    ref = load_volume(hippo_data / "labelsTr" / f"{case}.nii.gz").array
    out = predictor.predict_volume(img)
    assert out.shape == img.shape and np.allclose(out.affine, img.affine)
    scores = [dice(out.array == c, ref == c) for c in (1, 2)]
    assert min(scores) > 0.8, scores


def test_matches_stored_reference(predictor, hippo_data):
    """End-to-end regression: today's prediction equals the one stored when the model was bundled."""
    img = load_volume(hippo_data / "imagesTr" / "hippocampus_011.nii.gz")
    out = predictor.predict_volume(img).array
    ref = load_volume(REFERENCES / f"hippocampus_011_{predictor.model_path.stem}.nii.gz")
    assert np.allclose(ref.affine, img.affine)
    agree = float((out == ref.array).mean())
    assert agree > 0.999, agree  # identical on one machine; a few boundary voxels may differ across CPUs


@pytest.mark.slow
@pytest.mark.shared_data
def test_held_out_split_reaches_target(shared_data):
    """All 39 cases the bundled models never saw: the default's mean Dice must reach the target (15 s here); the
    ensemble takes 85 s over them, so its figure is benchmarks/hippocampus.py's, and test_matches_stored_reference
    pins its labels."""
    predictor = Predictor("hippocampus", device="cpu")
    names = held_out(load_checkpoint(predictor.model_path))
    root = shared_data / "hippocampus"
    per_class = {1: [], 2: []}
    for name in names:
        img = load_volume(root / "imagesTr" / f"{name}.nii.gz")
        ref = load_volume(root / "labelsTr" / f"{name}.nii.gz").array
        out = predictor.predict_volume(img).array
        for c in per_class:
            per_class[c].append(dice(out == c, ref == c))
    means = {c: float(np.mean(v)) for c, v in per_class.items()}
    assert np.mean(list(means.values())) >= TARGETS[predictor.model_path.stem], means


def test_demo_command(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "-o", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = load_volume(out / "hippocampus_001_labels.nii.gz")
    image = load_volume(__import__("medseg.apps.demo", fromlist=["SAMPLE"]).SAMPLE)
    assert labels.shape == image.shape and np.allclose(labels.affine, image.affine)
    png = Image.open(out / "hippocampus_001_overlay.png")
    assert png.format == "PNG" and png.width > 300 and png.height > 300
    arr = np.asarray(png.convert("RGB")).astype(int)
    # the anterior (red) and posterior (blue) colours both appear in the overlay
    assert ((arr[..., 0] > arr[..., 2] + 60)).sum() > 50 and ((arr[..., 2] > arr[..., 0] + 60)).sum() > 50
    rows = list(csv.DictReader(open(out / "hippocampus_001_volumes.csv")))
    assert [r["name"] for r in rows] == ["anterior", "posterior"]
    assert all(1.0 < float(r["volume_ml"]) < 4.0 for r in rows)
    assert "anterior" in proc.stdout and "Dice vs reference" in proc.stdout
