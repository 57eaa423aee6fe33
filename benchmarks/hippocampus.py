"""Hippocampus accuracy benchmark (MSD Task04): Dice/HD95 per class on a held-out split, and time.

By default it loads the bundled model and scores the validation cases stored in its
checkpoint (cases it never trained on). ``--train`` retrains from the config first.

    python benchmarks/hippocampus.py                       # bundled model
    python benchmarks/hippocampus.py --model runs/hippocampus/best.pt
    python benchmarks/hippocampus.py --train --set train.epochs=50
    python benchmarks/hippocampus.py --model hippocampus --model runs/hippocampus_wide/best.pt --tta
    python benchmarks/hippocampus.py --cv runs/hippocampus_cv                # cross-validation summary
    python benchmarks/hippocampus.py --model hippocampus --model runs/hippocampus_cv/fold_0/best.pt \
        --model ensemble.pt --tta      # single models and a fold ensemble on the same unseen cases
    python benchmarks/hippocampus.py --cv-ensemble runs/cv_all --cv-ensemble runs/cv_all_aug
                                       # two cross-validations over the same folds, ensembled fold by fold
                                       # (from their stored probabilities when both ran 'train --folds 5
                                       # --save-probabilities', so copies without weights do; else their weights;
                                       # benchmarks/records keeps neither: its README says how to regenerate them)
    python benchmarks/hippocampus.py --model hippocampus --amp bf16   # bf16 autocast (also on the CPU)

Prints a table and one JSON line; the figures go into docs/benchmarks.md by hand,
with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
#: What a record in benchmarks/records keeps of its folds' held-out predictions: their Dice, one row per case.
RECORD_TABLE = "dice_per_case.csv"


def score(pred, names, data, tta, train_seconds, evaluate) -> dict:
    from medseg.io.volume import load_volume, save_volume

    with tempfile.TemporaryDirectory() as tmp:
        pred_dir, ref_dir = Path(tmp) / "pred", Path(tmp) / "ref"
        ref_dir.mkdir()
        times = []
        for name in names:
            img = data / "imagesTr" / f"{name}.nii.gz"
            (ref_dir / img.name).symlink_to((data / "labelsTr" / img.name).resolve())
            t0 = time.perf_counter()
            vol = load_volume(img)
            save_volume(pred.predict_volume(vol), pred_dir / img.name, reference=vol)
            times.append(time.perf_counter() - t0)
        ev = evaluate(pred_dir, ref_dir, names=pred.labels, progress=False)
    return {
        "model": str(pred.model_path.relative_to(REPO) if pred.model_path.is_relative_to(REPO) else pred.model_path),
        "tta": tta,
        "amp": pred.amp_dtype if pred.amp else "off",
        "cases": len(names),
        "dice": {pred.labels[c]: round(ev.mean("dice", c), 4) for c in ev.classes},
        "hd95_mm": {pred.labels[c]: round(ev.mean("hd95", c), 3) for c in ev.classes},
        "mean_dice": round(ev.mean_dice, 4),
        "predict_s_per_case": round(float(np.mean(times)), 3),
        "train_s": None if train_seconds is None else round(train_seconds, 1),
        "device": str(pred.device),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="checkpoint or bundled name (default: bundled "
                    "hippocampus); repeat to compare models in one table on the first one's held-out cases")
    ap.add_argument("--tta", action="store_true", help="score each model without and with mirror test-time "
                    "augmentation (default: each model's own inference.tta only)")
    ap.add_argument("--cv", action="append", default=[], help="a 'medseg train --folds' folder: print its pooled "
                    "cross-validation Dice (repeatable)")
    ap.add_argument("--cv-final", action="append", default=[], help="a 'medseg train --folds' folder: predict each "
                    "fold's held-out cases again with the fold's final weights (last.pt, EMA when kept), so no "
                    "held-out case chose the epoch, and print the pooled Dice (repeatable)")
    ap.add_argument("--cv-ensemble", action="append", default=[], help="a 'medseg train --folds' folder over the "
                    "same folds as other --cv-ensemble folders: score the per-fold ensemble of their final weights")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hippocampus"), help="MSD Task04 folder")
    ap.add_argument("--train", action="store_true", help="train from --config first, then evaluate best.pt")
    ap.add_argument("--config", default=str(REPO / "configs" / "hippocampus.yaml"))
    ap.add_argument("--set", action="append", default=[], help="config override for --train")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="fp16", help="mixed precision for --model: fp16 (CUDA only; fp32 on the CPU), "
                    "bf16 (CUDA and CPU) or off")
    args = ap.parse_args(argv)

    from medseg.core.config import load_config

    data = Path(args.data)
    if not data.is_dir():
        print(f"hippocampus data not found at {data}; pass --data", file=sys.stderr)
        return 2
    train_seconds = None
    model = args.model[0] if args.model else None
    if args.train:
        from medseg.training.trainer import train

        cfg = load_config(args.config, [f"data.root={data}", *args.set])
        res = train(cfg, progress=False)
        train_seconds = res.seconds
        model = str(res.best_checkpoint)

    models = [model] if args.train or not args.model else args.model
    if not (args.train or args.model) and (args.cv or args.cv_final or args.cv_ensemble):
        models = []  # only cross-validation tables asked for
    if models:
        code = compare_models(models, args, data, train_seconds)
        if code:
            return code
    for cv in args.cv_final:
        cv_final(Path(cv), data, args.device)
    ensemble = {}
    if len(args.cv_ensemble) > 1:
        ensemble = cv_ensemble([Path(cv) for cv in args.cv_ensemble], data, args.device)
    for cv in args.cv:
        print_cv(Path(cv))
    extra = [ensemble] if ensemble.get("complete") else []  # a finished ensemble joins the recipes' table
    if args.cv and len(args.cv) + len(extra) > 1:
        compare_cv([Path(cv) for cv in args.cv], extra)
    return 0


def compare_models(models: list, args, data: Path, train_seconds) -> int:
    """Score every model on the first one's held-out cases (never trained on by any of them) in one table."""
    from medseg.evaluation.metrics import evaluate
    from medseg.core.runtime import amp_options
    from medseg.inference.predictor import Predictor
    from medseg.models.checkpoint import load_checkpoint

    amp = amp_options(args.amp)
    first = Predictor(models[0], device=args.device, **amp)
    split = load_checkpoint(first.model_path).get("split") or {}
    names = split.get("test") or split.get("validation") or []  # unseen cases first, else the validation split
    if not names and first.cfg.data.test_fraction > 0:  # an ensemble: the cases its config set aside
        from medseg.preprocessing.datasets import holdout_cases

        first.cfg.data.root = str(data)
        names = [c.name for c in holdout_cases(first.cfg.data)]
    if not names:
        print("checkpoint has no stored validation split; nothing held out to score", file=sys.stderr)
        return 2
    results = []
    for ref in models:
        pred = first if ref == models[0] else Predictor(ref, device=args.device, **amp)
        trained_on = set((load_checkpoint(pred.model_path).get("split") or {}).get("train") or [])
        if trained_on & set(names):
            print(f"{ref} was trained on {len(trained_on & set(names))} of the held-out cases; "
                  "compare models trained on the same split", file=sys.stderr)
            return 2
        for tta in ([False, True] if args.tta else [bool(pred.cfg.inference.tta)]):  # else the model's own setting
            pred.set_tta(tta)
            results.append(score(pred, names, data, tta, train_seconds if ref == models[0] else None, evaluate))
    print(f"held-out cases: {len(names)} (never trained on by any model below; from {first.model_path.name})")
    head = f"{'model':<44} {'TTA':<4} " + " ".join(f"{n + ' Dice':>15}" for n in results[0]["dice"])
    print(head + f" {'mean Dice':>10} {'s/case':>7}")
    for r in results:
        print(f"{r['model'][-44:]:<44} {'yes' if r['tta'] else 'no':<4} "
              + " ".join(f"{v:>15.4f}" for v in r["dice"].values())
              + f" {r['mean_dice']:>10.4f} {r['predict_s_per_case']:>7.2f}")
    for r in results:
        print(json.dumps(r))
    return 0


