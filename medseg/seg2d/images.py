"""2D image data: image folders with mask PNGs, and the Pascal VOC, Cityscapes and CamVid layouts.

A dataset is a folder. :func:`discover_images2d` recognises its layout from the folder
structure (``layout: auto``) and returns the image/mask pairs split into training and
validation, the class names and colours of known datasets, and how to turn a mask file
into class indices:

- ``folders``: ``images/`` and ``masks/`` (names set by ``data.images``/``data.masks``), paired
  by file stem; masks are palette PNGs (the pixel values are the indices), grey index PNGs, or
  RGB colour PNGs matched exactly against the class colours. A ``classes.json`` beside them
  (written by ``medseg import-annotations``) names the classes. Split by ``data.val_fraction``.
- ``voc``: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs, 255 = void) and the
  ``ImageSets/Segmentation/{train,val}.txt`` split; 21 classes.
- ``cityscapes``: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` with
  ``gtFine/.../*_gtFine_labelTrainIds.png`` (or ``*_labelIds.png``, mapped to the 19 training
  classes); other ids are void.
- ``camvid``: ``train/``, ``val/`` with ``trainannot/``, ``valannot/`` (SegNet's 11-class index
  masks, 11 = void) or ``train_labels/``, ``val_labels/`` with ``class_dict.csv`` (colour masks).

Images are read as RGB after applying the EXIF orientation (as annotation tools show them).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.core.errors import (
    ConfigError,
    DataError,
    InputNotFoundError,
    UnreadableFileError,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: per-channel mean and std of RGB values in [0, 1] (ImageNet's), so ImageNet-trained encoders fit
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


# ---------------------------------------------------------------------------
# class tables of known datasets


def voc_colormap(n: int = 256) -> np.ndarray:
    """Pascal VOC's palette: bits of the index spread over R, G, B from the high bit down."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
#: Cityscapes training classes: (label id, name, colour); train id = position
CITYSCAPES = [(7, "road", (128, 64, 128)), (8, "sidewalk", (244, 35, 232)), (11, "building", (70, 70, 70)),
              (12, "wall", (102, 102, 156)), (13, "fence", (190, 153, 153)), (17, "pole", (153, 153, 153)),
              (19, "traffic light", (250, 170, 30)), (20, "traffic sign", (220, 220, 0)),
              (21, "vegetation", (107, 142, 35)), (22, "terrain", (152, 251, 152)), (23, "sky", (70, 130, 180)),
              (24, "person", (220, 20, 60)), (25, "rider", (255, 0, 0)), (26, "car", (0, 0, 142)),
              (27, "truck", (0, 0, 70)), (28, "bus", (0, 60, 100)), (31, "train", (0, 80, 100)),
              (32, "motorcycle", (0, 0, 230)), (33, "bicycle", (119, 11, 32))]
#: SegNet's CamVid (11 classes, index 11 = void)
CAMVID11 = [("sky", (128, 128, 128)), ("building", (128, 0, 0)), ("pole", (192, 192, 128)), ("road", (128, 64, 128)),
            ("pavement", (60, 40, 222)), ("tree", (128, 128, 0)), ("sign", (192, 128, 128)), ("fence", (64, 64, 128)),
            ("car", (64, 0, 128)), ("pedestrian", (64, 64, 0)), ("bicyclist", (0, 128, 192))]


@dataclass
class Sample:
    name: str
    image: Path
    mask: Path | None = None


@dataclass
class Image2DData:
    """A recognised 2D dataset: pairs, split, and how mask files map to class indices."""

    root: Path
    layout: str
    train: list[Sample]
    val: list[Sample]
    classes: dict[int, str] | None = None
    colors: dict[int, list[int]] | None = None
    lut: np.ndarray | None = None
    """256-entry table from mask values to class indices (void -> ignore), for index masks."""
    color_to_class: dict[tuple[int, int, int], int] = field(default_factory=dict)
    """For RGB colour masks: colour -> class index (void colours -> ignore)."""
    ignore_index: int = 255


# ---------------------------------------------------------------------------
# reading


