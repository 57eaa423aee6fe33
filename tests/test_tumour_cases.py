"""Cases of several sequences from DICOM studies (rules with ``sequences:``), region models' lesion reports,
and the rules and config checks around them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


BRATS_REGIONS = [{"name": "whole_tumour", "labels": [1, 2, 3, 4]}, {"name": "tumour_core", "labels": [1, 3, 4]},
                 {"name": "enhancing_tumour", "labels": [4]}]
BRATS_LABELS = {0: "background", 1: "necrosis", 2: "oedema", 3: "non-enhancing tumour", 4: "enhancing tumour"}


@pytest.fixture(scope="session")
def nested_model():
    """A region model whose output is known: region r is on where the first sequence (z-scored) exceeds r."""
    from medseg.models.registry import MODELS, ModelSpec, register_model

    class Nested(torch.nn.Module):
        def __init__(self, outputs: int) -> None:
            super().__init__()
            self.outputs = outputs
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            steps = torch.arange(self.outputs, dtype=x.dtype, device=x.device).view(1, -1, 1, 1, 1)
            return 20.0 * (x[:, :1] - steps) + 0 * self.dummy

    if "test-nested" not in MODELS:
        register_model(ModelSpec("test-nested", 3, "test only", lambda cfg, i, o: Nested(o)))
    return "test-nested"


def region_checkpoint(path: Path, model_name: str, channels=("flair", "t1c")) -> Path:
    from medseg.core.config import from_dict
    from medseg.models.checkpoint import save_checkpoint
    from medseg.models.registry import build_model

    cfg = from_dict({"name": "nested", "labels": BRATS_LABELS, "regions": BRATS_REGIONS,
                     "data": {"channels": list(channels)}, "model": {"name": model_name},
                     "patch": {"size": [32, 32, 16]}, "preprocess": {"spacing": None},
                     "inference": {"overlap": 0.25}})
    return save_checkpoint(path, model=build_model(cfg.model, cfg.in_channels, cfg.out_channels), cfg=cfg, epoch=0)


def test_dicom_study_sequences_picked_by_rules(tmp_path, shared_data, nested_model):
    from medseg.io.dicom import load_dicom_series, scan_dicom
    from medseg.io.volume import load_volume

    study = shared_data / "dicom" / "mr_brain_study"
    model = region_checkpoint(tmp_path / "m.pt", nested_model)
    rules = Path(__file__).resolve().parent.parent / "configs" / "rules" / "glioma_sequences.yaml"
    from medseg.apps.run import predict
    from medseg.core.errors import InputNotFoundError

    predict([study], tmp_path / "out", model=model, device="cpu", rules=rules, stats="csv", progress=False)
    outs = sorted((tmp_path / "out").glob("case-*.nii.gz"))
    assert len(outs) == 1, list((tmp_path / "out").iterdir())
    flair = next(s for s in scan_dicom(study) if "FLAIR" in s.series_description)
    ref = load_dicom_series(flair)
    labels = load_volume(outs[0])
    assert labels.shape == ref.shape and np.allclose(labels.affine, ref.affine, atol=1e-4)  # the reference grid
    values = set(np.unique(labels.array).tolist())
    assert values <= {0, 1, 2, 4} and {1, 2, 4} <= values, values  # nested regions painted in order
    summary = json.loads(next((tmp_path / "out").glob("*.summary.json")).read_text())
    assert summary["regions"]["whole_tumour"]["volume_ml"] >= summary["regions"]["tumour_core"]["volume_ml"] \
        >= summary["regions"]["enhancing_tumour"]["volume_ml"] > 0
    # without per-sequence rules a study cannot be split into sequences: said, not guessed
    with pytest.raises(InputNotFoundError, match="sequences:"):
        predict([study], tmp_path / "out2", model=model, device="cpu", progress=False)


def test_rules_for_sequences_validate_and_merge(tmp_path):
    from medseg.core.errors import ConfigError
    from medseg.io.rules import load_rules, rules_for_sequence

    good = tmp_path / "r.yaml"
    good.write_text("modality: MR\nmin_slices: 7\nsequences:\n  flair: {description_include: flair}\n"
                    "  t1c: {contrast: with, modality: MR}\n")
    rules = load_rules(good)
    flair, t1c = rules_for_sequence(rules, "flair"), rules_for_sequence(rules, "t1c")
    assert flair.description_include == "flair" and flair.min_slices == 7 and flair.pick == "largest"
    assert t1c.contrast == "with" and t1c.modality == ["MR"] and t1c.description_include is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("sequences:\n  flair: {description_include: '('}\n")
    with pytest.raises(ConfigError, match="sequences.flair"):
        load_rules(bad)
    bad.write_text("sequences:\n  flair: {colour: red}\n")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_rules(bad)


def test_region_lesion_report_and_summary(tmp_path):
    from medseg.apps.run import write_stats
    from medseg.core.config import from_dict
    from medseg.io.volume import Volume

    cfg = from_dict({"labels": BRATS_LABELS, "regions": BRATS_REGIONS})
    lab = np.zeros((40, 40, 20), np.uint8)
    lab[5:25, 5:25, 2:12] = 2  # oedema 20x20x10
    lab[10:20, 10:20, 4:10] = 1  # core 10x10x6 ...
    lab[12:18, 12:18, 5:9] = 4  # ... with an enhancing 6x6x4 inside
    lab[30:34, 30:34, 15:17] = 4  # and a second, separate enhancing lesion (also tumour: a second component)
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    written = write_stats(Volume(lab, affine), cfg, tmp_path / "case", "json")
    report = json.loads(written[0].read_text())
    by_region = {}
    for les in report["lesions"]:
        by_region.setdefault(les["name"], []).append(les)
    assert [len(by_region[r["name"]]) for r in BRATS_REGIONS] == [2, 2, 2]
    assert {les["label"] for les in by_region["whole_tumour"]} == {2}  # the value the region writes
    core = by_region["tumour_core"][0]
    assert core["voxels"] == 600 and core["volume_ml"] == pytest.approx(600 * 0.5 * 0.5 * 2 / 1000)
    assert core["plane_axis"] == 2  # the 2 mm axis is the slice axis
    assert core["long_axis_mm"] == pytest.approx(np.hypot(9 * 0.5, 9 * 0.5), abs=1e-3)  # rounded to 4 decimals
    summary = report["summary"]
    ml = 0.5 * 0.5 * 2 / 1000
    assert summary["regions"]["enhancing_tumour"] == {"volume_ml": pytest.approx((144 + 32) * ml, abs=1e-4),
                                                      "lesions": 2}
    assert summary["fractions"]["necrosis / tumour_core"] == pytest.approx((600 - 144) / (600 + 32), abs=1e-4)
    assert summary["labels"]["oedema"] == pytest.approx((4000 - 600) * ml, abs=1e-4)
    csv_files = write_stats(Volume(lab, affine), cfg, tmp_path / "case", "csv")
    assert [p.name for p in csv_files] == ["case.lesions.csv", "case.summary.json"]


def test_region_values_and_config_checks():
    from medseg.core.config import from_dict
    from medseg.core.errors import ConfigError

    cfg = from_dict({"labels": BRATS_LABELS, "regions": BRATS_REGIONS, "data": {"channels": ["flair", "t1c"]}})
    assert cfg.region_values() == [2, 1, 4] and cfg.out_channels == 3 and cfg.in_channels == 2
    assert cfg.reference_channel == "flair"
    assert cfg.data.channels[0].file_patterns() == ["*flair*"]
    with pytest.raises(ConfigError, match="foreground label values"):
        from_dict({"labels": BRATS_LABELS, "regions": [{"name": "x", "labels": [7]}]})
    with pytest.raises(ConfigError, match="distinct sequence names"):
        from_dict({"data": {"channels": ["flair", "flair"]}})
    with pytest.raises(ConfigError, match="data.reference"):
        from_dict({"data": {"channels": ["flair", "t1c"], "reference": "t2"}})
    with pytest.raises(ConfigError, match="volume tasks"):
        from_dict({"task": "image2d", "model": {"name": "segnet"}, "patch": {"size": [64, 64]},
                   "data": {"channels": ["a", "b"]}})


def test_glioma_config_reads_the_shared_cases(shared_data):
    from medseg.core.config import load_config
    from medseg.preprocessing.datasets import dataset_cases

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "glioma.yaml")
    cases = dataset_cases(cfg.data)
    assert len(cases) >= 4
    for case in cases:
        names = [Path(f).name for f in case.files]
        assert names[0].startswith("Flair") and names[1].startswith("T1c") and "OTMultiClass" in case.label


def test_exported_region_model_carries_its_sequences_and_predicts_alike(tmp_path):
    """An exported model (TorchScript) keeps the sequence names and order and the regions, and predicts the same
    labels as its checkpoint."""
    from medseg.inference.export import export_model
    from medseg.inference.predictor import Predictor
    from medseg.io.volume import Volume
    from medseg.models.loading import model_config

    ck = region_checkpoint(tmp_path / "m.pt", "unet3d", channels=("t2w", "t1c"))
    ts = export_model(ck, tmp_path / "m.ts", "torchscript")
    cfg = model_config(ts)
    assert cfg.channel_names == ["t2w", "t1c"] and [r.name for r in cfg.regions] == [r["name"] for r in BRATS_REGIONS]
    rng = np.random.default_rng(0)
    case = Volume(rng.normal(size=(40, 36, 20, 2)).astype(np.float32), np.diag([1.0, 1.2, 2.5, 1.0]))
    a = Predictor(ck, device="cpu").predict_volume(case)
    b = Predictor(ts, device="cpu").predict_volume(case)
    assert a.shape == (40, 36, 20) and np.array_equal(a.affine, case.affine)
    assert (np.asarray(a.array) == np.asarray(b.array)).mean() > 0.999


@pytest.mark.slow
def test_bundled_glioma_model_takes_raw_intensities_and_brats_2023_names(tmp_path, shared_data):
    """The bundled glioma model on a BraTS 2015 case as given (normalised, background about -3) and on the same
    case as a scanner would give it (raw intensities, background 0) under BraTS 2023 file names: the same
    labels, on the FLAIR grid."""
    import nibabel as nib

    from medseg.apps.run import predict
    from medseg.io.volume import load_volume

    src = shared_data / "brats2015" / "brats_2013_pat0006_1"
    raw = tmp_path / "BraTS-GLI-00006-000"
    raw.mkdir()
    brain = np.asanyarray(nib.load(str(src / "brainmask.nii.gz")).dataobj) > 0.5
    for name, seq, (scale, shift) in (("Flair_subtrMeanDivStd", "t2f", (180.0, 600.0)),
                                      ("T1c_subtrMeanDivStd", "t1c", (250.0, 900.0))):
        img = nib.load(str(src / f"{name}.nii.gz"))
        arr = np.asanyarray(img.dataobj).astype(np.float32)
        scanner = np.where(brain, np.clip(arr * scale + shift, 1, None), 0).astype(np.int16)
        nib.save(nib.Nifti1Image(scanner, img.affine, img.header), str(raw / f"{raw.name}-{seq}.nii.gz"))
    for seq in ("t1n", "t2w"):  # the sequences the model does not take are left alone
        (raw / f"{raw.name}-{seq}.nii.gz").symlink_to(raw / f"{raw.name}-t2f.nii.gz")
    predict([src, raw], tmp_path / "out", model="glioma", device="cpu", progress=False)
    a = load_volume(tmp_path / "out" / f"{src.name}.nii.gz")
    b = load_volume(tmp_path / "out" / f"{raw.name}.nii.gz")
    flair = load_volume(src / "Flair_subtrMeanDivStd.nii.gz")
    for labels in (a, b):
        assert labels.shape == flair.shape and np.allclose(labels.affine, flair.affine)
    la, lb = np.asarray(a.array), np.asarray(b.array)
    assert (la > 0).sum() > 10_000  # a tumour is found ...
    both = (la > 0) | (lb > 0)
    assert ((la == lb) & both).sum() / both.sum() > 0.95  # ... and the same one from raw intensities