def cv_final(cv: Path, data: Path, device: str) -> dict:
    """Pooled out-of-fold Dice of the folds' final weights (what ``train.keep: last`` keeps), against best.pt's."""
    from medseg.core.config import load_config
    from medseg.training.crossval import predict_fold_validation

    folds = _fold_dirs(cv)
    per_case, epochs = {}, []
    for fdir in folds:
        cfg = load_config(fdir / "config.yaml", [f"data.root={data}"])
        per_case.update(predict_fold_validation(cfg, fdir, device=device, progress=False,
                                                checkpoint="last.pt", out_name="validation_final"))
        epochs.append(json.loads((fdir / "history.json").read_text())[-1]["epoch"])
    pooled = _pool(per_case, cfg)
    summary = json.loads((cv / "cv_summary.json").read_text()) if (cv / "cv_summary.json").is_file() else {}
    print(f"cross-validation {cv}: {len(folds)} folds, {len(per_case)} cases, final weights (epochs {epochs}), "
          f"TTA {'on' if cfg.inference.tta else 'off'}")
    print(f"{'':<28}" + " ".join(f"{c + ' Dice':>15}" for c in pooled if c != "mean") + f" {'mean Dice':>10}")
    print(f"{'pooled, final weights':<28}" + " ".join(f"{v:>15.4f}" for v in pooled.values()))
    if summary:
        best = summary["pooled_dice"]
        print(f"{'pooled, best.pt (as trained)':<28}" + " ".join(f"{best[c]:>15.4f}" for c in pooled))
    print(json.dumps({"cv": str(cv), "final_weights_pooled_dice": {k: round(v, 4) for k, v in pooled.items()}}))
    return pooled


