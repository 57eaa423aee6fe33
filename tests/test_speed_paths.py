"""The speed paths give the reference path's results: oneDNN 3D convolutions at batch 1, mirror TTA in one
batched forward pass, ``--amp auto``, and the soft targets of knowledge distillation that follow the
augmentation. Timings live in ``benchmarks/speed.py``, not here."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.core.config import load_config
from medseg.core.runtime import amp_dtype, cpu_has_fast_bf16
from medseg.inference.backends import (CPU_FP32_BATCH, MirrorRunner, TorchRunner, use_fast_cpu_kernels,
                                       use_onednn_conv3d)
from medseg.inference.engine import sliding_window_probs
from medseg.models.registry import build_model

from conftest import REPO, blob_label, image_from_label

CPU = torch.device("cpu")


def _dynunet(channels=(8, 16, 32), seed=0):
    cfg = load_config(REPO / "configs" / "hippocampus.yaml",
                      ["model.name=dynunet3d", f"model.channels={list(channels)}", "model.strides=[2, 2]",
                       "model.num_res_units=0"])
    torch.manual_seed(seed)
    return build_model(cfg.model, 1, 3).eval()


def _conv_kernels(fn) -> dict:
    with torch.profiler.profile() as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if "conv" in e.key or "norm" in e.key}


def test_onednn_convolutions_at_batch_one_match_pytorch():
    net = _dynunet()
    fast = copy.deepcopy(net)
    assert use_onednn_conv3d(fast) == sum(type(m) is torch.nn.Conv3d for m in net.modules()) > 0
    x = torch.randn(1, 1, 24, 32, 24)
    with torch.inference_mode():
        ref, out = net(x), fast(x)
        kernels = _conv_kernels(lambda: fast(x))
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4)
    assert kernels.get("aten::mkldnn_convolution", 0) == sum(type(m) is torch.nn.Conv3d for m in net.modules())
    assert "aten::slow_conv3d_forward" not in kernels, kernels
    # training keeps PyTorch's own path (gradients flow as before)
    fast.train()
    loss = fast(x).sum()
    loss.backward()
    assert all(p.grad is not None for p in fast.parameters() if p.requires_grad)


def test_fast_cpu_kernels_match_pytorch():
    net = _dynunet()
    fast = copy.deepcopy(net)
    counts = use_fast_cpu_kernels(fast)
    assert counts["instance_norm3d"] == sum(type(m) is torch.nn.InstanceNorm3d for m in net.modules()) > 0
    x = torch.randn(2, 1, 24, 32, 24)
    with torch.inference_mode():
        ref, out = net(x), fast(x)
        kernels = _conv_kernels(lambda: fast(x))
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(ref.argmax(1), out.argmax(1))
    assert "aten::native_batch_norm" not in kernels and "aten::slow_conv3d_forward" not in kernels, kernels
    # training keeps PyTorch's own kernels, with gradients
    fast.train()
    fast(x).sum().backward()
    assert all(p.grad is not None for p in fast.parameters() if p.requires_grad)


def test_fast_instance_norm_with_affine_and_with_a_large_offset():
    torch.manual_seed(0)
    norm = torch.nn.InstanceNorm3d(4, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    fast = copy.deepcopy(norm)
    assert use_fast_cpu_kernels(torch.nn.Sequential(fast, torch.nn.InstanceNorm3d(4, track_running_stats=True))) == \
        {"conv3d": 0, "instance_norm3d": 1, "fused_blocks": 0, "skip_heads": 0, "fused_upsampling": 0,
         "transposed_conv3d": 0}
    y = torch.randn(2, 4, 5, 7, 3) * 3 + 1
    with torch.inference_mode():
        assert torch.allclose(fast(y), norm(y), atol=1e-5)
        # a channel whose mean dwarfs its spread: E[x²] - E[x]² would lose every digit, PyTorch's kernel runs
        far = y + 1e4
        assert torch.allclose(fast(far), norm(far), atol=1e-3)


def _flat_dynunet(in_channels=1, deep_supervision=0, seed=0):
    """A DynUNet as the bundled models are built: flat 3x1x3 kernels at the finer levels, 3x3x3 below."""
    cfg = load_config(REPO / "configs" / "hippocampus.yaml",
                      ["model.name=dynunet3d", "model.channels=[8, 16, 32, 64]", "model.strides=[2, 2, 2]",
                       "model.num_res_units=0", "model.kernel_sizes=[[3, 1, 3], [3, 1, 3], [3, 3, 3], [3, 3, 3]]",
                       f"model.deep_supervision={deep_supervision}"])
    torch.manual_seed(seed)
    net = build_model(cfg.model, in_channels, 3).eval()
    with torch.no_grad():  # trained-looking affine norms, so that a wrong scale or shift shows
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d) and m.affine:
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return net


@pytest.mark.parametrize("in_channels,batch", [(1, 1), (1, 3), (2, 2)])
def test_cpu_runner_channels_last_and_fused_blocks_match_pytorch(in_channels, batch):
    """The CPU runner's whole path (channels-last activations and weights, instance norm and leaky ReLU in place in
    DynUNet's blocks, no deep-supervision heads) gives PyTorch's own logits, for one and several sequences."""
    net = _flat_dynunet(in_channels, deep_supervision=2)
    runner = TorchRunner([copy.deepcopy(net)], CPU, amp=False)
    assert runner.cpu_channels_last
    counts = use_fast_cpu_kernels(copy.deepcopy(net), channels_last=True)
    assert counts["fused_blocks"] > 0 and counts["skip_heads"] == 2 and counts["fused_upsampling"] == 3, counts
    x = torch.randn(batch, in_channels, 24, 32, 24)
    with torch.inference_mode():
        ref = net(x)
    out = runner(x)
    assert out.shape == ref.shape and out.is_contiguous()
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(out.argmax(1), ref.argmax(1))
    kernels = _conv_kernels(lambda: runner(x))
    assert "aten::native_batch_norm" not in kernels and "aten::slow_conv3d_forward" not in kernels, kernels
    assert "aten::slow_conv_transpose3d" not in kernels, kernels  # one window: the matrix-product upsampling


def test_cpu_runner_follows_weights_that_change_between_calls():
    """Validation during training runs the training network through the runner: its channels-last weight copies are
    made again after every optimiser step, and training itself keeps PyTorch's kernels and deep supervision."""
    model = _flat_dynunet(deep_supervision=2)
    runner = TorchRunner([model], CPU, amp=False)
    x = torch.randn(1, 1, 24, 32, 24)
    before = runner(x)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(x)
    assert out.shape[1] == 3  # deep supervision: the main output and two heads, stacked
    out.float().pow(2).mean().backward()
    opt.step()
    model.eval()
    after = runner(x)
    plain = _flat_dynunet(deep_supervision=2)
    plain.load_state_dict(model.state_dict())
    with torch.inference_mode():
        ref = plain(x)
    assert (after - before).abs().max() > 1e-3
    assert (after - ref).abs().max() < 1e-4


