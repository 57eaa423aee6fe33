"""Intensity transforms and the preprocessing/inverse pair on awkward geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blob_label

from medseg.core.config import Config
from medseg.core.errors import ConfigError
from medseg.inference.engine import to_source_grid
from medseg.io import Volume
from medseg.preprocessing import (
    CT_PRESETS,
    CTWindow,
    PercentileNorm,
    ZScore,
    ct_window_bounds,
    inference_transforms,
)


def test_ct_presets_and_window():
    assert ct_window_bounds("brain") == (0.0, 80.0)
    assert ct_window_bounds(window=[-600, 1500]) == (-1350.0, 150.0)
    hu = np.array([-1000.0, 0.0, 40.0, 80.0, 3000.0])
    np.testing.assert_allclose(CTWindow("brain")(hu), [0, 0, 0.5, 1, 1])
    assert set(CT_PRESETS) >= {"brain", "abdomen", "lung", "bone"}
    with pytest.raises(ConfigError, match="unknown CT window preset"):
        CTWindow("spleeeen")
    with pytest.raises(ConfigError, match="bad CT window"):
        CTWindow(window=[40, -1])


def test_zscore_nonzero_keeps_background():
    img = np.zeros((10, 10, 10), np.float32)
    img[2:8, 2:8, 2:8] = np.random.default_rng(0).normal(50, 10, (6, 6, 6))
    out = ZScore(nonzero=True)(img)
    fg = out[img != 0]
    assert abs(fg.mean()) < 1e-5 and abs(fg.std() - 1) < 1e-4
    assert np.all(out[img == 0] == 0)
    t = ZScore(nonzero=False)(torch.as_tensor(img))
    assert abs(float(t.mean())) < 1e-5


@pytest.mark.parametrize("nonzero", [True, False])
def test_zscore_slab_statistics_equal_float64_reference(nonzero):
    """Volumes too large for one pass get slab-wise statistics; they must match a float64 reference."""
    rng = np.random.default_rng(2)
    img = rng.normal(-600, 400, (1, 30, 31, 37)).astype(np.float32)  # CT-like: far from zero mean
    img[..., :9] = 0  # whole slabs without foreground, and a partial one
    img[0, :5, :, 9] = 0
    z = ZScore(nonzero=nonzero)
    z.one_pass_voxels, z.slab_voxels = 1000, 4 * 30 * 31  # force slabs of 4 slices on a small volume
    out = z(torch.as_tensor(img)).numpy()
    sel = img != 0 if nonzero else np.ones(img.shape, bool)
    ref = img.astype(np.float64)
    mean, std = ref[sel].mean(), ref[sel].std()
    expected = np.where(sel, (ref - mean) / std, 0.0)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_percentile_norm_clips_outliers():
    img = np.random.default_rng(1).normal(0, 1, (20, 20, 20)).astype(np.float32)
    img[0, 0, 0] = 1e6
    out = PercentileNorm(1, 99)(img)
    assert out.max() < 5


def _cfg(spacing):
    cfg = Config(labels={0: "bg", 1: "a", 2: "b"})
    cfg.preprocess.spacing = spacing
    cfg.preprocess.intensity.mode = "none"
    return cfg


def _roundtrip(shape, affine, spacing):
    """One-hot labels -> preprocessing (per class) -> inverse onto the source grid -> argmax."""
    lab = blob_label(shape)
    pre = inference_transforms(_cfg(spacing))
    channels = [pre({"image": Volume((lab == c).astype(np.float32), affine, source="synthetic")})["image"]
                for c in range(3)]
    onehot = torch.cat([ch.as_tensor() for ch in channels])
    back = to_source_grid(onehot, channels[0].affine, affine, shape)
    assert tuple(back.shape[1:]) == shape
    return lab, back.argmax(0).numpy()


def test_reorientation_inverse_is_exact(geometry):
    """Without resampling, processed -> source is a pure permutation/flip: labels come back identical."""
    _, shape, affine = geometry
    lab, back = _roundtrip(shape, affine, None)
    np.testing.assert_array_equal(back, lab)


def test_resampling_inverse_lands_on_source_grid(geometry):
    name, shape, affine = geometry
    lab, back = _roundtrip(shape, affine, [1.0, 1.0, 1.0])
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    for c in (1, 2):
        a, b = lab == c, back == c
        d = 2 * (a & b).sum() / (a.sum() + b.sum())
        # small objects on coarse grids lose edge voxels; a flip or shift would score far lower
        assert d > (0.6 if name == "anisotropic" else 0.85), (name, c, d)
        # no systematic displacement: centroids agree within half a voxel along each axis
        shift_mm = (np.argwhere(a).mean(0) - np.argwhere(b).mean(0)) * spacing
        assert np.all(np.abs(shift_mm) <= 0.5 * spacing + 1e-6), (name, c, shift_mm)


def test_processed_grid_is_ras():
    _, shape, affine = "flipped", (18, 20, 16), np.diag([-1.2, 0.8, -1.5, 1.0])
    vol = Volume(np.zeros(shape, np.float32), affine)
    img = inference_transforms(_cfg(None))({"image": vol})["image"]
    diag = np.diag(np.asarray(img.affine)[:3, :3])
    assert np.all(diag > 0)


def test_training_augmentations_keep_labels_and_shapes():
    from medseg.preprocessing import train_transforms

    cfg = Config(labels={0: "bg", 1: "a", 2: "b"})
    cfg.patch.size = [16, 16, 8]
    cfg.patch.samples_per_volume = 2
    aug = cfg.augment
    aug.affine_prob = aug.intensity_prob = aug.noise_prob = aug.gamma_prob = aug.blur_prob = 1.0
    shape, affine = (20, 24, 12), np.diag([0.9, 1.1, 2.0, 1.0])
    lab = blob_label(shape)
    item = {"image": Volume((100 + 50 * lab).astype(np.float32), affine), "label": Volume(lab, affine)}
    names = [type(t).__name__ for t in train_transforms(cfg).transforms]
    assert {"RandAdjustContrastd", "RandGaussianSmoothd", "RandAffined", "RandFlipd"} <= set(names)
    out = train_transforms(cfg)(item)
    assert len(out) == 2
    for sample in out:
        assert tuple(sample["image"].shape) == (1, 16, 16, 8) == tuple(sample["label"].shape)
        assert set(torch.unique(sample["label"]).tolist()) <= {0.0, 1.0, 2.0}
        assert torch.isfinite(sample["image"]).all()


@pytest.mark.parametrize("shape,dtype", [((40, 30, 37), np.int16), ((24, 20, 35, 2), np.float32),
                                         ((30, 20, 17), np.uint16)])
def test_fortran_order_arrays_become_the_same_channel_first_tensor(shape, dtype, monkeypatch):
    """Large arrays in Fortran order (as NIfTI and NRRD readers give them) are copied in slabs: same values."""
    from medseg.preprocessing import pipeline

    monkeypatch.setattr(pipeline, "SLAB_COPY_VOXELS", 100)
    arr = np.asfortranarray((np.random.default_rng(0).normal(size=shape) * 1000).astype(dtype))
    ref = torch.as_tensor(np.ascontiguousarray(arr).astype(np.float64)).float()
    ref = ref.permute(3, 0, 1, 2) if ref.ndim == 4 else ref[None]
    got = pipeline._channel_first_tensor(arr, torch.float32)
    assert got.is_contiguous() and got.dtype == torch.float32 and torch.equal(got, ref)
