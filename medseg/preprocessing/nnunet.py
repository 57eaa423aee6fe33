"""nnU-Net v2's preprocessing and its inverse, for models imported from nnU-Net results folders.

An imported nnU-Net model only agrees with nnU-Net's own predictor if it sees its input prepared
exactly as nnU-Net prepares it, so this module follows nnU-Net v2 (2.x, ``DefaultPreprocessor`` and
``export_prediction``) step by step:

1. the image as nnU-Net's default reader (SimpleITK) returns it: voxel axes reversed, ``(C, k, j, i)``;
2. ``transpose_forward`` of the plans;
3. crop to the bounding box of the non-zero region (holes filled), remembering the box;
4. normalise each channel by its scheme (``ZScoreNormalization`` over the whole crop or over the non-zero
   mask, ``CTNormalization`` with the dataset's foreground percentiles, mean and std, ``NoNormalization``,
   ``RescaleTo01Normalization``), *before* resampling;
5. resample to the target spacing: cubic spline in-plane; along a low-resolution axis (spacing ratio
   above 3) separately, with nearest neighbour (nnU-Net's ``separate_z``).

Back on the input grid, the network's output is resampled to the cropped shape (linear, or nearest along
the low-resolution axis), turned into labels, put back into the uncropped grid (background outside the
box) and transposed back.

The resampling is nnU-Net's ``resample_data_or_seg`` re-implemented on SciPy: the same
``scipy.ndimage.zoom`` call (``grid_mode=True``, edge mode, output clipped to the input's range) that
scikit-image's ``resize`` makes for nnU-Net, and the same ``map_coordinates`` call along the separate
axis. nnU-Net itself cannot be a dependency (its dependencies pin packages that do not import beside
medseg's torch); ``benchmarks/nnunet_agreement.py`` compares the whole path against nnU-Net's predictor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medseg.core.errors import ConfigError

ANISO_THRESHOLD = 3.0
"""nnU-Net's ``ANISO_THRESHOLD``: a spacing ratio above it resamples the coarse axis separately."""

NORMALIZATIONS = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization")


# ---------------------------------------------------------------------------
# resampling (nnU-Net's default_resampling)


def compute_new_shape(old_shape, old_spacing, new_spacing) -> list[int]:
    return [int(round(s / n * k)) for s, n, k in zip(old_spacing, new_spacing, old_shape)]


def _lowres_axis(spacing) -> list[int]:
    spacing = np.asarray(spacing, dtype=float)
    return [int(a) for a in np.where(max(spacing) / spacing == 1)[0]]


def separate_axis(force_separate_z, current_spacing, new_spacing) -> int | None:
    """The axis resampled on its own (nnU-Net's ``determine_do_sep_z_and_axis``), or None."""
    def aniso(sp) -> bool:
        sp = np.asarray(sp, dtype=float)
        return bool(sp.max() / sp.min() > ANISO_THRESHOLD)

    if force_separate_z is not None:
        axes = _lowres_axis(current_spacing) if force_separate_z else None
    elif aniso(current_spacing):
        axes = _lowres_axis(current_spacing)
    elif aniso(new_spacing):
        axes = _lowres_axis(new_spacing)
    else:
        axes = None
    return axes[0] if axes is not None and len(axes) == 1 else None


def _resize(image: np.ndarray, shape, order: int) -> np.ndarray:
    """``skimage.transform.resize(image, shape, order, mode="edge", anti_aliasing=False)`` for float64 input."""
    from scipy import ndimage

    zoom = [1.0 / (i / o) for i, o in zip(image.shape, shape)]
    out = ndimage.zoom(image, zoom, order=order, mode="nearest", cval=0.0, grid_mode=True)
    if order > 0:
        np.clip(out, image.min(), image.max(), out=out)
    return out


