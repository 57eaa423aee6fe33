"""Models imported from nnU-Net v2: its preprocessing re-implemented step by step (checked against outputs nnU-Net
itself computed, tests/data/nnunet), the safe import of a results folder, and predictions on the input grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import GEOMETRIES, TEST_DATA, assert_clean_error, blob_label, run_cli

from medseg.core.config import NnUNetPreprocessConfig
from medseg.preprocessing import nnunet

dna = pytest.importorskip("dynamic_network_architectures", reason="dynamic-network-architectures not installed")

REF = TEST_DATA / "nnunet"


def test_resampling_equals_nnunets():
    """Cubic spline, separate low-resolution axis (nearest along it), linear: the values nnU-Net computed."""
    ref = np.load(REF / "resampling.npz")
    for i in range(4):
        out = nnunet.resample(ref[f"x{i}"], ref[f"new{i}"], ref[f"sp{i}"], ref[f"nsp{i}"], order=int(ref[f"order{i}"]),
                              order_z=0, out_dtype=np.float32)
        assert out.shape == ref[f"y{i}"].shape
        np.testing.assert_allclose(out, ref[f"y{i}"], rtol=0, atol=1e-6)


def test_separate_axis_rule():
    assert nnunet.separate_axis(None, [4.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == 0
    assert nnunet.separate_axis(None, [1.0, 1.0, 1.0], [1.0, 5.0, 1.0]) == 1
    assert nnunet.separate_axis(None, [1.0, 1.2, 1.1], [1.0, 1.0, 1.0]) is None
    assert nnunet.separate_axis(None, [0.24, 1.25, 1.25], [1.0, 1.0, 1.0]) is None  # two coarse axes: not separate
    assert nnunet.separate_axis(False, [4.0, 1.0, 1.0], [1.0, 1.0, 1.0]) is None


def test_crop_and_normalisation_equal_nnunets():
    ref = np.load(REF / "normalization.npz")
    box, mask = nnunet.nonzero_box(ref["img"])
    assert [tuple(b) for b in box] == [tuple(b) for b in ref["bbox"]]
    np.testing.assert_array_equal(mask, ref["mask"])
    crop = ref["img"][(slice(None), *[slice(lo, hi) for lo, hi in box])].copy()
    props = {"mean": 90.0, "std": 20.0, "percentile_00_5": 40.0, "percentile_99_5": 150.0}
    np.testing.assert_allclose(nnunet.normalize(crop[0].copy(), "ZScoreNormalization", mask, True, props),
                               ref["zscore_mask"], atol=1e-5)
    np.testing.assert_allclose(nnunet.normalize(crop[1].copy(), "ZScoreNormalization", mask, False, props),
                               ref["zscore_all"], atol=1e-5)
    np.testing.assert_allclose(nnunet.normalize(crop[0].copy(), "CTNormalization", mask, False, props), ref["ct"],
                               atol=1e-5)


def test_window_steps_as_nnunet():
    from medseg.inference.engine import nnunet_steps, window_starts

    assert nnunet_steps(110, 64, 0.5) == [0, 23, 46]  # the example in nnU-Net's compute_steps_for_sliding_window
    assert nnunet_steps(64, 64, 0.5) == [0]
    assert nnunet_steps(65, 64, 0.5) == [0, 1]
    starts = window_starts((110, 64, 70), (64, 64, 64), 0.5, steps="nnunet")
    assert len(starts) == 3 * 1 * 2 and starts == sorted(starts, key=lambda s: (s[2], s[0], s[1]))


def test_mirror_combinations():
    from medseg.inference.backends import MirrorRunner, mirror_passes

    assert mirror_passes([0, 1, 2], combinations=True) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_passes([0, 2]) == [(0,), (2,)]

    class Runner:
        groups, device = 1, torch.device("cpu")

        def __call__(self, x):
            return torch.cat([x, 2 * x], dim=1)  # a position-wise "network": mirrors flipped back agree

    x = torch.randn(2, 1, 4, 5, 6)
    mr = MirrorRunner(Runner(), [0, 1, 2], combinations=True, average_logits=True)
    assert mr.groups == 1 and mr.passes == 8
    torch.testing.assert_close(mr(x), Runner()(x))


def _processed_cfg(spacing, transpose=(0, 1, 2), norm="NoNormalization"):
    return NnUNetPreprocessConfig(transpose=list(transpose), spacing=list(spacing), normalization=[norm],
                                  mask_for_norm=[False], intensity_properties=[{}],
                                  data_resampling={"order": 1, "order_z": 1, "force_separate_z": False},
                                  probabilities_resampling={"order": 1, "order_z": 0, "force_separate_z": None})


@pytest.mark.parametrize("name", ["oblique", "permuted", "anisotropic"])
@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1)])
def test_processed_affine_places_every_voxel(name, transpose):
    """A linear ramp in world coordinates, resampled linearly, holds at each processed voxel the ramp's value at the
    world position ``processed_affine`` gives that voxel: the grid bookkeeping (axis reversal, transpose, crop,
    resampling's edge alignment) is right."""
    shape, affine = GEOMETRIES[name]
    ii, jj, kk = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    world = np.einsum("ab,bxyz->axyz", affine[:3, :3], np.stack([ii, jj, kk])) + affine[:3, 3, None, None, None]
    w = np.array([0.3, -0.2, 0.5])
    ramp = 1000.0 + np.einsum("a,axyz->xyz", w, world)
    image = np.zeros(shape, np.float32)
    image[2:-2, 1:-1, 1:] = ramp[2:-2, 1:-1, 1:]  # a zero border: the crop to the non-zero region must be undone too
    target = [1.3, 0.8, 1.1]
    data, proc_affine, grid = nnunet.preprocess(torch.from_numpy(image)[None], affine, _processed_cfg(target, transpose))
    assert grid.box != [[0, s] for s in grid.shape_before_crop]
    p = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in data.shape[1:]], indexing="ij"))
    # medseg voxel index of each processed voxel, through the affine, then the ramp there
    xyz = np.einsum("ab,bxyz->axyz", proc_affine[:3, :3], p) + proc_affine[:3, 3, None, None, None]
    expect = 1000.0 + np.einsum("a,axyz->xyz", w, xyz)
    inner = tuple(slice(3, -3) for _ in range(3))  # voxels within half an input voxel of an edge clamp (edge mode)
    np.testing.assert_allclose(data[0][inner], expect[inner], rtol=0, atol=2e-3)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_labels_round_trip(name):
    """One-hot labels pushed through the forward step (no resampling) and back give the labels again: crop, axis
    order and transpose are undone exactly, and outside the crop box is background."""
    shape, affine = GEOMETRIES[name]
    lab = blob_label(shape)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    for transpose in [(0, 1, 2), (1, 2, 0)]:
        cfg = _processed_cfg([float(spacing[2 - t]) for t in transpose], transpose)
        onehot = np.stack([lab == c for c in range(3)]).astype(np.float32)
        data, _, grid = nnunet.preprocess(torch.from_numpy((lab > 0).astype(np.float32))[None], affine, cfg)
        # the processed grid is the crop of the label's non-zero region: take the one-hot labels there
        axes = [2 - t for t in transpose]
        crop = onehot.transpose(0, *[a + 1 for a in axes])[(slice(None), *[slice(lo, hi) for lo, hi in grid.box])]
        assert crop.shape[1:] == data.shape[1:]
        back = nnunet.to_input_grid(torch.from_numpy(crop), grid, cfg, lambda p: p.argmax(0))
        np.testing.assert_array_equal(back, lab)


