"""Dataset fingerprint -> plan: geometry, statistics, sizing, merging into configs, YAML."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import GEOMETRIES, REPO

from medseg.core.config import IntensityConfig, ModelConfig, apply_overrides, from_dict
from medseg.preprocessing.datasets import discover_msd
from medseg.core.errors import ConfigError
from medseg.planning import (
    Fingerprint,
    apply_plan,
    fingerprint,
    load_plan,
    make_plan,
)
from medseg.preprocessing.intensity import INTENSITY_MODES, ClipZScore, intensity_transform


def write_dataset(root: Path, images, labels, affines) -> Path:
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, (img, lab, aff) in enumerate(zip(images, labels, affines)):
        nib.save(nib.Nifti1Image(img.astype(np.float32), aff), str(root / "imagesTr" / f"case_{i:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(lab.astype(np.uint8), aff), str(root / "labelsTr" / f"case_{i:03d}.nii.gz"))
    return root


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def box_label(shape, value: int = 1) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    x, y, z = shape
    lab[x // 4: 3 * x // 4, y // 3: 2 * y // 3, z // 4: max(z // 4 + 1, 3 * z // 4)] = value
    return lab


@pytest.fixture(scope="module")
def hippo_fp() -> Fingerprint:
    return fingerprint(discover_msd(Path(__file__).parent / "data" / "hippocampus"), modality="MR", progress=False,
                       max_voxels_per_case=500)


def test_fingerprint_hippocampus(hippo_fp):
    fp = hippo_fp
    assert len(fp.cases) == 6 and fp.orientation == "RAS"
    np.testing.assert_allclose(fp.median_spacing, [1.0, 1.0, 1.0], atol=1e-4)
    np.testing.assert_allclose(fp.spacing_p10, [1.0, 1.0, 1.0], atol=1e-4)
    for shape in fp.shapes:
        assert all(20 <= s <= 70 for s in shape), shape
    assert all(lo <= m <= hi for lo, m, hi in zip(fp.shape_p10, fp.median_shape, fp.shape_p90))
    assert set(fp.class_frequency) == {0, 1, 2}
    assert sum(fp.class_frequency.values()) == pytest.approx(1.0)
    assert 0.8 < fp.class_frequency[0] < 0.99
    assert all(0.005 < fp.class_frequency[c] < 0.1 for c in (1, 2))
    assert fp.class_case_share == {0: 1.0, 1: 1.0, 2: 1.0}
    it = fp.intensity
    assert it["samples"] == 6 * 500  # bounded random sample per case
    assert it["min"] <= it["p00_5"] < it["mean"] < it["p99_5"] <= it["max"] and it["std"] > 0
    assert fp.zero_background_share == 0.0  # hippocampus crops have no zero background
    summary = fp.summary()
    assert summary["n_cases"] == 6 and "shapes" not in summary
    yaml.safe_dump(fp.to_dict())  # plain Python types only

    plan = make_plan(fp)
    assert plan.spacing == pytest.approx([1.0, 1.0, 1.0])
    assert plan.intensity == {"mode": "zscore", "nonzero": False}
    assert plan.model == "dynunet3d" and plan.channels[0] == 16 and plan.batch_size >= 2
    assert plan.deep_supervision == 2 and plan.num_res_units == 0 and plan.kernel_sizes is None  # isotropic
    assert plan.foreground_ratio == 0.33
    assert set(plan.reasons) >= {"spacing", "patch_size", "strides", "channels", "batch_size", "intensity", "model"}
    div = np.prod(plan.strides, axis=0)
    assert all(p % d == 0 and p // d >= 4 for p, d in zip(plan.patch_size, div))
    assert plan.estimates["step_s"] < 0.5


def test_fingerprint_reorients_without_resampling(tmp_path):
    shape, affine = GEOMETRIES["permuted"]  # voxel axes (i, j, k) -> world (A, S, R) with spacing (1.0, 1.3, 0.9)
    lab = box_label(shape)
    root = write_dataset(tmp_path, [np.full(shape, 5.0) + lab], [lab], [affine])
    fp = fingerprint(discover_msd(root), modality="MR", progress=False)
    assert fp.shapes == [[shape[2], shape[0], shape[1]]]
    np.testing.assert_allclose(fp.spacings[0], [0.9, 1.0, 1.3], atol=1e-5)
    assert fp.intensity["mean"] == pytest.approx(6.0)


def test_anisotropic_dataset_plan(tmp_path):
    z_spacings = [5.0, 5.0, 5.0, 4.0, 3.0]
    rng = np.random.default_rng(0)
    images, labels, affines = [], [], []
    for i, dz in enumerate(z_spacings):
        shape = (64 + 2 * i, 60, 14)
        lab = box_label(shape)
        images.append(100 + 50 * lab + rng.normal(0, 5, shape))
        labels.append(lab)
        affines.append(np.diag([0.8, 0.8, dz, 1.0]))
    fp = fingerprint(discover_msd(write_dataset(tmp_path, images, labels, affines)), modality="MR", progress=False)
    np.testing.assert_allclose(fp.median_spacing, [0.8, 0.8, 5.0], atol=1e-5)
    for device in ("cpu", "cuda"):
        plan = make_plan(fp, device=device)
        assert plan.spacing[:2] == pytest.approx([0.8, 0.8])
        assert plan.spacing[2] == pytest.approx(np.percentile(z_spacings, 10))  # 3.4 mm, not the 5 mm median
        assert "10th percentile" in plan.reasons["spacing"]
        assert plan.strides[0] == [2, 2, 1]  # the coarse axis is not halved at the first level
        assert any(s[2] == 2 for s in plan.strides[1:])  # ... but later, once the spacings are comparable
        div = np.prod(plan.strides, axis=0)
        assert all(p % d == 0 for p, d in zip(plan.patch_size, div))
        assert all(len(s) == 3 for s in plan.to_overrides()["model"]["strides"])  # per-axis strides
        assert plan.model == "dynunet3d" and plan.kernel_sizes[0] == [3, 3, 1]
    assert plan.model == "dynunet3d" and plan.deep_supervision >= 1 and plan.channels[0] == 32
    # 0.8 x 0.8 x 3.4 mm: in-plane 3x3 kernels only until the spacings are comparable (nnU-Net)
    assert plan.kernel_sizes[0] == [3, 3, 1] and plan.kernel_sizes[-1] == [3, 3, 3]
    assert len(plan.kernel_sizes) == len(plan.strides) + 1
    from medseg.core.config import from_dict
    from medseg.models.registry import build_model

    cfg = from_dict({"model": plan.to_overrides()["model"], "patch": {"size": plan.patch_size}})
    net = build_model(cfg.model, 1, 2).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *plan.patch_size))
    assert tuple(out.shape[2:]) == tuple(plan.patch_size)
    path = plan.save(tmp_path / "plan.yaml")
    assert load_plan(path).kernel_sizes == plan.kernel_sizes


def test_ct_dataset_plan_uses_foreground_statistics(tmp_path):
    rng = np.random.default_rng(1)
    images, labels, fg = [], [], []
    for i in range(3):
        shape = (40, 36, 30)
        lab = box_label(shape)
        img = np.full(shape, -1000.0)  # air
        img[4:-4, 4:-4, :] = rng.normal(0, 30, (32, 28, 30))  # soft tissue
        img[lab > 0] = rng.normal(80 + 10 * i, 15, int(lab.sum()))  # the organ
        img.flat[np.flatnonzero(lab)[:3]] = 3000.0  # a few bright outliers
        images.append(img)
        labels.append(lab)
        fg.append(img[lab > 0])
    root = write_dataset(tmp_path, images, labels, [np.diag([0.7, 0.7, 2.5, 1.0])] * 3)
    fp = fingerprint(discover_msd(root), modality="CT", progress=False, max_voxels_per_case=10 ** 6)
    plan = make_plan(fp)
    fg = np.concatenate(fg)
    assert plan.intensity["mode"] == "ct_fingerprint"
    np.testing.assert_allclose(plan.intensity["clip"], np.percentile(fg, [0.5, 99.5]), rtol=1e-4)
    assert plan.intensity["mean"] == pytest.approx(fg.mean(), rel=1e-4)
    assert plan.intensity["std"] == pytest.approx(fg.std(), rel=1e-4)
    assert plan.intensity["clip"][0] > -200  # air and tissue outside the label play no part

    # the transform reads clip/mean/std from the IntensityConfig
    cfg = SimpleNamespace(**plan.intensity)
    norm = intensity_transform(cfg, ["image"])
    out = norm({"image": torch.tensor(images[0])[None]})["image"]
    lo, hi = plan.intensity["clip"]
    assert float(out.min()) == pytest.approx((lo - fg.mean()) / fg.std(), rel=1e-4)
    assert float(out.max()) == pytest.approx((hi - fg.mean()) / fg.std(), rel=1e-4)
    assert hi < 1000  # the outliers are clipped away
    mid = (lo + hi) / 2
    np.testing.assert_allclose(ClipZScore(lo, hi, 10.0, 2.0)(np.array([-1e4, mid, 1e4])),
                               [(lo - 10) / 2, (mid - 10) / 2, (hi - 10) / 2], rtol=1e-5)
    if {"clip", "mean", "std"} <= {f.name for f in dataclasses.fields(IntensityConfig)}:
        merged = from_dict(apply_plan({"labels": {0: "bg", 1: "organ"}}, plan))
        assert merged.preprocess.intensity.mode == "ct_fingerprint"
        assert intensity_transform(merged.preprocess.intensity, ["image"]) is not None


def test_ct_fingerprint_mode_needs_values():
    assert "ct_fingerprint" in INTENSITY_MODES
    with pytest.raises(ConfigError, match="ct_fingerprint needs clip, mean and std"):
        intensity_transform(SimpleNamespace(mode="ct_fingerprint", clip=None, mean=None, std=None), ["image"])
    with pytest.raises(ConfigError, match="ct_fingerprint needs clip, mean and std"):
        intensity_transform(IntensityConfig(mode="ct_fingerprint"), ["image"])  # fields absent or unset
    with pytest.raises(ConfigError, match="bad ct_fingerprint values"):
        ClipZScore(10.0, 5.0, 0.0, 1.0)


def big_ct_fingerprint(n: int = 20) -> Fingerprint:
    """An abdomen-CT-like fingerprint without files: 512x512x~200 at 0.8x0.8x1.5 mm."""
    shapes = [[512, 512, 180 + 5 * i] for i in range(n)]
    spacings = [[0.78, 0.78, 1.5]] * n
    pct = {q: np.percentile(np.asarray(shapes, float), q, 0).tolist() for q in (10, 50, 90)}
    return Fingerprint(
        modality="CT", orientation="RAS", cases=[f"c{i}" for i in range(n)], spacings=spacings, shapes=shapes,
        median_spacing=[0.78, 0.78, 1.5], spacing_p10=[0.78, 0.78, 1.5], spacing_p90=[0.78, 0.78, 1.5],
        median_shape=pct[50], shape_p10=pct[10], shape_p90=pct[90],
        intensity={"mean": 90.0, "std": 40.0, "p00_5": -20.0, "p99_5": 200.0, "min": -90.0, "max": 900.0, "samples": 1},
        class_frequency={0: 0.97, 1: 0.03}, class_case_share={0: 1.0, 1: 1.0}, zero_background_share=0.0)


def test_patch_shrinks_to_the_budget(hippo_fp):
    roomy, tight = make_plan(hippo_fp, memory_gb=4), make_plan(hippo_fp, memory_gb=0.25)
    assert np.prod(tight.patch_size) < np.prod(roomy.patch_size)
    assert tight.estimates["memory_gb"] <= 0.25 < roomy.estimates["memory_gb"]
    assert "shrunk" in tight.reasons["patch_size"]
    fast = make_plan(hippo_fp, time_budget="0.1")
    assert np.prod(fast.patch_size) < np.prod(roomy.patch_size) and fast.estimates["step_s"] <= 0.1
    # the lighter UNet is planned with its own cost model
    unet = make_plan(hippo_fp, network="unet3d")
    assert unet.model == "unet3d" and unet.num_res_units == 2 and unet.deep_supervision == 0
    assert unet.patch_size == roomy.patch_size and unet.batch_size == roomy.batch_size  # 6 cases: batch cap 2
    assert unet.estimates["step_s"] < roomy.estimates["step_s"] / 3
    assert "residual UNet" in unet.reasons["model"] and "DynUNet" in roomy.reasons["model"]
    with pytest.raises(ConfigError, match="cannot plan for this network"):
        make_plan(hippo_fp, network="segresnet")

    fp = big_ct_fingerprint()
    cpu, gpu8, gpu4 = make_plan(fp), make_plan(fp, device="cuda"), make_plan(fp, device="cuda", memory_gb=4)
    assert cpu.estimates["step_s"] <= 0.5 and cpu.batch_size >= 2 and len(cpu.channels) <= 5
    assert np.prod(cpu.patch_size) < np.prod(gpu8.patch_size)
    assert np.prod(gpu4.patch_size) < np.prod(gpu8.patch_size)
    for plan, budget in ((gpu8, 8), (gpu4, 4)):
        assert plan.estimates["memory_gb"] <= budget
        assert max(plan.channels) <= 320 and plan.batch_size >= 2
        div = np.prod(plan.strides, axis=0)
        assert all(p % d == 0 and p // d >= 4 for p, d in zip(plan.patch_size, div))


def test_cpu_plan_for_bf16_training(monkeypatch, tmp_path):
    """bf16 plans cost DynUNet steps at the measured bf16 speed, so the same budget buys a larger patch or
    batch, and the plan trains in bf16; ``auto`` follows the CPU's bf16 support."""
    fp = big_ct_fingerprint()
    fp32, bf16 = make_plan(fp), make_plan(fp, precision="bf16")
    assert fp32.amp_dtype is None and "amp_dtype" not in fp32.to_overrides()["train"]
    assert bf16.amp_dtype == "bf16" and bf16.to_overrides()["train"]["amp_dtype"] == "bf16"
    assert np.prod(bf16.patch_size) * bf16.batch_size > np.prod(fp32.patch_size) * fp32.batch_size
    assert fp32.estimates["step_s"] <= 0.5 and bf16.estimates["step_s"] <= 0.5
    assert "bf16" in bf16.reasons["precision"] and "in bf16" in bf16.reasons["patch_size"]
    assert bf16.reasons["precision"] != fp32.reasons["precision"]
    assert load_plan(bf16.save(tmp_path / "plan.yaml")).to_overrides() == bf16.to_overrides()
    monkeypatch.setattr("medseg.core.runtime.cpu_has_fast_bf16", lambda: True)
    assert make_plan(fp, precision="auto").to_overrides() == bf16.to_overrides()
    assert make_plan(fp, device="cuda", precision="auto").amp_dtype is None  # GPUs: train.amp decides
    monkeypatch.setattr("medseg.core.runtime.cpu_has_fast_bf16", lambda: False)
    assert make_plan(fp, precision="auto").to_overrides() == fp32.to_overrides()
    with pytest.raises(ConfigError, match="unknown training precision"):
        make_plan(fp, precision="fp8")


