"""Import polygon and mask annotations (Labelme, CVAT's COCO and XML exports) into index masks.

Every source becomes one 8-bit palette PNG per image (pixel value = class index, 0 =
background) and a ``classes.json`` with the class list and colours, which together form
the ``folders`` layout that ``task: image2d`` trains on (images are copied beside them when
they can be found). Shapes are drawn in their stacking order, later (or higher
``z_order``) shapes on top, with PIL's polygon fill, which is what Labelme itself uses.

Supported shapes: Labelme polygon, rectangle, circle and mask; COCO polygons and RLE
(uncompressed counts or the compressed string); CVAT XML polygon, box (with rotation),
ellipse and mask. Lines and points have no area and are skipped, with a note.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.core.errors import (
    DataError,
    InputNotFoundError,
    OutputError,
    UnreadableFileError,
    UnsupportedInputError,
)

FORMATS = ("auto", "labelme", "coco", "cvat-xml")


@dataclass
class Shape:
    label: str
    kind: str  # polygon | rectangle | ellipse | mask
    points: list[tuple[float, float]] = field(default_factory=list)
    mask: np.ndarray | None = None  # for kind == "mask": boolean array placed at points[0]
    order: float = 0.0


@dataclass
class AnnotatedImage:
    name: str  # output stem
    image: str  # image file name as the annotation refers to it
    width: int
    height: int
    shapes: list[Shape]
    image_path: Path | None = None
    image_data: bytes | None = None


@dataclass
class ImportResult:
    outdir: Path
    classes: dict[int, str]
    colors: dict[int, list[int]]
    masks: list[Path]
    images: list[Path]
    skipped: list[str]


# ---------------------------------------------------------------------------
# RLE (COCO)


def rle_decode_string(s: str) -> list[int]:
    """COCO's compressed RLE string (as pycocotools writes it) -> run lengths."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_to_mask(counts: list[int], height: int, width: int, *, order: str = "F") -> np.ndarray:
    """Run lengths alternating 0s and 1s (starting with 0s) -> boolean (height, width).
    COCO runs go down the columns (``order="F"``); CVAT's go along the rows (``"C"``)."""
    flat = np.zeros(height * width, bool)
    pos, val = 0, False
    for n in counts:
        n = int(n)
        if n < 0 or pos + n > flat.size:
            raise DataError("RLE runs do not fit the mask size", expected=f"{height}x{width} pixels",
                            found=f"runs summing past {flat.size}", fix="re-export the annotations")
        flat[pos:pos + n] = val
        pos, val = pos + n, not val
    return flat.reshape((height, width), order=order)


# ---------------------------------------------------------------------------
# readers


def _pairs(flat: list[float]) -> list[tuple[float, float]]:
    return [(float(flat[i]), float(flat[i + 1])) for i in range(0, len(flat) - 1, 2)]


def read_labelme(path: Path) -> tuple[AnnotatedImage, list[str]]:
    try:
        doc = json.loads(path.read_text())
        w, h = int(doc["imageWidth"]), int(doc["imageHeight"])
        raw_shapes = doc["shapes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UnreadableFileError("not a Labelme annotation", path=path,
                                  expected="JSON with shapes, imageWidth, imageHeight", found=type(exc).__name__,
                                  fix="save the file from Labelme") from None
    shapes, skipped = [], []
    for i, s in enumerate(raw_shapes):
        kind, pts, label = s.get("shape_type") or "polygon", s.get("points") or [], str(s.get("label", ""))
        pts = [(float(x), float(y)) for x, y in pts]
        if kind == "polygon" and len(pts) >= 3:
            shapes.append(Shape(label, "polygon", pts, order=i))
        elif kind == "rectangle" and len(pts) == 2:
            shapes.append(Shape(label, "rectangle", pts, order=i))
        elif kind == "circle" and len(pts) == 2:
            (cx, cy), (px, py) = pts
            r = math.hypot(px - cx, py - cy)
            shapes.append(Shape(label, "ellipse", [(cx - r, cy - r), (cx + r, cy + r)], order=i))
        elif kind == "mask" and s.get("mask") and len(pts) >= 1:
            from PIL import Image

            with Image.open(io.BytesIO(base64.b64decode(s["mask"]))) as im:
                m = np.asarray(im.convert("L")) > 0
            shapes.append(Shape(label, "mask", [pts[0]], mask=m, order=i))
        else:
            skipped.append(f"{path.name}: shape {i} ({kind}, '{label}') has no area")
    image = str(doc.get("imagePath") or "")
    data = base64.b64decode(doc["imageData"]) if doc.get("imageData") else None
    name = Path(image).stem if image else path.stem
    img_path = (path.parent / image) if image else None
    return AnnotatedImage(name, image, w, h, shapes, img_path if img_path and img_path.is_file() else None, data), skipped