# ---------------------------------------------------------------------------
# a results folder with a small network of nnU-Net's kind


def _arch(features=(4, 8, 16)):
    n = len(features)
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n, "features_per_stage": list(features),
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
                            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
                            "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def make_results(root: Path, *, folds=(0, 1), arch=None, spacing=(1.0, 1.0, 1.0), transpose=(0, 1, 2),
                 labels=None, regions_class_order=None, channels=("MRI",)) -> Path:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    folder = root / "Dataset999_Test" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    arch = arch or _arch()
    labels = labels or {"background": 0, "a": 1, "b": 2}
    conf = {"patch_size": [16, 16, 16], "spacing": list(spacing), "normalization_schemes": ["ZScoreNormalization"] *
            len(channels), "use_mask_for_norm": [False] * len(channels),
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": arch}
    plans = {"transpose_forward": list(transpose), "configurations": {"3d_fullres": conf},
             "foreground_intensity_properties_per_channel": {str(c): {"mean": 1.0, "std": 1.0, "percentile_00_5": 0.0,
                                                                      "percentile_99_5": 2.0} for c in range(len(channels))}}
    dataset = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels, "file_ending": ".nii.gz"}
    if regions_class_order:
        dataset["regions_class_order"] = regions_class_order
    outputs = len(regions_class_order) if regions_class_order else len(labels)
    for f in folds:
        (folder / f"fold_{f}").mkdir(parents=True)
        torch.manual_seed(f)
        kw = dict(arch["arch_kwargs"], conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
        net = PlainConvUNet(input_channels=len(channels), num_classes=outputs, deep_supervision=False, **kw)
        torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                    "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 5,
                    # as nnU-Net writes them: numpy floats in the training log, a torch.device in init_args
                    "logging": {"mean_fg_dice": [np.float32(0.5)]}, "_best_ema": np.float32(0.5),
                    "init_args": {"configuration": "3d_fullres", "fold": f, "device": torch.device("cpu")}},
                   folder / f"fold_{f}" / "checkpoint_final.pth")
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def test_import_builds_an_ensemble_of_the_folds(tmp_path):
    from medseg.models.loading import load_model
    from medseg.models.nnunet import import_nnunet, load_nnunet_checkpoint

    folder = make_results(tmp_path)
    out = import_nnunet(folder.parent, tmp_path / "model.pt")
    loaded = load_model(out)
    assert len(loaded.nets) == 2
    cfg = loaded.cfg
    assert cfg.labels == {0: "background", 1: "a", 2: "b"} and cfg.preprocess.orientation is None
    assert cfg.inference.average == "logits" and cfg.inference.mirror == "combinations" and cfg.augment.flip_axes == [0, 1, 2]
    assert loaded.payload["source"]["folds"] == ["fold_0", "fold_1"]
    # the folds' weights, float16-rounded, in each member
    ref = load_nnunet_checkpoint(folder / "fold_1" / "checkpoint_final.pth")["network_weights"]
    for k, v in loaded.nets[1].state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ref[k].half().float())