def test_apply_plan_keeps_explicit_keys(hippo_fp):
    plan = make_plan(hippo_fp)
    data = yaml.safe_load((REPO / "configs" / "hippocampus.yaml").read_text())
    overrides = ["train.batch_size=3", "model.num_res_units=1", "inference.roi_size=[32, 32, 32]"]
    data = apply_overrides(data, overrides)
    keep = set(flatten(data))  # what the caller passes: the YAML's keys and the --set keys
    assert {"patch.size", "train.batch_size", "model.num_res_units", "preprocess.intensity.nonzero"} <= keep
    merged = apply_plan(data, plan, keep=keep)
    flat_before, flat_after = flatten(data), flatten(merged)
    assert len(flat_before) > 40
    for key, value in flat_before.items():  # every explicit value survives
        assert flat_after[key] == value, key
    assert merged["train"]["batch_size"] == 3 and merged["model"]["num_res_units"] == 1
    assert merged["patch"]["foreground_ratio"] == 0.67  # set in the YAML: not planned
    assert "samples_per_volume" in merged["patch"]  # absent from the YAML: planned
    assert merged["preprocess"]["intensity"] == {"mode": "zscore", "nonzero": True}
    assert data["patch"]["size"] == [48, 64, 48]  # the input dict is not modified

    # a nearly empty config gets every planned value and still validates and builds
    merged = apply_plan({"labels": {0: "background", 1: "anterior", 2: "posterior"}}, plan)
    cfg = from_dict(merged)
    assert cfg.patch.size == plan.patch_size and cfg.train.batch_size == plan.batch_size
    assert cfg.model.strides == [2, 2, 2] and cfg.preprocess.spacing == plan.spacing
    from medseg.models.registry import build_model

    net = build_model(cfg.model, 1, cfg.num_classes).eval()
    assert net(torch.zeros(1, 1, *cfg.patch.size)).shape[2:] == tuple(cfg.patch.size)

    # coupled keys: a user's channels keep the plan's strides out, another intensity mode keeps all
    # intensity values out, a section name keeps everything under it
    mixed = apply_plan({"model": {"channels": [8, 16]}, "preprocess": {"intensity": {"mode": "ct_window"}}},
                       make_plan(hippo_fp, device="cuda"), keep={"model.channels", "preprocess.intensity.mode"})
    assert mixed["model"]["channels"] == [8, 16] and "strides" not in mixed["model"]
    assert mixed["model"]["deep_supervision"] <= len(ModelConfig().strides) - 1
    assert mixed["preprocess"]["intensity"] == {"mode": "ct_window"}
    assert apply_plan({"train": {"lr": 0.1}}, plan, keep={"train"})["train"] == {"lr": 0.1}


