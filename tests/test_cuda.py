"""CUDA paths: run only where a GPU is present (skipped elsewhere, e.g. in CPU-only CI)."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, run_cli

from medseg.core.runtime import resolve_device
from medseg.inference.predictor import Predictor
from medseg.io import load_volume

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_device_is_cuda():
    assert resolve_device("auto").type == "cuda"


def test_cuda_amp_prediction_matches_cpu(hippo_data):
    vol = load_volume(hippo_data / "imagesTr" / "hippocampus_011.nii.gz")
    cpu = Predictor(device="cpu").predict_volume(vol).array
    gpu = Predictor(device="cuda", amp=True).predict_volume(vol).array
    for c in (1, 2):
        a, b = cpu == c, gpu == c
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.99


def test_cuda_training_with_amp(tmp_path, hippo_data):
    proc = run_cli("train", REPO / "configs" / "hippocampus.yaml", "--set", f"data.root={hippo_data}",
                   "--set", f"train.output_dir={tmp_path}/run", "--set", "train.epochs=2", "--set", "train.val_every=1",
                   "--set", "data.val_fraction=0.34", "--set", "train.device=cuda")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "device cuda" in proc.stderr