def test_imported_model_predicts_on_the_input_grid(tmp_path, geometry):
    """Every geometry trap: labels come back with the input's shape and affine, from both the nnU-Net voxel order
    and a reorientation first."""
    from medseg.inference.predictor import Predictor
    from medseg.io.volume import Volume
    from medseg.models.nnunet import import_nnunet

    _, shape, affine = geometry
    folder = make_results(tmp_path, spacing=(1.5, 1.0, 1.2), transpose=(2, 0, 1))
    vol = Volume(blob_label(shape).astype(np.float32) * 100 + 5, affine)
    for orientation in (None, "RAS"):
        model = import_nnunet(folder, tmp_path / f"m{orientation}.pt", orientation=orientation, folds=[0])
        p = Predictor(model, device="cpu", tta=False)
        out = p.predict_volume(vol)
        assert out.shape == shape and np.allclose(out.affine, affine)
        probs = p.probabilities(vol)
        assert tuple(probs.shape) == (3, *shape)
        torch.testing.assert_close(probs.sum(0), torch.ones(shape), atol=1e-4, rtol=0)


def test_logit_average_is_nnunets_fold_ensemble(tmp_path):
    """Two folds with logit averaging give what one network with the averaged logits gives (blending is linear)."""
    from medseg.inference.predictor import Predictor
    from medseg.io.volume import Volume
    from medseg.models.nnunet import import_nnunet

    folder = make_results(tmp_path)
    shape, affine = GEOMETRIES["identity"]
    vol = Volume(np.random.default_rng(0).normal(size=(30, 20, 26)).astype(np.float32), affine)
    both = Predictor(import_nnunet(folder, tmp_path / "both.pt"), device="cpu", tta=False,
                     amp=False)  # fp32 on CPUs where auto would pick bf16: the average is what is checked
    image = both.transforms({"image": vol})["image"]
    window = image.as_tensor()[None, :, :16, :16, :16]
    with torch.inference_mode():
        mean = (both.nets[0](window) + both.nets[1](window)) / 2
        torch.testing.assert_close(both.runner(window), mean)


