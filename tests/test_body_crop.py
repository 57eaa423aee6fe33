"""The sliding window runs on the body's bounding box only: air planes are cut, tissue never is, and the labels
inside the box are the whole grid's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_checkpoint

from medseg.inference.predictor import Predictor, body_crop
from medseg.io import Volume
from medseg.preprocessing.pipeline import BODY_MARGIN, body_box, otsu_threshold


def _ct_like(shape=(100, 90, 80), body=(slice(20, 70), slice(15, 80), slice(10, 60)), seed=0) -> np.ndarray:
    """Air (-1000 HU with noise) around a block of soft tissue (40 HU) holding a dark 'lung' pocket."""
    rng = np.random.default_rng(seed)
    x = rng.normal(-1000, 15, shape).astype(np.float32)
    x[body] = rng.normal(40, 15, x[body].shape)
    x[25:40, 20:40, 15:30] = rng.normal(-850, 30, (15, 20, 15))  # dark tissue inside the body
    return x


def test_otsu_threshold_lies_in_the_middle_of_the_gap():
    g = torch.Generator().manual_seed(0)
    air = -1000 + 10 * torch.randn(7000, generator=g)
    tissue = 40 + 10 * torch.randn(1000, generator=g)
    t = otsu_threshold(torch.cat([air, tissue]))
    gap_mid = (float(air.max()) + float(tissue.min())) / 2
    assert abs(t - gap_mid) < 30, (t, gap_mid)
    assert otsu_threshold(torch.full((10,), 3.0)) == 3.0


def test_body_box_cuts_air_planes_only():
    x = _ct_like()
    box = body_box(torch.from_numpy(x)[None])
    m = BODY_MARGIN
    assert box == (slice(20 - m, 70 + m), slice(15 - m, 80 + m), slice(10 - m, 60 + m))
    # the lung pocket at the body's edge stays inside: grow it to the body's first planes
    x[20:40, 15:40, 10:30] = -850
    assert body_box(torch.from_numpy(x)[None]) == box
    # padding outside a CT's circular field of view (far below air, the fill) does not become the dark class
    gi, gj = np.meshgrid(np.arange(100) - 49.5, np.arange(90) - 44.5, indexing="ij")
    x[(gi / 50) ** 2 + (gj / 45) ** 2 > 1] = -3024
    assert body_box(torch.from_numpy(x)[None]) == box
    # several sequences: the union of their bodies
    y = _ct_like(body=(slice(5, 30), slice(15, 80), slice(10, 60)), seed=1)
    both = body_box(torch.from_numpy(np.stack([x, y])))
    assert both[0] == slice(0, 70 + m) and both[1:] == box[1:]


def test_body_box_of_a_constant_image_is_none():
    assert body_box(torch.zeros(1, 20, 20, 20)) is None


def _counting(pred: Predictor) -> list[int]:
    """Count the windows the predictor's runner is given."""
    calls: list[int] = []
    inner = pred.runner

    class Counting:
        def __getattr__(self, name):
            return getattr(inner, name)

        def __call__(self, tiles):
            calls.append(int(tiles.shape[0]))
            return inner(tiles)

    pred.runner = Counting()
    return calls


def _with_and_without_crop(ck, x: np.ndarray) -> dict[bool, tuple[np.ndarray, int]]:
    """``crop_to_body`` on and off: the labels and the number of windows run."""
    runs = {}
    for crop in (False, True):
        pred = Predictor(ck, device="cpu", crop_to_body=crop)
        calls = _counting(pred)
        runs[crop] = (pred.predict_volume(Volume(x, np.eye(4))).array, sum(calls))
    return runs


def test_prediction_on_the_body_box_matches_the_whole_grid(tmp_path, threshold_model):
    """A model that labels each voxel by its intensity alone: cropping changes nothing but the window count."""
    ck = write_checkpoint(tmp_path / "t.pt", model_name=threshold_model, intensity="none", patch=(16, 16, 16))
    x = np.full((100, 90, 80), -5.0, np.float32)  # 'air', class 0 for the threshold model
    x[20:70, 15:80, 10:60] = 1.0
    x[40:60, 30:50, 20:40] = 2.0
    x[2, 2, 2] = x[97, 87, 77] = 1.0  # lone voxels far outside the body count as body: the box takes them in
    runs = _with_and_without_crop(ck, x)
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    assert runs[True][1] == runs[False][1]  # the lone voxels keep the whole grid

    x[2, 2, 2] = x[97, 87, 77] = -5.0
    x[x < 0] += np.random.default_rng(0).normal(0, 0.3, int((x < 0).sum()))  # noisy air: no fill value
    runs = _with_and_without_crop(ck, x)
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    assert runs[True][1] < 0.7 * runs[False][1], (runs[True][1], runs[False][1])


