"""A short real run on hippocampus MRI: train -> resume -> predict -> evaluate, all through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, run_cli


@pytest.mark.slow
def test_train_resume_predict_evaluate(tmp_path, hippo_data):
    run = tmp_path / "run"
    common = ["--set", f"data.root={hippo_data}", "--set", f"train.output_dir={run}", "--set", "data.val_fraction=0.34",
              "--set", "patch.size=[32, 32, 32]", "--set", "model.channels=[8, 16, 32]", "--set", "model.strides=[2, 2]",
              "--set", "train.batch_size=2", "--set", "patch.samples_per_volume=2", "--set", "train.val_every=4",
              "--set", "train.lr=0.01"]
    first = run_cli("train", REPO / "configs" / "hippocampus.yaml", *common, "--set", "train.epochs=4")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["validation"]) == ["hippocampus_007", "hippocampus_008"]  # deterministic for seed 0

    second = run_cli("train", REPO / "configs" / "hippocampus.yaml", *common, "--set", "train.epochs=8", "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming at epoch 5 of 8" in second.stderr
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert history[-1]["loss"] < history[0]["loss"]

    val_images = tmp_path / "val_images"
    val_labels = tmp_path / "val_labels"
    val_images.mkdir()
    val_labels.mkdir()
    for name in split["validation"]:
        (val_images / f"{name}.nii.gz").write_bytes((hippo_data / "imagesTr" / f"{name}.nii.gz").read_bytes())
        (val_labels / f"{name}.nii.gz").write_bytes((hippo_data / "labelsTr" / f"{name}.nii.gz").read_bytes())
    pred = run_cli("predict", val_images, "-o", tmp_path / "pred", "--model", run / "best.pt", "--device", "cpu")
    assert pred.returncode == 0, pred.stderr[-2000:]
    for name in split["validation"]:
        a = sitk.ReadImage(str(val_images / f"{name}.nii.gz"))
        b = sitk.ReadImage(str(tmp_path / "pred" / f"{name}.nii.gz"))
        assert a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin())
        assert np.allclose(a.GetDirection(), b.GetDirection()) and np.allclose(a.GetSpacing(), b.GetSpacing())

    ev = run_cli("evaluate", tmp_path / "pred", val_labels, "--json", tmp_path / "scores.json",
                 "--config", run / "best.pt")
    assert ev.returncode == 0, ev.stderr[-2000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["mean"]) == {"anterior", "posterior"}
    assert len(scores["cases"]) == 2
    assert 0.0 <= scores["mean_dice"] <= 1.0
