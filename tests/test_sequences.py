"""Several MRI sequences per case: finding them in every layout, reading them onto one grid, normalising and
augmenting them together, region targets, and predicting on the reference sequence's grid."""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    GEOMETRIES,
    REPO,
    SHARED,
    assert_clean_error,
    make_affine,
    rotation,
    run_cli,
)

from medseg.core.config import Config, from_dict, load_config
from medseg.core.errors import ConfigError, DataError, GeometryError, MedsegError
from medseg.io.sequences import load_sequences
from medseg.io.volume import Volume, load_volume
from medseg.preprocessing.datasets import dataset_cases, kfold_split, split_cases
from medseg.preprocessing.pipeline import load_case_image
from medseg.preprocessing.verify import verify_dataset

NAMES = ["flair", "t1c"]
SHAPE = (24, 24, 20)
AFFINE = make_affine(np.eye(3), (1.0, 1.0, 1.25), (-12.0, -12.0, -10.0))
GLIOMA = REPO / "configs" / "glioma.yaml"
BRATS = SHARED / "brats2015"


# ---------------------------------------------------------------------------
# helpers


def save(path: Path, array, affine=AFFINE) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64)), str(path))
    return path


def synthetic_case(seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flair, t1c, label) of a skull-stripped 'brain' (0 outside) with an oedema box (2) around a core (1)."""
    rng = np.random.default_rng(seed)
    x, y, z = shape
    lab = np.zeros(shape, np.uint8)
    o = seed % 3
    lab[5 + o:15 + o, 6:16, 4:13] = 2
    lab[8 + o:12 + o, 9:13, 6:10] = 1
    brain = np.zeros(shape, bool)
    brain[2:x - 2, 2:y - 2, 2:z - 2] = True
    flair = np.where(brain, 100.0 + 150.0 * (lab > 0) + rng.normal(0, 3, shape), 0.0).astype(np.float32)
    t1c = np.where(brain, 80.0 + 250.0 * (lab == 1) + rng.normal(0, 3, shape), 0.0).astype(np.float32)
    return flair, t1c, lab


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


REGIONS = [{"name": "whole", "labels": [1, 2]}, {"name": "core", "labels": [1]}]


def seq_config(root=None, *, regions=True, **over) -> Config:
    """A two-sequence (flair, t1c) config with a tiny model; ``over``: nested overrides."""
    d = {
        "name": "seq",
        "labels": {0: "background", 1: "core", 2: "oedema"},
        "data": {"root": None if root is None else str(root),
                 "channels": [{"name": "flair", "patterns": ["*flair*", "*t2f*", "*_0000.*"]},
                              {"name": "t1c", "patterns": ["*t1c*", "*_0001.*"]}],
                 "label_patterns": ["*seg*", "*label*"], "val_fraction": 0.34, "cache": False},
        "regions": REGIONS if regions else [],
        "preprocess": {"spacing": None, "crop_foreground": True},
        "patch": {"size": [16, 16, 16], "samples_per_volume": 2, "foreground_ratio": 1.0},
        "augment": {"enabled": False},
        "model": {"name": "unet3d", "channels": [4, 8], "strides": [2], "num_res_units": 1},
        "train": {"epochs": 1, "batch_size": 2, "val_every": 1, "device": "cpu", "threads": 2,
                  "output_dir": "unused"},
        "inference": {"overlap": 0.25, "sw_batch_size": 2},
    }
    return from_dict(_merge(d, over), source="test")


def case_folder(folder: Path, seed: int, *, names=("flair.nii.gz", "t1c.nii.gz"), label="seg.nii.gz",
                affine=AFFINE) -> Path:
    flair, t1c, lab = synthetic_case(seed)
    save(folder / names[0], flair, affine)
    save(folder / names[1], t1c, affine)
    if label:
        save(folder / label, lab, affine)
    return folder


def assert_on_grid(path_or_vol, ref: Volume) -> Volume:
    out = path_or_vol if isinstance(path_or_vol, Volume) else load_volume(path_or_vol)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
    return out


def world_points(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def covering_grid(ref_shape, ref_affine, spacing: float, direction=None, margin: float = 3.0):
    """(shape, affine) of a grid with ``direction`` (default: the identity) and isotropic ``spacing`` that covers
    the reference grid (``margin`` mm beyond it; a negative margin keeps inside it)."""
    direction = np.eye(3) if direction is None else np.asarray(direction)
    corners = np.array([[i, j, k] for i in (0, ref_shape[0] - 1) for j in (0, ref_shape[1] - 1)
                        for k in (0, ref_shape[2] - 1)], float)
    world = corners @ ref_affine[:3, :3].T + ref_affine[:3, 3]
    local = world @ direction  # coordinates along the new grid's axes
    lo, hi = local.min(0) - margin, local.max(0) + margin
    shape = tuple(int(s) for s in np.ceil((hi - lo) / spacing) + 1)
    return shape, make_affine(direction, (spacing,) * 3, direction @ lo)


def to_source_index(points: np.ndarray, affine) -> np.ndarray:
    affine = np.asarray(affine)
    return (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


# ---------------------------------------------------------------------------
# a tiny two-sequence region model, trained for one epoch


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seqdata")
    for i in range(3):
        case_folder(root / f"case{i}", i)
    return root


@pytest.fixture(scope="module")
def tiny_model(seq_data, tmp_path_factory) -> Path:
    from medseg.training.trainer import train

    out = tmp_path_factory.mktemp("seqrun")
    cfg = seq_config(seq_data, train={"output_dir": str(out)})
    assert cfg.in_channels == 2 and cfg.out_channels == 2
    res = train(cfg, progress=False, log=lambda m: None)
    assert res.best_checkpoint.is_file()
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["validation"]) == ["case0", "case1", "case2"]
    assert set(split["train"]).isdisjoint(split["validation"])
    assert set(res.history[-1]["val_dice"]) == {"whole", "core"}  # scored per region
    return res.best_checkpoint


# ---------------------------------------------------------------------------
# 1. nnU-Net names: CASE_0000, CASE_0001 are the sequences of one case (they were read as separate cases)


def nnunet_dataset(root: Path, keys=("caseA", "caseB")) -> Path:
    for i, key in enumerate(keys):
        flair, t1c, lab = synthetic_case(i)
        save(root / "imagesTr" / f"{key}_0000.nii.gz", flair)
        save(root / "imagesTr" / f"{key}_0001.nii.gz", t1c)
        save(root / "labelsTr" / f"{key}.nii.gz", lab)
    return root


def test_nnunet_names_are_one_case_with_its_sequences_in_order(tmp_path):
    root = nnunet_dataset(tmp_path / "ds")
    cases = dataset_cases(seq_config(root).data)
    assert [c.name for c in cases] == ["caseA", "caseB"]
    for c in cases:
        assert isinstance(c.image, tuple) and len(c.files) == 2
        assert [Path(f).name for f in c.files] == [f"{c.name}_0000.nii.gz", f"{c.name}_0001.nii.gz"]
        assert Path(c.label).name == f"{c.name}.nii.gz"
        vol = load_case_image(c.image, NAMES, "flair", c.name)
        flair, t1c, _ = synthetic_case(0 if c.name == "caseA" else 1)
        assert vol.array.shape == (*SHAPE, 2)
        np.testing.assert_array_equal(vol.array[..., 0], flair)
        np.testing.assert_array_equal(vol.array[..., 1], t1c)


def test_splits_never_separate_the_sequences_of_a_case(tmp_path):
    keys = [f"case{k}" for k in "ABCDE"]
    root = nnunet_dataset(tmp_path / "ds", keys)
    cases = dataset_cases(seq_config(root).data)
    assert len(cases) == 5
    all_files = {f for c in cases for f in c.files}
    assert len(all_files) == 10

    def check(train, val):
        assert {c.name for c in train}.isdisjoint({c.name for c in val})
        tf, vf = {f for c in train for f in c.files}, {f for c in val for f in c.files}
        assert tf.isdisjoint(vf) and tf | vf == all_files
        for c in val:  # both sequences of a case sit on the same side
            assert {Path(f).name for f in c.files} == {f"{c.name}_0000.nii.gz", f"{c.name}_0001.nii.gz"}

    validated = []
    for fold in range(2):
        train, val = kfold_split(cases, 2, fold, seed=3)
        check(train, val)
        validated += [c.name for c in val]
    assert sorted(validated) == keys  # every case is validated exactly once
    for seed in range(4):
        check(*split_cases(cases, 0.4, seed))


def test_verify_counts_nnunet_cases_not_files(tmp_path):
    root = nnunet_dataset(tmp_path / "ds")
    n, problems = verify_dataset(root, progress=False)
    assert n == 2, problems  # two cases, not four single-sequence "pairs"
    assert [p for p in problems if p.severity == "error"] == []
    n, problems = verify_dataset(root, config=seq_config(), progress=False)
    assert n == 2 and [p for p in problems if p.severity == "error"] == []


def test_one_channel_config_on_two_sequence_cases_is_an_error(tmp_path):
    root = nnunet_dataset(tmp_path / "ds")
    one = seq_config(root, regions=False, data={"channels": []})
    assert one.in_channels == 1
    with pytest.raises(DataError) as err:  # training refuses it, naming the case and the fix
        dataset_cases(one.data)
    msg = str(err.value)
    assert "caseA" in msg and "2 sequences" in msg and "data.channels" in msg
    _, problems = verify_dataset(root, config=one, progress=False)
    errors = [p for p in problems if p.severity == "error"]
    assert any("caseA" in str(p) for p in errors) and any("caseB" in str(p) for p in errors)
    assert all("2 sequences" in p.message for p in errors)


def test_verify_one_channel_config_names_the_fix(tmp_path):
    root = nnunet_dataset(tmp_path / "ds")
    one = seq_config(root, regions=False, data={"channels": []})
    _, problems = verify_dataset(root, config=one, progress=False)
    errors = [p for p in problems if p.severity == "error"]
    assert errors and all("data.channels" in str(p) for p in errors), [str(p) for p in errors]


# ---------------------------------------------------------------------------
# 2. every layout gives the same cases


def _layouts(tmp: Path) -> dict[str, tuple[Config, dict[str, int]]]:
    """Each layout of the same two cases: name -> (config, {case name: seed})."""
    out = {}
    # MSD: one 4D image per case, the sequences on the fourth axis
    msd = tmp / "msd"
    for key, seed in (("caseA", 0), ("caseB", 1)):
        flair, t1c, lab = synthetic_case(seed)
        save(msd / "imagesTr" / f"{key}.nii.gz", np.stack([flair, t1c], -1))
        save(msd / "labelsTr" / f"{key}.nii.gz", lab)
    out["msd4d"] = (seq_config(msd), {"caseA": 0, "caseB": 1})
    nn = nnunet_dataset(tmp / "nnunet")
    out["nnunet"] = (seq_config(nn), {"caseA": 0, "caseB": 1})
    folders = tmp / "folders"
    case_folder(folders / "caseA", 0, names=("caseA_flair.nii.gz", "caseA_t1c.nii.gz"), label="caseA_seg.nii.gz")
    case_folder(folders / "caseB", 1, names=("FLAIR.nii.gz", "T1C.nii.gz"), label="label.nii.gz")  # case ignored
    out["folders"] = (seq_config(folders), {"caseA": 0, "caseB": 1})
    # BraTS 2023 names with the glioma config's patterns: flair must take t2f, t1c must take t1c (not t1n)
    b23 = tmp / "brats2023"
    glioma = load_config(GLIOMA, [f"data.root={b23}"])
    for key, seed in (("BraTS-GLI-00000-000", 0), ("BraTS-GLI-00001-000", 1)):
        flair, t1c, lab = synthetic_case(seed)
        save(b23 / key / f"{key}-t2f.nii.gz", flair)
        save(b23 / key / f"{key}-t1c.nii.gz", t1c)
        save(b23 / key / f"{key}-t1n.nii.gz", t1c * 0.5 + 7)
        save(b23 / key / f"{key}-t2w.nii.gz", flair * 0.5 + 3)
        save(b23 / key / f"{key}-seg.nii.gz", lab)
    out["brats2023"] = (glioma, {"BraTS-GLI-00000-000": 0, "BraTS-GLI-00001-000": 1})
    # datalist JSON: a list in data.channels order, and a mapping from sequence name to file
    for kind in ("list", "mapping"):
        entries = []
        for key in ("caseA", "caseB"):
            files = [f"imagesTr/{key}_0000.nii.gz", f"imagesTr/{key}_0001.nii.gz"]
            image = files if kind == "list" else {"t1c": files[1], "flair": files[0]}  # mapping order is free
            entries.append({"image": image, "label": f"labelsTr/{key}.nii.gz"})
        dl = tmp / f"datalist_{kind}.json"
        dl.write_text(json.dumps({"training": entries}))
        out[f"datalist_{kind}"] = (seq_config(nn, data={"datalist": str(dl)}), {"caseA": 0, "caseB": 1})
    return out


def test_every_layout_gives_the_same_cases(tmp_path):
    layouts = _layouts(tmp_path)
    msd_file = tmp_path / "msd" / "imagesTr" / "caseA.nii.gz"
    assert load_volume(msd_file, channels=True).array.shape == (*SHAPE, 2)
    with pytest.raises(MedsegError, match="more than one channel"):
        load_volume(msd_file)  # a 4D image only where sequences are expected
    for layout, (cfg, expected) in layouts.items():
        cases = dataset_cases(cfg.data)
        assert sorted(c.name for c in cases) == sorted(expected), layout
        for c in cases:
            flair, t1c, lab = synthetic_case(expected[c.name])
            vol = load_case_image(c.image, cfg.channel_names, cfg.reference_channel, c.name)
            assert vol.array.shape == (*SHAPE, 2), layout
            assert vol.meta["channels"] == ["flair", "t1c"], layout
            np.testing.assert_array_equal(vol.array[..., 0], flair, err_msg=f"{layout} {c.name} flair")
            np.testing.assert_array_equal(vol.array[..., 1], t1c, err_msg=f"{layout} {c.name} t1c")
            np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)
            np.testing.assert_array_equal(np.asarray(load_volume(c.label).array), lab, err_msg=layout)
        if not cfg.data.datalist:  # verify-data checks folders
            n, problems = verify_dataset(cfg.data.root, config=cfg, progress=False)
            assert n == 2 and not [p for p in problems if p.severity == "error"], (layout, [str(p) for p in problems])


def test_brats2023_names_pick_the_right_files(tmp_path):
    cfg, _ = _layouts(tmp_path)["brats2023"]
    for c in dataset_cases(cfg.data):
        assert [Path(f).name for f in c.files] == [f"{c.name}-t2f.nii.gz", f"{c.name}-t1c.nii.gz"]
        assert Path(c.label).name == f"{c.name}-seg.nii.gz"


def test_datalist_with_a_missing_or_extra_sequence_is_an_error(tmp_path):
    nn = nnunet_dataset(tmp_path / "nn")
    bad = [{"image": {"flair": "imagesTr/caseA_0000.nii.gz"}, "label": "labelsTr/caseA.nii.gz"}]
    (tmp_path / "m.json").write_text(json.dumps({"training": bad}))
    with pytest.raises(DataError, match="no t1c sequence"):
        dataset_cases(seq_config(nn, data={"datalist": str(tmp_path / "m.json")}).data)
    three = [{"image": ["imagesTr/caseA_0000.nii.gz"] * 3, "label": "labelsTr/caseA.nii.gz"}]
    (tmp_path / "l.json").write_text(json.dumps({"training": three}))
    with pytest.raises(DataError, match="3 sequence files, the config names 2"):
        dataset_cases(seq_config(nn, data={"datalist": str(tmp_path / "l.json")}).data)


# ---------------------------------------------------------------------------
# 3. missing, ambiguous and miscounted sequences


def write_yaml(cfg: Config, path: Path) -> Path:
    import yaml

    from medseg.core.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def test_missing_sequence_is_named_by_verify_and_training(tmp_path):
    root = tmp_path / "ds"
    case_folder(root / "caseA", 0)
    case_folder(root / "caseB", 1)
    (root / "caseB" / "t1c.nii.gz").unlink()
    cfg = seq_config(root)
    n, problems = verify_dataset(root, config=cfg, progress=False)
    errors = [str(p) for p in problems if p.severity == "error"]
    assert n == 1 and len(errors) == 1, errors
    assert "case caseB has no t1c sequence" in errors[0]
    with pytest.raises(DataError, match="case caseB has no t1c sequence") as err:
        dataset_cases(cfg.data)
    assert "data.channels" in str(err.value)  # the fix: add the file or set its patterns


def test_verify_data_cli_names_case_and_sequence(tmp_path):
    root = tmp_path / "ds"
    case_folder(root / "caseA", 0)
    case_folder(root / "caseB", 1)
    (root / "caseB" / "t1c.nii.gz").unlink()
    cfg_file = write_yaml(seq_config(root), tmp_path / "seq.yaml")
    proc = run_cli("verify-data", root, "--config", cfg_file, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stdout
    assert "caseB" in lines[0] and "no t1c sequence" in lines[0], lines[0]  # on one line
    assert "1 error(s)" in proc.stdout


def test_verify_data_prints_each_problem_on_one_line(tmp_path):
    from typer.testing import CliRunner

    from medseg.cli import app

    root = tmp_path / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    key = "BraTS-GLI-00000-000"
    flair, t1c, lab = synthetic_case(0)
    for seq, arr in (("t2f", flair), ("t1n", t1c), ("t2w", flair), ("seg", lab)):  # no t1c
        save(root / key / f"{key}-{seq}.nii.gz", arr)
    res = CliRunner().invoke(app, ["verify-data", str(root), "--config", str(GLIOMA)])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "has no t1c sequence" in lines[0] and lines[0].rstrip().endswith("data.channels"), res.output


def test_ambiguous_pattern_names_both_files(tmp_path):
    root = tmp_path / "ds"
    case_folder(root / "caseA", 0)
    flair, _, _ = synthetic_case(0)
    save(root / "caseA" / "flair_old.nii.gz", flair)
    cfg = seq_config(root)
    _, problems = verify_dataset(root, config=cfg, progress=False)
    errors = [str(p) for p in problems if p.severity == "error"]
    assert len(errors) == 1 and "several files match sequence flair" in errors[0], errors
    assert "flair.nii.gz" in errors[0] and "flair_old.nii.gz" in errors[0]
    with pytest.raises(DataError, match="several files match sequence flair") as err:
        dataset_cases(cfg.data)
    assert "flair_old.nii.gz" in str(err.value) and "flair.nii.gz," in str(err.value)


def test_one_file_claimed_by_two_sequences_is_an_error(tmp_path):
    root = tmp_path / "ds"
    flair, _, lab = synthetic_case(0)
    save(root / "caseA" / "flair_t1c.nii.gz", flair)  # matches *flair* and *t1c*
    save(root / "caseA" / "seg.nii.gz", lab)
    with pytest.raises(DataError, match="one file matches sequences flair and t1c"):
        dataset_cases(seq_config(root).data)


def test_sequence_count_the_model_does_not_expect(tmp_path):
    # a 3D image where the model takes two sequences
    flair, _, _ = synthetic_case(0)
    f3d = save(tmp_path / "one.nii.gz", flair)
    with pytest.raises(DataError, match=r"1 sequence\(s\), the model takes 2"):
        load_case_image(str(f3d), NAMES, "flair", "one")
    # a 4D image of three sequences for two
    f4d = save(tmp_path / "msd" / "imagesTr" / "caseA.nii.gz", np.stack([flair] * 3, -1))
    save(tmp_path / "msd" / "labelsTr" / "caseA.nii.gz", synthetic_case(0)[2])
    with pytest.raises(DataError, match=r"3 sequence\(s\), the model takes 2"):
        load_case_image(str(f4d), NAMES, "flair", "caseA")
    _, problems = verify_dataset(tmp_path / "msd", config=seq_config(), progress=False)
    assert any("3 sequence(s) on the fourth axis, expected 2" in str(p) for p in problems), problems
    # nnU-Net files with a third sequence number the config does not name
    nn = nnunet_dataset(tmp_path / "nn", ("caseA",))
    save(nn / "imagesTr" / "caseA_0002.nii.gz", flair)
    with pytest.raises(DataError, match="sequences the config does not name: 0002"):
        dataset_cases(seq_config(nn).data)
    (nn / "imagesTr" / "caseA_0002.nii.gz").unlink()
    (nn / "imagesTr" / "caseA_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"misses sequence 0001 \(t1c\)"):
        dataset_cases(seq_config(nn).data)


# ---------------------------------------------------------------------------
# 4. sequences on different grids are resampled onto the reference grid in physical space


def _linear(world: np.ndarray) -> np.ndarray:
    return (2.0 * world[..., 0] + 3.0 * world[..., 1] - world[..., 2] + 50.0).astype(np.float32)


def _block_box(shape, affine) -> tuple[np.ndarray, np.ndarray]:
    """A 12 mm box (world axes) a little off the centre of the grid ``(shape, affine)``."""
    centre = np.asarray(affine)[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + np.asarray(affine)[:3, 3]
    centre = centre + [1.5, -1.0, 0.5]
    return centre - 6.0, centre + 6.0


def _block(world: np.ndarray, box) -> np.ndarray:
    lo, hi = box
    inside = np.all((world >= lo) & (world <= hi), axis=-1)
    return np.where(inside, 1000.0, 100.0).astype(np.float32)


@pytest.mark.parametrize("other", ["coarse_shifted", "oblique_flipped"])
@pytest.mark.parametrize("reference", ["identity", "oblique", "flipped"])
def test_other_grid_is_resampled_in_physical_space(reference, other):
    ref_shape, ref_aff = GEOMETRIES[reference]
    direction = np.eye(3) if other == "coarse_shifted" else rotation(20, -15, 35) @ np.diag([-1.0, 1.0, -1.0])
    shape, aff = covering_grid(ref_shape, ref_aff, 2.0, direction)
    if other == "coarse_shifted":
        aff[:3, 3] += [0.7, -1.3, 0.4]  # an origin off the reference's voxel lattice
    pts = world_points(shape, aff)
    ref = Volume(np.ones(ref_shape, np.float32), ref_aff)
    lin = Volume(_linear(pts), aff)
    box = _block_box(ref_shape, ref_aff)
    block = Volume(_block(pts, box), aff)
    out = load_sequences({"flair": ref, "t1c": lin, "t2": block}, "flair", "case7")
    assert out.array.shape == (*ref_shape, 3) and out.meta["channels"] == ["flair", "t1c", "t2"]
    np.testing.assert_allclose(out.affine, ref_aff)
    assert out.meta["resampled"] == ["t1c", "t2"]
    rw = world_points(ref_shape, ref_aff)
    # trilinear interpolation reproduces a linear function exactly wherever the source grid surrounds the point
    src = to_source_index(rw, aff)
    inside = np.all((src >= 0) & (src <= np.array(shape) - 1), -1)
    assert inside.mean() > 0.95
    np.testing.assert_allclose(out.array[..., 1][inside], _linear(rw)[inside], atol=2e-3)
    # the bright block lands at its world position (more than one source cell diagonal, 2 mm * sqrt(3), from
    # its faces: trilinear interpolation blurs the faces over that much)
    lo, hi = box
    deep_in = np.all((rw >= lo + 3.5) & (rw <= hi - 3.5), -1)
    far_out = np.any((rw < lo - 3.5) | (rw > hi + 3.5), -1)
    assert deep_in.sum() >= 8 and far_out.sum() > 50, (deep_in.sum(), far_out.sum())
    np.testing.assert_allclose(out.array[..., 2][deep_in], 1000.0, atol=1e-3)
    np.testing.assert_allclose(out.array[..., 2][far_out], 100.0, atol=1e-3)


def test_same_grid_sequences_are_kept_as_they_are():
    flair, t1c, _ = synthetic_case(0)
    out = load_sequences({"flair": Volume(flair, AFFINE), "t1c": Volume(t1c, AFFINE)}, "flair", "c")
    assert out.meta["resampled"] == []
    np.testing.assert_array_equal(out.array[..., 1], t1c)


def test_reference_other_than_the_first_sequence():
    shape2, aff2 = covering_grid(SHAPE, AFFINE, 2.0, rotation(0, 0, 90), margin=-2.0)
    lin2 = Volume(_linear(world_points(shape2, aff2)), aff2)
    lin1 = Volume(_linear(world_points(SHAPE, AFFINE)), AFFINE)
    out = load_sequences({"flair": lin1, "t1c": lin2}, "t1c", "c")  # the t1c grid is the output's
    assert out.shape == shape2 and out.meta["channels"] == ["flair", "t1c"] and out.meta["resampled"] == ["flair"]
    np.testing.assert_allclose(out.affine, aff2)
    np.testing.assert_array_equal(out.array[..., 1], lin2.array)
    np.testing.assert_allclose(out.array[..., 0], lin2.array, atol=2e-3)  # flair read at the t1c voxels' positions


def test_non_overlapping_sequence_is_a_geometry_error(tmp_path):
    flair, t1c, _ = synthetic_case(0)
    far = AFFINE.copy()
    far[:3, 3] += [400.0, 0.0, 0.0]
    with pytest.raises(GeometryError) as err:
        load_sequences({"flair": Volume(flair, AFFINE), "t1c": Volume(t1c, far)}, "flair", "case9")
    msg = str(err.value)
    assert "case case9" in msg and "sequence t1c" in msg and "0% covered" in msg
    # a third of the reference covered is not enough either
    part = AFFINE.copy()
    part[0, 3] += 16.0
    with pytest.raises(GeometryError, match="sequence t1c does not overlap"):
        load_sequences({"flair": Volume(flair, AFFINE), "t1c": Volume(t1c, part)}, "flair", "case9")
    # verify-data reports it per case, as an error
    root = tmp_path / "ds"
    case_folder(root / "case9", 0)
    save(root / "case9" / "t1c.nii.gz", t1c, far)
    _, problems = verify_dataset(root, config=seq_config(root), progress=False)
    assert [p.severity for p in problems] == ["error"], problems
    assert problems[0].case == "case9" and "sequence t1c does not overlap" in problems[0].message
    # an overlapping sequence on another grid is only a warning there
    near = AFFINE.copy()
    near[:3, 3] += [1.5, 0.0, 0.0]
    save(root / "case9" / "t1c.nii.gz", t1c, near)
    _, problems = verify_dataset(root, config=seq_config(root), progress=False)
    assert [p.severity for p in problems] == ["warning"] and "resampled" in problems[0].message


def test_prediction_lies_on_the_reference_grid(tiny_model):
    from medseg.inference.predictor import Predictor

    pred = Predictor(tiny_model, device="cpu")
    assert pred.cfg.in_channels == 2 and pred.activation == "sigmoid"
    ref_shape, ref_aff = GEOMETRIES["oblique"]
    flair = np.zeros(ref_shape, np.float32)
    flair[3:-3, 3:-3, 3:-3] = 200 + np.random.default_rng(0).normal(0, 5, (ref_shape[0] - 6, ref_shape[1] - 6,
                                                                            ref_shape[2] - 6))
    shape2, aff2 = covering_grid(ref_shape, ref_aff, 2.0, np.diag([-1.0, 1.0, 1.0]))
    t1c = Volume(_block(world_points(shape2, aff2), _block_box(ref_shape, ref_aff)), aff2)
    vol = load_sequences({"flair": Volume(flair, ref_aff), "t1c": t1c}, "flair", "c")
    labels = pred.predict_volume(vol)
    assert_on_grid(labels, Volume(flair, ref_aff))
    assert labels.array.dtype == np.uint8 and set(np.unique(labels.array)) <= {0, 1, 2}
    # outside the foreground's bounding box (any sequence off its background fill) the output is background
    fg = (vol.array[..., 0] != 0) | (vol.array[..., 1] != 100)
    spans = [np.nonzero(fg.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    box = tuple(slice(int(idx[0]), int(idx[-1]) + 1) for idx in spans)
    outside = np.ones(ref_shape, bool)
    outside[box] = False
    assert outside.any() and not labels.array[outside].any()


# ---------------------------------------------------------------------------
# 5. z-score per sequence, inside the foreground


def test_zscore_is_per_sequence():
    from medseg.preprocessing.intensity import ZScore

    flair, t1c, _ = synthetic_case(0)
    t1c = t1c * 7.0 + np.where(t1c != 0, 500.0, 0.0).astype(np.float32)  # another scale and offset
    both = np.stack([flair, t1c])
    for nonzero in (True, False):
        z = ZScore(nonzero=nonzero)
        out_t = z(torch.from_numpy(both))
        out_n = z(both)
        for c, arr in enumerate((flair, t1c)):
            alone = z(torch.from_numpy(arr[None]))[0]
            torch.testing.assert_close(out_t[c], alone, atol=1e-5, rtol=0)
            np.testing.assert_allclose(out_n[c], alone.numpy(), atol=1e-5)
            fg = arr != 0 if nonzero else np.ones(arr.shape, bool)
            assert abs(float(out_t[c][torch.from_numpy(fg)].mean())) < 1e-4
            assert abs(float(out_t[c][torch.from_numpy(fg)].std(unbiased=False)) - 1.0) < 1e-4
    # the slab-wise statistics of large volumes give the same per-channel result
    big = ZScore(nonzero=True)
    big.one_pass_voxels, big.slab_voxels = 100, 1000
    torch.testing.assert_close(big(torch.from_numpy(both)), ZScore(nonzero=True)(torch.from_numpy(both)),
                               atol=1e-5, rtol=0)


def test_zscore_background_fill_and_raw_scanner_values_agree():
    from medseg.preprocessing.intensity import ZScore

    rng = np.random.default_rng(1)
    raw = np.zeros(SHAPE, np.float32)  # scanner intensities, skull-stripped: background 0
    brain = np.zeros(SHAPE, bool)
    brain[3:-3, 4:-4, 3:-3] = True
    raw[brain] = rng.uniform(150.0, 900.0, int(brain.sum()))
    # BraTS 2015 style: normalised after stripping, the background a constant that is not 0
    fill = -3.16
    norm = np.full(SHAPE, fill, np.float32)
    norm[brain] = (raw[brain] - 420.0) / 133.0
    assert not np.any(norm[brain] == np.float32(fill))
    z = ZScore(nonzero=True)
    for a, b in ((torch.from_numpy(raw[None]), torch.from_numpy(norm[None])), (raw, norm)):
        za, zb = (np.asarray(z(x)).reshape(SHAPE) for x in (a, b))
        np.testing.assert_allclose(za[brain], zb[brain], atol=1e-5)
        assert np.all(za[~brain] == 0) and np.all(zb[~brain] == 0)
    # both as two sequences of one case, each with its own fill
    two = z(torch.from_numpy(np.stack([norm, raw])))
    np.testing.assert_allclose(two[0].numpy(), two[1].numpy(), atol=1e-5)


# ---------------------------------------------------------------------------
# 6. augmentation keeps the sequences aligned


def test_augmentation_keeps_sequences_aligned(tmp_path):
    from medseg.preprocessing.pipeline import train_transforms

    flair, _, lab = synthetic_case(2)
    block = (lab > 0).astype(np.uint8)
    img = np.where(flair != 0, 100.0 + 600.0 * block, 0.0).astype(np.float32)
    aff = GEOMETRIES["flipped"][1]  # reoriented to RAS on the way
    root = tmp_path / "ds"
    save(root / "c" / "flair.nii.gz", img, aff)
    save(root / "c" / "t1c.nii.gz", img, aff)  # two identical sequences
    save(root / "c" / "seg.nii.gz", block, aff)
    cfg = seq_config(root, regions=False, labels={0: "background", 1: "lesion"},
                     preprocess={"spacing": [1.1, 0.9, 1.3]},
                     patch={"size": [16, 16, 12], "samples_per_volume": 3},
                     augment={"enabled": True, "flip_axes": [0, 1, 2], "flip_prob": 0.5, "rotate_deg": 25,
                              "scale": 0.2, "affine_prob": 1.0, "elastic_prob": 1.0, "elastic_magnitude": [0, 40],
                              "intensity_prob": 1.0, "noise_prob": 0.0, "gamma_prob": 1.0, "blur_prob": 1.0})
    (case,) = dataset_cases(cfg.data)
    tf = train_transforms(cfg)
    n_samples = 0
    for seed in range(3):
        tf.set_random_state(seed)
        samples = tf(case.as_dict())
        for s in samples:
            image, label = torch.as_tensor(s["image"]), torch.as_tensor(s["label"])
            assert image.shape[0] == 2 and tuple(image.shape[1:]) == (16, 16, 12) == tuple(label.shape[1:])
            torch.testing.assert_close(image[0], image[1], atol=1e-5, rtol=1e-5)  # same spatial transform
            lesion = label[0] > 0
            assert lesion.any()  # patches centred on the lesion
            high = image[0] > (image[0].max() + image[0].min()) / 2
            dice = 2 * float((high & lesion).sum()) / float(high.sum() + lesion.sum())
            assert dice > 0.8, dice  # the label still covers the bright block
            n_samples += 1
    assert n_samples == 9


# ---------------------------------------------------------------------------
# 7. regions <-> labels, region values, config checks

BRATS_REGIONS = [{"name": "whole_tumour", "labels": [1, 2, 3, 4]}, {"name": "tumour_core", "labels": [1, 3, 4]},
                 {"name": "enhancing_tumour", "labels": [4]}]
BRATS_LABELS = {0: "background", 1: "necrosis", 2: "oedema", 3: "non-enhancing", 4: "enhancing"}


def brats_config(**over) -> Config:
    return from_dict(_merge({"labels": BRATS_LABELS, "regions": BRATS_REGIONS, "data": {"channels": ["flair", "t1c"]}},
                            over), source="test")


def test_region_round_trip_writes_3_as_1():
    from medseg.core.regions import labels_to_regions, region_masks, regions_to_labels

    cfg = brats_config()
    assert cfg.region_values() == [2, 1, 4]  # largest region first, each its label no later region lists
    assert cfg.out_channels == 3 and cfg.num_classes == 5
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 5, size=(10, 9, 8)).astype(np.uint8)
    regions = labels_to_regions(torch.from_numpy(lab)[None], cfg.regions)
    assert regions.shape == (3, 10, 9, 8) and regions.dtype == torch.float32
    for r, values in enumerate(([1, 2, 3, 4], [1, 3, 4], [4])):
        np.testing.assert_array_equal(regions[r].numpy().astype(bool), np.isin(lab, values))
    batch = labels_to_regions(torch.from_numpy(lab)[None, None].float(), cfg.regions)  # (B, 1, ...) labels
    assert batch.shape == (1, 3, 10, 9, 8)
    back = regions_to_labels(regions, cfg.region_values())
    # label 3 (non-enhancing tumour core) is in the same regions as 1: the regions cannot tell them apart, and
    # the core is written back as 1
    expected = np.where(lab == 3, 1, lab)
    np.testing.assert_array_equal(back.numpy(), expected)
    np.testing.assert_array_equal(regions_to_labels(regions.numpy(), cfg.region_values()), expected)  # numpy too
    np.testing.assert_array_equal(regions_to_labels(regions.numpy() > 0.5, cfg.region_values()), expected)
    masks = region_masks(lab, cfg.regions)
    assert [m.sum() for m in masks] == [int(np.isin(lab, v).sum()) for v in ([1, 2, 3, 4], [1, 3, 4], [4])]
    # probabilities: painted in order, > 0.5 counts
    probs = torch.zeros(3, 2, 1, 1)
    probs[:, 0] = torch.tensor([0.9, 0.7, 0.2])[:, None, None]
    probs[:, 1] = torch.tensor([0.4, 0.9, 0.9])[:, None, None]  # inner regions win where they are on
    assert regions_to_labels(probs, [2, 1, 4]).flatten().tolist() == [1, 4]


def test_region_values_explicit_and_default():
    cfg = brats_config(regions=[{"name": "whole_tumour", "labels": [1, 2, 3, 4]},
                                {"name": "tumour_core", "labels": [1, 3, 4], "value": 3},
                                {"name": "enhancing_tumour", "labels": [4]}])
    assert cfg.region_values() == [2, 3, 4]
    one = brats_config(regions=[{"name": "tumour", "labels": [3, 1]}])
    assert one.region_values() == [1]  # the smallest of its labels
    assert Config().region_values() == [] and Config().out_channels == 2


def test_channel_config_forms_and_properties():
    cfg = brats_config(data={"channels": ["flair", {"name": "t1c", "patterns": ["*T1C*", "*_0001.*"]}],
                             "reference": "t1c"})
    assert cfg.channel_names == ["flair", "t1c"] and cfg.in_channels == 2
    assert cfg.data.channels[0].file_patterns() == ["*flair*"]  # a bare name: its own pattern
    assert cfg.data.channels[1].file_patterns() == ["*T1C*", "*_0001.*"]
    assert cfg.reference_channel == "t1c"
    assert brats_config().reference_channel == "flair"  # default: the first
    plain = Config()
    assert plain.channel_names == ["image"] and plain.in_channels == 1 and plain.reference_channel == "image"
    glioma = load_config(GLIOMA)
    assert glioma.channel_names == ["flair", "t1c"] and glioma.in_channels == 2 and glioma.out_channels == 3
    assert glioma.region_values() == [2, 1, 4]


@pytest.mark.parametrize("over, fragment", [
    ({"regions": [{"name": "a", "labels": [1]}, {"name": "a", "labels": [4]}]}, "regions need distinct names"),
    ({"regions": [{"name": "a", "labels": []}]}, "region 'a' must list foreground label values"),
    ({"regions": [{"name": "a", "labels": [0, 1]}]}, "region 'a' must list foreground label values"),
    ({"regions": [{"name": "a", "labels": [7]}]}, "region 'a' must list foreground label values"),
    ({"regions": [{"name": "a", "labels": [1], "value": 9}]}, "region 'a' writes a value that is not a label"),
    ({"regions": [{"name": "", "labels": [1]}]}, "regions need distinct names"),
    ({"data": {"channels": ["flair", "flair"]}}, "data.channels needs distinct sequence names"),
    ({"data": {"channels": ["fl air", "t1c"]}}, "data.channels needs distinct sequence names"),
    ({"data": {"channels": [{"patterns": ["*x*"]}]}}, "data.channels needs distinct sequence names"),
    ({"data": {"reference": "t2"}}, "data.reference is not one of data.channels"),
    ({"inference": {"postprocess": {"keep_largest": [3]}}}, "postprocess names labels the regions never write"),
    ({"data": {"channels": [{"name": "flair", "pattern": ["*x*"]}]}}, "pattern"),
    ({"regions": [{"name": "a", "labels": "1,2"}]}, "regions"),
    ({"task": "image2d", "patch": {"size": [64, 64]}, "model": {"name": "unet2d"}},
     "data.channels and regions are for volume tasks"),
])
def test_bad_regions_and_channels_are_config_errors(over, fragment):
    with pytest.raises(ConfigError) as err:
        brats_config(**over)
    assert fragment in str(err.value), str(err.value)


# ---------------------------------------------------------------------------
# 8. predict entry points of a two-sequence model


def test_predict_case_folder_never_takes_the_label_as_a_sequence(tiny_model, tmp_path):
    from medseg.apps.run import predict

    folder = tmp_path / "in" / "patient7"
    ref_shape, ref_aff = GEOMETRIES["oblique"]
    flair = np.zeros(ref_shape, np.float32)
    flair[3:-3, 3:-3, 3:-3] = 300.0
    save(folder / "patient7_flair.nii.gz", flair, ref_aff)
    # the label matches *flair* as well as *seg*: it is the label, not a second flair
    save(folder / "patient7_flair_seg.nii.gz", (flair > 0).astype(np.uint8), ref_aff)
    shape2, aff2 = covering_grid(ref_shape, ref_aff, 2.0, np.diag([1.0, -1.0, 1.0]))  # t1c on another grid
    save(folder / "patient7_t1c.nii.gz", _block(world_points(shape2, aff2), _block_box(ref_shape, ref_aff)), aff2)
    out = tmp_path / "out"
    res = predict([folder], out, model=tiny_model, device="cpu", progress=False)
    assert len(res) == 1 and [p.name for p in res[0].outputs] == ["patient7.nii.gz"]
    labels = assert_on_grid(out / "patient7.nii.gz", load_volume(folder / "patient7_flair.nii.gz"))
    assert set(np.unique(np.asarray(labels.array))) <= {0, 1, 2}


def test_predict_folder_of_nnunet_names_gives_one_output_per_case(tiny_model, tmp_path):
    from medseg.apps.run import predict

    src = tmp_path / "nn"
    grids = {"caseA": (SHAPE, AFFINE), "caseB": GEOMETRIES["flipped"]}
    for i, (key, (shape, aff)) in enumerate(grids.items()):
        flair = np.zeros(shape, np.float32)
        flair[2:-2, 2:-2, 2:-2] = 200.0 + 50 * i
        save(src / f"{key}_0000.nii.gz", flair, aff)
        save(src / f"{key}_0001.nii.gz", flair * 0.5, aff)
    out = tmp_path / "out"
    res = predict([src], out, model=tiny_model, device="cpu", progress=False)
    assert sorted(p.name for r in res for p in r.outputs) == ["caseA.nii.gz", "caseB.nii.gz"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["caseA.nii.gz", "caseB.nii.gz"]
    for key in grids:
        assert_on_grid(out / f"{key}.nii.gz", load_volume(src / f"{key}_0000.nii.gz"))
    # a case missing its second file is skipped with the reason, the other is still segmented
    (src / "caseB_0001.nii.gz").unlink()
    from medseg.apps.run import discover_inputs
    from medseg.models.loading import model_config

    items, skipped = discover_inputs([src], model_config(tiny_model), recursive=False)
    assert [it.name for it in items] == ["caseA"]
    assert any("caseB" in s.reason and "1 of 2" in s.reason for s in skipped), skipped


def test_predict_channel_options(tiny_model, tmp_path):
    f, _, _ = synthetic_case(0)
    flair = save(tmp_path / "scan_flair.nii.gz", f)
    shape2, aff2 = covering_grid(SHAPE, AFFINE, 2.0, rotation(10, 0, -20))
    t1c = save(tmp_path / "other" / "scan_t1c.nii.gz", _linear(world_points(shape2, aff2)), aff2)
    out = tmp_path / "out"
    proc = run_cli("predict", "--channel", f"t1c={t1c}", "--channel", f"flair={flair}", "-o", out,
                   "--model", tiny_model, "--device", "cpu", "--stats", "json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    labels = assert_on_grid(out / "scan_flair.nii.gz", load_volume(flair))  # named after the reference file
    assert set(np.unique(np.asarray(labels.array))) <= {0, 1, 2}
    report = json.loads((out / "scan_flair.lesions.json").read_text())
    assert set(report["summary"]["regions"]) == {"whole", "core"}  # a region model's case summary
    # a sequence missing: a one-line error naming it, nothing written
    proc = run_cli("predict", "--channel", f"flair={flair}", "-o", tmp_path / "out2", "--model", tiny_model,
                   "--device", "cpu", timeout=120)
    assert_clean_error(proc, "--channel", "t1c")
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").glob("*.nii.gz"))


def test_predict_channel_errors_in_process(tiny_model, tmp_path):
    from medseg.apps.run import parse_channels, predict

    f, t, _ = synthetic_case(0)
    flair, t1c = save(tmp_path / "f.nii.gz", f), save(tmp_path / "t.nii.gz", t)
    with pytest.raises(ConfigError) as err:  # a name the model does not take
        predict([], tmp_path / "o", model=tiny_model, device="cpu", progress=False,
                channels=parse_channels([f"flair={flair}", f"t2={t1c}"]))
    assert "t2" in str(err.value) and "t1c" in str(err.value)
    with pytest.raises(ConfigError, match="given twice"):
        parse_channels([f"flair={flair}", f"flair={t1c}"])
    with pytest.raises(ConfigError, match="bad --channel"):
        parse_channels([str(flair)])
    with pytest.raises(ConfigError, match="not both"):
        predict([flair], tmp_path / "o", model=tiny_model, device="cpu", progress=False,
                channels=parse_channels([f"flair={flair}", f"t1c={t1c}"]))
    # a 4D file of both sequences is one case
    four = save(tmp_path / "c4.nii.gz", np.stack([f, t], -1))
    predict([four], tmp_path / "o4", model=tiny_model, device="cpu", progress=False)
    assert_on_grid(tmp_path / "o4" / "c4.nii.gz", Volume(f, AFFINE))


def test_predict_with_a_reference_other_than_the_first(tiny_model, tmp_path):
    # the same weights with data.reference: t1c: the output lies on the t1c grid
    from medseg.apps.run import predict
    from medseg.models.checkpoint import save_checkpoint
    from medseg.models.loading import load_model

    loaded = load_model(tiny_model)
    cfg = copy.deepcopy(loaded.cfg)
    cfg.data.reference = "t1c"
    model = save_checkpoint(tmp_path / "ref_t1c.pt", model=loaded.nets[0], cfg=cfg, epoch=1)
    f, _, _ = synthetic_case(1)
    folder = tmp_path / "in" / "caseR"
    save(folder / "flair.nii.gz", f)
    t_shape, t_aff = covering_grid(SHAPE, AFFINE, 1.5, rotation(0, 0, 180), margin=-1.0)
    save(folder / "t1c.nii.gz", _linear(world_points(t_shape, t_aff)) + 300, t_aff)
    predict([folder], tmp_path / "out", model=model, device="cpu", progress=False)
    assert_on_grid(tmp_path / "out" / "caseR.nii.gz", load_volume(folder / "t1c.nii.gz"))


def test_3d_file_for_a_two_sequence_model_is_a_clear_error(tiny_model, tmp_path):
    from medseg.apps.run import predict

    f, _, _ = synthetic_case(0)
    flair = save(tmp_path / "f.nii.gz", f)
    with pytest.raises(DataError, match=r"1 sequence\(s\), the model takes 2"):
        predict([flair], tmp_path / "o", model=tiny_model, device="cpu", progress=False)


# ---------------------------------------------------------------------------
# 9. real BraTS 2015 cases: train -> predict -> evaluate, briefly


@pytest.mark.slow
@pytest.mark.shared_data
def test_brats_train_predict_evaluate(tmp_path):
    if not BRATS.is_dir() or len([d for d in BRATS.iterdir() if d.is_dir()]) < 2:
        pytest.skip("../shared/data/brats2015 is not present in this checkout")
    from medseg.training.trainer import train

    t0 = time.perf_counter()
    cases = sorted(d for d in BRATS.iterdir() if d.is_dir())[:2]
    data = tmp_path / "brats"
    data.mkdir()
    for d in cases:
        os.symlink(d, data / d.name)
    cfg = load_config(GLIOMA, [f"data.root={data}", "preprocess.spacing=[4,4,4]", "patch.size=[32,32,32]",
                               "model.channels=[4,8,16]", "model.strides=[2,2]", "train.epochs=1",
                               "data.val_fraction=0.5", "data.cache=false", f"train.output_dir={tmp_path / 'run'}",
                               "patch.samples_per_volume=2", "inference.sw_batch_size=4"])
    found = dataset_cases(cfg.data)
    assert [c.name for c in found] == [d.name for d in cases]
    for c in found:  # the glioma patterns pick FLAIR and T1c, the label is OTMultiClass, brainmask is no sequence
        assert [Path(f).name for f in c.files] == ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]
        assert Path(c.label).name == "OTMultiClass.nii.gz"
    res = train(cfg, progress=False, log=lambda m: None)
    assert res.best_checkpoint.is_file()
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]) == 1 and len(split["validation"]) == 1
    case = data / split["validation"][0]
    out = tmp_path / "pred"
    proc = run_cli("predict", case, "-o", out, "--model", res.best_checkpoint, "--device", "cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr
    labels = assert_on_grid(out / f"{case.name}.nii.gz", load_volume(case / "Flair_subtrMeanDivStd.nii.gz"))
    assert labels.shape == (240, 240, 155)
    assert set(np.unique(np.asarray(labels.array)).tolist()) <= {0, 1, 2, 4}  # regions write 2, 1, 4
    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy(case / "OTMultiClass.nii.gz", refs / f"{case.name}.nii.gz")
    proc = run_cli("evaluate", out, refs, "--config", GLIOMA, "--json", tmp_path / "scores.json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["regions"] == {"whole_tumour": [1, 2, 3, 4], "tumour_core": [1, 3, 4], "enhancing_tumour": [4]}
    (cs,) = scores["cases"]
    assert cs["case"] == case.name
    for region in ("whole_tumour", "tumour_core", "enhancing_tumour"):
        scored = ("dice", "hd95_mm", "lesionwise_dice", "lesionwise_hd95_mm")
        assert set(scored) | {"pred_volume_ml", "ref_volume_ml"} <= set(cs[region]), cs[region]
        assert set(scored) <= set(scores["mean"][region]), scores["mean"][region]
        assert cs[region]["ref_volume_ml"] > 0  # every BraTS region is present in the reference
        assert cs[region]["dice"] is None or 0.0 <= cs[region]["dice"] <= 1.0
    print(f"brats train/predict/evaluate: {time.perf_counter() - t0:.1f} s")