def read_coco(path: Path) -> tuple[list[AnnotatedImage], list[str], list[str]]:
    """Images, class names in category-id order, notes."""
    try:
        doc = json.loads(path.read_text())
        cats = sorted(doc["categories"], key=lambda c: int(c["id"]))
        images = {int(im["id"]): im for im in doc["images"]}
        anns = doc["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UnreadableFileError("not a COCO annotation file", path=path,
                                  expected="JSON with images, annotations and categories", found=type(exc).__name__,
                                  fix="export the task from CVAT as 'COCO 1.0'") from None
    cat_name = {int(c["id"]): str(c["name"]) for c in cats}
    by_image: dict[int, list[Shape]] = {i: [] for i in images}
    skipped = []
    for order, a in enumerate(anns):
        iid, seg = int(a["image_id"]), a.get("segmentation")
        if iid not in images or int(a["category_id"]) not in cat_name:
            raise DataError("annotation refers to an unknown image or category", path=path,
                            found=f"annotation {a.get('id')}: image {iid}, category {a.get('category_id')}",
                            fix="re-export the annotations")
        label = cat_name[int(a["category_id"])]
        h, w = int(images[iid]["height"]), int(images[iid]["width"])
        if isinstance(seg, list) and seg:
            for poly in seg:
                if len(poly) >= 6:
                    by_image[iid].append(Shape(label, "polygon", _pairs(poly), order=order))
        elif isinstance(seg, dict) and "counts" in seg:
            rh, rw = (int(v) for v in seg.get("size", (h, w)))
            counts = rle_decode_string(seg["counts"]) if isinstance(seg["counts"], str) else list(seg["counts"])
            by_image[iid].append(Shape(label, "mask", [(0.0, 0.0)], mask=rle_to_mask(counts, rh, rw), order=order))
        else:
            skipped.append(f"{path.name}: annotation {a.get('id')} ('{label}') has no area (no segmentation)")
    out = []
    for iid, im in images.items():
        fname = str(im["file_name"])
        p = path.parent / fname
        for cand in (p, path.parent / "images" / fname, path.parent.parent / "images" / fname):
            if cand.is_file():
                p = cand
                break
        out.append(AnnotatedImage(Path(fname).stem, fname, int(im["width"]), int(im["height"]), by_image[iid],
                                  p if p.is_file() else None))
    return out, [cat_name[int(c["id"])] for c in cats], skipped


def _hex_color(text: str | None) -> list[int] | None:
    if text and len(text.strip()) == 7 and text.strip().startswith("#"):
        t = text.strip()
        return [int(t[i:i + 2], 16) for i in (1, 3, 5)]
    return None