def read_image(path: str | Path) -> np.ndarray:
    """RGB ``uint8`` array (H, W, 3), EXIF orientation applied; grey and RGBA images become RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError("image not found", path=path, fix="check the path")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "F"):
                a = np.asarray(im, np.float32)
                lo, hi = float(a.min()), float(a.max())
                a = ((a - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
                return np.repeat(a[..., None], 3, -1)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UnreadableFileError("cannot read image", path=path, expected="a PNG, JPEG, BMP, TIFF or WebP image",
                                  found=str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__,
                                  fix="re-export the image; it may be truncated") from None


def read_mask(path: str | Path, data: Image2DData | None = None) -> np.ndarray:
    """Class indices (H, W) ``int64`` from an index, palette or RGB colour mask PNG."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UnreadableFileError("cannot read mask", path=path, expected="a PNG index, palette or colour mask",
                                  found=str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__,
                                  fix="re-export the mask as PNG") from None
    if mode == "LA":
        arr = arr[..., 0]
    if arr.ndim == 3:
        rgb = arr[..., :3].astype(np.int64)
        table = data.color_to_class if data else {}
        if not table:
            raise DataError("colour mask but no class colours to match", path=path,
                            expected="an index or palette PNG, or class colours (config 'colors' or classes.json)",
                            found=f"{mode} image", fix="give each class a colour under 'colors' in the config")
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        out = np.full(code.shape, -1, np.int64)
        for color, cls in table.items():
            out[code == ((color[0] << 16) | (color[1] << 8) | color[2])] = cls
        if (out < 0).any():
            y, x = np.argwhere(out < 0)[0]
            raise DataError("mask colour matches no class", path=path,
                            expected=f"one of {len(table)} class colours", found=f"RGB {tuple(rgb[y, x])} at x={x}, y={y}",
                            fix="add the colour under 'colors' in the config (or map it to void)")
        return out
    out = arr.astype(np.int64)
    if data is not None and data.lut is not None:
        if out.max() > 255 or out.min() < 0:
            raise DataError("mask values outside 0-255", path=path, found=f"{out.min()}..{out.max()}",
                            fix="use 8-bit index masks")
        out = data.lut[out].astype(np.int64)
    return out


def to_tensor(rgb: np.ndarray):
    """(H, W, 3) uint8 -> normalised float tensor (3, H, W)."""
    import torch

    x = (rgb.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ---------------------------------------------------------------------------
# layouts


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    if not folder.is_dir():
        return []
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def detect_layout(root: Path) -> str:
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return "voc"
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if (root / "train").is_dir() and ((root / "trainannot").is_dir() or (root / "train_labels").is_dir()):
        return "camvid"
    return "folders"


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClass").is_dir():
            return cand
    return root


def _split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    order = sorted(samples, key=lambda s: s.name)
    random.Random(seed).shuffle(order)
    n_val = int(round(len(order) * val_fraction)) if len(order) > 1 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and len(order) > 1 else 0), len(order) - 1)
    return sorted(order[n_val:], key=lambda s: s.name), sorted(order[:n_val], key=lambda s: s.name)


def _pair(images: list[Path], masks: dict[str, Path], where: Path) -> list[Sample]:
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise DataError(f"{len(missing)} image(s) without a mask", path=where,
                        expected="a mask PNG with the same name stem for every image",
                        found="no mask for " + ", ".join(missing[:5]), fix="add the masks or remove those images")
    return [Sample(p.stem, p, masks[p.stem]) for p in images]


def _lut(mapping: dict[int, int], ignore: int, identity: bool = False) -> np.ndarray:
    lut = np.arange(256, dtype=np.int64) if identity else np.full(256, ignore, np.int64)
    for k, v in mapping.items():
        lut[k] = v
    return lut


def _voc(root: Path, data_cfg) -> Image2DData:
    root = _voc_root(root)
    masks = {p.stem: p for p in _images_in(root / "SegmentationClass")}
    sets = root / "ImageSets" / "Segmentation"

    def listed(name: str) -> list[Sample] | None:
        f = sets / f"{name}.txt"
        if not f.is_file():
            return None
        out = []
        for stem in f.read_text().split():
            img = root / "JPEGImages" / f"{stem}.jpg"
            if stem in masks and img.is_file():
                out.append(Sample(stem, img, masks[stem]))
        return out

    train, val = listed("train"), listed("val")
    if train is None:
        imgs = [p for p in _images_in(root / "JPEGImages") if p.stem in masks]
        train, val = _split(_pair(imgs, masks, root), data_cfg.val_fraction, data_cfg.seed)
    cmap = voc_colormap()
    return Image2DData(root, "voc", train, val or [], dict(enumerate(VOC_CLASSES)),
                       {i: cmap[i].tolist() for i in range(len(VOC_CLASSES))},
                       lut=_lut({255: data_cfg.ignore_index}, data_cfg.ignore_index, identity=True), ignore_index=data_cfg.ignore_index)