def test_plan_yaml_round_trip(tmp_path, hippo_fp):
    for plan in (make_plan(hippo_fp), make_plan(big_ct_fingerprint(), device="cuda")):
        path = plan.save(tmp_path / "plan.yaml")
        text = path.read_text()
        assert text.splitlines()[1] == "fingerprint:" and "\nreasons:\n" in text and "\nplan:\n" in text
        assert load_plan(path) == plan
    with pytest.raises(ConfigError, match="not a plan file"):
        (tmp_path / "bad.yaml").write_text("a: 1\n")
        load_plan(tmp_path / "bad.yaml")


@pytest.mark.shared_data
def test_fingerprint_all_hippocampus_cases(shared_data):
    cases = discover_msd(shared_data / "hippocampus")
    t0 = time.perf_counter()
    fp = fingerprint(cases, modality="MR", progress=False)
    elapsed = time.perf_counter() - t0
    assert len(fp.cases) == len(cases) == 195
    assert elapsed < 30, elapsed
    np.testing.assert_allclose(fp.median_spacing, [1.0, 1.0, 1.0], atol=1e-3)
    assert set(fp.class_frequency) == {0, 1, 2} and fp.intensity["samples"] <= 195 * 10_000
    print(f"\nfingerprint of {len(cases)} cases in {elapsed:.1f} s")
    for kwargs in ({"device": "cpu"}, {"device": "cuda"}):
        plan = make_plan(fp, **kwargs)
        print(yaml.safe_dump({"device": plan.device, **plan.to_overrides(), "estimates": plan.estimates,
                              "reasons": plan.reasons}, sort_keys=False, width=140))
        assert plan.patch_size == [40, 56, 40] and plan.batch_size >= 2


