"""bf16 mixed precision on the CPU: training steps and prediction.

fp16 autocast stays CUDA-only (asked for on the CPU it is fp32); bf16 runs on the CPU too."""

from __future__ import annotations

import numpy as np
import torch
from conftest import REPO

from medseg.core.config import load_config
from medseg.core.runtime import autocast, cpu_has_fast_bf16

CPU = torch.device("cpu")


def _conv_dtype(ctx) -> torch.dtype:
    conv = torch.nn.Conv3d(1, 2, 3)
    with ctx:
        return conv(torch.randn(1, 1, 6, 6, 6)).dtype


def test_cpu_autocast_is_bf16_only():
    assert _conv_dtype(autocast(CPU, True, "bf16")) == torch.bfloat16
    assert _conv_dtype(autocast(CPU, True, "bfloat16")) == torch.bfloat16
    assert _conv_dtype(autocast(CPU, True, "fp16")) == torch.float32  # fp16 on the CPU: a no-op
    assert _conv_dtype(autocast(CPU, True, None)) == torch.float32
    assert _conv_dtype(autocast(CPU, False, "bf16")) == torch.float32


def test_bf16_training_step_on_cpu_keeps_fp32_weights(monkeypatch):
    from medseg.models import build_model
    from medseg.training.trainer import _loss, grad_scaler, supervised_loss, train_step

    cfg = load_config(REPO / "configs" / "hippocampus.yaml",
                      ["model.name=dynunet3d", "model.channels=[4, 8, 16]", "model.strides=[2, 2]",
                       "model.deep_supervision=1", "model.num_res_units=0", "train.amp_dtype=bf16"])
    torch.manual_seed(0)
    net = build_model(cfg.model, 1, 3)
    seen = []
    net.input_block.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.AdamW(net.parameters(), 1e-2)
    said = []
    # first as on a CPU with native bf16 (no warning), whatever CPU runs the test; then as on one without
    monkeypatch.setattr("medseg.core.runtime.cpu_has_fast_bf16", lambda: True)
    scaler = grad_scaler(CPU, cfg.train, said.append)
    assert not scaler.is_enabled()  # bf16 needs no loss scaling
    x, y = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 3, (2, 1, 16, 16, 16)).float()
    before = [p.detach().clone() for p in net.parameters()]
    losses = [train_step(net, opt, scaler, CPU, cfg.train.amp, lambda: supervised_loss(_loss(cfg), net(x), y),
                         amp_dtype=cfg.train.amp_dtype) for _ in range(3)]
    assert seen and set(seen) == {torch.bfloat16}
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    # the warning for CPUs that only emulate bf16 (slower than fp32 there)
    monkeypatch.setattr("medseg.core.runtime.cpu_has_fast_bf16", lambda: False)
    grad_scaler(CPU, cfg.train, said.append)
    assert len(said) == 1 and "slower than fp32" in said[0] and "train.amp_dtype: fp16" in said[0]
    grad_scaler(CPU, load_config(REPO / "configs" / "hippocampus.yaml").train, said.append)  # fp16: no warning
    assert len(said) == 1


def test_channels_last_for_cpu_bf16_training_only():
    from medseg.models import build_model
    from medseg.training.trainer import speed_settings

    base = load_config(REPO / "configs" / "hippocampus.yaml").train  # fp16 asked for: the CPU trains in fp32
    bf16 = load_config(REPO / "configs" / "hippocampus.yaml", ["train.amp_dtype=bf16"]).train
    off = load_config(REPO / "configs" / "hippocampus.yaml", ["train.amp_dtype=bf16", "train.channels_last=false"]).train
    assert speed_settings(CPU, bf16, 3) == torch.channels_last_3d
    assert speed_settings(CPU, bf16, 2) is None
    assert speed_settings(CPU, base, 3) is None
    assert speed_settings(CPU, off, 3) is None
    # the same network, channels-last or not, computes the same bf16 outputs; its weights load into a plain model
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "hippocampus.yaml",
                      ["model.name=dynunet3d", "model.channels=[4, 8, 16]", "model.strides=[2, 2]",
                       "model.num_res_units=0"])
    net = build_model(cfg.model, 1, 3).eval()
    x = torch.randn(1, 1, 16, 24, 16)
    with torch.no_grad(), autocast(CPU, True, "bf16"):
        ref = net(x).float()
        net.to(memory_format=torch.channels_last_3d)
        assert net.input_block.conv1.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        out = net(x.contiguous(memory_format=torch.channels_last_3d)).float()
    assert torch.allclose(ref, out, atol=0.05 * float(ref.abs().max()))
    plain = build_model(cfg.model, 1, 3)
    plain.load_state_dict(net.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), net.state_dict().values()))


def test_cpu_bf16_check_answers():
    assert isinstance(cpu_has_fast_bf16(), bool)


def test_bundled_model_predicts_in_bf16_on_cpu(hippo_data):
    """``--amp bf16`` on the CPU runs the network in bf16 (the probabilities differ from fp32's) and gives
    the same segmentation to within a few boundary voxels."""
    from medseg.inference.predictor import Predictor
    from medseg.io import load_volume

    model = "hippocampus"  # the default: what --amp auto runs in bf16 on CPUs with AMX
    vol = load_volume(hippo_data / "imagesTr" / "hippocampus_003.nii.gz")
    ref = Predictor(model, device="cpu", amp=False).probabilities(vol)
    assert torch.equal(Predictor(model, device="cpu", amp_dtype="fp16").probabilities(vol), ref)
    if not cpu_has_fast_bf16():  # --amp auto (the default) is fp32 where bf16 would be emulated
        assert torch.equal(Predictor(model, device="cpu").probabilities(vol), ref)
    low = Predictor(model, device="cpu", amp_dtype="bf16").probabilities(vol)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    diff = (low - ref).abs().max()
    assert 0 < diff < 0.5
    a, b = ref.argmax(0), low.argmax(0)
    for c in (1, 2):
        inter = int(((a == c) & (b == c)).sum())
        assert 2 * inter / (int((a == c).sum()) + int((b == c).sum())) > 0.97, c
    off = Predictor(model, device="cpu", amp=False, amp_dtype="bf16").probabilities(vol)
    assert torch.equal(off, ref)
