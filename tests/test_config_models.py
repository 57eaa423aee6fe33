"""Config loading, overrides and the model registry."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from medseg.core.config import from_dict, load_config, to_dict
from medseg.core.errors import ConfigError, InputNotFoundError, UnknownModelError
from medseg.models import MODELS, SliceWise, build_model, get_spec


def test_hippocampus_config_loads_with_overrides():
    cfg = load_config(REPO / "configs" / "hippocampus.yaml", ["train.epochs=3", "patch.size=[32, 32, 32]"])
    assert cfg.train.epochs == 3 and cfg.patch.size == [32, 32, 32]
    assert cfg.labels == {0: "background", 1: "anterior", 2: "posterior"}
    assert cfg.num_classes == 3
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    import yaml

    if "plan" in yaml.safe_load(path.read_text()):
        pytest.skip("planned at load time from its dataset (tests/test_planning.py covers plan: auto)")
    cfg = load_config(path)
    assert cfg.num_classes >= 2 and cfg.train.epochs > 0
    model = build_model(cfg.model, 3 if get_spec(cfg.model.name).dims == 2 else 1, cfg.num_classes)  # as trained
    assert sum(p.numel() for p in model.parameters()) > 0


def test_unknown_key_suggests_the_right_one(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epohcs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epohcs'.*did you mean 'train.epochs'"):
        load_config(p)


def test_bad_types_and_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="bad value for 'train.epochs'"):
        load_config(p)
    p.write_text("train:\n  loss: focal\n")
    with pytest.raises(ConfigError, match="unknown loss"):
        load_config(p)
    p.write_text("preprocess:\n  intensity:\n    mode: ct_window\n    ct_preset: nope\n")
    with pytest.raises(ConfigError, match="unknown CT window preset"):
        load_config(p)
    p.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="bad --set"):
        load_config(REPO / "configs" / "hippocampus.yaml", ["train.epochs"])
    with pytest.raises(InputNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_registry_builds_and_rejects_unknown():
    assert {"unet3d", "unet2d"} <= set(MODELS)
    cfg = load_config(REPO / "configs" / "hippocampus.yaml").model
    net = build_model(cfg, 1, 3)
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    with pytest.raises(UnknownModelError, match="did you mean 'unet3d'"):
        get_spec("unet3", )


def test_unet2d_runs_slice_by_slice():
    cfg = load_config(REPO / "configs" / "hippocampus.yaml", ["model.name=unet2d"]).model
    net = build_model(cfg, 1, 3)
    assert isinstance(net, SliceWise)
    x = torch.randn(2, 1, 16, 24, 5)
    y = net(x)
    assert y.shape == (2, 3, 16, 24, 5)
    # each slice is independent of its neighbours
    x2 = x.clone()
    x2[..., 0] = 0
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x)[..., 1:], net(x2)[..., 1:], atol=1e-5)


def test_dynunet_with_deep_supervision_trains_and_predicts():
    from medseg.training.trainer import _loss, supervised_loss

    cfg = load_config(REPO / "configs" / "hippocampus.yaml",
                      ["model.name=dynunet3d", "model.channels=[8, 16, 32]", "model.strides=[2, 2]",
                       "model.deep_supervision=1", "model.num_res_units=0"])
    net = build_model(cfg.model, 1, 3)
    x, y = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 3, (2, 1, 16, 16, 16)).float()
    net.train()
    out = net(x)
    assert out.shape == (2, 2, 3, 16, 16, 16)  # main output + one auxiliary head, stacked on dim 1
    loss = supervised_loss(_loss(cfg), out, y)
    loss.backward()
    assert torch.isfinite(loss)
    net.eval()
    assert net(x).shape == (2, 3, 16, 16, 16)
    bad = load_config(REPO / "configs" / "hippocampus.yaml", ["model.name=dynunet3d", "model.channels=[8, 16]",
                                                              "model.strides=[2]", "model.deep_supervision=2"])
    with pytest.raises(ConfigError, match="too many deep-supervision heads"):
        build_model(bad.model, 1, 3)


def test_batch_dice_pools_the_batch_before_the_ratio():
    """``train.batch_dice``: one Dice over the batch as a single volume (nnU-Net's 3D loss), not a mean of
    per-patch Dice; checked against the ratio computed by hand on near one-hot predictions."""
    from medseg.training.trainer import _loss

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g)
    y[1][y[1] == 2] = 1  # the second patch has no class 2: per-patch Dice then scores it 0 or 1, the batch does not
    pred = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g)
    logits = 50.0 * torch.nn.functional.one_hot(pred[:, 0], 3).permute(0, 4, 1, 2, 3).float()

    def by_hand(dims):
        p = torch.nn.functional.one_hot(pred[:, 0], 3).float()
        t = torch.nn.functional.one_hot(y[:, 0], 3).float()
        inter, size = (p * t).sum(dims), p.sum(dims) + t.sum(dims)
        d = (2 * inter + 1e-5) / (size + 1e-5)
        return float(1 - d[..., 1:].mean())

    per_patch = load_config(REPO / "configs" / "hippocampus.yaml", ["train.loss=dice"])
    batched = load_config(REPO / "configs" / "hippocampus.yaml", ["train.loss=dice", "train.batch_dice=true"])
    assert float(_loss(per_patch)(logits, y.float())) == pytest.approx(by_hand((1, 2, 3)), abs=1e-4)
    assert float(_loss(batched)(logits, y.float())) == pytest.approx(by_hand((0, 1, 2, 3)), abs=1e-4)
    assert by_hand((1, 2, 3)) != pytest.approx(by_hand((0, 1, 2, 3)), abs=1e-3)
