"""RECIST long/short axes of lesions and BraTS 2023 lesion-wise Dice/HD95, on shapes of known size."""

from __future__ import annotations

import csv
import math
import time

import numpy as np
import pytest
from conftest import make_affine, rotation
from scipy.spatial.distance import pdist

from medseg.evaluation.brats import (
    BRATS_HD95_PENALTY_MM,
    BRATS_MIN_LESION_VOXELS,
    lesionwise,
)
from medseg.evaluation.lesions import (
    Lesion,
    acquisition_axis,
    lesion_table,
    recist_axes,
    write_lesion_report,
)
from medseg.evaluation.metrics import hd95
from medseg.io.volume import Volume

# ---------------------------------------------------------------------------
# acquisition plane


@pytest.mark.parametrize("spacing, axis", [
    ((1.0, 1.0, 1.0), 2),  # all tie: k
    ((1.0, 1.0, 1.005), 2),  # within 1 %: still a tie
    ((1.0, 1.005, 1.0), 2),  # j is larger, but within 1 %: k
    ((0.8, 0.8, 5.0), 2),
    ((4.0, 1.0, 1.0), 0),
    ((1.0, 3.0, 1.0), 1),
    ((5.0, 5.0, 1.0), 1),  # i and j tie: the last of them
    ((1.0, 1.02, 1.0), 1),  # 2 %: no tie
])
def test_acquisition_axis_is_the_thickest_or_the_last_tied(spacing, axis):
    assert acquisition_axis(make_affine(np.eye(3), spacing, (0, 0, 0))) == axis
    # rotation and flips do not change the spacing, so not the axis either
    assert acquisition_axis(make_affine(rotation(30, -20, 10) @ np.diag([-1, 1, -1]), spacing, (5, 6, 7))) == axis


# ---------------------------------------------------------------------------
# RECIST axes of an ellipsoid of known size

LONG, SHORT = 40.0, 20.0  # in-plane axes of the ellipsoid's central section, mm


def _ellipsoid(shape, spacing, plane, angle_deg=25.0, offset=(0.3, 0.4), depth_mm=12.0):
    """Voxel-centre mask of an ellipsoid whose section through the centre (on a slice) has axes
    LONG x SHORT mm, turned ``angle_deg`` in the plane; off-grid in-plane by ``offset`` voxels."""
    a, b = [ax for ax in range(3) if ax != plane]
    g = np.indices(shape).astype(float)
    centre = np.array(shape, float) // 2
    centre[a] += offset[0]
    centre[b] += offset[1]
    x, y, z = ((g[ax] - centre[ax]) * spacing[ax] for ax in (a, b, plane))
    t = math.radians(angle_deg)
    u, v = x * math.cos(t) + y * math.sin(t), -x * math.sin(t) + y * math.cos(t)
    return (u / (LONG / 2)) ** 2 + (v / (SHORT / 2)) ** 2 + (z / (depth_mm / 2)) ** 2 <= 1


GRIDS = {
    # name: (shape, direction, spacing, expected plane axis)
    "isotropic": ((52, 52, 15), np.eye(3), (1.0, 1.0, 1.0), 2),
    "anisotropic": ((64, 64, 5), np.eye(3), (0.8, 0.8, 5.0), 2),
    "flipped": ((48, 58, 7), np.diag([-1.0, 1.0, -1.0]), (1.1, 0.9, 3.0), 2),
    "oblique": ((58, 58, 7), rotation(0, 30, 0), (0.9, 0.9, 2.5), 2),
    "thick-i": ((5, 52, 52), np.eye(3), (4.0, 1.0, 1.0), 0),
}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_recist_axes_of_an_ellipsoid(name):
    shape, direction, spacing, plane = GRIDS[name]
    affine = make_affine(direction, spacing, (-20.0, 13.5, 4.0))
    mask = _ellipsoid(shape, spacing, plane)
    long, short, axis = recist_axes(mask, affine)
    assert axis == plane
    s = max(sp for ax, sp in enumerate(spacing) if ax != plane)  # in-plane voxel size
    # between voxel centres inside the ellipse: never longer than the true axis, at most a voxel shorter
    assert LONG - s <= long <= LONG + 1e-9
    assert abs(short - SHORT) <= s
    # the same through lesion_table, rounded in the reports
    (les,) = lesion_table(Volume(mask.astype(np.uint8), affine))
    assert (les.long_axis_mm, les.short_axis_mm, les.plane_axis) == (long, short, plane)
    assert les.to_dict()["long_axis_mm"] == round(long, 4) and les.row()["short_axis_mm"] == round(short, 4)
    # the 3D diameter is at least the in-slice long axis
    assert les.diameter_mm >= long - 1e-9