def _cityscapes(root: Path, data_cfg) -> Image2DData:
    ignore = data_cfg.ignore_index

    def split(name: str) -> tuple[list[Sample], bool]:
        out, train_ids = [], True
        for img in _images_in(root / "leftImg8bit" / name, recursive=True):
            stem = img.name.replace("_leftImg8bit" + img.suffix, "")
            gt = root / "gtFine" / name / img.parent.name
            mask = gt / f"{stem}_gtFine_labelTrainIds.png"
            if not mask.is_file():
                mask, train_ids = gt / f"{stem}_gtFine_labelIds.png", False
            if not mask.is_file():
                raise DataError("Cityscapes image without a gtFine mask", path=img,
                                expected=f"{gt}/{stem}_gtFine_labelTrainIds.png or _labelIds.png",
                                fix="unpack gtFine_trainvaltest beside leftImg8bit")
            out.append(Sample(stem, img, mask))
        return out, train_ids

    train, ids_a = split("train")
    val, ids_b = split("val")
    if ids_a and ids_b:
        lut = _lut({i: i for i in range(len(CITYSCAPES))}, ignore)
    elif not (ids_a or ids_b):
        lut = _lut({lid: t for t, (lid, _, _) in enumerate(CITYSCAPES)}, ignore)
    else:
        raise DataError("Cityscapes masks mix labelIds and labelTrainIds", path=root / "gtFine",
                        fix="create labelTrainIds for every split (cityscapesscripts createTrainIdLabelImgs) or none")
    return Image2DData(root, "cityscapes", train, val, {i: n for i, (_, n, _) in enumerate(CITYSCAPES)},
                       {i: list(c) for i, (_, _, c) in enumerate(CITYSCAPES)}, lut=lut, ignore_index=ignore)


