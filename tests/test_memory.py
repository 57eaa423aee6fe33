"""Memory planning and the memory-bounded sliding window: same answer as MONAI, bounded memory, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GEOMETRIES, assert_clean_error, blob_label, image_from_label, run_cli, write_checkpoint

from medseg.core.config import Config
from medseg.core.errors import ResourceError
from medseg.inference.engine import labels_on_source_grid, sliding_window_probs, to_source_grid
from medseg.inference.memory import plan_memory, processed_shape
from medseg.core.runtime import current_rss_bytes
from medseg.inference.predictor import Predictor
from medseg.io import Volume


def _net(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Conv3d(4, classes, 3, padding=1)).eval()


@pytest.mark.parametrize("shape,roi,overlap,blend", [
    ((1, 35, 51, 35), (48, 64, 48), 0.5, "gaussian"),      # smaller than a window: padded
    ((1, 70, 60, 81), (32, 24, 32), 0.5, "gaussian"),      # many windows, several slabs
    ((1, 40, 30, 50), (16, 16, 16), 0.25, "constant"),
    ((1, 20, 18, 7), (16, 16, 7), 0.0, "gaussian"),
])
def test_sliding_window_probs_equal_monai(shape, roi, overlap, blend):
    from monai.inferers import sliding_window_inference

    net = _net()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = torch.softmax(sliding_window_inference(x[None], roi, 4, net, overlap=overlap, mode=blend)[0], 0)
    got = sliding_window_probs(net, x, roi, num_classes=3, overlap=overlap, blend=blend, sw_batch_size=3)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5)
    half = sliding_window_probs(net, x, roi, num_classes=3, overlap=overlap, blend=blend, out_dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), ref, atol=1e-3)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_chunked_labels_equal_resampled_argmax(name):
    shape, affine = GEOMETRIES[name]
    probs = torch.softmax(torch.randn(3, 26, 30, 24) * 3, 0)
    proc = np.diag([1.0, 1.0, 1.0, 1.0])
    proc[:3, 3] = affine[:3, 3] - 4
    ref = to_source_grid(probs, proc, affine, shape).argmax(0).numpy()
    got = labels_on_source_grid(probs, proc, affine, shape, chunk_voxels=500)  # many small chunks
    assert got.dtype == np.uint8 and got.shape == shape
    assert (got == ref).mean() > 0.999


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_separable_return_to_the_input_grid_equals_grid_sample(name, monkeypatch):
    """Probabilities on the grid that reorientation and resampling make of an input (any direction cosines) go back
    one axis at a time; the values and labels are those of MONAI's SpatialResample and of grid_sample."""
    from monai.data import MetaTensor
    from monai.transforms import Orientationd, Spacingd

    from medseg.inference import engine
    from medseg.preprocessing.resample import scaled_permutation

    shape, affine = GEOMETRIES[name]
    img = MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine))
    img = Orientationd(["image"], axcodes="RAS")({"image": img})["image"]
    proc = Spacingd(["image"], pixdim=(1.1, 0.9, 1.3), mode="bilinear")({"image": img})["image"]
    proc_affine = proc.affine.numpy()
    assert scaled_permutation(np.linalg.inv(proc_affine) @ affine) is not None
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, *proc.shape[1:]) * 3, 0)
    fast_probs = to_source_grid(probs, proc_affine, affine, shape)
    fast_labels = labels_on_source_grid(probs, proc_affine, affine, shape, chunk_voxels=500)
    monkeypatch.setattr(engine, "scaled_permutation", lambda m: None)  # the general paths
    ref_probs = to_source_grid(probs, proc_affine, affine, shape)
    ref_labels = labels_on_source_grid(probs, proc_affine, affine, shape, chunk_voxels=500)
    assert fast_probs.shape == ref_probs.shape == (3, *shape)
    assert torch.allclose(fast_probs, ref_probs, atol=1e-5)
    assert fast_labels.shape == shape and (fast_labels == ref_labels).mean() > 0.999


