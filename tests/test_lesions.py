"""Per-lesion statistics and the surface / volume / lesion-wise evaluation metrics, on shapes of known size."""

from __future__ import annotations

import csv
import itertools
import json
import math

import nibabel as nib
import numpy as np
import pytest
from conftest import GEOMETRIES, make_affine, rotation
from scipy import ndimage
from scipy.spatial.distance import pdist

from medseg.core.errors import OutputError
from medseg.evaluation.metrics import assd, evaluate, hd95, score_case, surface_dice
from medseg.io.volume import Volume, load_volume, save_volume
from medseg.evaluation.lesions import (
    label_components,
    lesion_table,
    longest_diameter_mm,
    match_lesions,
    write_lesion_report,
)

# ---------------------------------------------------------------------------
# lesion_table


@pytest.mark.parametrize("centre", [(24.0, 24.0, 7.0), (23.7, 24.2, 6.4)], ids=["on-voxel", "off-grid"])
def test_ball_volume_and_diameter_on_anisotropic_grid(centre):
    r, spacing = 10.0, np.array([0.5, 0.5, 2.0])
    g = np.indices((50, 50, 16)).astype(float)
    inside = sum(((g[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)) <= r * r
    (les,) = lesion_table(Volume(inside.astype(np.uint8), make_affine(np.eye(3), spacing, (3.0, -2.0, 1.0))))
    exact = 4 / 3 * math.pi * r ** 3 / 1000
    # Voxel centres within r: sampling a 20 mm ball with 2 mm slices loses about 1 %
    # (2 * pi * sum(r^2 - z^2) over the 11 slice centres = 4147 vs 4189 mm^3) and counting 0.5 mm
    # pixels per slice adds well under 1 %; 3 % covers both.
    assert les.volume_ml == pytest.approx(exact, rel=0.03)
    # and always: between the balls of radius r -/+ half a voxel diagonal
    h = np.linalg.norm(spacing) / 2
    assert 4 / 3 * math.pi * (r - h) ** 3 / 1000 < les.volume_ml < 4 / 3 * math.pi * (r + h) ** 3 / 1000
    assert les.voxels == int(inside.sum()) and les.volume_ml == pytest.approx(les.voxels * 0.5 * 0.5 * 2 / 1000)
    # diameter between voxel centres: never above 2r, at most one voxel diagonal below
    assert 2 * r - np.linalg.norm(spacing) <= les.diameter_mm <= 2 * r + 1e-9
    assert np.allclose(les.centroid_ras, np.asarray(centre) * spacing + (3.0, -2.0, 1.0), atol=0.05)


def _box_mask(shape, lo, hi):
    m = np.zeros(shape, np.uint8)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return m


@pytest.mark.parametrize("geom", sorted(GEOMETRIES))
def test_box_exact_count_volume_diameter_and_bbox(geom):
    shape, affine = GEOMETRIES[geom]
    lo, hi = (2, 3, 1), (7, 9, 5)  # 5 x 6 x 4 voxels
    (les,) = lesion_table(Volume(_box_mask(shape, lo, hi), affine))
    assert les.voxels == 120
    assert les.volume_ml == pytest.approx(120 * abs(np.linalg.det(affine[:3, :3])) / 1000, rel=1e-12)
    corners = np.array(list(itertools.product(*[(a, b - 1) for a, b in zip(lo, hi)])), float)
    world = corners @ affine[:3, :3].T
    assert les.diameter_mm == pytest.approx(pdist(world).max(), rel=1e-9)
    assert les.bbox_min == lo and les.bbox_max == tuple(b - 1 for b in hi)


@pytest.mark.parametrize("geom", ["oblique", "flipped", "permuted"])
def test_centroid_in_world_coordinates_matches_itk(geom, tmp_path):
    import SimpleITK as sitk

    shape, affine = GEOMETRIES[geom]
    mask = _box_mask(shape, (2, 3, 1), (7, 9, 5))
    mask[2, 3, 5] = 1  # an extra voxel so the centroid is off the box centre
    vol = Volume(mask, affine)
    (les,) = lesion_table(vol)
    centre = np.argwhere(mask).mean(axis=0)
    # LPS as DICOM / ITK / Slicer read it, from the file written to disk
    img = sitk.ReadImage(str(save_volume(vol, tmp_path / "m.nrrd")))
    lps = img.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre])
    assert np.allclose(les.centroid_lps, lps, atol=1e-6)
    assert np.allclose(les.centroid_ras, (affine @ [*centre, 1.0])[:3], atol=1e-9)
    assert np.allclose(les.centroid_ras, np.array(lps) * (-1, -1, 1), atol=1e-6)