def _pool(per_case: dict, cfg) -> dict:
    """Mean Dice per class over all out-of-fold cases, and their mean."""
    labels = {str(k): v for k, v in cfg.labels.items() if k}
    pooled = {labels[c]: float(np.nanmean([d[c] for d in per_case.values()])) for c in labels}
    pooled["mean"] = float(np.mean(list(pooled.values())))
    return pooled


def cv_ensemble(cvs: list[Path], data: Path, device: str) -> dict:
    """Pooled out-of-fold Dice of the per-fold ensemble of several cross-validations over the same folds:
    the mean of the probabilities every run stored for fold I's held-out cases ('train --save-probabilities'),
    or else fold I of every run (final weights) packed into one model that predicts those cases."""
    from medseg.core.config import load_config
    from medseg.preprocessing.datasets import kfold_split, training_pool
    from medseg.inference.probabilities import SUFFIX
    from medseg.training.crossval import pool_and_choose_postprocessing, pooled_dice, read_fold_pairs

    folds = _fold_dirs(cvs[0])
    tag = "ensemble_" + "_".join(cv.name for cv in cvs[1:])
    done, pairs, how, starts = [], [], set(), []
    for fdir in folds:
        for cv in cvs:
            if (cv / RECORD_TABLE).is_file() and not (cv / fdir.name / "validation").is_dir():
                missing = cv / fdir.name / "validation" / f"{_held_out(cv / fdir.name)[0]}.probs.npz"
                raise SystemExit(f"error: {missing} not found: {cv} is a record of figures, its predictions and "
                                 f"probabilities were not kept; regenerate them with '{_regenerate(cv)}' and pass "
                                 f"{_regenerated(cv)} instead (benchmarks/records/README.md)")
        if not all((cv / fdir.name / "validation" / "dice.json").is_file() for cv in cvs):
            print(f"{fdir.name}: not finished in every run yet, left out")
            continue
        done.append(fdir.name)
        starts.append(len(pairs))  # this fold's pairs start here
        cfg = load_config(fdir / "config.yaml", [f"data.root={data}"])
        _, val_cases = kfold_split(training_pool(cfg.data), cfg.data.folds, cfg.data.fold, cfg.data.seed)
        stored = [[cv / fdir.name / "validation" / f"{c.name}{SUFFIX}" for cv in cvs] for c in val_cases]
        if all(p.is_file() for paths in stored for p in paths):  # kept by 'train --save-probabilities'
            pairs += _ensemble_stored_fold(val_cases, stored)
            how.add("stored out-of-fold probabilities averaged")
            continue
        if not ((fdir / tag / "dice.json").is_file() and (fdir / f"{tag}.pt").is_file()):  # else reused
            _predict_ensemble_fold(cvs, fdir, tag, cfg, device)
        pairs += read_fold_pairs(fdir / tag, val_cases, fix=f"delete {fdir / tag} and run this again")
        how.add("fold models packed into one ensemble, final weights")
    if not done:
        print("no fold finished in every run")
        return {}
    pooled = pooled_dice(pairs, cfg)
    first = [_first_fold_config(cv) for cv in cvs]
    row = {"name": "ensemble of " + " + ".join(cv.name for cv in cvs), "recipe": " + ".join(map(_recipe, first)),
           "cases": len(pairs), "folds": _folds_key(first[0]), "pooled": pooled, "post": pooled,
           "complete": len(done) == cfg.data.folds,  # every fold the config splits into, not only those on disk
           "per_fold": {}}
    print(f"per-fold ensemble of {', '.join(map(str, cvs))}: {len(done)} of {cfg.data.folds} folds, {len(pairs)} cases, "
          f"{' / '.join(sorted(how))}, TTA {'on' if cfg.inference.tta else 'off'} (as {cvs[0]} predicted)")
    print(f"{'':<28}" + " ".join(f"{c + ' Dice':>15}" for c in pooled if c != "mean") + f" {'mean Dice':>10}")
    per_fold = row["per_fold"] = {name: pooled_dice(pairs[a:b], cfg)
                                  for name, a, b in zip(done, starts, starts[1:] + [len(pairs)])}
    for name, dice in per_fold.items():
        print(f"{name + ', ensemble':<28}" + " ".join(f"{v:>15.4f}" for v in dice.values()))
    print(f"{'pooled, ensemble':<28}" + " ".join(f"{v:>15.4f}" for v in pooled.values()))
    result = {"cv_ensemble": [str(c) for c in cvs], "pooled_dice": {k: round(v, 4) for k, v in pooled.items()},
              "fold_mean_dice": {name: round(dice["mean"], 4) for name, dice in per_fold.items()}}
    if row["complete"]:  # postprocessing chosen on the ensemble's own out-of-fold predictions
        _, chosen, post, _ = pool_and_choose_postprocessing(pairs, cfg)
        name = f"pooled + {'+'.join(chosen) or 'no postprocessing'}"[:28]
        print(f"{name:<28}" + " ".join(f"{post[c]:>15.4f}" for c in pooled))
        result.update(postprocess=chosen, pooled_dice_postprocessed=post)
        row["post"] = post
    print(json.dumps(result))
    return row


