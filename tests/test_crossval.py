"""Cross-validation, fold ensembles, postprocessing chosen on CV, EMA and warm starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, assert_clean_error, run_cli

from medseg.core.config import ConfigError, load_config
from medseg.preprocessing.datasets import Case, kfold_split, split_cases, holdout_cases, training_pool
from medseg.core.errors import CheckpointError
from medseg.inference.postprocess import apply_postprocessing, keep_largest, keep_largest_foreground
from medseg.evaluation.choose import choose_postprocessing
from medseg.models.checkpoint import load_checkpoint
from medseg.training.trainer import EMA

TINY = ["model.channels=[4,8,16]", "model.strides=[2,2]", "model.num_res_units=1", "patch.size=[16,16,16]",
        "train.epochs=2", "train.val_every=1", "train.batch_size=2", "inference.sw_batch_size=2",
        "data.cache=false", "augment.enabled=false"]


def _sets(*items: str) -> list[str]:
    out = []
    for it in items:
        out += ["--set", it]
    return out


def test_kfold_split_covers_every_case_once():
    cases = [Case(f"c{i:02d}", f"c{i}.nii.gz", f"l{i}.nii.gz") for i in range(23)]
    vals = []
    for f in range(5):
        train, val = kfold_split(cases, 5, f, seed=3)
        assert not {c.name for c in train} & {c.name for c in val}
        assert len(train) + len(val) == 23 and len(val) in (4, 5)
        vals += [c.name for c in val]
    assert sorted(vals) == sorted(c.name for c in cases)
    assert kfold_split(cases[::-1], 5, 2, seed=3) == kfold_split(cases, 5, 2, seed=3)  # order-independent


def test_test_fraction_keeps_unseen_cases_out_of_every_fold(tmp_path):
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
        for i in range(20):
            (tmp_path / sub / f"case_{i:02d}.nii.gz").write_bytes(b"")
    recipe = REPO / "benchmarks" / "configs" / "hippocampus_cv.yaml"
    cfg = load_config(recipe, [f"data.root={tmp_path}", "data.test_fraction=0.2"])
    pool, held = training_pool(cfg.data), holdout_cases(cfg.data)
    assert len(held) == 4 and len(pool) == 16
    assert not {c.name for c in pool} & {c.name for c in held}
    # the same cases a single run with val_fraction 0.2 and the same seed validates on
    _, val = split_cases(pool + held, 0.2, cfg.data.seed)
    assert [c.name for c in val] == [c.name for c in held]
    seen = set()
    for f in range(4):
        train, v = kfold_split(pool, 4, f, cfg.data.seed)
        seen |= {c.name for c in train} | {c.name for c in v}
    assert not seen & {c.name for c in held}
    cfg0 = load_config(recipe, [f"data.root={tmp_path}", "data.test_fraction=0"])
    assert len(training_pool(cfg0.data)) == 20 and holdout_cases(cfg0.data) == []
    with pytest.raises(ConfigError, match="test_fraction"):
        load_config(recipe, ["data.test_fraction=1.0"])


def _blobs(shape=(30, 30, 30)):
    ref = np.zeros(shape, np.int64)
    ref[5:15, 5:15, 5:15] = 1
    ref[15:20, 5:15, 5:15] = 2
    return ref


def test_keep_largest_steps():
    lab = _blobs()
    noisy = lab.copy()
    noisy[25:27, 25:27, 25:27] = 1  # a stray class-1 island
    noisy[0:2, 25:27, 0:2] = 2      # a stray class-2 island
    assert np.array_equal(keep_largest(noisy, [1, 2]), lab)
    assert np.array_equal(keep_largest_foreground(noisy, [1, 2]), lab)
    only1 = keep_largest(noisy, [1])
    assert (only1[0:2, 25:27, 0:2] == 2).all() and (only1[25:27, 25:27, 25:27] == 0).all()
    assert np.array_equal(apply_postprocessing(noisy, {"keep_largest": [1, 2]}), lab)
    assert apply_postprocessing(noisy, {}) is noisy


def test_postprocessing_chosen_only_where_it_helps():
    ref = _blobs()
    noisy = ref.copy()
    noisy[25:28, 25:28, 25:28] = 1
    chosen, report = choose_postprocessing([(noisy, ref), (ref.copy(), ref)], [1, 2])
    assert chosen == {"keep_largest_foreground": [1, 2]}
    assert report["after"][1] > report["before"][1]
    # the reference itself has two separate class-1 parts: removing one would hurt, so nothing is chosen
    two = ref.copy()
    two[25:28, 25:28, 25:28] = 1
    chosen, _ = choose_postprocessing([(two.copy(), two), (two.copy(), two)], [1, 2])
    assert chosen == {}


def test_ema_is_a_moving_average():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = EMA(net, 0.9)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(net)
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 1.2))
    assert not ema.model.weight.requires_grad


def test_config_checks_for_new_keys(tmp_path):
    with pytest.raises(ConfigError, match="cross-validation"):
        load_config(REPO / "configs" / "hippocampus.yaml", ["data.folds=1"])
    with pytest.raises(ConfigError, match="train.ema"):
        load_config(REPO / "configs" / "hippocampus.yaml", ["train.ema=1.5"])
    with pytest.raises(ConfigError, match="train.keep"):
        load_config(REPO / "configs" / "hippocampus.yaml", ["train.keep=final"])
    with pytest.raises(ConfigError, match="unknown postprocessing step"):
        load_config(REPO / "configs" / "hippocampus.yaml", ["inference.postprocess={largest: [1]}"])
    with pytest.raises(ConfigError, match="not labels"):
        load_config(REPO / "configs" / "hippocampus.yaml", ["inference.postprocess={keep_largest: [7]}"])


@pytest.mark.slow
def test_folds_train_pool_pack_and_predict_ensemble(tmp_path, hippo_data):
    out = tmp_path / "cv"
    args = ["train", REPO / "configs" / "hippocampus.yaml", "--folds", "2", "--save-probabilities",
            *_sets(f"data.root={hippo_data}", f"train.output_dir={out}", "train.ema=0.9", *TINY)]
    proc = run_cli(*args[:5], "--fold", "1", *args[5:])
    assert proc.returncode == 0, proc.stderr
    assert "1 of 2 folds done" in proc.stdout and not (out / "cv_summary.json").exists()
    proc = run_cli(*args)  # fold 1 is skipped as done, fold 0 trains, then the summary
    assert proc.returncode == 0, proc.stderr
    assert "fold 1: already done" in proc.stderr and "pooled out-of-fold Dice" in proc.stdout
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["cases"] == 6 and set(summary["fold_dice"]) == {"0", "1"}
    assert set(summary["pooled_dice"]) == {"anterior", "posterior", "mean"}
    names = {p.name for f in (0, 1) for p in (out / f"fold_{f}" / "validation").glob("*.nii.gz")}
    assert names == {p.name for p in (hippo_data / "labelsTr").glob("*.nii.gz")}
    _check_stored_probabilities(out, tmp_path, summary)
    # pack both folds into one ensemble file carrying the chosen postprocessing
    model = tmp_path / "ensemble.pt"
    proc = run_cli("pack-model", out, model)
    assert proc.returncode == 0, proc.stderr
    ck = load_checkpoint(model)
    assert len(ck["ensemble"]) == 1 and ck["config"]["inference"]["postprocess"] == summary["postprocess"]
    from medseg.inference.predictor import Predictor
    from medseg.io import load_volume

    p = Predictor(model, device="cpu", amp=False)
    assert len(p.nets) == 2
    vol = load_volume(hippo_data / "imagesTr" / "hippocampus_003.nii.gz")
    lab = p.predict_volume(vol)
    assert lab.shape == vol.shape and np.allclose(lab.affine, vol.affine)
    # the ensemble's probabilities are the mean of its members'
    single = [Predictor(out / f"fold_{f}" / "best.pt", device="cpu", amp=False).probabilities(vol) for f in (0, 1)]
    assert torch.allclose(p.probabilities(vol), (single[0] + single[1]) / 2, atol=2e-3)
    # a member altered after packing is refused
    payload = torch.load(model, weights_only=True)
    key = next(iter(payload["ensemble"][0]))
    payload["ensemble"][0][key] = payload["ensemble"][0][key] + 1
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="ensemble weights"):
        load_checkpoint(tmp_path / "tampered.pt")


def _check_stored_probabilities(out: Path, tmp_path: Path, summary: dict) -> None:
    """--save-probabilities kept each held-out case's probabilities: their argmax is the written prediction,
    and a copy of the run without any weights still ensembles from them."""
    import importlib.util
    import shutil

    from medseg.inference.probabilities import ensemble_labels, load_probabilities
    from medseg.io import load_volume

    for pred in sorted(out.glob("fold_*/validation/*.nii.gz")):
        stored = pred.with_name(pred.name.replace(".nii.gz", ".probs.npz"))
        probs, _ = load_probabilities(stored)
        assert probs.shape[0] == 3 and torch.allclose(probs.sum(0), torch.ones(()), atol=0.02)
        written = load_volume(pred)
        again = ensemble_labels([stored, stored], written.affine, written.shape)
        # 8-bit rounding can flip near-ties, and this two-epoch network's classes are near-ties almost everywhere
        # (a trained hippocampus fold: 17 of 2.3 million voxels)
        assert (again == np.asarray(written.array)).mean() > 0.99, pred.name
    weightless = tmp_path / "records"
    shutil.copytree(out, weightless, ignore=shutil.ignore_patterns("*.pt"))
    spec = importlib.util.spec_from_file_location("hippo_bench", REPO / "benchmarks" / "hippocampus.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = (weightless / "fold_0" / "config.yaml").read_text()
    row = bench.cv_ensemble([weightless, out], Path(load_config(weightless / "fold_0" / "config.yaml").data.root),
                            "cpu")
    assert (weightless / "fold_0" / "config.yaml").read_text() == config and not list(weightless.rglob("*.pt"))
    assert row["complete"] and row["cases"] == summary["cases"]
    assert abs(row["pooled"]["mean"] - summary["pooled_dice"]["mean"]) < 2e-3, (row, summary["pooled_dice"])
    assert sorted(row["per_fold"]) == [f"fold_{f}" for f in range(len(summary["fold_dice"]))]
    for f, dice in summary["fold_dice"].items():  # a run ensembled with itself scores each fold as the run did
        assert abs(row["per_fold"][f"fold_{f}"]["mean"] - dice["mean"]) < 2e-3, (f, row["per_fold"], dice)
    bench.compare_cv([out], [row])  # a finished ensemble is a row of the recipes' table, its gain over the same folds


def test_save_probabilities_needs_folds(tmp_path):
    proc = run_cli("train", REPO / "configs" / "hippocampus.yaml", "--save-probabilities",
                   "--set", f"train.output_dir={tmp_path / 'run'}")
    assert_clean_error(proc, "--save-probabilities", "--folds")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_init_from_warm_start_and_mismatch(tmp_path, hippo_data):
    first = tmp_path / "a"
    base = ["train", REPO / "configs" / "hippocampus.yaml",
            *_sets(f"data.root={hippo_data}", *TINY, "train.epochs=1")]
    assert run_cli(*base, "--set", f"train.output_dir={first}").returncode == 0
    proc = run_cli(*base, "--set", f"train.output_dir={tmp_path / 'b'}", "--set", f"train.init_from={first / 'best.pt'}")
    assert proc.returncode == 0, proc.stderr
    assert "starting from the weights of" in proc.stderr
    proc = run_cli(*base, "--set", f"train.output_dir={tmp_path / 'c'}", "--set", f"train.init_from={first / 'best.pt'}",
                   "--set", "model.channels=[4,8,32]")
    assert_clean_error(proc, "different model", "best.pt")
    # resuming with more epochs extends the run; the learning-rate decay now ends at the new last epoch
    proc = run_cli(*base, "--set", f"train.output_dir={first}", "--set", "train.epochs=2", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "schedule now ends at epoch 2 (was 1)" in proc.stderr and "resuming at epoch 2 of 2" in proc.stderr
    ck = load_checkpoint(first / "last.pt")
    assert ck["epoch"] == 2 and ck["history"][-1]["lr"] == pytest.approx(0.0)


@pytest.mark.slow
def test_keep_last_saves_the_final_ema_weights_as_best(tmp_path, hippo_data):
    # train.keep: last (the cross-validation protocol): best.pt is the final EMA weights, whatever validation says
    from medseg.training.trainer import train

    cfg = load_config(REPO / "configs" / "hippocampus.yaml",
                      [f"data.root={hippo_data}", f"train.output_dir={tmp_path / 'run'}", "train.ema=0.9",
                       "train.keep=last", *TINY, "train.epochs=3"])
    res = train(cfg, progress=False)
    best, last = load_checkpoint(res.best_checkpoint), load_checkpoint(res.last_checkpoint)
    assert best["epoch"] == 3 and res.best_epoch == 3
    assert best["best_metric"] == last["history"][-1]["val_mean_dice"] == res.best_metric
    for k, v in last["ema_state_dict"].items():
        assert torch.equal(best["state_dict"][k], v), k
    assert any(not torch.equal(last["state_dict"][k], v) for k, v in last["ema_state_dict"].items())
    # predicting with (or packing) last.pt uses its EMA weights too, as validation did
    from medseg.inference.predictor import Predictor
    from medseg.io import load_volume
    from medseg.models.checkpoint import pack

    vol = load_volume(hippo_data / "imagesTr" / "hippocampus_003.nii.gz")
    ref = Predictor(res.best_checkpoint, device="cpu", amp=False).probabilities(vol)
    assert torch.allclose(Predictor(res.last_checkpoint, device="cpu", amp=False).probabilities(vol), ref, atol=1e-6)
    packed = pack(res.last_checkpoint, tmp_path / "packed.pt")
    assert torch.allclose(Predictor(packed, device="cpu", amp=False).probabilities(vol), ref, atol=2e-3)


def test_pack_model_needs_an_output(tmp_path):
    assert_clean_error(run_cli("pack-model", tmp_path / "x.pt"), "SOURCE... OUTPUT.pt")
    empty = tmp_path / "cv"
    empty.mkdir()
    assert_clean_error(run_cli("pack-model", empty, tmp_path / "m.pt"), "no fold checkpoints")


def test_elastic_augmentation_keeps_labels_integral(hippo_data):
    from medseg.preprocessing.pipeline import train_transforms

    cfg = load_config(REPO / "configs" / "hippocampus.yaml",
                      ["augment.elastic_prob=1.0", "augment.affine_prob=0", "patch.size=[24,24,24]",
                       "patch.samples_per_volume=1"])
    name = "hippocampus_003.nii.gz"
    item = {"image": str(hippo_data / "imagesTr" / name), "label": str(hippo_data / "labelsTr" / name)}
    out = train_transforms(cfg)(item)
    out = out[0] if isinstance(out, list) else out
    lab = np.asarray(out["label"])
    assert lab.shape == (1, 24, 24, 24) and set(np.unique(lab)) <= {0.0, 1.0, 2.0}


def test_int8_pack_is_smaller_and_predicts_the_same_labels(tmp_path, hippo_data):
    from medseg.evaluation.metrics import dice
    from medseg.inference.predictor import Predictor
    from medseg.models.loading import resolve_model
    from medseg.io import load_volume
    from medseg.models.checkpoint import pack

    bundled = resolve_model("hippocampus-fast")  # one network: packed twice, a two-member ensemble
    half = pack([bundled, bundled], tmp_path / "half.pt")
    small = pack([bundled, bundled], tmp_path / "int8.pt", int8=True)
    assert small.stat().st_size < 0.6 * half.stat().st_size
    ck = load_checkpoint(small)
    assert any(v.dtype == torch.int8 for v in ck["state_dict"].values())
    assert len(ck["ensemble_quant_scales"]) == 1
    vol = load_volume(hippo_data / "imagesTr" / "hippocampus_003.nii.gz")
    ref = np.asarray(Predictor(half, device="cpu").predict_volume(vol).array)
    got = np.asarray(Predictor(small, device="cpu").predict_volume(vol).array)
    assert ref.max() == 2  # the case has both labels
    for c in (1, 2):
        assert dice(got == c, ref == c) > 0.98
    # a packed int8 ensemble packs again (members kept, weights dequantised)
    again = pack([small], tmp_path / "again.pt")
    assert len(load_checkpoint(again)["ensemble"]) == 1
    assert (np.asarray(Predictor(again, device="cpu").predict_volume(vol).array) == got).mean() > 0.999
    # the scales are covered by the checksum, and int8 weights need them
    payload = torch.load(small, weights_only=True)
    key = next(iter(payload["quant_scales"]))
    payload["quant_scales"][key] = payload["quant_scales"][key] * 2
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "tampered.pt")
    del payload["quant_scales"]
    torch.save(payload, tmp_path / "noscales.pt")
    with pytest.raises(CheckpointError, match="int8 weights without one scale"):
        load_checkpoint(tmp_path / "noscales.pt")


def test_packing_keeps_aliased_weights_shared(tmp_path):
    """MONAI's DynUNet lists its blocks twice in its state dict; packing must not store them twice."""
    from medseg.core.config import from_dict
    from medseg.inference.predictor import Predictor
    from medseg.models.registry import build_model
    from medseg.models.checkpoint import pack, save_checkpoint

    cfg = from_dict({"labels": {0: "background", 1: "a", 2: "b"}, "model": {
        "name": "dynunet3d", "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "deep_supervision": 2}})
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 3).eval()
    state = model.state_dict()
    assert len({v.data_ptr() for v in state.values()}) < len(state)  # the aliasing this test is about
    full = save_checkpoint(tmp_path / "full.pt", model=model, cfg=cfg, epoch=1)
    half = pack(full, tmp_path / "half.pt")
    small = pack(full, tmp_path / "int8.pt", int8=True)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    assert small.stat().st_size < 0.55 * half.stat().st_size
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for path, tol in ((half, 0.02), (small, 0.1)):
            got = Predictor(path, device="cpu").net(x)
            assert (got - ref).abs().max() < tol * ref.abs().max(), path.name
    assert pack(small, tmp_path / "again.pt").stat().st_size < 0.55 * full.stat().st_size  # repacked: still once


def test_checkpoint_every_writes_last_pt_every_n_epochs_and_at_the_end(tmp_path, hippo_data, monkeypatch):
    import medseg.training.trainer as trainer

    written = []
    real = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint",
                        lambda path, **kw: (written.append((Path(path).name, kw["epoch"])), real(path, **kw))[1])
    cfg = load_config(REPO / "configs" / "hippocampus.yaml",
                      [f"data.root={hippo_data}", f"train.output_dir={tmp_path / 'run'}", *TINY,
                       "train.epochs=5", "train.val_every=5", "train.checkpoint_every=2"])
    res = trainer.train(cfg, progress=False)
    assert [e for name, e in written if name == "last.pt"] == [2, 4, 5]
    assert [h["epoch"] for h in load_checkpoint(res.last_checkpoint)["history"]] == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="checkpoint_every"):
        load_config(REPO / "configs" / "hippocampus.yaml", ["train.checkpoint_every=0"])