def test_separate_lesions_give_rows_by_label_then_size():
    lab = np.zeros((30, 30, 20), np.uint8)
    lab[2:5, 2:5, 2:5] = 1  # 27 voxels
    lab[10:20, 10:14, 10:12] = 1  # 80 voxels
    lab[25:27, 25:27, 15:17] = 2  # 8 voxels
    rows = lesion_table(Volume(lab, np.eye(4)), names={1: "tumour", 2: "oedema"})
    assert [(r.label, r.name, r.lesion, r.voxels) for r in rows] == [
        (1, "tumour", 1, 80), (1, "tumour", 2, 27), (2, "oedema", 1, 8)]
    assert rows[0].diameter_mm == pytest.approx(math.sqrt(9 ** 2 + 3 ** 2 + 1))
    assert lesion_table(Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4))) == []
    (single,) = lesion_table(Volume(_box_mask((4, 4, 4), (1, 1, 1), (2, 2, 2)), np.eye(4)))
    assert single.diameter_mm == 0.0  # one voxel: its centre only


def test_connectivity_6_18_26():
    corner = np.zeros((5, 5, 5), bool)
    corner[1, 1, 1] = corner[2, 2, 2] = True
    edge = np.zeros((5, 5, 5), bool)
    edge[1, 1, 1] = edge[2, 2, 1] = True
    assert [label_components(corner, c)[1] for c in (6, 18, 26)] == [2, 2, 1]
    assert [label_components(edge, c)[1] for c in (6, 18, 26)] == [2, 1, 1]
    with pytest.raises(ValueError):
        label_components(edge, 8)


def test_diameter_equals_brute_force_on_random_shapes():
    """Hull shortcut and the flat / straight fallbacks against all pairs, on a sheared grid."""
    rng = np.random.default_rng(0)
    affine = np.array([[0.3, 0.2, 0.1, 5], [0.0, 1.1, -0.4, 0], [0.2, 0.0, 2.5, 0], [0, 0, 0, 1]])
    shapes = [tuple(rng.integers(1, 20, 3)) for _ in range(40)] + [(1, 15, 12), (14, 1, 1), (9, 9, 1)]
    for shape in shapes:
        mask = rng.random(shape) < rng.uniform(0.05, 0.9)
        if not mask.any():
            continue
        pts = np.argwhere(mask) @ affine[:3, :3].T
        expected = pdist(pts).max() if len(pts) > 1 else 0.0
        assert longest_diameter_mm(mask, affine) == pytest.approx(expected, abs=1e-9), shape
    flat = np.zeros((3, 200, 150), bool)
    flat[1, 10:190, 5:140] = True  # a single plane: the 3D hull is degenerate
    assert longest_diameter_mm(flat, np.eye(4)) == pytest.approx(math.hypot(179, 134))


def test_write_lesion_report_csv_and_json(tmp_path):
    lab = np.zeros((20, 20, 10), np.uint8)
    lab[2:6, 2:6, 2:4] = 1
    lab[10:12, 10:12, 6:8] = 1
    affine = make_affine(rotation(10, 0, 20), (0.8, 0.8, 3.0), (1.0, 2.0, 3.0))
    rows = lesion_table(Volume(lab, affine), names={1: "tumour"})
    out = write_lesion_report(rows, tmp_path / "r" / "lesions.csv")
    read = list(csv.DictReader(out.open()))
    assert len(read) == 2 and read[0]["name"] == "tumour" and int(read[0]["voxels"]) == 32
    assert float(read[0]["volume_ml"]) == pytest.approx(rows[0].volume_ml, rel=1e-5)
    assert float(read[1]["centroid_lps_L"]) == pytest.approx(rows[1].centroid_lps[0], abs=1e-3)
    assert read[1]["bbox_max_k"] == "7"
    data = json.loads(write_lesion_report(rows, tmp_path / "lesions.json").read_text())
    assert data["count"] == 2 and data["lesions"][1]["bbox_min"] == [10, 10, 6]
    assert data["lesions"][0]["diameter_mm"] == pytest.approx(rows[0].diameter_mm, abs=1e-4)
    assert write_lesion_report([], tmp_path / "empty.csv").read_text().startswith("label,name,lesion,voxels")
    with pytest.raises(OutputError, match="csv or .json"):
        write_lesion_report(rows, tmp_path / "lesions.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.csv", "lesions.json", "r"]  # no temp files left