def test_recist_long_axis_is_the_largest_slice_section():
    # an ellipsoid cut off-centre in k: the largest section is on the slice nearest its centre
    spacing = (1.0, 1.0, 2.0)
    g = np.indices((50, 50, 12)).astype(float)
    centre = (24.5, 24.0, 5.3)
    r = 15.0
    ball = sum(((g[ax] - centre[ax]) * spacing[ax]) ** 2 for ax in range(3)) <= r * r
    long, short, axis = recist_axes(ball, make_affine(np.eye(3), spacing, (0, 0, 0)))
    assert axis == 2
    radius5 = math.sqrt(r * r - (0.3 * 2.0) ** 2)  # the section of slice k = 5
    assert 2 * radius5 - 1.0 <= long <= 2 * radius5 + 1e-9
    assert abs(short - 2 * radius5) <= 1.0


@pytest.mark.parametrize("direction, spacing, plane", [
    (np.eye(3), (1.0, 1.0, 1.0), 2),
    (np.eye(3), (0.7, 1.1, 3.0), 2),
    (rotation(30, 0, 0) @ np.diag([-1.0, 1.0, 1.0]), (0.7, 1.1, 3.0), 2),
    (rotation(10, 20, 30), (4.0, 0.9, 1.2), 0),
])
def test_recist_axes_of_a_rectangle_are_its_diagonal_and_perpendicular_chord(direction, spacing, plane):
    n = [4, 4, 4]
    a, b = [ax for ax in range(3) if ax != plane]
    n[a], n[b] = 26, 11
    mask = np.zeros([m + 4 for m in n], bool)
    mask[2:2 + n[0], 2:2 + n[1], 2:2 + n[2]] = True
    width, height = (n[a] - 1) * spacing[a], (n[b] - 1) * spacing[b]  # between voxel centres
    diagonal = math.hypot(width, height)
    # the chords perpendicular to a diagonal of a W x H rectangle (W >= H) are longest between the
    # two long sides, where a right triangle with the diagonal gives them length H * D / W
    chord = min(width, height) * diagonal / max(width, height)
    long, short, axis = recist_axes(mask, make_affine(direction, spacing, (1.0, 2.0, 3.0)))
    assert axis == plane
    assert long == pytest.approx(diagonal, rel=1e-9)
    assert short == pytest.approx(chord, rel=1e-9)


def test_recist_axes_across_a_chosen_axis():
    mask = np.zeros((12, 9, 7), bool)
    mask[1:11, 1:8, 1:6] = True  # 10 x 7 x 5 voxels, 1 mm: centres span 9 x 6 x 4 mm
    affine = np.eye(4)
    for plane, (w, h) in {0: (6, 4), 1: (9, 4), 2: (9, 6)}.items():
        d = math.hypot(w, h)
        assert recist_axes(mask, affine, plane_axis=plane) == pytest.approx((d, h * d / w, plane))
    with pytest.raises(ValueError, match="plane_axis"):
        recist_axes(mask, affine, plane_axis=3)


def test_recist_axes_of_degenerate_shapes():
    affine = make_affine(np.eye(3), (0.5, 0.5, 2.0), (0, 0, 0))
    mask = np.zeros((10, 10, 5), bool)
    assert recist_axes(mask, affine) == (0.0, 0.0, 2)
    mask[3, 4, 2] = True
    assert recist_axes(mask, affine) == (0.0, 0.0, 2)  # one voxel: its centre
    mask[3, 4, 1:4] = True  # a line across the slices: one voxel per slice
    assert recist_axes(mask, affine) == (0.0, 0.0, 2)
    mask[:] = False
    mask[1:8, 4, 2] = True  # a line of 7 voxels in a slice
    assert recist_axes(mask, affine) == pytest.approx((3.0, 0.0, 2))


SHEARED = np.array([[0.9, 0.35, 0.2, 1.0], [0.0, 1.1, 0.0, 2.0], [0.0, 0.1, 2.7, 3.0], [0, 0, 0, 1]])  # tilted, skewed


@pytest.mark.parametrize("affine", [make_affine(rotation(15, -10, 30), (0.9, 1.1, 2.7), (-40.5, 12.25, 7.0)), SHEARED],
                         ids=["oblique", "sheared"])