def _camvid(root: Path, data_cfg) -> Image2DData:
    ignore = data_cfg.ignore_index
    if (root / "class_dict.csv").is_file():  # colour masks <stem>_L.png in <split>_labels/
        with open(root / "class_dict.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh)]
        classes, colors, table = {}, {}, {}
        for r in rows:
            color = (int(r["r"]), int(r["g"]), int(r["b"]))
            if r["name"].strip().lower() in ("void", "unlabelled", "unlabeled"):
                table[color] = ignore
                continue
            idx = len(classes)
            classes[idx], colors[idx], table[color] = r["name"].strip(), list(color), idx

        def split(name: str) -> list[Sample]:
            masks = {p.stem.removesuffix("_L"): p for p in _images_in(root / f"{name}_labels")}
            return _pair(_images_in(root / name), masks, root / name) if (root / name).is_dir() else []

        return Image2DData(root, "camvid", split("train"), split("val"), classes, colors, color_to_class=table,
                           ignore_index=ignore)

    def split11(name: str) -> list[Sample]:
        if not (root / name).is_dir():
            return []
        return _pair(_images_in(root / name), {p.stem: p for p in _images_in(root / f"{name}annot")}, root / name)

    return Image2DData(root, "camvid", split11("train"), split11("val"), {i: n for i, (n, _) in enumerate(CAMVID11)},
                       {i: list(c) for i, (_, c) in enumerate(CAMVID11)},
                       lut=_lut({i: i for i in range(len(CAMVID11))}, ignore), ignore_index=ignore)


def read_classes_json(path: Path) -> tuple[dict[int, str], dict[int, list[int]]]:
    try:
        doc = json.loads(path.read_text())
        classes = {int(k): str(v) for k, v in doc["classes"].items()}
        colors = {int(k): [int(c) for c in v] for k, v in (doc.get("colors") or {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnreadableFileError("not a class list", path=path,
                                  expected='{"classes": {"0": "background", ...}, "colors": {...}}',
                                  found=type(exc).__name__, fix="rewrite it with 'medseg import-annotations'") from None
    return classes, colors


def _folders(root: Path, data_cfg, colors: dict[int, list[int]] | None) -> Image2DData:
    img_dir, mask_dir = root / data_cfg.images, root / data_cfg.masks
    for d, what in ((img_dir, "data.images"), (mask_dir, "data.masks")):
        if not d.is_dir():
            raise InputNotFoundError("dataset folder not found", path=d,
                                     expected="images/ and masks/ sub-folders (or the VOC, Cityscapes or CamVid layout)",
                                     fix=f"set {what} to the sub-folder's name, or data.layout")
    images = _images_in(img_dir)
    if not images:
        raise InputNotFoundError("no images in folder", path=img_dir, expected="PNG or JPEG files",
                                 fix="check data.root and data.images")
    samples = _pair(images, {p.stem: p for p in _images_in(mask_dir)}, mask_dir)
    train, val = _split(samples, data_cfg.val_fraction, data_cfg.seed)
    classes = cols = None
    if (root / "classes.json").is_file():
        classes, cols = read_classes_json(root / "classes.json")
    cols = colors or cols or {}
    table = {tuple(int(v) for v in c): k for k, c in cols.items()}
    return Image2DData(root, "folders", train, val, classes, cols or None, color_to_class=table,
                       ignore_index=data_cfg.ignore_index)


def discover_images2d(data_cfg, colors: dict[int, list[int]] | None = None) -> Image2DData:
    """Recognise the dataset under ``data_cfg.root`` and list its training and validation pairs."""
    if not data_cfg.root:
        raise ConfigError("data.root is not set", expected="the dataset folder", fix="set data.root in the config")
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise InputNotFoundError("dataset folder not found", path=root, expected="a folder of images and masks",
                                 fix="check data.root (relative paths are relative to the current folder)")
    layout = data_cfg.layout if data_cfg.layout != "auto" else detect_layout(_voc_root(root))
    if layout == "voc":
        data = _voc(root, data_cfg)
    elif layout == "cityscapes":
        data = _cityscapes(root, data_cfg)
    elif layout == "camvid":
        data = _camvid(root, data_cfg)
    else:
        data = _folders(root, data_cfg, colors)
    if not data.train:
        raise InputNotFoundError("no training images found", path=root, expected=f"the {layout} layout",
                                 fix="check data.root and data.layout")
    return data


# ---------------------------------------------------------------------------
# config checks


# ---------------------------------------------------------------------------
# a small synthetic dataset (tests, notebooks, trying things out)

SHAPE_CLASSES = {0: "background", 1: "disc", 2: "square", 3: "triangle"}
SHAPE_COLORS = {0: [0, 0, 0], 1: [230, 80, 60], 2: [60, 150, 240], 3: [80, 200, 90]}


def make_shapes_dataset(root: str | Path, n: int = 24, size: int = 64, seed: int = 0) -> Path:
    """``root/images/*.png`` (RGB: textured background with discs, squares and triangles in
    noisy colours) and ``root/masks/*.png`` (palette index masks), plus ``root/classes.json``."""
    from PIL import Image, ImageDraw

    from medseg.seg2d.overlay import save_index_png

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = {1: (200, 70, 60), 2: (60, 110, 210), 3: (70, 180, 80)}
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size]
        bg = 110 + 25 * np.sin(xx / rng.uniform(3, 8) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(3, 8))
        img = np.repeat(bg[..., None], 3, -1) + rng.normal(0, 8, (size, size, 3))
        mask = Image.new("L", (size, size), 0)
        canvas = Image.fromarray(np.zeros((size, size, 3), np.uint8))
        dm, dc = ImageDraw.Draw(mask), ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(1, 4))
            r = rng.uniform(size / 10, size / 5)
            cx, cy = rng.uniform(r, size - r, 2)
            color = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in base[cls])
            if cls == 1:
                box = [cx - r, cy - r, cx + r, cy + r]
                dm.ellipse(box, fill=cls)
                dc.ellipse(box, fill=color)
            elif cls == 2:
                box = [cx - r, cy - r, cx + r, cy + r]
                dm.rectangle(box, fill=cls)
                dc.rectangle(box, fill=color)
            else:
                pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
                dm.polygon(pts, fill=cls)
                dc.polygon(pts, fill=color)
        m = np.asarray(mask)
        img = np.where(m[..., None] > 0, np.asarray(canvas, np.float32) + rng.normal(0, 8, (size, size, 3)), img)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"shape_{i:03d}.png")
        save_index_png(m, root / "masks" / f"shape_{i:03d}.png", SHAPE_COLORS)
    (root / "classes.json").write_text(json.dumps({"classes": {str(k): v for k, v in SHAPE_CLASSES.items()},
                                                   "colors": {str(k): v for k, v in SHAPE_COLORS.items()}}, indent=1))
    return root