# ---------------------------------------------------------------------------
# surface metrics and volumes


def _shifted_boxes():
    a = np.zeros((40, 40, 40), bool)
    b = np.zeros_like(a)
    a[10:20, 10:20, 10:20] = True
    b[10:20, 10:20, 12:22] = True  # same cube moved 2 voxels along k
    return a, b


def test_surface_dice_and_assd_on_shifted_box():
    a, b = _shifted_boxes()
    # Each cube has 10^3 - 8^3 = 488 surface voxels. Distances (1 mm voxels) from a's to b's surface:
    # bottom face k=10: 100 at 2; ring k=11: 36 at 1; rings k=12..18: 252 at 0; top face k=19: ring 36 at 0,
    # the next 28 at 1 (one voxel from b's side), the inner 6x6=36 at 2. By symmetry the same from b.
    assert surface_dice(a, a, (1, 1, 1)) == 1.0 and assd(a, a, (1, 1, 1)) == 0.0
    assert assd(a, b, (1, 1, 1)) == pytest.approx((100 * 2 + 36 + 28 + 36 * 2) / 488)
    assert assd(a, b, (2, 2, 2)) == pytest.approx(2 * 336 / 488)  # mm, not voxels
    # area-weighted: the faces of the cubes' sides are 10 x 10 squares, 2 voxels apart along k. Within 1 mm lie
    # the side walls' overlap; within 2 mm or more everything
    assert surface_dice(a, b, (1, 1, 1), 2.5) == 1.0
    assert 0.5 < surface_dice(a, b, (1, 1, 1), 1.0) < 1.0


def test_surface_dice_equals_deepminds_reference():
    """Surface Dice as published work computes it: DeepMind's surface-distance package (area-weighted surfels)."""
    sd = pytest.importorskip("surface_distance", reason="the reference package surface-distance is not installed")
    rng = np.random.default_rng(3)
    a, b = _shifted_boxes()
    b[14:18, 4:12, 20:30] = True
    field = ndimage.gaussian_filter(rng.random((24, 20, 16)), 2.0)
    blob_a = field > np.percentile(field, 70)
    blob_b = ndimage.binary_dilation(blob_a, iterations=1) & (rng.random(blob_a.shape) > 0.1)
    assert 0 < blob_a.sum() < blob_b.sum()
    for x, y in ((a, b), (blob_a, blob_b)):
        for spacing in ((1.0, 1.0, 1.0), (0.7, 0.9, 2.0)):
            for tol in (0.5, 1.0, 2.0):
                ref = sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(y, x, spacing), tol)
                assert surface_dice(x, y, spacing, tol) == pytest.approx(ref, abs=1e-5), (spacing, tol)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI deprecation inside compute_surface_dice
def test_assd_agrees_with_monai_on_anisotropic_grid():
    import torch
    from monai.metrics import compute_average_surface_distance

    a, b = _shifted_boxes()
    b[14:18, 4:12, 20:30] = True
    spacing = (0.7, 0.9, 2.0)

    def onehot(m):
        return torch.from_numpy(np.stack([~m, m]))[None].float()

    # MONAI averages the two directed means; ours pools all surface voxels (equal when both counts are)
    d_ab = compute_average_surface_distance(onehot(a), onehot(b), spacing=spacing).item()
    d_ba = compute_average_surface_distance(onehot(b), onehot(a), spacing=spacing).item()
    na, nb = (int(m.sum() - ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1)).sum()) for m in (a, b))
    assert na == 488
    assert assd(a, b, spacing) == pytest.approx((d_ab * na + d_ba * nb) / (na + nb), rel=1e-5)