def resample(data: np.ndarray, new_shape, current_spacing, new_spacing, *, order: int = 3, order_z: int = 0,
             force_separate_z: bool | None = None, out_dtype=None) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images and network outputs ``(C, X, Y, Z)``."""
    from scipy.ndimage import map_coordinates

    axis = separate_axis(force_separate_z, current_spacing, new_spacing)
    shape = np.array(data.shape[1:])
    new_shape = np.array([int(s) for s in new_shape])
    out_dtype = out_dtype or data.dtype
    if np.all(shape == new_shape):
        return data.astype(out_dtype, copy=False)
    out = np.zeros((data.shape[0], *new_shape), dtype=out_dtype)
    for c in range(data.shape[0]):
        img = data[c].astype(np.float64, copy=False)
        if axis is None:
            out[c] = _resize(img, new_shape, order)
            continue
        plane = [s for a, s in enumerate(new_shape) if a != axis]
        tmp = new_shape.copy()
        tmp[axis] = shape[axis]
        here = np.zeros(tmp)
        for k in range(shape[axis]):
            index = [slice(None)] * 3
            index[axis] = k
            here[tuple(index)] = _resize(img[tuple(index)], plane, order)
        if shape[axis] == new_shape[axis]:
            out[c] = here
            continue
        grid = np.mgrid[:new_shape[0], :new_shape[1], :new_shape[2]].astype(np.float64)
        for a in range(3):
            grid[a] = here.shape[a] / new_shape[a] * (grid[a] + 0.5) - 0.5
        out[c] = map_coordinates(here, grid, order=order_z, mode="nearest")
    return out


# ---------------------------------------------------------------------------
# cropping and normalisation


def nonzero_box(data: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """nnU-Net's ``crop_to_nonzero`` box ``[[lo, hi), ...]`` and the hole-filled non-zero mask inside it."""
    from scipy.ndimage import binary_fill_holes

    mask = np.any(data != 0, axis=0)
    mask = binary_fill_holes(mask)
    where = np.argwhere(mask)
    if where.size == 0:  # nnU-Net's get_bbox_from_mask on an empty mask: the whole image
        box = [[0, int(s)] for s in mask.shape]
    else:
        box = [[int(lo), int(hi) + 1] for lo, hi in zip(where.min(0), where.max(0))]
    inner = mask[tuple(slice(lo, hi) for lo, hi in box)]
    return box, inner


def normalize(channel: np.ndarray, scheme: str, nonzero: np.ndarray, use_mask: bool, props: dict) -> np.ndarray:
    """One channel (float32) normalised as nnU-Net's scheme of that name does."""
    image = channel.astype(np.float32, copy=False)
    eps = 1e-8
    if scheme == "ZScoreNormalization":
        if use_mask:
            values = image[nonzero]
            mean, std = values.mean(), values.std()
            image[nonzero] = (values - mean) / max(std, eps)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, eps)
        return image
    if scheme == "CTNormalization":
        np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
        image -= props["mean"]
        image /= max(props["std"], eps)
        return image
    if scheme == "NoNormalization":
        return image
    if scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
        return image
    raise ConfigError(f"unknown nnU-Net normalisation '{scheme}'", expected=" | ".join(NORMALIZATIONS),
                      found=scheme, fix="import a model whose plans use one of nnU-Net's built-in schemes")


# ---------------------------------------------------------------------------
# the whole forward step, and its inverse


@dataclass
class NnUNetGrid:
    """What the inverse needs: shapes and spacings in nnU-Net's (transposed) axis order, the crop box."""

    shape_before_crop: list[int]
    box: list[list[int]]
    spacing: list[float]
    """Input spacing, transposed."""
    target_spacing: list[float]

    @property
    def cropped_shape(self) -> list[int]:
        return [hi - lo for lo, hi in self.box]


def grid_of(meta: dict) -> NnUNetGrid:
    """The :class:`NnUNetGrid` kept in a processed image's ``meta["nnunet"]``."""
    return NnUNetGrid(**{k: meta[k] for k in ("shape_before_crop", "box", "spacing", "target_spacing")})


def _axes_to_nnunet(transpose) -> list[int]:
    """For nnU-Net axis ``d`` (after the transpose), the medseg voxel axis it comes from."""
    # nnU-Net array axis a = medseg axis 2 - a (SimpleITK reverses the axes); transposed axis d = axis transpose[d]
    return [2 - int(t) for t in transpose]