def test_outside_the_box_is_background_even_where_the_model_says_otherwise(tmp_path, threshold_model):
    ck = write_checkpoint(tmp_path / "t.pt", model_name=threshold_model, intensity="none", patch=(16, 16, 16))
    x = np.full((100, 90, 80), 1.0, np.float32)  # 'air' that the threshold model calls class 1
    x += np.random.default_rng(0).normal(0, 0.05, x.shape).astype(np.float32)
    x[30:60, 30:60, 30:60] = 2.0
    pred = Predictor(ck, device="cpu")
    img = torch.from_numpy(x)[None]
    roi = [16, 16, 16]
    box = body_crop(pred.cfg, img, roi)
    assert box == tuple(slice(30 - BODY_MARGIN, 60 + BODY_MARGIN) for _ in range(3))
    labels = pred.predict_volume(Volume(x, np.eye(4))).array
    inside = np.zeros(x.shape, bool)
    inside[box] = True
    assert (labels[~inside] == 0).all()
    assert (labels[30:60, 30:60, 30:60] == 2).all() and (labels[inside] == 1).sum() > 0
    pred.cfg.inference.crop_to_body = False
    assert body_crop(pred.cfg, img, roi) is None
    assert (pred.predict_volume(Volume(x, np.eye(4))).array[~inside] == 1).all()


def test_no_crop_when_it_saves_no_window(tmp_path, threshold_model):
    ck = write_checkpoint(tmp_path / "t.pt", model_name=threshold_model, intensity="none", patch=(16, 16, 16))
    pred = Predictor(ck, device="cpu")
    x = torch.full((1, 16, 16, 16), -5.0)
    x[0, 4:12, 4:12, 4:12] = 2.0
    assert body_crop(pred.cfg, x, [16, 16, 16]) is None  # one window
    x = torch.full((1, 40, 40, 40), -5.0)
    x[0, 2:38, 2:38, 2:38] = 2.0
    assert body_crop(pred.cfg, x, [16, 16, 16]) is None  # the margin reaches the edges


@pytest.mark.parametrize("steps", ["monai", "nnunet"])
def test_window_count_matches_the_sliding_window(steps):
    from medseg.inference.engine import sliding_window_probs, window_count

    calls = []

    def runner(tiles):
        calls.append(int(tiles.shape[0]))
        return torch.zeros(tiles.shape[0], 2, *tiles.shape[2:])

    for shape in [(40, 33, 50), (10, 70, 16), (16, 16, 16)]:
        calls.clear()
        sliding_window_probs(runner, torch.zeros(1, *shape), [16, 16, 16], num_classes=2, overlap=0.25, steps=steps,
                             sw_batch_size=1)
        assert sum(calls) == window_count(shape, [16, 16, 16], 0.25, steps), shape


def test_predict_runs_the_whole_grid_when_asked(tmp_path, threshold_model):
    """``crop_to_body=False`` (``--no-crop-body``) reaches the predictor through ``predict``'s runtime options."""
    import nibabel as nib

    from medseg.apps.run import predict

    ck = write_checkpoint(tmp_path / "t.pt", model_name=threshold_model, intensity="none", patch=(16, 16, 16))
    x = np.full((60, 60, 60), 1.0, np.float32) + np.random.default_rng(0).normal(0, 0.05, (60, 60, 60)).astype(np.float32)
    x[25:35, 25:35, 25:35] = 2.0
    src = tmp_path / "in" / "v.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(x, np.eye(4)), str(src))
    outside = np.ones(x.shape, bool)
    outside[25 - BODY_MARGIN:35 + BODY_MARGIN, 25 - BODY_MARGIN:35 + BODY_MARGIN, 25 - BODY_MARGIN:35 + BODY_MARGIN] = False
    for crop, expected in ((None, 0), (False, 1)):
        out = tmp_path / f"out_{crop}"
        predict([src], out, model=ck, device="cpu", progress=False, runtime={"crop_to_body": crop})
        labels = np.asarray(nib.load(str(out / "v.nii.gz")).dataobj)
        assert (labels[outside] == expected).all(), crop