def test_empty_masks_and_volume_difference():
    a, _ = _shifted_boxes()
    z = np.zeros_like(a)
    assert math.isnan(surface_dice(z, z, (1, 1, 1))) and math.isnan(assd(z, z, (1, 1, 1)))
    assert surface_dice(a, z, (1, 1, 1)) == 0.0 and assd(z, a, (1, 1, 1)) == math.inf
    assert hd95(a, z, (1, 1, 1)) == math.inf and math.isnan(hd95(z, z, (1, 1, 1)))
    aff = np.diag([1.0, 1.0, 2.0, 1.0])  # 2 mm^3 voxels
    pred = Volume(a.astype(np.uint8), aff)
    ref = Volume(np.zeros_like(pred.array), aff)
    ref.array[10:20, 10:20, 10:18] = 1
    cs = score_case(pred, ref, [1], "c")
    assert cs.pred_volume_ml[1] == pytest.approx(2.0) and cs.ref_volume_ml[1] == pytest.approx(1.6)
    assert cs.avd_ml[1] == pytest.approx(0.4) and cs.rvd_pct[1] == pytest.approx(25.0)
    empty = score_case(Volume(np.zeros_like(pred.array), aff), ref, [1], "e")
    assert empty.rvd_pct[1] == -100.0 and empty.dice[1] == 0.0 and empty.lesions[1].sensitivity == 0.0
    assert math.isnan(empty.lesions[1].precision) and empty.lesions[1].f1 == 0.0
    nothing = score_case(Volume(np.zeros_like(pred.array), aff), Volume(np.zeros_like(pred.array), aff), [1], "n")
    assert math.isnan(nothing.rvd_pct[1]) and nothing.avd_ml[1] == 0.0 and math.isnan(nothing.lesions[1].f1)


# ---------------------------------------------------------------------------
# lesion-wise detection


def _detection_case():
    ref = np.zeros((40, 40, 20), bool)
    pred = np.zeros_like(ref)
    ref[2:8, 2:8, 2:6] = True  # lesion A, 144 voxels: detected
    ref[30:33, 30:33, 10:13] = True  # lesion B, 27 voxels: missed
    pred[4:10, 4:10, 3:7] = True  # 144 voxels, 4 x 4 x 3 = 48 of them on A: IoU 48/240
    pred[20:24, 2:6, 12:16] = True  # false positive, 64 voxels
    return pred, ref


def test_one_missed_one_false_positive():
    pred, ref = _detection_case()
    m = match_lesions(pred, ref, np.diag([0.5, 0.5, 2.0, 1.0]))
    assert (m.n_ref, m.n_pred, m.detected, m.true_positive) == (2, 2, 1, 1)
    assert m.sensitivity == 0.5 and m.precision == 0.5 and m.f1 == pytest.approx(0.5)
    assert [(les.voxels, les.extra["detected"]) for les in m.reference] == [(144, True), (27, False)]
    assert m.reference[0].extra["best_iou"] == pytest.approx(0.2)
    assert m.reference[1].diameter_mm == pytest.approx(math.sqrt(1 + 1 + 16))
    assert m.reference[0].volume_ml == pytest.approx(144 * 0.5 / 1000)
    assert [les.voxels for les in m.false_positive] == [64]
    strict = match_lesions(pred, ref, np.eye(4), min_iou=0.3)  # the overlap on A is too small now
    assert (strict.detected, strict.true_positive, strict.f1) == (0, 0, 0.0)
    big = np.zeros_like(ref)
    big[0:35, 0:35, 0:15] = True  # one prediction covering both: both detected, one true positive
    m2 = match_lesions(big, ref, np.eye(4))
    assert (m2.n_pred, m2.detected, m2.true_positive, m2.sensitivity, m2.precision) == (1, 2, 1, 1.0, 1.0)


def test_evaluate_writes_every_metric(tmp_path):
    pred, ref = _detection_case()
    affine = make_affine(rotation(0, 0, 30), (0.5, 0.5, 2.0), (0.0, 0.0, 0.0))
    for folder, masks in (("pred", (pred, ref)), ("ref", (ref, ref))):
        (tmp_path / folder).mkdir()
        for name, m in zip(("a", "b"), masks):
            nib.save(nib.Nifti1Image(m.astype(np.uint8), affine), str(tmp_path / folder / f"{name}.nii.gz"))
    ev = evaluate(tmp_path / "pred", tmp_path / "ref", names={1: "tumour"}, json_path=tmp_path / "e.json",
                  progress=False, tolerance_mm=2.0)
    assert ev.mean("dice", 1) == pytest.approx((2 * 48 / (208 + 171) + 1) / 2)
    assert ev.mean("hd95", 1) > 0 and ev.mean("lesion_sensitivity", 1) == pytest.approx(0.75)
    totals = ev.lesion_totals(1)
    assert (totals["n_ref"], totals["detected"], totals["n_pred"], totals["true_positive"]) == (4, 3, 4, 3)
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["settings"]["surface_dice_tolerance_mm"] == 2.0
    assert set(data["mean"]["tumour"]) >= {"dice", "hd95_mm", "surface_dice", "assd_mm", "avd_ml", "rvd_pct",
                                           "lesion_sensitivity", "lesion_precision", "lesion_f1"}
    assert data["lesions"]["tumour"]["sensitivity"] == 0.75
    case_a = data["cases"][0]["tumour"]
    assert case_a["lesions"]["f1"] == 0.5 and case_a["surface_dice"] < 1
    assert [r["detected"] for r in case_a["lesions"]["reference"]] == [True, False]
    assert case_a["lesions"]["false_positive"][0]["voxels"] == 64
    assert data["cases"][1]["tumour"]["dice"] == 1.0 and data["cases"][1]["tumour"]["assd_mm"] == 0.0