def preprocess(image: torch.Tensor, affine: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray, NnUNetGrid]:
    """``(data, processed_affine, grid)`` for a channel-first image ``(C, X, Y, Z)`` with its voxel-to-world
    ``affine``: the network's input in nnU-Net's axis order, the affine of that grid, and the inverse's
    bookkeeping. ``cfg``: the model's ``preprocess.nnunet`` section."""
    axes = _axes_to_nnunet(cfg.transpose)
    data = np.asarray(image, dtype=np.float32)
    data = np.ascontiguousarray(data.transpose(0, *[a + 1 for a in axes]))
    zooms = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    spacing = [float(zooms[a]) for a in axes]
    shape_before = [int(s) for s in data.shape[1:]]
    box, nonzero = nonzero_box(data)
    data = data[(slice(None), *[slice(lo, hi) for lo, hi in box])]
    target = [float(s) for s in cfg.spacing]
    new_shape = compute_new_shape(data.shape[1:], spacing, target)
    for c in range(data.shape[0]):
        data[c] = normalize(data[c], cfg.normalization[c], nonzero, bool(cfg.mask_for_norm[c]),
                            cfg.intensity_properties[c] if c < len(cfg.intensity_properties) else {})
    data = _resample_by(cfg.data_resampling, data, new_shape, spacing, target, default_order=3)
    grid = NnUNetGrid(shape_before, box, spacing, target)
    return data, processed_affine(affine, axes, box, new_shape), grid


def processed_affine(affine, axes, box, new_shape) -> np.ndarray:
    """Voxel-to-world affine of the processed grid: processed index ``p`` along nnU-Net axis ``d`` is cropped
    index ``(p + 0.5) * cropped / new - 0.5`` (resampling aligns the grids' outer edges), plus the crop's
    start, on medseg voxel axis ``axes[d]``."""
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for d, a in enumerate(axes):
        lo, hi = box[d]
        scale = (hi - lo) / int(new_shape[d])
        m[a, d] = scale
        m[a, 3] = lo + 0.5 * scale - 0.5
    return np.asarray(affine, dtype=float) @ m


def _resample_by(kwargs: dict, data: np.ndarray, new_shape, current_spacing, new_spacing, *,
                 default_order: int) -> np.ndarray:
    """:func:`resample` with the plans' resampling arguments (``order``, ``order_z``, ``force_separate_z``)."""
    return resample(data, new_shape, current_spacing, new_spacing, order=int(kwargs.get("order", default_order)),
                    order_z=int(kwargs.get("order_z", 0)), force_separate_z=kwargs.get("force_separate_z"),
                    out_dtype=np.float32)


def _to_cropped_shape(probs, grid: NnUNetGrid, cfg) -> np.ndarray:
    """The network's output ``(C, …)`` resampled from the processed grid to the cropped input's shape."""
    values = probs.float().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, dtype=np.float32)
    return _resample_by(cfg.probabilities_resampling, values, grid.cropped_shape, grid.target_spacing, grid.spacing,
                        default_order=1)


def _uncrop(values: np.ndarray, grid: NnUNetGrid, cfg, full: np.ndarray) -> np.ndarray:
    """``values`` (spatial axes last, nnU-Net's order) put into ``full`` (the uncropped grid, its outside already
    set) at the crop box, then transposed back to the input's voxel axes."""
    full[(..., *[slice(lo, hi) for lo, hi in grid.box])] = values
    axes = _axes_to_nnunet(cfg.transpose)
    lead = full.ndim - 3
    inverse = [lead + axes.index(a) for a in range(3)]  # input axis a is nnU-Net axis axes.index(a)
    return np.ascontiguousarray(full.transpose(*range(lead), *inverse))


def to_input_grid(probs: torch.Tensor, grid: NnUNetGrid, cfg, decode, dtype=np.uint8) -> np.ndarray:
    """Labels ``(X, Y, Z)`` on the input grid from the network's output ``(C, …)`` on the processed grid, as
    nnU-Net exports them: resampled to the cropped shape, decoded, uncropped (background outside the box),
    transposed back."""
    labels = decode(torch.from_numpy(_to_cropped_shape(probs, grid, cfg))).numpy().astype(dtype, copy=False)
    return _uncrop(labels, grid, cfg, np.zeros(grid.shape_before_crop, dtype=dtype))


def probabilities_to_input_grid(probs: torch.Tensor, grid: NnUNetGrid, cfg, *, softmax: bool = True) -> torch.Tensor:
    """Probabilities ``(C, X, Y, Z)`` on the input grid; outside the crop box background is certain (class 0 for a
    softmax model, every region off for a region model)."""
    values = _to_cropped_shape(probs, grid, cfg)
    full = np.zeros((values.shape[0], *grid.shape_before_crop), dtype=np.float32)
    if softmax:
        full[0] = 1.0
    return torch.from_numpy(_uncrop(values, grid, cfg, full))