def _ensemble_stored_fold(cases: list, stored: list[list[Path]]) -> list:
    """``(prediction, reference)`` pairs from the mean of each case's stored probabilities, on the case's grid."""
    from medseg.inference.probabilities import ensemble_labels
    from medseg.io import load_volume

    pairs = []
    for case, paths in zip(cases, stored):
        vol = load_volume(case.image)
        pred = ensemble_labels(paths, vol.affine, vol.shape)
        pairs.append((pred, np.rint(load_volume(case.label).array).astype(np.int64)))
    return pairs


def _predict_ensemble_fold(cvs: list[Path], fdir: Path, tag: str, cfg, device: str) -> None:
    """Pack fold ``fdir.name`` of every run in ``cvs`` into ``fdir/tag.pt`` and predict the fold's held-out cases."""
    from medseg.models.checkpoint import pack
    from medseg.training.crossval import predict_fold_validation

    split = _held_out(fdir)
    for cv in cvs[1:]:
        if _held_out(cv / fdir.name) != split:
            raise SystemExit(f"{cv / fdir.name} holds out other cases than {fdir}: not the same folds")
    for cv in cvs:
        if not (cv / fdir.name / "last.pt").is_file():
            raise SystemExit(f"error: {cv / fdir.name / 'last.pt'} not found, nor the probabilities of the fold's "
                             f"held-out cases: regenerate them with '{_regenerate(cv)}' and pass "
                             f"{_regenerated(cv)} instead")
    pack([cv / fdir.name / "last.pt" for cv in cvs], fdir / f"{tag}.pt")
    predict_fold_validation(cfg, fdir, device=device, progress=False, checkpoint=f"{tag}.pt", out_name=tag)


def _held_out(fdir: Path) -> list[str]:
    """The cases fold ``fdir`` held out (its ``split.json``)."""
    return json.loads((fdir / "split.json").read_text())["validation"]


def _regenerate(cv: Path) -> str:
    """The command that trains the run ``cv`` again (its first fold's resolved config, every fold) and keeps its
    held-out predictions and probabilities, into ``runs/NAME``."""
    first = _fold_dirs(cv)[0]
    folds = _first_fold_config(cv)["data"]["folds"]
    return (f"medseg train {first / 'config.yaml'} --folds {folds} --save-probabilities "
            f"--set train.output_dir={_regenerated(cv)}")


