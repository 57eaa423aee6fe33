"""K-fold cross-validation: train each fold, predict its held-out cases, pool, choose postprocessing.

Layout of ``train.output_dir`` after ``medseg train CONFIG --folds 5``::

    fold_0/ ... fold_4/        best.pt, last.pt, history.json, split.json of each fold
    fold_K/validation/*.nii.gz out-of-fold predictions on each case's own grid
    cv_summary.json            per-fold and pooled Dice, the postprocessing trial results
    postprocess.json           the chosen postprocessing (used by 'medseg pack-model DIR')

Folds can run as separate jobs (``--fold I``); the summary is written once every fold is done.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.core.config import Config
from medseg.preprocessing.datasets import kfold_split, training_pool
from medseg.core.errors import CheckpointError, DataError, InputNotFoundError
from medseg.inference.probabilities import SUFFIX as PROBS_SUFFIX
from medseg.preprocessing.pipeline import load_case_image
from medseg.io.volume import atomic_write, load_volume, save_volume
from medseg.inference.postprocess import apply_postprocessing
from medseg.evaluation.choose import choose_postprocessing, mean_dice_per_class, mean_dice_per_region


@dataclass
class CVResult:
    output_dir: Path
    folds_done: list[int]
    fold_dice: dict[int, dict[str, float]] = field(default_factory=dict)
    pooled: dict[str, float] | None = None
    pooled_postprocessed: dict[str, float] | None = None
    postprocess: dict[str, list[int]] | None = None

    @property
    def complete(self) -> bool:
        return self.pooled is not None


def fold_config(cfg: Config, folds: int, fold: int) -> Config:
    out = copy.deepcopy(cfg)
    out.data.folds, out.data.fold = folds, fold
    out.train.output_dir = str(Path(cfg.train.output_dir) / f"fold_{fold}")
    out.validate()
    return out


def _write_json(path: Path, data) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=1)))


def predict_fold_validation(cfg: Config, fold_dir: Path, *, device: str = "auto", progress: bool = True,
                            checkpoint: str = "best.pt", out_name: str = "validation",
                            save_probabilities: bool = False) -> dict:
    """Predict every validation case of a fold with its ``checkpoint`` (``best.pt``; ``last.pt`` = the final
    weights, EMA when kept) into ``fold_dir/out_name``, on the case's own grid; Dice per case.
    ``save_probabilities``: also keep each case's probabilities (``CASE.probs.npz``), to ensemble later."""
    from medseg.inference.predictor import Predictor
    from medseg.core.progress import progress_bar

    ck_path = fold_dir / checkpoint
    if not ck_path.is_file():
        raise CheckpointError(f"fold has no {checkpoint}", path=ck_path, expected="a finished fold",
                              fix="train the fold first: medseg train CONFIG --folds N --fold I")
    _, val_cases = kfold_split(training_pool(cfg.data), cfg.data.folds, cfg.data.fold, cfg.data.seed)
    predictor = Predictor(ck_path, device=device)
    out_dir = fold_dir / out_name
    out_dir.mkdir(exist_ok=True)
    classes = [c for c in cfg.labels if c]
    cases = {}
    with progress_bar(f"validate fold {cfg.data.fold}", total=len(val_cases), enabled=progress) as advance:
        for case in val_cases:
            vol = load_case_image(case.image, cfg.channel_names, cfg.reference_channel, case.name)
            pred = predictor.predict_volume(vol, probabilities_to=out_dir / f"{case.name}{PROBS_SUFFIX}"
                                            if save_probabilities else None)
            save_volume(pred, out_dir / f"{case.name}.nii.gz", reference=vol)
            ref = load_volume(case.label).array
            pair = [(np.asarray(pred.array), np.rint(ref).astype(np.int64))]
            if cfg.regions:
                cases[case.name] = mean_dice_per_region(pair, cfg.regions)
            else:
                d = mean_dice_per_class(pair, classes)
                cases[case.name] = {str(c): d[c] for c in classes}
            advance()
    _write_json(out_dir / "dice.json", cases)
    return cases


def pooled_dice(pairs: list, cfg: Config) -> dict[str, float]:
    """Mean Dice per label name (per region for a region model) over ``(prediction, reference)`` pairs, and
    their mean (4 decimals)."""
    if cfg.regions:
        d = mean_dice_per_region(pairs, cfg.regions)
        out = {k: round(float(v), 4) for k, v in d.items()}
        out["mean"] = round(float(np.nanmean(list(d.values()))), 4)
        return out
    d = mean_dice_per_class(pairs, [c for c in cfg.labels if c])
    out = {cfg.labels.get(c, str(c)): round(float(v), 4) for c, v in d.items()}
    out["mean"] = round(float(np.nanmean(list(d.values()))), 4)
    return out