def test_recist_long_axis_matches_brute_force_on_random_blobs(affine):
    rng = np.random.default_rng(7)
    for _ in range(15):
        blob = rng.random((14, 12, 6)) < 0.25
        long, short, axis = recist_axes(blob, affine)
        assert axis == 2
        best = 0.0
        for k in range(blob.shape[2]):
            ijk = np.argwhere(blob[:, :, k])
            if len(ijk) > 1:
                best = max(best, pdist(np.c_[ijk[:, :2], np.full(len(ijk), k)] @ affine[:3, :3].T).max())
        assert long == pytest.approx(best, rel=1e-9)
        assert 0.0 <= short <= long + 1e-9


def test_recist_axes_are_fast_on_a_large_lesion():
    mask = np.zeros((64, 64, 44), bool)
    mask[2:62, 2:62, 2:42] = True  # 60 x 60 x 40, every slice ties for the long axis
    g = np.indices(mask.shape)
    mask &= (g[0] - 32) ** 2 + (g[1] - 30) ** 2 < 31 ** 2  # rounded corners: many hull vertices
    start = time.perf_counter()
    long, short, axis = recist_axes(mask, make_affine(rotation(0, 0, 30), (0.8, 0.8, 3.0), (0, 0, 0)))
    assert time.perf_counter() - start < 1.0
    assert axis == 2 and 0.8 * 59 <= long <= 0.8 * math.hypot(59, 59) and short <= long


def test_lesion_report_has_the_recist_columns_next_to_the_diameter(tmp_path):
    lab = np.zeros((30, 30, 8), np.uint8)
    lab[2:22, 3:13, 2:5] = 1
    rows = lesion_table(Volume(lab, make_affine(np.eye(3), (0.5, 0.5, 3.0), (0, 0, 0))))
    read = list(csv.DictReader(write_lesion_report(rows, tmp_path / "l.csv").open()))
    keys = list(read[0])
    i = keys.index("diameter_mm")
    assert keys[i + 1:i + 4] == ["long_axis_mm", "short_axis_mm", "plane_axis"]
    d = math.hypot(9.5, 4.5)
    assert float(read[0]["long_axis_mm"]) == pytest.approx(d, abs=1e-4)
    assert float(read[0]["short_axis_mm"]) == pytest.approx(4.5 * d / 9.5, abs=1e-4)
    assert read[0]["plane_axis"] == "2"
    empty = write_lesion_report([], tmp_path / "e.csv").read_text().splitlines()[0].split(",")
    assert empty[i + 1:i + 4] == ["long_axis_mm", "short_axis_mm", "plane_axis"]
    # a Lesion built without the new fields still works, marked as not measured
    les = Lesion(1, "a", 1, 1, 0.001, 0.0, (0.0,) * 3, (0.0,) * 3, (0,) * 3, (0,) * 3)
    assert (les.long_axis_mm, les.short_axis_mm, les.plane_axis) == (0.0, 0.0, -1)


# ---------------------------------------------------------------------------
# BraTS 2023 lesion-wise Dice and HD95

SHAPE = (60, 60, 40)


def _cube(lo, size, shape=SHAPE):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + s) for a, s in zip(lo, np.broadcast_to(size, 3)))] = True
    return m


def test_lesionwise_identical_masks():
    ref = _cube((5, 5, 5), 8) | _cube((40, 40, 20), 10)
    s = lesionwise(ref, ref, (1.0, 1.0, 1.0))
    assert (s.dice, s.hd95, s.n_ref, s.n_pred_fp) == (1.0, 0.0, 2, 0)
    assert [(e["kind"], e["voxels"], e["dice"]) for e in s.per_lesion] == [("reference", 512, 1.0),
                                                                           ("reference", 1000, 1.0)]


def test_lesionwise_missed_lesion_and_false_positive():
    a, b = _cube((5, 5, 5), 8), _cube((40, 40, 5), 8)
    fp = _cube((5, 40, 28), 6)
    s = lesionwise(a | fp, a | b, (1.0, 1.0, 1.0))
    assert (s.n_ref, s.n_pred_fp) == (2, 1)
    assert s.dice == pytest.approx((1 + 0 + 0) / 3)
    assert s.hd95 == pytest.approx((0 + BRATS_HD95_PENALTY_MM + BRATS_HD95_PENALTY_MM) / 3)
    kinds = {(e["kind"], e["voxels"]): (e["dice"], e["hd95"]) for e in s.per_lesion}
    assert kinds[("false_positive", 216)] == (0.0, 374.0)