def test_sgd_optimizer_trains_and_resume_refuses_a_changed_optimizer(tmp_path, hippo_data):
    from medseg.training.trainer import train

    sets = [f"data.root={hippo_data}", f"train.output_dir={tmp_path / 'run'}", *TINY]
    res = train(load_config(REPO / "configs" / "hippocampus.yaml", [*sets, "train.optimizer=sgd", "train.lr=0.01"]),
                progress=False)
    state = load_checkpoint(res.last_checkpoint)["optimizer"]["param_groups"][0]
    assert state["momentum"] == 0.99 and state["nesterov"] is True
    more = load_config(REPO / "configs" / "hippocampus.yaml", [*sets, "train.epochs=3"])  # adamw, the default
    with pytest.raises(CheckpointError, match="train.optimizer changed"):
        train(more, resume=True, progress=False)
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(REPO / "configs" / "hippocampus.yaml", ["train.optimizer=adam"])


def test_checkpoint_of_unaliased_dynunet_weights_packs_to_half_size(tmp_path):
    # a GPU model's state_dict copied to the host (.cpu() per key) no longer shares DynUNet's aliased blocks;
    # save_checkpoint must store them once, or the checkpoint and every file packed from it double in size
    from medseg.models.registry import build_model
    from medseg.models.checkpoint import host_state, pack, save_checkpoint

    cfg = load_config(REPO / "benchmarks" / "configs" / "hippocampus_cv_dynunet.yaml")
    model = build_model(cfg.model, 1, cfg.num_classes)
    unaliased = {k: v.clone() for k, v in model.state_dict().items()}  # what per-key .cpu() of CUDA tensors gives
    shared = host_state(unaliased)
    assert len({t.untyped_storage().data_ptr() for t in shared.values()}) < len(unaliased)
    for k, v in unaliased.items():
        assert torch.equal(shared[k], v), k
    model.load_state_dict(unaliased)
    model.state_dict = lambda: unaliased  # noqa: E731 - the state as a CUDA model hands it over
    ck = save_checkpoint(tmp_path / "best.pt", model=model, cfg=cfg, epoch=1)
    packed = pack(ck, tmp_path / "packed.pt")
    n = sum(p.numel() for p in build_model(cfg.model, 1, cfg.num_classes).parameters())
    assert ck.stat().st_size < 4.3 * n and packed.stat().st_size < 2.3 * n  # float32 and float16, stored once
    assert all(torch.equal(a, b) for a, b in zip(load_checkpoint(ck)["state_dict"].values(), unaliased.values()))


