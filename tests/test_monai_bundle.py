"""Models imported from MONAI bundles: a small bundle made with MONAI's bundle tools, run by MONAI's bundle runner
and by medseg on the same input, gives the same labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import GEOMETRIES, assert_clean_error, blob_label, run_cli


def inference_config(datalist: list[str], output_dir: Path, *, pre=None, inferer=None) -> dict:
    pre = pre or [
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.3, 1.1, 1.6], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": "$-20 + 10", "a_max": 250, "b_min": 0,
         "b_max": 1, "clip": True},
    ]
    return {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "output_dir": str(output_dir),
        "device": "$torch.device('cpu')",
        "channels": [8, 16, 32],
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                        "channels": "@channels", "strides": [2, 2], "num_res_units": 1, "norm": "batch"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            *pre,
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "dataset": {"_target_": "Dataset", "data": [{"image": p} for p in datalist], "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": inferer or {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 2,
                               "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "separate_folder": False, "resample": False}]},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "amp": False},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}, "map_location": "cpu"},
        "initialize": ["$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }


def make_bundle(root: Path, datalist: list[str], output_dir: Path, **kw) -> Path:
    from monai.bundle import ConfigParser, init_bundle
    from monai.networks.nets import UNet

    bundle = root / "bundle"
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=[8, 16, 32], strides=[2, 2], num_res_units=1,
               norm="batch")
    with torch.no_grad():  # give the batch norms statistics of their own, so eval mode is not the identity
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    init_bundle(str(bundle), ckpt_file=None, network=net)
    config = inference_config(datalist, output_dir, **kw)
    ConfigParser.export_config_file(config, str(bundle / "configs" / "inference.json"))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["name"] = "tiny bundle"
    meta.setdefault("network_data_format", {}).setdefault("outputs", {})["pred"] = {
        "type": "image", "num_channels": 3, "channel_def": {"0": "background", "1": "box", "2": "ball"}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle


def run_bundle(bundle: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(bundle / "configs" / "inference.json"), "--meta_file",
                           str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("name", ["oblique", "anisotropic"])
def test_bundle_labels_equal_monais_runner(tmp_path, name):
    import nibabel as nib

    from medseg.inference.predictor import Predictor
    from medseg.io.volume import load_volume
    from medseg.models.monai_bundle import import_bundle

    shape, affine = GEOMETRIES[name]
    image = tmp_path / "case.nii.gz"
    data = blob_label(shape).astype(np.float32) * 90 + np.random.default_rng(0).normal(20, 15, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), image)
    bundle = make_bundle(tmp_path, [str(image)], tmp_path / "monai_out")
    run_bundle(bundle)
    ref = nib.load(tmp_path / "monai_out" / "case_seg.nii.gz")
    ref_labels = np.asarray(ref.dataobj).squeeze()
    model = import_bundle(bundle, tmp_path / "model.pt")
    vol = load_volume(image)
    ours = Predictor(model, device="cpu", amp=False).predict_volume(vol)
    assert ours.shape == shape and np.allclose(ours.affine, vol.affine)
    assert ref_labels.shape == shape
    for c in (1, 2):  # the random network paints both classes somewhere: the comparison is not trivially empty
        assert 0.02 < (ref_labels == c).mean() < 0.98 or (ref_labels == c).sum() > 20
    agree = float((ours.array == ref_labels).mean())
    assert agree >= 0.9999, agree  # measured: every voxel the same (docs/import-models.md)


def test_bundle_config_becomes_medseg_config(tmp_path):
    from medseg.models.loading import load_model
    from medseg.models.monai_bundle import import_bundle

    bundle = make_bundle(tmp_path, [], tmp_path / "out")
    cfg = load_model(import_bundle(bundle, tmp_path / "m.pt")).cfg
    assert cfg.labels == {0: "background", 1: "box", 2: "ball"}
    assert cfg.preprocess.orientation == "RAS" and cfg.preprocess.spacing == [1.3, 1.1, 1.6]
    assert cfg.preprocess.intensity.mode == "range" and cfg.preprocess.intensity.scale_range == [-10, 250, 0, 1]
    assert cfg.inference.roi_size == [16, 16, 16] and cfg.inference.overlap == 0.25
    assert cfg.inference.blend == "constant" and cfg.model.arch["class"] == "UNet"
    assert cfg.model.arch["kwargs"]["channels"] == [8, 16, 32]  # "@channels" resolved by MONAI's parser


def test_unsupported_steps_are_refused_by_name(tmp_path):
    from medseg.core.errors import ConfigError
    from medseg.models.monai_bundle import import_bundle

    pre = [{"_target_": "CropForegroundd", "keys": "image", "source_key": "image"}]
    bundle = make_bundle(tmp_path, [], tmp_path / "out", pre=pre)
    with pytest.raises(ConfigError, match="CropForegroundd"):
        import_bundle(bundle, tmp_path / "m.pt")
    proc = run_cli("import-model", "monai-bundle", str(bundle), "-o", str(tmp_path / "m.pt"))
    assert_clean_error(proc, "CropForegroundd cannot be reproduced")
    torch.save({"model": {"weight": torch.zeros(2)}, "extra": Path("/x")}, bundle / "models" / "model.pt")
    proc = run_cli("import-model", "monai-bundle", str(tmp_path / "nope"), "-o", str(tmp_path / "m.pt"))
    assert_clean_error(proc, "MONAI bundle folder not found")