def test_scaled_permutation_refuses_a_rotation():
    from medseg.preprocessing.resample import scaled_permutation

    shape, affine = GEOMETRIES["oblique"]
    assert scaled_permutation(np.linalg.inv(np.eye(4)) @ affine) is None
    m = np.array([[0, 0, -2.0, 5], [0.5, 0, 0, 1], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    assert scaled_permutation(m) == [(1, 0.5, 1.0), (2, 1.0, 0.0), (0, -2.0, 5.0)]


@pytest.mark.parametrize("name", ["oblique", "flipped", "anisotropic"])
@pytest.mark.parametrize("dtype", [torch.int16, torch.float32])
@pytest.mark.parametrize("separable", [True, False])
def test_slab_resampling_equals_one_spacingd(name, dtype, separable, monkeypatch):
    """ChunkedSpacingd, forced into many slabs, gives MONAI's whole-volume Spacingd grid and values: one axis at
    a time (what every Spacing grid allows), and through SpatialResample where that is not possible."""
    from monai.data import MetaTensor
    from monai.transforms import Spacingd

    from medseg.preprocessing import resample as memory

    shape, affine = GEOMETRIES[name]
    monkeypatch.setattr(memory, "CHUNKED_RESAMPLE_VOXELS", 100)
    monkeypatch.setattr(memory, "SLAB_VOXELS", 300)
    if not separable:
        monkeypatch.setattr(memory, "scaled_permutation", lambda m: None)
    img = MetaTensor((torch.randn(1, *shape) * 100).to(dtype), affine=torch.as_tensor(affine))
    whole = Spacingd(["image"], pixdim=(0.8, 1.0, 1.2), mode="bilinear")
    ref = whole({"image": img})["image"]
    got = memory.ChunkedSpacingd(whole)({"image": img})["image"]
    assert got.shape == ref.shape and ref.shape[3] > 3  # several slabs along the last axis
    assert torch.allclose(got.affine.double(), ref.affine.double(), atol=1e-6)
    assert torch.allclose(got.as_tensor().float(), ref.as_tensor().float(), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channel_argmax_equals_argmax_with_ties(dtype):
    from medseg.inference.engine import channel_argmax

    v = (torch.rand(4, 30, 20, 10) * 4).round().to(dtype)  # many ties: the lower channel wins, as argmax's
    assert torch.equal(channel_argmax(v).long(), v.argmax(0))
    s = v.permute(0, 3, 1, 2)[:, :, 5:]  # a strided view
    assert torch.equal(channel_argmax(s).long(), s.argmax(0))
    assert channel_argmax(v[:1]).eq(0).all()


def test_plan_small_and_ct_volumes():
    cfg = Config(name="t", labels={0: "bg", 1: "a", 2: "b"})
    cfg.preprocess.spacing = [1.0, 1.0, 1.0]
    cfg.patch.size = [48, 64, 48]
    cfg.model.channels = [16, 32, 64, 128]
    cfg.model.strides = [2, 2, 2]
    small = plan_memory((35, 51, 35), np.eye(4), cfg, num_classes=3)
    # the estimate counts the process as it is, plus what predicting this volume adds
    assert small.probs_dtype == torch.float32 and small.host_peak_bytes - current_rss_bytes() < 512 * 2 ** 20
    ct_affine = np.diag([0.8, 0.8, 1.0, 1.0])
    assert processed_shape((512, 512, 600), ct_affine, cfg) == (410, 410, 600)
    ct = plan_memory((512, 512, 600), ct_affine, cfg, num_classes=3, source_itemsize=2, check=False)
    assert ct.probs_dtype == torch.float16  # full-volume probabilities kept compact
    assert ct.host_peak_bytes - current_rss_bytes() < 3.5 * 2 ** 30
    assert "410, 410, 600" in ct.describe()
    # a reoriented volume: axes swap before resampling
    perm = np.array([[0, 0, -2.0, 0], [1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    assert processed_shape((10, 20, 30), perm, cfg) == (60, 10, 20)


def test_refuses_with_a_clear_message_when_memory_is_short(tmp_path, monkeypatch):
    ck = write_checkpoint(tmp_path / "m.pt", spacing=[0.25, 0.25, 0.25])  # 64x more voxels after resampling
    vol = Volume(image_from_label(blob_label((120, 120, 120))), np.eye(4))  # 110 M voxels after resampling
    monkeypatch.setenv("MEDSEG_MEMORY_LIMIT_GB", "1.0")  # the whole process, libraries included
    with pytest.raises(ResourceError, match="not enough memory") as err:
        Predictor(ck, device="cpu").predict_volume(vol)
    assert "MEDSEG_MEMORY_LIMIT_GB" in str(err.value) and "coarser spacing" in str(err.value)
    import nibabel as nib

    nib.save(nib.Nifti1Image(vol.array, vol.affine), str(tmp_path / "v.nii.gz"))
    proc = run_cli("predict", tmp_path / "v.nii.gz", "-o", tmp_path / "out", "--model", ck, "--device", "cpu")
    assert_clean_error(proc, "not enough memory", "fix:")
    assert not (tmp_path / "out" / "v.nii.gz").exists()
    monkeypatch.setenv("MEDSEG_MEMORY_LIMIT_GB", "many")
    with pytest.raises(Exception, match="MEDSEG_MEMORY_LIMIT_GB"):
        Predictor(ck, device="cpu").predict_volume(vol)


def test_large_volume_predicts_with_compact_probabilities(tmp_path):
    ck = write_checkpoint(tmp_path / "m.pt", spacing=None, patch=(32, 32, 32))
    pred = Predictor(ck, device="cpu", overlap=0.0)
    shape = (96, 96, 80)  # 3 classes x 737k voxels: float32 would be 8.8 MB, float16 half
    lab = blob_label(shape)
    vol = Volume(image_from_label(lab), np.diag([-1.0, 1.0, 1.0, 1.0]))
    import medseg.inference.memory as memory

    old = memory.COMPACT_PROBS_BYTES
    memory.COMPACT_PROBS_BYTES = 1 << 20
    try:
        compact = pred.predict_volume(vol).array
        assert pred.last_plan.probs_dtype == torch.float16
    finally:
        memory.COMPACT_PROBS_BYTES = old
    full = pred.predict_volume(vol).array
    assert pred.last_plan.probs_dtype == torch.float32
    assert (compact == full).mean() > 0.999


@pytest.mark.slow
def test_ct_size_volume_stays_under_4gb_peak_rss(tmp_path):
    """512x512x600 int16 CT through the real CLI with a 3D model: peak RSS of the whole process < 4 GB."""
    import resource
    import subprocess
    import sys

    import nibabel as nib

    ck = write_checkpoint(tmp_path / "m.pt", spacing=[1.0, 1.0, 1.0], patch=(96, 96, 96), channels=(2, 4))
    arr = np.random.default_rng(0).normal(0, 100, (512, 512, 600)).astype(np.int16)
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / "ct.nii"))
    del arr
    code = ("import resource, sys; from medseg.cli import main; sys.argv = ['medseg', 'predict', sys.argv[1], '-o', "
            "sys.argv[2], '--model', sys.argv[3], '--device', 'cpu', '--overlap', '0'];\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ct.nii"), str(tmp_path / "out"), str(ck)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_kb = int(proc.stdout.split("PEAK")[-1].strip())
    assert peak_kb * 1024 < 4 * 2 ** 30, f"peak RSS {peak_kb / 2 ** 20:.2f} GB"
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "ct.nii.gz" in written, written  # labels are always written compressed, beside the colour tables
    out = nib.load(str(tmp_path / "out" / "ct.nii.gz"))
    assert out.shape == (512, 512, 600) and np.allclose(out.affine, affine)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp_dtype", ["fp16", "bf16"])
def test_cuda_amp_dtypes_and_placement_match_cpu(hippo_data, amp_dtype):
    from medseg.io import load_volume

    vol = load_volume(hippo_data / "imagesTr" / "hippocampus_011.nii.gz")
    cpu = Predictor(device="cpu").predict_volume(vol).array
    gpu_pred = Predictor(device="cuda", amp=True, amp_dtype=amp_dtype)
    gpu = gpu_pred.predict_volume(vol).array
    plan = gpu_pred.last_plan
    assert plan.device.startswith("cuda") and plan.sw_batch_size >= 1 and plan.accumulate_on == "device"
    for c in (1, 2):
        a, b = cpu == c, gpu == c
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.99


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_windows_from_a_cpu_volume_equal_a_device_volume():
    net = _net().cuda()
    x = torch.randn(1, 70, 60, 81)
    on_dev = sliding_window_probs(net, x, (32, 32, 32), num_classes=3, overlap=0.5, device=torch.device("cuda"),
                                  image_on_device=True)
    streamed = sliding_window_probs(net, x, (32, 32, 32), num_classes=3, overlap=0.5, device=torch.device("cuda"),
                                    image_on_device=False, accumulate_on=torch.device("cpu"))
    assert torch.allclose(on_dev, streamed, atol=1e-5)