def test_cpu_runner_splits_large_window_batches_with_the_same_values():
    net = _dynunet()
    runner = TorchRunner([copy.deepcopy(net)], CPU, amp=False)
    seen = []
    module = runner.module
    runner.module = lambda x: (seen.append(x.shape[0]), module(x))[1]
    x = torch.randn(5, 1, 24, 32, 24)
    out = runner(x)
    assert seen == [2, 2, 1] and CPU_FP32_BATCH == 2
    with torch.inference_mode():
        alone = torch.cat([module(w) for w in x.split(1)])
    assert out.shape == alone.shape and (out - alone).abs().max() < 1e-5
    assert torch.equal(out.argmax(1), alone.argmax(1))


_FAULTS = """
import resource, sys, torch
import medseg.core.runtime as runtime
from medseg.inference.backends import TorchRunner
sys.path.insert(0, sys.argv[2])
from test_speed_paths import _dynunet
if sys.argv[1] == "off":
    runtime._allocator_set = True  # as if already set: glibc keeps its own settings
runner = TorchRunner([_dynunet((16, 32, 64))], torch.device("cpu"), amp=False)
x = torch.randn(1, 1, 40, 56, 40)
for _ in range(3):
    runner(x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    runner(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_cpu_runner_keeps_freed_activations_instead_of_faulting_them_in_again():
    """A CPU runner sets glibc's malloc to keep freed blocks of a window's size: after the first windows, a window
    costs few page faults (Python's own small-object arenas still come and go). Without the setting one window
    through the hippocampus DynUNet faulted 2,000-10,000 pages here."""
    faults = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode, str(Path(__file__).parent)], capture_output=True,
                             text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        faults[mode] = int(out.stdout.split()[-1])
    assert faults["on"] <= max(300, faults["off"] // 4), faults


def test_mirror_tta_in_one_batch_equals_two_passes():
    net = _dynunet()
    runner = TorchRunner([net], CPU, amp=False)
    mirror = MirrorRunner(runner, [0])
    assert (mirror.groups, mirror.passes) == (2, 2)
    x = torch.randn(1, 20, 28, 18)  # smaller than the window: one window, padded
    roi = (24, 32, 24)
    got = sliding_window_probs(mirror, x, roi, num_classes=3, overlap=0.25, groups=mirror.groups)
    with torch.inference_mode():
        def probs(img):
            pad = torch.nn.functional.pad(img[None], (3, 3, 2, 2, 2, 2))  # the window's centring pads
            return torch.softmax(net(pad)[0], 0)[:, 2:22, 2:30, 3:21]
        ref_pad = torch.nn.functional.pad(x[None], (3, 3, 2, 2, 2, 2))
        ref = (torch.softmax(net(ref_pad)[0], 0)
               + torch.flip(torch.softmax(net(torch.flip(ref_pad, dims=[2]))[0], 0), dims=[1])) / 2
        ref = ref[:, 2:22, 2:30, 3:21]
    assert got.shape == (3, 20, 28, 18)
    assert torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())
    assert not torch.allclose(got, probs(x), atol=1e-3)  # the mirrored pass counts
    # several windows: the mirrored windows are blended like ensemble members, every voxel a probability
    big = torch.randn(1, 40, 50, 30)
    many = sliding_window_probs(mirror, big, roi, num_classes=3, overlap=0.25, groups=mirror.groups)
    assert many.shape == (3, 40, 50, 30) and torch.allclose(many.sum(0), torch.ones(40, 50, 30), atol=1e-4)


def test_predictor_tta_runs_one_forward_per_window_batch(hippo_data):
    """The bundled default model with TTA: the mirror image rides in the same batch (one forward per window batch)."""
    from medseg.inference.predictor import Predictor
    from medseg.io import load_volume

    vol = load_volume(hippo_data / "imagesTr" / "hippocampus_003.nii.gz")
    p = Predictor("hippocampus", device="cpu", tta=True, amp=False)
    calls = []
    module = p.runner.module
    p.runner.module = lambda x: (calls.append(x.shape[0]), module(x))[1]
    labels = p.predict_volume(vol).array
    assert calls and all(n % 2 == 0 for n in calls), calls  # original and mirror together
    plain = Predictor("hippocampus", device="cpu", tta=False, amp=False).predict_volume(vol).array
    for c in (1, 2):  # TTA refines boundaries; it does not move the structure
        inter = int(((labels == c) & (plain == c)).sum())
        assert 2 * inter / (int((labels == c).sum()) + int((plain == c).sum())) > 0.95


def test_amp_auto_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch):
    monkeypatch.setattr("medseg.core.runtime.cpu_has_fast_bf16", lambda: True)
    assert amp_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr("medseg.core.runtime.cpu_has_fast_bf16", lambda: False)
    assert amp_dtype("auto", CPU) == torch.float16  # = fp32 on a CPU (autocast ignores fp16 there)
    assert amp_dtype("auto", torch.device("cuda")) == torch.float16
    assert TorchRunner([_dynunet()], CPU).dtype == torch.float16


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no native bf16 (AMX or AVX-512 BF16)")
def test_default_predict_on_native_bf16_cpu_gives_fp32_labels(hippo_data):
    """Where ``--amp auto`` chooses bf16, the default model's labels match fp32's (Dice >= 0.99 per label)."""
    from medseg.inference.predictor import Predictor
    from medseg.io import load_volume

    for name in ("hippocampus_003", "hippocampus_011"):
        vol = load_volume(hippo_data / "imagesTr" / f"{name}.nii.gz")
        auto = Predictor("hippocampus", device="cpu").predict_volume(vol).array
        ref = Predictor("hippocampus", device="cpu", amp=False).predict_volume(vol).array
        for c in (1, 2):
            inter = int(((auto == c) & (ref == c)).sum())
            assert 2 * inter / (int((auto == c).sum()) + int((ref == c).sum())) >= 0.99


class _OneHotTeacher:
    """A teacher transform whose soft targets are the label's own one-hot foreground channels."""

    def __call__(self, data):
        from monai.data import MetaTensor

        d = dict(data)
        lab = d["label"]
        soft = torch.stack([(lab[0] == c).float() for c in (1, 2)])
        d["soft"] = MetaTensor(soft, meta=dict(lab.meta), applied_operations=list(lab.applied_operations))
        return d


def test_soft_targets_follow_every_augmentation(tmp_path):
    from medseg.io.volume import Volume, save_volume
    from medseg.preprocessing.pipeline import train_transforms
    from medseg.training.distill import soft_targets

    lab = blob_label((30, 34, 26))
    lab[lab > 0] = 1 + (np.indices(lab.shape)[1][lab > 0] > 17)
    affine = np.diag([1.2, 0.9, 1.5, 1.0])
    save_volume(Volume(image_from_label(lab), affine), tmp_path / "img.nii.gz")
    save_volume(Volume(lab.astype(np.uint8), affine), tmp_path / "lab.nii.gz")
    cfg = load_config(REPO / "configs" / "hippocampus.yaml",
                      ["patch.size=[24, 24, 24]", "patch.samples_per_volume=2", "augment.flip_prob=0.5",
                       "augment.affine_prob=1.0", "augment.rotate_deg=20", "augment.elastic_prob=0.5"])
    tr = train_transforms(cfg, _OneHotTeacher())
    agree = []
    for seed in range(6):
        tr.set_random_state(seed)
        for s in tr({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}):
            assert s["soft"].shape == (2, 24, 24, 24) and s["label"].shape == (1, 24, 24, 24)
            hard = soft_targets(torch.as_tensor(s["soft"])[None])[0].argmax(0)
            agree.append(float((hard == torch.as_tensor(s["label"])[0].long()).float().mean()))
    assert min(agree) > 0.97, agree  # nearest labels and bilinear soft targets differ only on boundaries


def test_distill_loss_weights_and_gradient():
    from monai.losses import DiceCELoss

    from medseg.training.distill import DistillLoss

    base = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8)).float()
    onehot = torch.cat([(label == c).float() for c in (1, 2)], dim=1)
    target = torch.cat([label, onehot], dim=1)
    assert torch.allclose(DistillLoss(base, 0.0)(logits, target), base(logits, label))
    teacher_agrees = DistillLoss(base, 1.0)(logits, target)
    uniform = torch.cat([label, torch.full_like(onehot, 1 / 3)], dim=1)
    assert not torch.allclose(teacher_agrees, DistillLoss(base, 1.0)(logits, uniform))
    DistillLoss(base, 0.5)(logits, target).backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_teacher_must_share_labels_and_preprocessing(tmp_path):
    from medseg.core.errors import ConfigError
    from medseg.training.distill import load_teacher

    cfg = load_config(REPO / "configs" / "hippocampus.yaml", ["train.teacher=hippocampus"])
    assert load_teacher(cfg, CPU).cfg.labels == cfg.labels
    other = load_config(REPO / "configs" / "hippocampus.yaml", ["train.teacher=hippocampus",
                                                                  "preprocess.spacing=[2.0, 2.0, 2.0]"])
    with pytest.raises(ConfigError, match="preprocessing differs"):
        load_teacher(other, CPU)
    with pytest.raises(ConfigError, match="label models only"):
        load_config(REPO / "configs" / "glioma.yaml", ["train.teacher=hippocampus"])


def test_cpu_runner_keeps_the_usual_layout_for_monai_unet():
    """MONAI's UNet ran no faster channels-last on the CPU: its runner keeps the usual layout, same logits."""
    cfg = load_config(REPO / "configs" / "hippocampus.yaml", ["model.name=unet3d", "model.channels=[8, 16, 32]",
                                                               "model.strides=[2, 2]"])
    torch.manual_seed(0)
    net = build_model(cfg.model, 1, 3).eval()
    runner = TorchRunner([copy.deepcopy(net)], CPU, amp=False)
    assert not runner.cpu_channels_last
    x = torch.randn(1, 1, 24, 32, 24)
    with torch.inference_mode():
        ref = net(x)
    assert (runner(x) - ref).abs().max() < 1e-4
