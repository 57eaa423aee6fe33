"""Train every 2D model for a few steps, predict PNG/JPEG images, overlays, IoU, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_clean_error, run_cli
from PIL import Image
from test_models2d import SMALL

from medseg.core.config import from_dict
from medseg.seg2d.images import make_shapes_dataset, read_mask
from medseg.seg2d.evaluation import (
    confusion_matrix,
    evaluate_masks,
    iou_per_class,
    mean_iou,
)
from medseg.seg2d.predict import ImagePredictor, predict_images
from medseg.models.checkpoint import load_checkpoint
from medseg.seg2d.train import train_2d


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", n=8, size=64)


def config(root, out, name, **train):
    return from_dict({"task": "image2d", "name": "t", "data": {"root": str(root), "val_fraction": 0.25},
                      "patch": {"size": [64, 64]}, "model": {"name": name, **SMALL[name]},
                      "augment": {"flip_axes": [1]},
                      "train": {"epochs": 2, "batch_size": 3, "val_every": 1, "output_dir": str(out), "threads": 2,
                                "lr": 0.003, **train}})


HEAVY = ("fcn_resnet", "flexunet2d", "deeplabv3plus_mobilenetv3")  # 5-12 M parameters: over 20 s on 2 busy cores


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in sorted(SMALL)])
def test_each_model_trains_and_predicts(shapes, tmp_path, name):
    res = train_2d(config(shapes, tmp_path / "run", name), progress=False, log=lambda m: None)
    assert res.best_checkpoint.is_file() and res.epochs_run == 2
    ck = load_checkpoint(res.best_checkpoint)
    assert ck["config"]["task"] == "image2d" and ck["config"]["labels"] == {0: "background", 1: "disc",
                                                                           2: "square", 3: "triangle"}
    assert set(ck["val_iou"]) == {"background", "disc", "square", "triangle"}
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)
    # predict from the checkpoint alone, on an odd-sized JPEG too
    img = np.asarray(Image.open(shapes / "images" / "shape_000.png"))[:61, :50]
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "odd.jpg", quality=95)
    out = predict_images([tmp_path / "in" / "odd.jpg", shapes / "images" / "shape_001.png"], tmp_path / "pred",
                         model=res.best_checkpoint, device="cpu", progress=False)
    assert [r.input.name for r in out] == ["odd.jpg", "shape_001.png"]
    mask = read_mask(tmp_path / "pred" / "odd.png")
    assert mask.shape == (61, 50) and mask.max() <= 3
    assert Image.open(tmp_path / "pred" / "odd.png").mode == "P"
    assert (tmp_path / "pred" / "overlays" / "shape_001.png").is_file()


@pytest.mark.slow
def test_segnet_learns_the_shapes(shapes, tmp_path):
    cfg = config(shapes, tmp_path / "run", "segnet", epochs=25, val_every=25)
    cfg.model.channels = [16, 32, 64]
    res = train_2d(cfg, progress=False, log=lambda m: None)
    out = predict_images([shapes / "images"], tmp_path / "pred", model=res.best_checkpoint, device="cpu",
                         progress=False)
    assert len(out) == 8
    ev = evaluate_masks(tmp_path / "pred", shapes / "masks", names=cfg.labels)
    assert ev.iou[0] > 0.8 and ev.mean_iou > 0.4, ev.iou  # background and most shapes found after 25 short epochs


def test_resume_continues_from_last(shapes, tmp_path):
    cfg = config(shapes, tmp_path / "run", "unet2d", epochs=1)
    train_2d(cfg, progress=False, log=lambda m: None)
    cfg.train.epochs = 2
    res = train_2d(cfg, resume=True, progress=False, log=lambda m: None)
    assert res.epochs_run == 1 and [h["epoch"] for h in res.history] == [1, 2]


def test_iou_from_confusion_matrix():
    ref = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [2, 0, 2, 2]])
    cm = confusion_matrix(pred, ref, 3)
    assert cm.sum() == 10  # the two ignored pixels are left out
    iou = iou_per_class(cm)
    assert iou[0] == pytest.approx(3 / 5) and iou[1] == pytest.approx(4 / 5) and iou[2] == pytest.approx(1 / 2)
    assert mean_iou(cm) == pytest.approx((3 / 5 + 4 / 5 + 1 / 2) / 3)
    assert np.isnan(iou_per_class(confusion_matrix(pred, ref, 4))[3])  # absent everywhere: NaN, not 0


def test_overlay_colours_blend_and_legend(tmp_path):
    from medseg.seg2d.overlay import overlay

    rgb = np.full((300, 400, 3), 100, np.uint8)
    mask = np.zeros((300, 400), np.int64)
    mask[50:150, 50:250] = 1
    img = np.asarray(overlay(rgb, mask, {0: "background", 1: "car"}, {1: [255, 0, 0]}, alpha=0.5))
    assert img.shape[1] == 400 and img.shape[0] > 300  # legend below
    assert tuple(img[10, 10]) == (100, 100, 100)  # background untouched
    assert tuple(img[100, 100]) == (177, 50, 50)  # 0.5 * 100 + 0.5 * (255, 0, 0)
    assert tuple(img[50, 100]) == (255, 0, 0)  # border drawn opaque
    small = overlay(rgb[:32, :48], mask[:32, :48], {0: "background", 1: "car"})
    assert small.width >= 48 * 8  # small images are enlarged to be seen


@pytest.mark.slow
def test_cli_train_predict_evaluate(shapes, tmp_path):
    proc = run_cli("train", "configs/shapes_2d.yaml", "--set", f"data.root={shapes}", "--set", "train.epochs=2",
                   "--set", "train.val_every=1", "--set", f"train.output_dir={tmp_path / 'run'}",
                   "--set", "model.channels=[8,16]")
    assert proc.returncode == 0, proc.stderr
    assert "best mean validation IoU" in proc.stdout
    model = tmp_path / "run" / "best.pt"
    proc = run_cli("predict", shapes / "images", "-o", tmp_path / "pred", "--model", model, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "pred").glob("*.png"))) == 8
    proc = run_cli("evaluate", tmp_path / "pred", shapes / "masks", "--config", model, "--json", tmp_path / "iou.json")
    assert proc.returncode == 0, proc.stderr
    assert "mean IoU" in proc.stdout and "triangle" in proc.stdout
    doc = json.loads((tmp_path / "iou.json").read_text())
    assert set(doc["iou"]) == {"background", "disc", "square", "triangle"} and doc["images"] == 8
    # never into an input folder; images need a 2D model
    bad = run_cli("predict", shapes / "images", "-o", shapes / "images", "--model", model)
    assert_clean_error(bad, "output folder is an input folder")
    bad = run_cli("predict", shapes / "images" / "shape_000.png", "-o", tmp_path / "x")
    assert_clean_error(bad, "PNG/JPEG images need a 2D image model")


def test_predictor_keeps_the_image_size(shapes, tmp_path):
    res = train_2d(config(shapes, tmp_path / "run", "segnet", epochs=1), progress=False, log=lambda m: None)
    pred = ImagePredictor(res.best_checkpoint, device="cpu")
    for h, w in [(1, 1), (33, 65), (100, 31)]:
        assert pred.predict_array(np.zeros((h, w, 3), np.uint8)).shape == (h, w)