def test_regions_decode_as_nnunet(tmp_path):
    from medseg.models.loading import load_model
    from medseg.models.nnunet import import_nnunet

    folder = make_results(tmp_path, labels={"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": [3]},
                          regions_class_order=[1, 2, 3])
    cfg = load_model(import_nnunet(folder, tmp_path / "r.pt")).cfg
    assert [r.labels for r in cfg.regions] == [[1, 2, 3], [2, 3], [3]] and cfg.region_values() == [1, 2, 3]
    from medseg.inference.predictor import Predictor

    p = Predictor(tmp_path / "r.pt", device="cpu", tta=False)
    probs = torch.zeros(3, 2, 1, 1)
    probs[2, 0] = 0.9  # enhancing without core or whole: nnU-Net still paints it (no nesting rule)
    assert p.decode(probs)[:, 0, 0].tolist() == [3, 0]


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    from medseg.core.errors import CheckpointError, ConfigError
    from medseg.models.nnunet import import_nnunet, load_nnunet_checkpoint

    folder = make_results(tmp_path, folds=(0,))
    ck = folder / "fold_0" / "checkpoint_final.pth"
    payload = load_nnunet_checkpoint(ck)  # numpy floats and a torch.device load; anything else is refused
    payload["init_args"]["sneaky"] = Path("/etc")  # any object outside torch's safe list
    torch.save(payload, ck)
    with pytest.raises(CheckpointError, match="safely"):
        import_nnunet(folder, tmp_path / "m.pt")
    folder2 = make_results(tmp_path / "b", folds=(0,))
    plans = json.loads((folder2 / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    (folder2 / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ConfigError, match="unsupported layer"):
        import_nnunet(folder2, tmp_path / "m.pt")


def test_cli_import_model(tmp_path):
    folder = make_results(tmp_path, folds=(0,))
    proc = run_cli("import-model", "nnunet", str(folder), "-o", str(tmp_path / "m.pt"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.pt").is_file()
    proc = run_cli("import-model", "nnunet", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.pt"))
    assert_clean_error(proc, "nnU-Net results folder not found")
    proc = run_cli("import-model", "nnunet", str(folder), "-o", str(tmp_path / "x.pt"), "--folds", "3")
    assert_clean_error(proc, "fold_3")


def test_installed_models_are_used_by_name(tmp_path):
    """Without -o, import-model installs the model in $MEDSEG_MODELS_DIR; 'models --json' lists it and --model NAME
    finds it."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    folder = make_results(tmp_path, folds=(0,))
    env = {**os.environ, "MEDSEG_MODELS_DIR": str(tmp_path / "models"), "PYTHONWARNINGS": "ignore"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "medseg", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=600)

    proc = cli("import-model", "nnunet", folder, "--name", "toy_nnunet")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "models" / "toy_nnunet.pt").is_file()
    listed = {m["name"]: m for m in json.loads(cli("models", "--json").stdout)}
    assert listed["toy_nnunet"]["kind"] == "installed" and listed["toy_nnunet"]["source"] == "nnunet"
    assert listed["toy_nnunet"]["outputs"] == ["a", "b"] and listed["hippocampus"]["kind"] == "bundled"
    sample = REPO / "medseg" / "assets" / "samples" / "hippocampus_001.nii.gz"
    proc = cli("predict", sample, "-o", tmp_path / "out", "--model", "toy_nnunet", "--no-tta")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "hippocampus_001.nii.gz").is_file()


# ---------------------------------------------------------------------------
# against nnU-Net's own predictor (tests/data/nnunet/tiny: a model nnU-Net trained, and its predictions)

TINY = REF / "tiny"


@pytest.mark.parametrize("tta", [False, True])
def test_labels_agree_with_nnunets_predictor(tmp_path, tta):
    """The imported model's labels against those nnU-Net predicted from the same results folder and inputs (both
    folds; with and without mirror TTA): the same grid, and Dice at least 0.99 per class on every case, among them
    an anisotropic input (the separate-axis resampling) and an oblique one."""
    import nibabel as nib

    from medseg.inference.predictor import Predictor
    from medseg.io.volume import load_volume
    from medseg.models.nnunet import import_nnunet

    (folder,) = (TINY / "results" / "Dataset004_Hippocampus").iterdir()
    predictor = Predictor(import_nnunet(folder, tmp_path / "tiny.pt"), device="cpu", tta=tta)
    ref_dir = TINY / ("nnunet_tta" if tta else "nnunet_notta")
    for path in sorted((TINY / "inputs").glob("*_0000.nii.gz")):
        case = path.name[: -len("_0000.nii.gz")]
        vol = load_volume(path)
        ours = predictor.predict_volume(vol)
        ref = nib.load(ref_dir / f"{case}.nii.gz")
        theirs = np.asarray(ref.dataobj)
        assert ours.shape == theirs.shape and np.allclose(ours.affine, ref.affine, atol=1e-4), case
        for c in (1, 2):
            a, b = ours.array == c, theirs == c
            assert b.sum() > 100, case  # nnU-Net found the class: the comparison is not between empty masks
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99, (case, c)


def test_several_channels(tmp_path):
    """A model of two channels (nnU-Net's channel_names): its sequences become data.channels, each normalised by its
    own scheme, and a case given as two files (nnU-Net names) predicts on the first file's grid."""
    import nibabel as nib

    from medseg.apps.run import predict
    from medseg.models.loading import load_model
    from medseg.models.nnunet import import_nnunet

    folder = make_results(tmp_path, folds=(0,), channels=("T2", "ADC map"))
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization", "CTNormalization"]
    (folder / "plans.json").write_text(json.dumps(plans))
    model = import_nnunet(folder, tmp_path / "two.pt")
    cfg = load_model(model).cfg
    assert cfg.channel_names == ["T2", "ADC_map"] and cfg.preprocess.nnunet.normalization[1] == "CTNormalization"
    shape, affine = GEOMETRIES["oblique"]
    src = tmp_path / "in"
    src.mkdir()
    for c in range(2):
        nib.save(nib.Nifti1Image(blob_label(shape).astype(np.float32) * (50 + c) + c, affine),
                 src / f"case7_000{c}.nii.gz")
    (res,) = predict([src], tmp_path / "out", model=model, device="cpu", progress=False)
    out = nib.load(res.outputs[0])
    assert out.shape == shape and np.allclose(out.affine, affine, atol=1e-5)


def test_imported_model_on_dicom_with_every_output_format(tmp_path):
    """The imported nnU-Net model through the whole run loop: a DICOM series in; NIfTI, Slicer, DICOM SEG and
    RTSTRUCT out, all on the series' grid."""
    from medseg.apps.run import predict
    from medseg.io.dicom import load_dicom_series
    from medseg.io.dicom_seg import read_dicom_seg
    from medseg.io.volume import load_volume
    from medseg.models.nnunet import import_nnunet

    (folder,) = (TINY / "results" / "Dataset004_Hippocampus").iterdir()
    model = import_nnunet(folder, tmp_path / "tiny.pt", folds=[0])
    hcrop = TEST_DATA / "dicom" / "hcrop"
    (res,) = predict([hcrop], tmp_path / "out", model=model, device="cpu", progress=False, tta=False,
                     formats=["nifti", "seg.nrrd", "dicom-seg", "rtstruct"])
    names = sorted(p.name.split(".", 1)[1] for p in res.outputs)
    assert names == ["dcm", "nii.gz", "rtstruct.dcm", "seg.nrrd"]
    labels = load_volume(next(p for p in res.outputs if p.name.endswith(".nii.gz")))
    source = load_dicom_series(hcrop)
    assert labels.shape == source.shape and np.allclose(labels.affine, source.affine, atol=1e-4)
    assert {1, 2} <= set(np.unique(labels.array).tolist())  # the model finds both parts on this crop
    from medseg.io.dicom import scan_dicom

    (info,) = [s for s in scan_dicom(hcrop) if s.usable]
    files = list(info.files)  # in the loader's slice order
    seg, _ = read_dicom_seg(next(p for p in res.outputs if p.name.endswith(".dcm") and "rtstruct" not in p.name), files)
    np.testing.assert_array_equal(seg, labels.array)