def test_lesionwise_partial_overlap_uses_dice_and_hd95_in_mm():
    ref = _cube((10, 10, 10), 10)
    pred = _cube((10, 10, 12), 10)  # moved 2 voxels along k: 800 voxels shared
    for spacing in [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (0.8, 0.8, 3.0)]:
        s = lesionwise(pred, ref, spacing)
        assert s.dice == pytest.approx(2 * 800 / 2000)
        assert s.hd95 == pytest.approx(hd95(pred, ref, spacing)) and s.hd95 == pytest.approx(2 * spacing[2])
    # with a false positive both means halve (HD95 with the penalty)
    s = lesionwise(pred | _cube((40, 40, 30), 5), ref, (1.0, 1.0, 1.0))
    assert s.dice == pytest.approx(0.8 / 2) and s.hd95 == pytest.approx((2.0 + 374.0) / 2)


def test_lesionwise_small_reference_lesions_are_left_out():
    big, small = _cube((5, 5, 5), 10), _cube((40, 40, 30), 3)  # 27 voxels
    assert small.sum() <= BRATS_MIN_LESION_VOXELS
    for pred in (big, big | small, big | _cube((40, 40, 30), 5)):  # missed, found, over-segmented
        s = lesionwise(pred, big | small, (1.0, 1.0, 1.0))
        assert (s.dice, s.hd95, s.n_ref, s.n_pred_fp) == (1.0, 0.0, 1, 0)  # a prediction on it is no FP
    # the official threshold keeps a lesion only above 50 voxels: 50 is left out, 51 counts
    fifty = _cube((40, 40, 30), (5, 5, 2))
    assert lesionwise(big, big | fifty, (1, 1, 1)).dice == 1.0
    s = lesionwise(big, big | fifty | _cube((45, 40, 30), 1), (1, 1, 1))  # 51 voxels, missed
    assert (s.dice, s.n_ref) == (0.5, 2) and s.hd95 == pytest.approx(187.0)
    # only small lesions, nothing predicted elsewhere: nothing to score
    assert lesionwise(small, small, (1, 1, 1)).dice == 1.0
    assert lesionwise(np.zeros(SHAPE, bool), small, (1, 1, 1)).hd95 == 0.0


def test_lesionwise_empty_masks():
    empty = np.zeros(SHAPE, bool)
    s = lesionwise(empty, empty, (1.0, 1.0, 1.0))
    assert (s.dice, s.hd95, s.n_ref, s.n_pred_fp, s.per_lesion) == (1.0, 0.0, 0, 0, [])
    s = lesionwise(_cube((5, 5, 5), 4) | _cube((30, 30, 30), 4), empty, (1.0, 1.0, 1.0))
    assert (s.dice, s.hd95, s.n_ref, s.n_pred_fp) == (0.0, 374.0, 0, 2)
    corners = _cube((5, 5, 5), 4) | _cube((9, 9, 9), 4)  # touching at one corner: one component (26)
    assert lesionwise(corners, empty, (1.0, 1.0, 1.0)).n_pred_fp == 1
    s = lesionwise(empty, _cube((5, 5, 5), 6), (1.0, 1.0, 1.0))
    assert (s.dice, s.hd95, s.n_ref, s.n_pred_fp) == (0.0, 374.0, 1, 0)


def test_lesionwise_dilation_joins_nearby_reference_pieces():
    a = _cube((10, 10, 10), 8)
    b = _cube((22, 10, 10), 8)  # 4 empty voxels between a and b
    ref = a | b
    s = lesionwise(a, ref, (1.0, 1.0, 1.0))  # dilation 3 joins them into one lesion, half found
    assert (s.n_ref, s.n_pred_fp) == (1, 0)
    assert s.dice == pytest.approx(2 * 512 / (512 + 1024))
    assert s.per_lesion[0]["voxels"] == 1024  # the lesion is the reference voxels, not the dilation
    for dilation in (0, 1):  # too little to bridge 4 voxels: two lesions, one found
        s = lesionwise(a, ref, (1.0, 1.0, 1.0), dilation=dilation)
        assert (s.n_ref, s.dice, s.hd95) == (2, 0.5, pytest.approx(187.0))
    far = a | _cube((30, 10, 10), 8)  # 12 voxels apart: separate even with dilation 3
    assert lesionwise(a, far, (1.0, 1.0, 1.0)).n_ref == 2
    # the dilation steps through edges (18-neighbourhood): three steps reach 3 voxels along two
    # axes at once, so cubes 5 empty voxels apart along a diagonal join (face steps alone would not)
    diagonal = a | _cube((23, 23, 10), 8)
    assert lesionwise(a, diagonal, (1.0, 1.0, 1.0)).n_ref == 1
    assert lesionwise(a, a | _cube((25, 25, 10), 8), (1.0, 1.0, 1.0)).n_ref == 2  # 7 apart: separate
    # but not through corners: along the space diagonal three steps reach only 2 voxels per axis
    assert lesionwise(a, a | _cube((22, 22, 22), 8), (1.0, 1.0, 1.0)).n_ref == 1  # 4 apart
    assert lesionwise(a, a | _cube((23, 23, 23), 8), (1.0, 1.0, 1.0)).n_ref == 2  # 5 apart