def read_fold_pairs(pred_dir: Path, cases: list, *, fix: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(prediction, reference)`` label arrays of ``cases`` from the out-of-fold predictions in ``pred_dir``."""
    pairs = []
    for case in cases:
        pred_path = pred_dir / f"{case.name}.nii.gz"
        if not pred_path.is_file():
            raise InputNotFoundError("out-of-fold prediction missing", path=pred_path,
                                     expected="one prediction per validation case", fix=fix)
        pred = np.asarray(load_volume(pred_path).array).astype(np.int64)
        ref = np.rint(load_volume(case.label).array).astype(np.int64)
        if pred.shape != ref.shape:
            raise DataError("prediction and label grids differ", path=pred_path, expected=str(ref.shape),
                            found=str(pred.shape), fix="delete the fold's prediction folder and predict it again")
        pairs.append((pred, ref))
    return pairs


def pool_and_choose_postprocessing(pairs: list, cfg: Config) -> tuple[dict, dict, dict, list]:
    """Pooled Dice of all out-of-fold ``pairs``, the postprocessing that helps on them, the pooled Dice after it
    and the trial report (as nnU-Net chooses it: on the cross-validation predictions, never on a test set)."""
    classes = [c for c in cfg.labels if c]
    if cfg.regions:  # the written labels, scored as regions
        classes = sorted(set(cfg.region_values()))
        chosen, report = choose_postprocessing(pairs, classes, score=lambda ps: mean_dice_per_region(ps, cfg.regions))
    else:
        chosen, report = choose_postprocessing(pairs, classes)
    post_pairs = [(apply_postprocessing(p, chosen), r) for p, r in pairs]
    trials = [{**t, "dice": {str(c): round(v, 5) for c, v in t["dice"].items()}} for t in report["trials"]]
    return pooled_dice(pairs, cfg), chosen, pooled_dice(post_pairs, cfg), trials


def summarize(cfg: Config, folds: int) -> CVResult:
    """Pool the out-of-fold predictions of all finished folds; choose postprocessing when all are done."""
    base = Path(cfg.train.output_dir)
    res = CVResult(base, [])
    pairs_by_fold = {}
    pool = training_pool(cfg.data)  # discovered once, not per fold
    for f in range(folds):
        fcfg = fold_config(cfg, folds, f)
        vdir = Path(fcfg.train.output_dir) / "validation"
        if not (vdir / "dice.json").is_file():
            continue
        _, val_cases = kfold_split(pool, folds, f, cfg.data.seed)
        pairs = read_fold_pairs(vdir, val_cases, fix=f"re-run: medseg train CONFIG --folds {folds} --fold {f} --resume")
        pairs_by_fold[f] = pairs
        res.folds_done.append(f)
        res.fold_dice[f] = pooled_dice(pairs, cfg)
    if len(res.folds_done) < folds:
        return res
    pooled = [p for f in range(folds) for p in pairs_by_fold[f]]
    res.pooled, res.postprocess, res.pooled_postprocessed, trials = pool_and_choose_postprocessing(pooled, cfg)
    summary = {
        "folds": folds, "cases": len(pooled),
        "fold_dice": {str(f): d for f, d in res.fold_dice.items()},
        "pooled_dice": res.pooled, "pooled_dice_postprocessed": res.pooled_postprocessed,
        "postprocess": res.postprocess,
        "postprocess_trials": trials,
    }
    _write_json(base / "cv_summary.json", summary)
    _write_json(base / "postprocess.json", res.postprocess)
    return res


def train_folds(cfg: Config, folds: int, *, only: int | None = None, resume: bool = False,
                progress: bool = True, log=None, save_probabilities: bool = False) -> CVResult:
    """Train folds ``0..folds-1`` (or only ``only``), predict their validation cases, then summarize.
    ``save_probabilities``: keep the held-out cases' probabilities too, so that this run can be ensembled
    with another over the same folds without their weights (``benchmarks/hippocampus.py --cv-ensemble``)."""
    from medseg.training.trainer import train

    if folds < 2:
        raise DataError("cross-validation needs at least 2 folds", found=str(folds), fix="e.g. --folds 5")
    if only is not None and not 0 <= only < folds:
        raise DataError("fold out of range", expected=f"0..{folds - 1}", found=str(only), fix=f"--fold 0..{folds - 1}")
    from medseg.training.distributed import DistContext

    ctx = DistContext.from_env()
    if ctx.enabled and only is None:
        raise DataError("under torchrun, train one fold per launch", expected="--folds K --fold I",
                        found=f"--folds {folds} without --fold", fix="launch torchrun once per fold with --fold I")
    say = log or print
    for f in ([only] if only is not None else range(folds)):
        fcfg = fold_config(cfg, folds, f)
        fdir = Path(fcfg.train.output_dir)
        if (fdir / "validation" / "dice.json").is_file():
            say(f"fold {f}: already done")
            continue
        last = fdir / "last.pt"
        say(f"fold {f} of {folds}")
        train(fcfg, resume=resume and last.is_file(), progress=progress, log=log)
        if ctx.is_main:  # rank 0 predicts the fold's held-out cases
            predict_fold_validation(fcfg, fdir, device=fcfg.train.device, progress=progress,
                                    save_probabilities=save_probabilities)
    return summarize(cfg, folds) if ctx.is_main else CVResult(Path(cfg.train.output_dir), [])
