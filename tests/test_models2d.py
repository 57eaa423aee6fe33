"""2D image models: shapes on odd sizes, MobileNetV3 layout, FCN skips, user-supplied weights, registry."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from medseg.core.config import ModelConfig, from_dict
from medseg.core.errors import CheckpointError, ConfigError
from medseg.models import nets2d
from medseg.models.registry import MODELS, build_model

SMALL = {  # small settings per model so that the tests stay fast
    "fcn_resnet": {"backbone": "resnet10"},
    "segnet": {"channels": [8, 16, 32]},
    "deeplabv3plus_mobilenetv3": {"backbone": "mobilenetv3_small"},
    "flexunet2d": {"backbone": "resnet10"},
    "unet2d": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
}


def model_cfg(name: str, **kw) -> ModelConfig:
    return ModelConfig(name=name, **{**SMALL[name], **kw})


@pytest.mark.parametrize("name", sorted(SMALL))
def test_logits_have_the_input_size(name):
    torch.manual_seed(0)
    net = build_model(model_cfg(name), 3, 5).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 96, 64))
    assert out.shape == (2, 5, 96, 64)
    if name != "unet2d":  # every image model also takes sizes that are not multiples of 32
        with torch.no_grad():
            assert net(torch.rand(1, 3, 67, 45)).shape == (1, 5, 67, 45)


def test_registry_lists_2d_models_with_descriptions():
    for name in ("fcn_resnet", "segnet", "deeplabv3plus_mobilenetv3", "flexunet2d", "unet2d"):
        assert MODELS[name].dims == 2 and len(MODELS[name].description) > 40


def test_medseg_models_shows_name_dims_description():
    proc = run_cli("models")
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(proc.stdout.split())
    for name in ("fcn_resnet", "segnet", "deeplabv3plus_mobilenetv3", "flexunet2d", "unet2d", "unet3d"):
        assert name in flat
    assert "2D" in flat and "3D" in flat and "indices" in flat  # SegNet's description


@pytest.mark.parametrize("variant,params", [("large", 2_971_952), ("small", 927_008)])
def test_mobilenetv3_matches_the_torchvision_feature_layout(variant, params):
    # torchvision's mobilenet_v3_large has 5,483,032 parameters, of which the classifier holds 2,511,080
    # (small: 2,542,856 and 1,615,848): the feature extractors hold exactly these counts
    enc = nets2d.MobileNetV3Encoder(3, variant, output_stride=32)
    assert sum(p.numel() for p in enc.parameters()) == params
    assert next(iter(enc.state_dict())) == "features.0.0.weight"
    for os_ in (32, 16, 8):
        low, deep = nets2d.MobileNetV3Encoder(3, variant, output_stride=os_).eval()(torch.zeros(1, 3, 64, 64))
        assert low.shape[-1] == 16 and deep.shape[-1] == 64 // os_


def test_fcn_skips_start_at_zero_so_8s_begins_from_the_stride_32_scores():
    import torch.nn.functional as F

    torch.manual_seed(0)
    fcn8 = nets2d.FCN(3, 4, "resnet10", skips=8).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = fcn8.encoder(x)
        staged = fcn8.head(feats[4])
        for f in (feats[3], feats[2], x):  # 32s -> 16s -> 8s -> input, skip scores still zero
            staged = F.interpolate(staged, size=f.shape[-2:], mode="bilinear", align_corners=False)
        assert torch.allclose(fcn8(x), staged, atol=1e-5)
        fcn8.score8.weight.normal_()
        assert not torch.allclose(fcn8(x), staged, atol=1e-3)
    assert fcn8.score16 is not None and nets2d.FCN(3, 4, "resnet10", skips=32).score16 is None
    assert nets2d.FCN(3, 4, "resnet10", skips=16).score8 is None


def test_segnet_unpools_with_the_pooling_indices():
    net = nets2d.SegNet(3, 2, [4, 8]).eval()
    x = torch.rand(1, 3, 16, 16)
    pooled, indices, sizes = net.encoder(x)
    up = net.unpool(pooled, indices[-1], output_size=sizes[-1])
    # every non-zero after unpooling sits where the encoder found the maximum
    flat = up.flatten(2)
    assert torch.equal(flat.gather(2, indices[-1].flatten(2)), pooled.flatten(2))
    assert int((up != 0).sum()) <= pooled.numel()


def test_bad_backbone_and_output_stride_are_config_errors():
    with pytest.raises(ConfigError, match="model.backbone"):
        build_model(ModelConfig(name="fcn_resnet", backbone="vgg16"), 3, 2)
    with pytest.raises(ConfigError, match="model.output_stride"):
        build_model(ModelConfig(name="deeplabv3plus_mobilenetv3", output_stride=4), 3, 2)


def test_image_model_with_volume_task_is_refused():
    with pytest.raises(ConfigError, match="task: image2d"):
        from_dict({"model": {"name": "segnet"}})
    with pytest.raises(ConfigError, match="patch.size"):
        from_dict({"task": "image2d", "model": {"name": "segnet"}, "patch": {"size": [64, 64, 1]}})
    with pytest.raises(ConfigError, match="task"):
        from_dict({"task": "photo"})


# --- user-supplied weights -------------------------------------------------------------------


def test_encoder_weights_load_and_classifier_head_is_dropped(tmp_path):
    torch.manual_seed(1)
    src = nets2d.MobileNetV3Encoder(3, "small", output_stride=32)
    state = dict(src.state_dict())
    state["classifier.0.weight"] = torch.zeros(1024, 576)  # an ImageNet classifier's head
    torch.save(state, tmp_path / "mnv3.pth")
    net = build_model(model_cfg("deeplabv3plus_mobilenetv3"), 3, 3)
    assert nets2d.load_weights(net, tmp_path / "mnv3.pth") == "encoder"
    for k, v in src.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[k], v)


def test_whole_model_weights_load(tmp_path):
    a, b = (build_model(model_cfg("segnet"), 3, 3) for _ in range(2))
    torch.save({"state_dict": a.state_dict()}, tmp_path / "segnet.pt")
    assert nets2d.load_weights(b, tmp_path / "segnet.pt") == "model"
    assert all(torch.equal(b.state_dict()[k], v) for k, v in a.state_dict().items())


def test_mismatched_weights_are_a_clear_error(tmp_path):
    other = nets2d.MobileNetV3Encoder(3, "large")
    torch.save(other.state_dict(), tmp_path / "large.pth")
    net = build_model(model_cfg("deeplabv3plus_mobilenetv3"), 3, 3)  # small backbone
    with pytest.raises(CheckpointError) as err:
        nets2d.load_weights(net, tmp_path / "large.pth")
    msg = str(err.value)
    assert "do not fit the encoder" in msg and ("another shape" in msg or "unexpected" in msg)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="missing"):
        nets2d.load_weights(build_model(model_cfg("fcn_resnet"), 3, 2), tmp_path / "junk.pth")


def test_weights_file_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="safely"):
        nets2d.load_weights(build_model(model_cfg("segnet"), 3, 2), tmp_path / "evil.pth")


def test_weights_error_through_the_cli(tmp_path):
    from medseg.seg2d.images import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", n=4, size=64)
    torch.save({"nope": torch.zeros(2)}, tmp_path / "w.pth")
    proc = run_cli("train", "configs/shapes_2d.yaml", "--set", f"data.root={tmp_path / 'data'}",
                   "--set", f"model.weights={tmp_path / 'w.pth'}", "--set", f"train.output_dir={tmp_path / 'run'}",
                   "--set", "train.epochs=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = " ".join(proc.stderr.strip().splitlines()[-1].split())  # after the training log lines
    assert last.startswith("error:") and "weights do not fit" in " ".join(proc.stderr.split()) and "w.pth" in last