# ---------------------------------------------------------------------------
# real tumour label maps

# Measured (26-connectivity, voxel-centre diameters):
#   brain1  (0.78 x 0.78 x 6.5 mm): lesion 1  3524 voxels 13.98 mL, 46.5 mm; lesion 2  613 voxels 2.43 mL, 26.4 mm
#   brain2  (0.78 x 0.78 x 6.5 mm): lesion 1   453 voxels  1.80 mL, 19.7 mm
#   breast1 (0.66 x 0.66 x 2.1 mm): lesion 1   143 voxels  0.132 mL, 7.8 mm
TUMOURS = {"brain1": [(3524, 13.981, 46.45), (613, 2.432, 26.44)], "brain2": [(453, 1.797, 19.65)],
           "breast1": [(143, 0.1324, 7.77)]}


@pytest.mark.shared_data
@pytest.mark.parametrize("case", sorted(TUMOURS))
def test_real_tumour_lesion_table(shared_data, case):
    vol = load_volume(shared_data / "tumour" / f"{case}_label.nrrd")
    rows = lesion_table(vol, names={1: "tumour"})
    assert [(r.voxels, round(r.volume_ml, 3), round(r.diameter_mm, 2)) for r in rows] == [
        (n, pytest.approx(ml, abs=1e-3), pytest.approx(d, abs=0.01)) for n, ml, d in TUMOURS[case]]
    for r in rows:
        assert 0.05 < r.volume_ml < 100 and 2 < r.diameter_mm < 100  # plausible for a tumour
        pts = np.argwhere(label_components(vol.array == 1)[0] == r.lesion) @ vol.affine[:3, :3].T
        assert r.diameter_mm == pytest.approx(pdist(pts).max())
        assert np.all(np.array(r.bbox_min) <= r.bbox_max)


@pytest.mark.shared_data
def test_real_tumours_evaluated_against_themselves(shared_data, tmp_path):
    for folder in ("pred", "ref"):
        (tmp_path / folder).mkdir()
        for case in TUMOURS:
            (tmp_path / folder / f"{case}.nrrd").symlink_to(shared_data / "tumour" / f"{case}_label.nrrd")
    ev = evaluate(tmp_path / "pred", tmp_path / "ref", names={1: "tumour"}, progress=False)
    assert [cs.case for cs in ev.cases] == sorted(TUMOURS)
    for cs in ev.cases:
        assert cs.dice[1] == 1.0 and cs.hd95[1] == 0.0 and cs.surface_dice[1] == 1.0 and cs.assd[1] == 0.0
        assert cs.lesions[1].sensitivity == 1.0 and cs.lesions[1].precision == 1.0 and cs.avd_ml[1] == 0.0
    assert ev.lesion_totals(1)["n_ref"] == 4
    # dropping brain1's smaller lesion from the prediction: one of its two lesions missed
    vol = load_volume(shared_data / "tumour" / "brain1_label.nrrd")
    labelled, _ = label_components(vol.array == 1)
    cs = score_case(vol.with_array(np.where(labelled == 1, 1, 0).astype(np.uint8)), vol, [1], "brain1")
    assert cs.lesions[1].sensitivity == 0.5 and cs.lesions[1].precision == 1.0
    assert cs.avd_ml[1] == pytest.approx(613 * vol.voxel_volume_ml)
    assert 0 < cs.surface_dice[1] < 1 and cs.hd95[1] > 0