def read_cvat_xml(path: Path) -> tuple[list[AnnotatedImage], list[str], dict[str, list[int]], list[str]]:
    """Images, class names (the task's label order), label colours, notes."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise UnreadableFileError("not a readable XML file", path=path, found=str(exc)[:120],
                                  fix="export the task from CVAT as 'CVAT for images 1.1'") from None
    if root.tag != "annotations":
        raise UnreadableFileError("not a CVAT XML export", path=path, expected="an <annotations> root",
                                  found=f"<{root.tag}>", fix="export as 'CVAT for images 1.1'")
    if root.find("track") is not None:
        raise UnsupportedInputError("CVAT video (track) annotations", path=path,
                                    expected="'CVAT for images 1.1' export", found="<track> elements",
                                    fix="export the task as 'CVAT for images 1.1'")
    names, colors = [], {}
    for lab in root.iter("label"):
        n = lab.findtext("name")
        if n is not None and n not in names:
            names.append(n)
            c = _hex_color(lab.findtext("color"))
            if c:
                colors[n] = c
    images, skipped = [], []
    for im in root.iter("image"):
        w, h = int(im.get("width")), int(im.get("height"))
        shapes = []
        for order, el in enumerate(im):
            label, z = el.get("label", ""), float(el.get("z_order", 0))
            key = (z, order)
            if el.tag == "polygon":
                pts = [tuple(float(v) for v in p.split(",")) for p in el.get("points", "").split(";") if p]
                shapes.append(Shape(label, "polygon", pts, order=key))
            elif el.tag == "box":
                x0, y0, x1, y1 = (float(el.get(k)) for k in ("xtl", "ytl", "xbr", "ybr"))
                rot = math.radians(float(el.get("rotation", 0)))
                if rot:
                    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
                    pts = [(cx + (x - cx) * math.cos(rot) - (y - cy) * math.sin(rot),
                            cy + (x - cx) * math.sin(rot) + (y - cy) * math.cos(rot)) for x, y in corners]
                    shapes.append(Shape(label, "polygon", pts, order=key))
                else:
                    shapes.append(Shape(label, "rectangle", [(x0, y0), (x1, y1)], order=key))
            elif el.tag == "ellipse":
                cx, cy, rx, ry = (float(el.get(k)) for k in ("cx", "cy", "rx", "ry"))
                shapes.append(Shape(label, "ellipse", [(cx - rx, cy - ry), (cx + rx, cy + ry)], order=key))
            elif el.tag == "mask":
                left, top, mw, mh = (int(float(el.get(k))) for k in ("left", "top", "width", "height"))
                counts = [int(v) for v in el.get("rle", "").replace(" ", "").split(",") if v]
                shapes.append(Shape(label, "mask", [(left, top)], mask=rle_to_mask(counts, mh, mw, order="C"), order=key))
            elif el.tag in ("polyline", "points", "skeleton", "cuboid", "tag"):
                skipped.append(f"{path.name}: {el.tag} ('{label}') on {im.get('name')} has no area")
        shapes.sort(key=lambda s: s.order)
        fname = str(im.get("name"))
        p = path.parent / fname
        if not p.is_file():
            p = path.parent / "images" / Path(fname).name
        images.append(AnnotatedImage(Path(fname).stem, fname, w, h, shapes, p if p.is_file() else None))
    return images, names, colors, skipped


# ---------------------------------------------------------------------------
# rasterising


def rasterize(ann: AnnotatedImage, class_index: dict[str, int]) -> np.ndarray:
    """Draw the shapes in order into a (height, width) uint8 index mask (0 = background)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (ann.width, ann.height), 0)
    draw = ImageDraw.Draw(canvas)
    for s in ann.shapes:
        if s.label not in class_index:
            raise DataError(f"label '{s.label}' is not in the class list", path=ann.image or ann.name,
                            expected=", ".join(class_index), found=repr(s.label),
                            fix="add it to the --classes file, or correct the annotation")
        v = class_index[s.label]
        if s.kind == "polygon":
            draw.polygon(s.points, fill=v, outline=v)
        elif s.kind == "rectangle":
            (x0, y0), (x1, y1) = s.points
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=v, outline=v)
        elif s.kind == "ellipse":
            draw.ellipse([s.points[0], s.points[1]], fill=v, outline=v)
        elif s.kind == "mask":
            arr = np.array(canvas)
            x0, y0 = (int(round(c)) for c in s.points[0])
            m = s.mask
            ys, xs = slice(max(y0, 0), min(y0 + m.shape[0], ann.height)), slice(max(x0, 0), min(x0 + m.shape[1], ann.width))
            sub = m[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
            arr[ys, xs][sub] = v
            canvas = Image.fromarray(arr)
            draw = ImageDraw.Draw(canvas)
    return np.asarray(canvas)


# ---------------------------------------------------------------------------
# the import


def detect_format(src: Path) -> str:
    if src.is_dir():
        return "labelme"
    if src.suffix.lower() == ".xml":
        return "cvat-xml"
    try:
        doc = json.loads(src.read_text())
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise UnreadableFileError("cannot read annotation file", path=src, expected="Labelme JSON, COCO JSON or CVAT XML",
                                  found=type(exc).__name__, fix="check the file") from None
    if isinstance(doc, dict) and {"images", "annotations", "categories"} <= set(doc):
        return "coco"
    if isinstance(doc, dict) and "shapes" in doc:
        return "labelme"
    raise UnsupportedInputError("unknown annotation format", path=src, expected="Labelme JSON, COCO JSON or CVAT XML",
                                found="JSON with keys " + ", ".join(sorted(doc)[:5]) if isinstance(doc, dict) else "JSON",
                                fix="pass --format labelme|coco|cvat-xml")


def read_class_list(path: str | Path) -> list[str]:
    """Class names, one a line (``classes.txt``, Labelme's ``labels.txt``) or a classes.json; the first is
    the background unless it is named otherwise (Labelme's ``__ignore__`` lines are dropped)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError("class list not found", path=path, expected="a text file, one class a line",
                                 fix="check the --classes path")
    if path.suffix.lower() == ".json":
        from medseg.seg2d.images import read_classes_json

        classes, _ = read_classes_json(path)
        return [classes[k] for k in sorted(classes)]
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and ln.strip() != "__ignore__"]
    if names and names[0] == "_background_":
        names[0] = "background"
    return names


def import_annotations(src: str | Path, outdir: str | Path, *, fmt: str = "auto",
                       classes: list[str] | None = None) -> ImportResult:
    """Write ``OUTDIR/masks/<image stem>.png``, ``OUTDIR/classes.json`` and (when found)
    ``OUTDIR/images/<image file>`` from Labelme, COCO or CVAT XML annotations.

    ``classes`` fixes the class order (index = position; the first is class 0, the background);
    otherwise class 0 is ``background`` followed by the source's labels (COCO: category ids,
    CVAT: the task's label list, Labelme: first appearance over the files sorted by name).
    """
    from medseg.seg2d.overlay import class_colors, save_index_png

    src, outdir = Path(src), Path(outdir)
    if not src.exists():
        raise InputNotFoundError("annotation source not found", path=src, fix="check the path")
    if fmt not in FORMATS:
        raise UnsupportedInputError("unknown annotation format", expected=" | ".join(FORMATS), found=repr(fmt),
                                    fix="use --format auto")
    src_dir = src if src.is_dir() else src.parent
    if outdir.resolve() == src_dir.resolve() or src_dir.resolve() in outdir.resolve().parents:
        raise OutputError("output folder is inside the annotation folder", path=outdir,
                          fix="write the masks outside the input folder")
    fmt = detect_format(src) if fmt == "auto" else fmt
    notes: list[str] = []
    colors_by_name: dict[str, list[int]] = {}
    if fmt == "labelme":
        files = sorted(src.glob("*.json")) if src.is_dir() else [src]
        if not files:
            raise InputNotFoundError("no Labelme JSON files in folder", path=src, fix="check the path")
        images, found = [], []
        for f in files:
            ann, skipped = read_labelme(f)
            images.append(ann)
            notes += skipped
            for s in ann.shapes:
                if s.label not in found:
                    found.append(s.label)
    elif fmt == "coco":
        images, found, notes = read_coco(src)
    else:
        images, found, colors_by_name, notes = read_cvat_xml(src)
    if classes:
        names = list(classes)
    else:
        names = ["background"] + [n for n in found if n.lower() not in ("background", "_background_")]
    index = {n: i for i, n in enumerate(names)}
    if "_background_" in found and "_background_" not in index:
        index["_background_"] = 0
    class_map = dict(enumerate(names))
    pal = class_colors(class_map, {i: colors_by_name[n] for n, i in index.items() if n in colors_by_name} or None)
    colors = {i: list(c) if c is not None else [0, 0, 0] for i, c in pal.items()}
    seen: dict[str, str] = {}
    masks, copied = [], []
    for ann in images:
        if ann.name in seen:
            raise DataError("two annotated images have the same name stem", path=src,
                            found=f"{seen[ann.name]} and {ann.image}", fix="rename one image")
        seen[ann.name] = ann.image
        mask = rasterize(ann, index)
        masks.append(save_index_png(mask, outdir / "masks" / f"{ann.name}.png", colors))
        target = outdir / "images" / (Path(ann.image).name if ann.image else f"{ann.name}.png")
        if ann.image_path is not None:
            from medseg.io.volume import atomic_write

            copied.append(atomic_write(target, lambda t, p=ann.image_path: shutil.copyfile(p, t)))
        elif ann.image_data is not None:
            from medseg.io.volume import atomic_write

            copied.append(atomic_write(target, lambda t, d=ann.image_data: Path(t).write_bytes(d)))
    from medseg.io.volume import atomic_write

    doc = {"classes": {str(k): v for k, v in class_map.items()}, "colors": {str(k): v for k, v in colors.items()},
           "source": {"format": fmt, "path": src.name, "images": len(images)}}
    atomic_write(outdir / "classes.json", lambda t: Path(t).write_text(json.dumps(doc, indent=1)))
    return ImportResult(outdir, class_map, colors, masks, copied, notes)
