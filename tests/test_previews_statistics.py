"""--preview and --statistics in predict and batch: a PNG per output, label statistics per case, and one table per
batch."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from conftest import FAST_MODEL, REPO, run_cli

SAMPLE = REPO / "medseg" / "assets" / "samples" / "hippocampus_001.nii.gz"


def test_label_statistics_values():
    from medseg.evaluation.statistics import label_statistics
    from medseg.io.volume import Volume

    rng = np.random.default_rng(0)
    lab = np.zeros((6, 7, 8), np.uint8)
    lab[1:3, 1:4, 2:5] = 1
    img = rng.normal(10, 2, (6, 7, 8, 2)).astype(np.float32)
    aff = np.diag([0.5, 1.0, 2.0, 1.0])
    rows = label_statistics(Volume(img, aff), Volume(lab, aff), {0: "bg", 1: "a", 2: "b"}, ["t1", "flair"])
    assert [(r["label"], r["sequence"]) for r in rows] == [(1, "t1"), (1, "flair"), (2, "t1"), (2, "flair")]
    a_flair = img[..., 1][lab == 1]
    assert rows[1]["voxels"] == 18 and rows[1]["volume_ml"] == pytest.approx(18 * 1.0e-3)
    assert rows[1]["mean"] == pytest.approx(a_flair.mean(), rel=1e-6)
    assert rows[1]["p50"] == pytest.approx(np.median(a_flair), rel=1e-6)
    assert rows[1]["std"] == pytest.approx(a_flair.std(), rel=1e-5)
    assert rows[2]["voxels"] == 0 and rows[2]["mean"] is None  # an absent label keeps its row


def test_predict_writes_preview_and_statistics(tmp_path):
    from PIL import Image

    from medseg.io.volume import load_volume

    proc = run_cli("predict", str(SAMPLE), "-o", str(tmp_path / "out"), *FAST_MODEL, "--preview", "--statistics")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    png = Image.open(out / "hippocampus_001.preview.png")
    assert png.size[0] > 300 and png.mode == "RGB"
    assert len(np.unique(np.asarray(png).reshape(-1, 3), axis=0)) > 20  # an image, not a blank
    doc = json.loads((out / "hippocampus_001.statistics.json").read_text())
    labels = load_volume(out / "hippocampus_001.nii.gz").array
    image = load_volume(SAMPLE).array
    for row in doc["rows"]:
        mask = labels == row["label"]
        assert row["voxels"] == int(mask.sum()) > 0
        assert row["mean"] == pytest.approx(float(image[mask].mean()), rel=1e-5)
    with open(out / "hippocampus_001.statistics.csv") as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == ["anterior", "posterior"]


@pytest.mark.slow
def test_batch_statistics_table_and_resume(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(SAMPLE, root / "a.nii.gz")
    shutil.copy(SAMPLE, root / "b.nii.gz")
    out = tmp_path / "out"
    proc = run_cli("batch", str(root), "-o", str(out), *FAST_MODEL, "--statistics", "--record-paths")
    assert proc.returncode == 0, proc.stderr
    with open(out / "statistics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted({r["case"] for r in rows}) == ["a.nii.gz", "b.nii.gz"] and len(rows) == 4
    # asked again with previews: the finished cases lack them, so they run again; nothing else is lost
    proc = run_cli("batch", str(root), "-o", str(out), *FAST_MODEL, "--statistics", "--preview", "--record-paths")
    assert proc.returncode == 0, proc.stderr
    assert "done 2" in proc.stdout
    assert (out / "a.preview.png").is_file() and (out / "b.statistics.json").is_file()
    proc = run_cli("batch", str(root), "-o", str(out), *FAST_MODEL, "--statistics", "--preview", "--record-paths")
    assert "already done 2" in proc.stdout
    with open(out / "statistics.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
