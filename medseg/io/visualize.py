"""Colour overlays of label volumes on images (PNG), for people to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.core.labels import label_colors
from medseg.io.volume import Volume, atomic_write

def _canonical(vol: Volume) -> np.ndarray:
    """Array reoriented to RAS so that slices display the same way for any input orientation."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(vol.affine)
    return nib.orientations.apply_orientation(np.asarray(vol.array), ornt)


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99])
    hi = hi if hi > lo else lo + 1
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _blend(gray: np.ndarray, lab: np.ndarray, colors, alpha: float) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    for value, color in colors.items():
        m = lab == value
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(color, np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


def overlay_png(image: Volume, labels: Volume, path: str | Path, names: dict[int, str],
                colors: dict[int, list[int]] | None = None, alpha: float = 0.45, height: int = 320) -> Path:
    """Axial, coronal and sagittal slices through the labelled region, labels in colour, with a legend."""
    from PIL import Image, ImageDraw, ImageFont

    img = _canonical(image).astype(np.float32)
    lab = _canonical(labels)
    cols = label_colors(names, colors)
    fg = np.argwhere(lab > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else (np.asarray(lab.shape) // 2)
    i, j, k = (int(c) for c in centre)
    gray = _window(img)
    # RAS array shown as radiology viewers (and 3D Slicer) do: anterior/superior up, patient right on the
    # viewer's left in axial and coronal views, anterior on the left in the sagittal view
    def view(a):
        return np.fliplr(np.rot90(a))

    views = [
        ("axial", view(gray[:, :, k]), view(lab[:, :, k])),
        ("coronal", view(gray[:, j, :]), view(lab[:, j, :])),
        ("sagittal", view(gray[i, :, :]), view(lab[i, :, :])),
    ]
    spacing = _canonical_spacing(image)
    aspect = {"axial": (spacing[0], spacing[1]), "coronal": (spacing[0], spacing[2]), "sagittal": (spacing[1], spacing[2])}
    tiles = []
    for name, g, lb in views:
        rgb = Image.fromarray(_blend(g, lb, cols, alpha))
        sx, sy = aspect[name]
        w_mm, h_mm = rgb.width * sx, rgb.height * sy
        scale = height / h_mm
        tiles.append((name, rgb.resize((max(1, round(w_mm * scale)), height), Image.NEAREST)))
    legend_h = 22 * (len(cols) + 1)
    width = sum(t.width for _, t in tiles) + 10 * (len(tiles) + 1)
    canvas = Image.new("RGB", (width, height + 30 + legend_h), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = 10
    for name, tile in tiles:
        canvas.paste(tile, (x, 24))
        draw.text((x, 5), name, fill=(255, 255, 255), font=font)
        x += tile.width + 10
    y = height + 34
    for value, color in cols.items():
        draw.rectangle([10, y, 26, y + 14], fill=color)
        draw.text((34, y), f"{value}  {names.get(value, str(value))}", fill=(255, 255, 255), font=font)
        y += 22
    out = Path(path)
    return atomic_write(out, lambda tmp: canvas.save(tmp, format="PNG"))


def _canonical_spacing(vol: Volume) -> np.ndarray:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(vol.affine)
    sp = vol.spacing
    out = np.empty(3)
    for src_axis, (dst_axis, _) in enumerate(ornt):
        out[int(dst_axis)] = sp[src_axis]
    return out


def label_volumes_ml(labels: Volume, names: dict[int, str]) -> dict[str, float]:
    """Volume per label in millilitres (voxel count times voxel volume)."""
    arr = np.asarray(labels.array)
    vox = labels.voxel_volume_ml
    return {names.get(v, str(v)): float((arr == v).sum() * vox) for v in sorted(names) if v != 0}