def test_networks_of_different_widths_pack_into_one_ensemble(tmp_path):
    """Members of one ensemble may be different networks, if they share labels, preprocessing and windows:
    the packed file predicts the average of what each member predicts alone."""
    from medseg.core.config import from_dict, to_dict
    from medseg.inference.predictor import Predictor
    from medseg.io.volume import Volume
    from medseg.models.registry import build_model
    from medseg.models.checkpoint import pack, save_checkpoint

    base = {"labels": {0: "background", 1: "a", 2: "b"}, "patch": {"size": [32, 32, 32]},
            "preprocess": {"spacing": None}, "inference": {"sw_batch_size": 1}}
    paths, models = [], []
    for width, name in ((4, "narrow"), (6, "wide")):
        cfg = from_dict({**base, "model": {"name": "dynunet3d", "channels": [width, 2 * width, 4 * width],
                                           "strides": [2, 2], "deep_supervision": 1}})
        torch.manual_seed(width)
        model = build_model(cfg.model, 1, 3).eval()
        models.append(model)
        paths.append(save_checkpoint(tmp_path / f"{name}.pt", model=model, cfg=cfg, epoch=1))
    packed = pack(paths, tmp_path / "mixed.pt")
    ck = load_checkpoint(packed)
    assert ck["config"]["model"]["channels"] == [4, 8, 16] and ck["ensemble_models"][0]["channels"] == [6, 12, 24]
    pred = Predictor(packed, device="cpu", amp=False)
    assert [sum(p.numel() for p in n.parameters()) for n in pred.nets] \
        == [sum(p.numel() for p in m.parameters()) for m in models]
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        for net, model in zip(pred.nets, models):
            ref = model(x)
            assert (net(x) - ref).abs().max() < 0.02 * ref.abs().max()  # float16 storage
    # the ensemble's labels are the argmax of the averaged member probabilities, on the input's grid
    rng = np.random.default_rng(0)
    affine = np.array([[0.0, 0, -1.2, 30], [0.9, 0, 0, -5], [0, 1.1, 0, 7], [0, 0, 0, 1]])
    vol = Volume(rng.normal(size=(20, 24, 18)).astype(np.float32), affine)
    alone = [Predictor(p, device="cpu", amp=False).processed_probabilities(vol)[0] for p in paths]
    mixed, _ = pred.processed_probabilities(vol)
    assert torch.allclose(torch.as_tensor(mixed), (torch.as_tensor(alone[0]) + torch.as_tensor(alone[1])) / 2,
                          atol=0.02)
    out = pred.predict_volume(vol)
    assert out.shape == vol.shape and np.allclose(out.affine, vol.affine)
    # a packed mixed ensemble packs again with its members' configs
    assert load_checkpoint(pack([packed], tmp_path / "again.pt"))["ensemble_models"] == ck["ensemble_models"]
    # members must see the same windows: a different patch size is refused, naming the setting
    other = from_dict({**base, "patch": {"size": [48, 48, 48]}, "model": to_dict(from_dict(ck["config"]))["model"]})
    odd = save_checkpoint(tmp_path / "odd.pt", model=models[0], cfg=other, epoch=1)
    with pytest.raises(CheckpointError, match="differ in patch.size") as err:
        pack([paths[0], odd], tmp_path / "bad.pt")
    assert "odd.pt" in str(err.value)
    # a member config that does not fit its weights is a clear error, not a traceback
    payload = torch.load(packed, weights_only=True)
    payload["ensemble_models"][0]["channels"] = [8, 16, 32]
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        Predictor(tmp_path / "tampered.pt", device="cpu")