def _regenerated(cv: Path) -> Path:
    """Where :func:`_regenerate` trains: ``runs/NAME``, or ``runs/NAME_probs`` when that is ``cv`` itself
    (its finished folds would be skipped)."""
    out = Path("runs") / cv.name
    return out.with_name(f"{cv.name}_probs") if out.resolve() == cv.resolve() else out


def print_cv(cv: Path) -> None:
    """Per-fold and pooled out-of-fold Dice of a 'medseg train --folds' folder, as a table."""
    summary = json.loads((cv / "cv_summary.json").read_text())
    pooled, post = summary["pooled_dice"], summary["pooled_dice_postprocessed"]
    classes = [k for k in pooled if k != "mean"]
    print(f"cross-validation {cv}: {summary['folds']} folds, {summary['cases']} cases (out-of-fold predictions)")
    print(f"{'':<28}" + " ".join(f"{c + ' Dice':>15}" for c in classes) + f" {'mean Dice':>10}")
    rows = [(f"fold {f}", d) for f, d in sorted(summary["fold_dice"].items(), key=lambda kv: int(kv[0]))]
    rows += [("pooled", pooled), (f"pooled + {'+'.join(summary['postprocess'] or {}) or 'no postprocessing'}"[:28], post)]
    for name, d in rows:
        print(f"{name:<28}" + " ".join(f"{d[c]:>15.4f}" for c in classes) + f" {d['mean']:>10.4f}")


def _fold_dirs(cv: Path) -> list[Path]:
    """The ``fold_I`` folders of a 'medseg train --folds' run, in fold order."""
    return sorted((p for p in cv.glob("fold_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))


def _first_fold_config(cv: Path) -> dict:
    """The resolved config of a run's first fold on disk (every fold shares it but for ``data.fold``)."""
    import yaml

    return yaml.safe_load((_fold_dirs(cv)[0] / "config.yaml").read_text())


def _recipe(cfg: dict) -> str:
    m = cfg["model"]
    width = f" {m['channels'][0]}-{m['channels'][-1]}" if m.get("channels") else ""
    recipe = f"{m['name']}{width} {cfg['train']['epochs']} ep"
    if (cfg["train"].get("amp_dtype") or "") == "bf16":
        recipe += " bf16"
    if (cfg.get("inference") or {}).get("tta"):
        recipe += ", TTA"
    return recipe


def _folds_key(cfg: dict) -> tuple:
    """What decides a cross-validation's folds: data folder, seed, set-aside share and fold count."""
    d = cfg["data"]
    return Path(d["root"]).name, d.get("seed"), d.get("test_fraction"), d.get("folds")


def compare_cv(cvs: list[Path], extra: list[dict] = ()) -> None:
    """Pooled out-of-fold Dice of several cross-validations (and finished --cv-ensemble rows) in one table, each
    against the first one; a gain is printed only over the same folds (same data, seed, set-aside share, K)."""
    print(f"cross-validated recipes, pooled out-of-fold Dice (gain against {cvs[0]})")
    rows = []
    for cv in cvs:
        summary, cfg = json.loads((cv / "cv_summary.json").read_text()), _first_fold_config(cv)
        rows.append({"name": cv.name, "recipe": _recipe(cfg), "cases": summary["cases"], "folds": _folds_key(cfg),
                     "pooled": summary["pooled_dice"], "post": summary["pooled_dice_postprocessed"]})
    rows += list(extra)
    base = rows[0]
    classes = [k for k in base["pooled"] if k != "mean"]
    print(f"{'folder':<32} {'recipe':<44} {'cases':>5} " + " ".join(f"{c + ' Dice':>15}" for c in classes)
          + f" {'mean Dice':>10} {'+postproc':>10} {'gain':>7}")
    for r in rows:
        same = r["cases"] == base["cases"] and r["folds"] == base["folds"]
        gain = f"{r['pooled']['mean'] - base['pooled']['mean']:>+7.4f}" if same else f"{'n/a':>7}"
        print(f"{r['name'][:32]:<32} {r['recipe'][:44]:<44} {r['cases']:>5} "
              + " ".join(f"{r['pooled'][c]:>15.4f}" for c in classes)
              + f" {r['pooled']['mean']:>10.4f} {r['post']['mean']:>10.4f} {gain}")


if __name__ == "__main__":
    sys.exit(main())
