"""2D data: the folders, Pascal VOC, Cityscapes and CamVid layouts, mask reading, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medseg.core.config import DataConfig, from_dict
from medseg.seg2d import images as d2
from medseg.core.errors import DataError, GeometryError, InputNotFoundError
from medseg.seg2d.overlay import save_index_png


def _rgb(path, h=20, w=30, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _index(path, arr, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8), mode=mode).save(path)


def test_shapes_dataset_is_the_folders_layout_with_classes(tmp_path):
    root = d2.make_shapes_dataset(tmp_path / "shapes", n=6, size=64)
    data = d2.discover_images2d(DataConfig(root=str(root), val_fraction=0.34))
    assert data.layout == "folders" and len(data.train) == 4 and len(data.val) == 2
    assert data.classes == d2.SHAPE_CLASSES
    mask = d2.read_mask(data.train[0].mask, data)
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1, 2, 3} and mask.max() > 0
    assert Image.open(data.train[0].mask).mode == "P"  # a palette PNG: values are the classes
    again = d2.discover_images2d(DataConfig(root=str(root), val_fraction=0.34))
    assert [s.name for s in again.val] == [s.name for s in data.val]  # deterministic split


def test_voc_layout_is_recognised_with_palette_and_void(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    cmap = d2.voc_colormap()
    for i, stem in enumerate(["2007_000032", "2007_000033", "2007_000039"]):
        _rgb(root / "JPEGImages" / f"{stem}.jpg", seed=i)
        m = np.zeros((20, 30), np.uint8)
        m[5:10, 5:20] = 15  # person
        m[4, :] = 255  # void border
        im = Image.fromarray(m, mode="P")
        im.putpalette(cmap.reshape(-1).tolist())
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        im.save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000033\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000039\n")
    data = d2.discover_images2d(DataConfig(root=str(tmp_path / "VOCdevkit")))
    assert data.layout == "voc" and [s.name for s in data.val] == ["2007_000039"] and len(data.train) == 2
    assert len(data.classes) == 21 and data.classes[15] == "person"
    assert data.colors[15] == [192, 128, 128] and data.colors[1] == [128, 0, 0]  # VOC's palette
    mask = d2.read_mask(data.train[0].mask, data)
    assert mask[7, 10] == 15 and mask[4, 0] == 255 and mask[0, 0] == 0


def test_cityscapes_label_ids_map_to_the_19_training_classes(tmp_path):
    for split in ("train", "val"):
        stem = f"aachen_000000_00001{9 if split == 'train' else 8}"
        _rgb(tmp_path / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png")
        ids = np.zeros((20, 30), np.uint8)
        ids[:10] = 7  # road
        ids[10:15] = 26  # car
        ids[15:] = 1  # ego vehicle: not a training class
        _index(tmp_path / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", ids)
    data = d2.discover_images2d(DataConfig(root=str(tmp_path)))
    assert data.layout == "cityscapes" and len(data.train) == 1 and len(data.val) == 1
    assert len(data.classes) == 19 and data.classes[0] == "road" and data.classes[13] == "car"
    m = d2.read_mask(data.train[0].mask, data)
    assert m[0, 0] == 0 and m[12, 0] == 13 and m[19, 0] == 255


def test_camvid_segnet_and_colour_variants(tmp_path):
    a = tmp_path / "segnet"
    for split in ("train", "val"):
        _rgb(a / split / "0001TP_006690.png")
        m = np.full((20, 30), 3, np.uint8)
        m[0] = 11  # unlabelled
        _index(a / f"{split}annot" / "0001TP_006690.png", m)
    data = d2.discover_images2d(DataConfig(root=str(a)))
    assert data.layout == "camvid" and len(data.classes) == 11 and data.classes[3] == "road"
    m = d2.read_mask(data.train[0].mask, data)
    assert m[0, 0] == 255 and m[5, 5] == 3

    b = tmp_path / "kaggle"
    (b).mkdir()
    (b / "class_dict.csv").write_text("name,r,g,b\nRoad,128,64,128\nCar,64,0,128\nVoid,0,0,0\n")
    _rgb(b / "train" / "f1.png")
    colour = np.zeros((20, 30, 3), np.uint8)
    colour[:10] = (128, 64, 128)
    colour[10:15] = (64, 0, 128)
    Image.fromarray(colour).save((b / "train_labels").mkdir() or b / "train_labels" / "f1_L.png")
    data = d2.discover_images2d(DataConfig(root=str(b)))
    assert data.layout == "camvid" and data.classes == {0: "Road", 1: "Car"}
    m = d2.read_mask(data.train[0].mask, data)
    assert m[0, 0] == 0 and m[12, 0] == 1 and m[19, 0] == 255
    colour[19, 29] = (1, 2, 3)
    Image.fromarray(colour).save(b / "train_labels" / "f1_L.png")
    with pytest.raises(DataError, match=r"matches no class.*x=29, y=19"):
        d2.read_mask(data.train[0].mask, data)


def test_folders_with_colour_masks_use_the_config_colours(tmp_path):
    _rgb(tmp_path / "images" / "a.jpg")
    colour = np.zeros((20, 30, 3), np.uint8)
    colour[5:9, 5:9] = (255, 0, 0)
    Image.fromarray(colour).save((tmp_path / "masks").mkdir() or tmp_path / "masks" / "a.png")
    data = d2.discover_images2d(DataConfig(root=str(tmp_path), val_fraction=0.0), {0: [0, 0, 0], 1: [255, 0, 0]})
    m = d2.read_mask(data.train[0].mask, data)
    assert m.sum() == 16 and m[6, 6] == 1
    with pytest.raises(DataError, match="class colours"):
        d2.read_mask(data.train[0].mask, d2.discover_images2d(DataConfig(root=str(tmp_path), val_fraction=0.0)))


def test_missing_masks_and_folders_are_clear_errors(tmp_path):
    with pytest.raises(InputNotFoundError, match="dataset folder not found"):
        d2.discover_images2d(DataConfig(root=str(tmp_path / "nope")))
    _rgb(tmp_path / "images" / "a.png")
    _rgb(tmp_path / "images" / "b.png")
    _index(tmp_path / "masks" / "a.png", np.zeros((20, 30)))
    with pytest.raises(DataError, match="without a mask.*b.png"):
        d2.discover_images2d(DataConfig(root=str(tmp_path)))


def test_mask_size_and_values_are_checked_when_loading(tmp_path):
    from medseg.seg2d.train import ImagePairs

    _rgb(tmp_path / "images" / "a.png")
    _index(tmp_path / "masks" / "a.png", np.zeros((10, 30)))
    cfg = from_dict({"task": "image2d", "model": {"name": "segnet"}, "patch": {"size": [64, 64]},
                     "data": {"root": str(tmp_path), "val_fraction": 0.0}})
    data = d2.discover_images2d(cfg.data)
    with pytest.raises(GeometryError, match="sizes differ"):
        ImagePairs(data.train, data, cfg, train=False)[0]
    _index(tmp_path / "masks" / "a.png", np.full((20, 30), 7))
    with pytest.raises(DataError, match="outside the configured labels"):
        ImagePairs(data.train, data, cfg, train=False)[0]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert d2.read_image(tmp_path / "phone.jpg").shape == (30, 20, 3)


def test_augment_crops_to_patch_and_pads_with_ignore():
    from medseg.seg2d.train import augment

    cfg = from_dict({"task": "image2d", "model": {"name": "segnet"}, "patch": {"size": [64, 96]},
                     "augment": {"flip_axes": [0, 1], "scale": 0.0}})
    x, y = torch.rand(3, 40, 120), torch.ones(40, 120, dtype=torch.long)
    xa, ya = augment(x, y, cfg, 255)
    assert xa.shape == (3, 64, 96) and ya.shape == (64, 96)
    assert (ya == 255).sum() == 24 * 96 and set(ya.unique().tolist()) == {1, 255}


def test_index_png_round_trip(tmp_path):
    m = np.random.default_rng(0).integers(0, 5, (17, 23))
    save_index_png(m, tmp_path / "m.png", {1: (255, 0, 0), 2: (0, 255, 0)})
    assert np.array_equal(d2.read_mask(tmp_path / "m.png"), m)