def test_lesionwise_prediction_near_a_lesion_is_matched_not_false_positive():
    ref = _cube((10, 10, 10), 8)
    near = _cube((20, 10, 10), 8)  # 2 empty voxels away: inside the dilated extent, no overlap
    s = lesionwise(near, ref, (1.0, 1.0, 1.0))
    assert (s.n_ref, s.n_pred_fp, s.dice) == (1, 0, 0.0)
    assert s.hd95 == pytest.approx(hd95(near, ref, (1.0, 1.0, 1.0))) and s.hd95 < 374
    # with no dilation it misses and is a false positive
    s = lesionwise(near, ref, (1.0, 1.0, 1.0), dilation=0)
    assert (s.n_ref, s.n_pred_fp, s.dice, s.hd95) == (1, 1, 0.0, 374.0)


def test_lesionwise_merges_the_predicted_pieces_of_one_lesion():
    ref = _cube((10, 10, 10), 10)
    pred = ref.copy()
    pred[:, :, 14] = False  # two pieces of 400 and 500 voxels
    s = lesionwise(pred, ref, (1.0, 1.0, 1.0))
    assert (s.n_ref, s.n_pred_fp) == (1, 0)
    assert s.per_lesion[0]["pred_components"] == [1, 2]
    assert s.dice == pytest.approx(2 * 900 / 1900)


def test_lesionwise_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        lesionwise(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        lesionwise(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, 0, 1))


def _lesionwise_step_by_step(pred, ref, spacing, dilation=3, min_voxels=50, penalty=374.0):
    """The rule spelled out literally: each lesion dilated on its own, as the official code does."""
    from scipy import ndimage

    full = ndimage.generate_binary_structure(3, 3)
    step = ndimage.generate_binary_structure(3, 2)
    def grow(mask):  # (scipy's iterations=0 would mean "until nothing changes")
        return ndimage.binary_dilation(mask, step, iterations=dilation) if dilation else mask

    pred_cc, n_pred = ndimage.label(pred, full)
    groups, n = ndimage.label(grow(ref), full)
    scores, touched = [], set()
    for g in range(1, n + 1):
        lesion = ref & (groups == g)
        near = set(np.unique(pred_cc[grow(lesion)]).tolist()) - {0}
        touched |= near
        if lesion.sum() <= min_voxels:
            continue
        merged = np.isin(pred_cc, list(near))
        d = 2 * (merged & lesion).sum() / (merged.sum() + lesion.sum())
        scores.append((d, hd95(merged, lesion, spacing) if near else penalty))
    fp = n_pred - len(touched)
    count = len(scores) + fp
    if not count:
        return 1.0, 0.0
    return (sum(d for d, _ in scores) / count, (sum(h for _, h in scores) + penalty * fp) / count)


def test_lesionwise_matches_the_rule_step_by_step_on_random_masks():
    rng = np.random.default_rng(3)
    from scipy import ndimage

    for trial in range(6):
        shape = (28, 26, 20)
        field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
        ref = field > np.quantile(field, 0.9)  # 1 to 16 lesions of all sizes, some touching the border
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) > 0.45
        pred = ndimage.binary_dilation(ref & (rng.random(shape) < 0.6)) | noise  # partly right, with FPs
        spacing = (1.0, 1.0, 1.0) if trial % 2 else (0.9, 1.2, 2.0)
        dilation = (3, 1, 0)[trial % 3]
        s = lesionwise(pred, ref, spacing, dilation=dilation, min_voxels=20)
        assert (s.dice, s.hd95) == pytest.approx(_lesionwise_step_by_step(pred, ref, spacing, dilation, 20))
        assert s.n_ref >= 1 and s.n_pred_fp >= 1 and 0 < s.dice < 1
