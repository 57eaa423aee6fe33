"""Index masks as palette PNGs, and colour overlays of masks on photographs with a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.io.volume import atomic_write
from medseg.core.labels import PALETTE

#: class names that are left transparent in overlays when they are label 0
BACKGROUND_NAMES = ("background", "void", "unlabeled", "unlabelled", "_background_", "none")


def class_colors(labels: dict[int, str], colors: dict[int, list[int]] | None = None) -> dict[int, tuple | None]:
    """Colour per class for overlays: the config's colour, else a fixed palette; label 0 named
    background (or void/unlabelled) gets None, i.e. it is not drawn."""
    out: dict[int, tuple | None] = {}
    i = 0
    for value in sorted(labels):
        if value == 0 and str(labels[value]).strip().lower() in BACKGROUND_NAMES:
            out[value] = None
            continue
        c = (colors or {}).get(value)
        out[value] = tuple(int(v) for v in c) if c else PALETTE[i % len(PALETTE)]
        i += 1
    return out


def palette_bytes(colors: dict[int, list[int] | tuple | None]) -> list[int]:
    pal = np.zeros((256, 3), np.uint8)
    for value, c in colors.items():
        if c is not None and 0 <= value < 256:
            pal[value] = c
    return pal.reshape(-1).tolist()


def save_index_png(mask: np.ndarray, path: str | Path, colors: dict[int, list[int] | tuple | None]) -> Path:
    """Write class indices as an 8-bit palette PNG: pixel values are the classes, viewers show colours."""
    from PIL import Image

    m = np.asarray(mask)
    if m.min() < 0 or m.max() > 255:
        from medseg.core.errors import DataError

        raise DataError("mask values do not fit an 8-bit PNG", path=path, found=f"{m.min()}..{m.max()}",
                        fix="use at most 255 classes")
    im = Image.fromarray(m.astype(np.uint8), mode="L").convert("P")
    im.putpalette(palette_bytes(colors))
    return atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def overlay(rgb: np.ndarray, mask: np.ndarray, labels: dict[int, str], colors: dict[int, list[int]] | None = None,
            *, alpha: float = 0.5, legend: bool = True, outline: bool = True, ignore_index: int = 255,
            min_side: int = 256):
    """The image with each class blended in its colour (``alpha``), class borders drawn opaque,
    and below it a legend of the classes present with their share of the pixels. Images whose
    shorter side is under ``min_side`` are enlarged by a whole factor (pixel copies) so that they
    can be seen. Returns a PIL image."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    rgb = np.asarray(rgb)
    mask = np.asarray(mask)
    if rgb.shape[:2] != mask.shape:
        from medseg.core.errors import GeometryError

        raise GeometryError("mask and image sizes differ", expected=f"{rgb.shape[1]}x{rgb.shape[0]} pixels",
                            found=f"{mask.shape[1]}x{mask.shape[0]}", fix="overlay a mask predicted for this image")
    cols = class_colors(labels, colors)
    factor = -(-min_side // max(1, min(mask.shape))) if min(mask.shape) < min_side else 1
    if factor > 1:
        rgb = rgb.repeat(factor, 0).repeat(factor, 1)
        mask = mask.repeat(factor, 0).repeat(factor, 1)
    out = rgb.astype(np.float32).copy()
    for value, color in cols.items():
        if color is None:
            continue
        m = mask == value
        if not m.any():
            continue
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
        if outline:
            edge = m & ~ndimage.binary_erosion(m, border_value=1)
            out[edge] = color
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if not legend:
        return img
    present = [v for v in sorted(cols) if cols[v] is not None and (mask == v).any()]
    size = max(11, min(18, img.width // 30))
    font = _font(size)
    row = size + 8
    total = mask.size - int((mask == ignore_index).sum())
    items = [(cols[v], f"{v}: {labels.get(v, v)}  {100.0 * (mask == v).sum() / max(total, 1):.1f}%") for v in present]
    if not items:
        items = [((0, 0, 0), "no classes found")]
    draw0 = ImageDraw.Draw(img)
    text_w = max(int(draw0.textlength(t, font=font)) for _, t in items) + size + 24
    width = max(img.width, text_w)
    canvas = Image.new("RGB", (width, img.height + row * len(items) + 8), (24, 24, 24))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = img.height + 4
    for color, text in items:
        draw.rectangle([6, y + 2, 6 + size, y + 2 + size], fill=tuple(color), outline=(255, 255, 255))
        draw.text((size + 14, y + 1), text, fill=(240, 240, 240), font=font)
        y += row
    return canvas


def save_overlay(rgb: np.ndarray, mask: np.ndarray, path: str | Path, labels: dict[int, str],
                 colors: dict[int, list[int]] | None = None, *, alpha: float = 0.5, legend: bool = True) -> Path:
    img = overlay(rgb, mask, labels, colors, alpha=alpha, legend=legend)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