def test_config_plan_auto_and_plan_file_fill_only_unset_keys(tmp_path, hippo_data):
    from medseg.core.config import load_config as load_unplanned
    from medseg.planning import load_planned_config as load_config
    from conftest import run_cli

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"name: h\nplan: auto\nlabels: {{0: bg, 1: a, 2: p}}\ndata: {{root: {hippo_data}}}\n"
                        "patch: {size: [32, 32, 32]}\ntrain: {device: cpu}\n")
    raw = load_unplanned(cfg_path)  # loading a config never plans: the trainer asks the planner
    assert raw.plan == "auto" and raw.model.name == "unet3d" and raw.preprocess.spacing is None
    cfg = load_config(cfg_path)
    assert cfg.patch.size == [32, 32, 32]  # set by the user: kept
    assert cfg.preprocess.spacing == [1.0, 1.0, 1.0] and cfg.patch.foreground_ratio == 0.33  # planned
    assert cfg.train.batch_size >= 2 and cfg.model.name == "dynunet3d" and cfg.model.deep_supervision == 2
    cfg_path.write_text(cfg_path.read_text().replace("train: {device: cpu}", "train: {device: cpu}\nmodel: {name: unet3d}"))
    unet = load_config(cfg_path)  # a network named in the config is planned as that network
    assert unet.model.name == "unet3d" and unet.model.num_res_units == 2 and unet.model.deep_supervision == 0
    cfg_path.write_text(cfg_path.read_text().replace("\nmodel: {name: unet3d}", ""))
    proc = run_cli("plan", hippo_data, "-o", tmp_path / "plan.yaml")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "patch_size:" in proc.stdout
    cfg_path.write_text(cfg_path.read_text().replace("plan: auto", f"plan: {tmp_path / 'plan.yaml'}"))
    from_file = load_config(cfg_path, ["train.batch_size=3"])
    assert from_file.train.batch_size == 3 and from_file.preprocess.spacing == cfg.preprocess.spacing
    cfg_path.write_text(cfg_path.read_text().replace(str(tmp_path / "plan.yaml"), str(tmp_path / "none.yaml")))
    from medseg.core.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError, match="plan file not found"):
        load_config(cfg_path)
