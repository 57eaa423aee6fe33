"""The training loop: patches in, checkpoints out, resumable."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medseg.core.config import Config, to_dict
from medseg.models.checkpoint import save_config
from medseg.preprocessing.datasets import holdout_split, kfold_split, split_cases
from medseg.preprocessing.verify import check_training_inputs
from medseg.core.errors import CheckpointError, DataError
from medseg.inference.backends import TorchRunner
from medseg.inference.engine import channel_argmax, sliding_window_probs, window_size
from medseg.inference.predictor import on_foreground
from medseg.core.runtime import autocast, keep_freed_cpu_memory
from medseg.io.volume import atomic_write, remove_partial_files
from medseg.models.registry import build_model, get_spec
from medseg.models.checkpoint import (
    config_from_checkpoint,
    host_state,
    load_checkpoint,
    member_states,
    predict_states,
    save_checkpoint,
)
from medseg.training.distributed import DistContext
from medseg.training.distributed import barrier as dist_barrier
from medseg.training.distributed import sampler as dist_sampler
from medseg.training.distributed import setup as dist_setup
from medseg.training.distributed import teardown as dist_teardown
from medseg.training.distributed import wrap as dist_wrap


@dataclass
class TrainResult:
    output_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_metric: float
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list = field(default_factory=list)


class RegionLoss(torch.nn.Module):
    """Region-based training (nnU-Net's): the label map becomes one binary target per region, and each
    sigmoid output gets a soft Dice term plus (``dicece``) binary cross-entropy."""

    def __init__(self, regions, with_bce: bool = True, batch: bool = False) -> None:
        from monai.losses import DiceLoss

        super().__init__()
        self.regions = regions
        self.dice = DiceLoss(sigmoid=True, include_background=True, batch=batch)
        self.bce = torch.nn.BCEWithLogitsLoss() if with_bce else None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from medseg.core.regions import labels_to_regions

        target = labels_to_regions(labels, self.regions)
        loss = self.dice(logits, target)
        return loss + self.bce(logits.float(), target) if self.bce is not None else loss


def _loss(cfg: Config):
    from monai.losses import DiceCELoss, DiceLoss

    batch = bool(cfg.train.batch_dice)
    if cfg.regions:
        return RegionLoss(cfg.regions, with_bce=cfg.train.loss == "dicece", batch=batch)
    if cfg.train.loss == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=batch)
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=batch)


def make_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW, or SGD with Nesterov momentum 0.99 (nnU-Net's)."""
    if tc.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=0.99, nesterov=True,
                               weight_decay=tc.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)


def speed_settings(device: torch.device, tc, dims: int):
    """Speed settings of the training device; returns the memory format for 3D inputs and weights, or None.

    On CUDA: cuDNN benchmark when ``train.deterministic`` is off (``set_determinism`` turns it off), and
    channels-last when ``train.channels_last``. On the CPU: channels-last only under bf16 autocast
    (``train.amp_dtype: bf16``), where oneDNN's bf16 convolutions run 5-17% faster in it (fp32 gains nothing)."""
    if dims != 3 or not tc.channels_last:
        fmt = None
    elif device.type == "cuda":
        fmt = torch.channels_last_3d
    else:
        fmt = torch.channels_last_3d if (device.type == "cpu" and tc.amp and tc.amp_dtype == "bf16") else None
    if device.type == "cuda" and not tc.deterministic:
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    return fmt


def supervised_loss(loss_fn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss of one output, or of deep-supervision outputs stacked on dim 1 (weights 1, 1/2, 1/4... normalised)."""
    if out.ndim == y.ndim + 1:  # (B, heads, C, ...) from DynUNet with deep supervision
        weights = torch.tensor([0.5 ** i for i in range(out.shape[1])])
        weights = weights / weights.sum()
        return sum(w * loss_fn(out[:, i], y) for i, w in enumerate(weights.tolist()))
    return loss_fn(out, y)


def train_step(model: torch.nn.Module, opt, scaler, device: torch.device, amp: bool, compute_loss,
               clip: float = 12.0, amp_dtype: str | None = None) -> float:
    """One optimisation step shared by the volume and image trainers: forward and loss under
    autocast, scaled backward, gradient norm clipped to ``clip``, step; returns the loss."""
    opt.zero_grad(set_to_none=True)
    with autocast(device, amp, amp_dtype):
        loss = compute_loss()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    return float(loss.detach())


def grad_scaler(device: torch.device, tc, say=None) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on CUDA only (bf16 keeps fp32's exponent range and needs none).

    Checks ``train.amp_dtype`` and warns when bf16 is asked for on a CPU without native bf16."""
    from medseg.core.runtime import amp_dtype, cpu_has_fast_bf16

    dt = amp_dtype(tc.amp_dtype)
    if say and device.type == "cpu" and tc.amp and dt == torch.bfloat16 and not cpu_has_fast_bf16():
        say("warning: train.amp_dtype bf16 on a CPU without AMX or AVX-512 BF16: bf16 is emulated there and "
            "trains slower than fp32; set train.amp_dtype: fp16 to train in fp32 on this CPU")
    return torch.amp.GradScaler("cuda", enabled=(device.type == "cuda" and tc.amp and dt == torch.float16))


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice for classes 1..C-1 between integer maps; NaN where both are empty."""
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        denom = int(p.sum()) + int(g.sum())
        if denom:
            out[c - 1] = 2.0 * int((p & g).sum()) / denom
    return out


def _check_labels(label: torch.Tensor, cfg: Config, what: str) -> None:
    lo, hi = float(label.min()), float(label.max())
    if lo < 0 or hi >= cfg.num_classes:
        raise DataError(f"label values outside the configured labels in {what}",
                        expected=f"integers 0..{cfg.num_classes - 1} ({', '.join(cfg.labels.values())})",
                        found=f"values from {lo:g} to {hi:g}",
                        fix="fix the labels or the 'labels' mapping; 'medseg verify-data' lists the files")


def dice_per_region(probs: torch.Tensor, label: torch.Tensor, regions) -> np.ndarray:
    """Dice per region between sigmoid outputs (> 0.5) and the regions of an integer label map; NaN where both
    are empty."""
    from medseg.core.regions import region_masks

    out = np.full(len(regions), np.nan)
    for r, ref in enumerate(region_masks(label, regions)):
        p = probs[r] > 0.5
        denom = int(p.sum()) + int(ref.sum())
        if denom:
            out[r] = 2.0 * int((p & ref).sum()) / denom
    return out


def score_names(cfg: Config) -> list[str]:
    """What validation Dice is reported for: the regions, or the foreground labels."""
    return [r.name for r in cfg.regions] if cfg.regions else [cfg.labels.get(c, str(c)) for c in range(1, cfg.num_classes)]


def validate(model, val_ds, cfg: Config, device, dims: int) -> np.ndarray:
    """Mean Dice per class (or region) over the validation cases, predicted by the sliding window ``predict`` uses."""
    model.eval()
    runner = TorchRunner([model], device, amp=cfg.train.amp, amp_dtype=cfg.train.amp_dtype)
    scores = []
    for i in range(len(val_ds)):
        item = val_ds[i]
        image = item["image"]
        probs = on_foreground(cfg, image, lambda work: sliding_window_probs(  # cropped as predict crops
            runner, work, window_size(cfg, work.shape[1:], dims), num_classes=cfg.out_channels,
            overlap=cfg.inference.overlap, blend=cfg.inference.blend, sw_batch_size=cfg.inference.sw_batch_size,
            device=device, activation="sigmoid" if cfg.regions else "softmax"))
        label = torch.as_tensor(item["label"])[0].round().long()
        if cfg.regions:
            scores.append(dice_per_region(probs, label, cfg.regions))
        else:
            scores.append(dice_per_class(channel_argmax(probs).long(), label, cfg.num_classes))
    model.train()
    return np.nanmean(np.stack(scores), axis=0) if scores else np.array([])


class EMA:
    """Exponential moving average of a model's weights: ``avg = decay * avg + (1 - decay) * current``.

    Averaged weights generalise a little better than the last step's and make the
    best-epoch choice less noisy; they are what gets validated and saved.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        import copy

        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        avg_f, cur_f = [], []
        for avg, cur in zip(self.model.state_dict().values(), model.state_dict().values()):
            if avg.is_floating_point():
                avg_f.append(avg)
                cur_f.append(cur.detach())
            else:
                avg.copy_(cur)
        if avg_f:  # avg = decay * avg + (1 - decay) * cur, one fused launch for all tensors
            torch._foreach_lerp_(avg_f, cur_f, 1.0 - self.decay)


def _init_weights(model: torch.nn.Module, cfg: Config, path: Path) -> None:
    ck = load_checkpoint(path)
    if to_dict(config_from_checkpoint(ck, str(path)).model) != to_dict(cfg.model):
        raise CheckpointError("train.init_from holds a different model", path=path,
                              expected=str(to_dict(cfg.model)), found=str(ck["config"]["model"]),
                              fix="start from a checkpoint of the same model config, or drop train.init_from")
    model.load_state_dict(predict_states(ck)[0])


def _is_tty() -> bool:
    return sys.stderr.isatty()


def train(cfg: Config, *, resume: bool = False, progress: bool = True, log=None) -> TrainResult:
    """Train ``cfg`` and write ``best.pt``/``last.pt`` into ``cfg.train.output_dir``."""
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.utils import set_determinism
    from rich.console import Console

    from medseg.preprocessing.pipeline import train_transforms, val_transforms

    console = Console(stderr=True)
    ctx = DistContext.from_env()
    _say = log or (lambda msg: console.print(msg, highlight=False))

    def say(msg: str) -> None:  # only rank 0 talks in multi-process training
        if ctx.is_main:
            _say(msg)

    progress = progress and ctx.is_main
    tc = cfg.train
    out = Path(tc.output_dir)
    check_training_inputs(cfg, out)  # bad data or an output folder among the inputs: refused before any write
    out.mkdir(parents=True, exist_ok=True)
    remove_partial_files(out, ["last.pt", "best.pt", "history.json", "split.json", "config.yaml"])  # a killed run's
    last_path, best_path = out / "last.pt", out / "best.pt"
    if tc.threads:
        torch.set_num_threads(tc.threads)
    set_determinism(seed=tc.seed + ctx.rank)  # each process draws its own patches and augmentations
    device = dist_setup(ctx, tc.device)
    if device.type == "cpu":
        keep_freed_cpu_memory()  # a step's activations and gradients are reused, not faulted in again
    spec = get_spec(cfg.model.name)

    cases, held_out = holdout_split(cfg.data)
    if cfg.data.folds:
        train_cases, val_cases = kfold_split(cases, cfg.data.folds, cfg.data.fold, cfg.data.seed)
    else:
        train_cases, val_cases = split_cases(cases, cfg.data.val_fraction, cfg.data.seed)
    split = {"train": [c.name for c in train_cases], "validation": [c.name for c in val_cases],
             "test": [c.name for c in held_out]}
    if ctx.is_main:
        atomic_write(out / "split.json", lambda p: Path(p).write_text(json.dumps(split, indent=1)))
        save_config(cfg, out / "config.yaml")

    model = build_model(cfg.model, cfg.in_channels, cfg.out_channels).to(device)
    loss_fn = _loss(cfg)
    teacher = None
    if tc.teacher:
        from medseg.training.distill import DistillLoss, TeacherProbsd, load_teacher

        teacher = TeacherProbsd(load_teacher(cfg, device))
        loss_fn = DistillLoss(loss_fn, tc.distill, batch=bool(tc.batch_dice))
    opt = make_optimizer(model, tc)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=max(1, tc.epochs), power=0.9)
    scaler = grad_scaler(device, tc, say)
    start_epoch, best, best_epoch, history = 1, -1.0, 0, []
    if tc.init_from and not resume:
        _init_weights(model, cfg, Path(tc.init_from))
        say(f"starting from the weights of {tc.init_from}")
    ema = EMA(model, tc.ema) if tc.ema else None
    if resume:
        if not last_path.is_file():
            raise CheckpointError("nothing to resume", path=last_path, expected="a last.pt from an earlier run",
                                  fix="run without --resume, or point train.output_dir at the earlier run")
        ck = load_checkpoint(last_path)
        if to_dict(config_from_checkpoint(ck, str(last_path)).model) != to_dict(cfg.model) or ck["config"]["labels"] != dict(cfg.labels):
            raise CheckpointError("cannot resume: the model or labels in the config changed", path=last_path,
                                  expected=str(ck["config"]["model"]), found=str(to_dict(cfg.model)),
                                  fix="resume with the same config, or train into a new train.output_dir")
        model.load_state_dict(member_states(ck)[0])
        saved_opt = (ck["config"].get("train") or {}).get("optimizer", "adamw")
        if saved_opt != tc.optimizer:
            raise CheckpointError("cannot resume: train.optimizer changed", path=last_path, expected=saved_opt,
                                  found=tc.optimizer, fix=f"resume with train.optimizer={saved_opt}, or train into "
                                  "a new train.output_dir (train.init_from starts from its weights)")
        if "optimizer" in ck:
            opt.load_state_dict(ck["optimizer"])
        if "scheduler" in ck:
            sched.load_state_dict(ck["scheduler"])
            if sched.total_iters != max(1, tc.epochs):  # train.epochs changed: decay to zero at the new end
                say(f"learning-rate schedule now ends at epoch {tc.epochs} (was {sched.total_iters})")
                sched.total_iters = max(1, tc.epochs)
        if ema is not None and "ema_state_dict" in ck:
            ema.model.load_state_dict(ck["ema_state_dict"])
        start_epoch = int(ck["epoch"]) + 1
        best = float(ck.get("best_metric") or -1.0)
        best_epoch = int(ck.get("best_epoch", 0))
        history = list(ck.get("history", []))
        say(f"resuming at epoch {start_epoch} of {tc.epochs} (best mean Dice so far {best:.4f})")

    cache = CacheDataset if cfg.data.cache else Dataset
    kw = {"cache_rate": 1.0, "num_workers": max(1, tc.num_workers), "progress": False} if cfg.data.cache else {}
    t0 = time.time()
    train_ds = cache([c.as_dict() for c in train_cases], transform=train_transforms(cfg, teacher), **kw)
    val_ds = cache([c.as_dict() for c in val_cases], transform=val_transforms(cfg), **kw) if val_cases else None
    train_sampler = dist_sampler(train_ds, ctx, tc.seed)
    loader = DataLoader(train_ds, batch_size=tc.batch_size, shuffle=train_sampler is None, sampler=train_sampler,
                        num_workers=tc.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=tc.num_workers > 0,  # no new loader processes every epoch
                        drop_last=len(train_ds) > tc.batch_size * ctx.world_size)
    fmt = speed_settings(device, tc, spec.dims)
    if fmt is not None:
        model.to(memory_format=fmt)
    net = dist_wrap(model, ctx, device)  # DDP averages gradients across processes; `model` stays the plain module
    say(f"{len(train_cases)} training / {len(val_cases)} validation cases; data ready in {time.time() - t0:.1f} s"
        + (f" (with the probabilities of teacher {Path(tc.teacher).name})" if teacher is not None else "") + "; "
        f"device {device}; model {cfg.model.name} ({sum(p.numel() for p in model.parameters()):,} parameters)"
        + (f"; {ctx.world_size} processes" if ctx.enabled else ""))

    from medseg.core.progress import progress_bar

    t_start = time.time() - (history[-1]["elapsed_s"] if history else 0.0)
    epoch = start_epoch - 1
    with progress_bar("train", total=tc.epochs, enabled=progress, completed=start_epoch - 1) as advance:
        model.train()
        for epoch in range(start_epoch, tc.epochs + 1):
            losses = []
            if train_sampler is not None:
                train_sampler.set_epoch(epoch)
            for batch in loader:
                _check_labels(batch["label"], cfg, "a training batch")  # on the host: no device sync
                x = batch["image"].to(device, non_blocking=True)
                y = batch["label"].to(device, non_blocking=True)
                if teacher is not None:  # the label and the teacher's probabilities travel as one target
                    y = torch.cat([y, batch["soft"].to(device, non_blocking=True)], dim=1)
                if fmt is not None:
                    x = x.contiguous(memory_format=fmt)
                loss = train_step(model, opt, scaler, device, tc.amp,
                                  lambda: supervised_loss(loss_fn, net(x), y),  # noqa: B023 - called at once
                                  amp_dtype=tc.amp_dtype)
                if ema is not None:
                    ema.update(model)
                losses.append(loss)
            sched.step()
            record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                      "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t_start, 1)}
            if not ctx.is_main:
                continue
            if val_ds is not None and (epoch % tc.val_every == 0 or epoch == tc.epochs):
                for j in range(len(val_ds)):
                    _check_labels(torch.as_tensor(val_ds[j]["label"]), cfg, f"validation case {val_cases[j].name}")
                dice = validate(ema.model if ema else model, val_ds, cfg, device, spec.dims)
                model.train()
                record["val_dice"] = {name: round(float(d), 4) for name, d in zip(score_names(cfg), dice)}
                record["val_mean_dice"] = round(float(np.nanmean(dice)), 4)
                if record["val_mean_dice"] > best:
                    best, best_epoch = record["val_mean_dice"], epoch
                if best_epoch == epoch and tc.keep == "best":
                    save_checkpoint(best_path, model=ema.model if ema else model, cfg=cfg, epoch=epoch, best_metric=best,
                                    best_epoch=best_epoch, split=split, val_dice=record["val_dice"])
            history.append(record)
            if epoch % tc.checkpoint_every == 0 or epoch == tc.epochs:
                save_checkpoint(last_path, model=model, cfg=cfg, epoch=epoch, best_metric=best, best_epoch=best_epoch,
                                optimizer=opt.state_dict(), scheduler=sched.state_dict(), history=history, split=split,
                                **({"ema_state_dict": host_state(ema.model.state_dict())}
                                   if ema else {}))
                atomic_write(out / "history.json", lambda p: Path(p).write_text(json.dumps(history, indent=1)))
            desc = f"loss {record['loss']:.4f}"
            if "val_mean_dice" in record:
                desc += f" · val Dice {record['val_mean_dice']:.4f} (best {best:.4f} @ {best_epoch})"
            advance(desc)
            if not _is_tty() or "val_mean_dice" in record:
                say(f"epoch {epoch}/{tc.epochs} {desc} · {record['elapsed_s']:.0f} s")
    dist_barrier(ctx)
    dist_teardown(ctx)
    if (val_ds is None or tc.keep == "last") and ctx.is_main:
        # no validation split, or train.keep: last: best.pt holds the final weights (also after a no-op resume,
        # in case a kill came between the last epoch's last.pt and this write)
        final = history[-1] if history else {}
        save_checkpoint(best_path, model=ema.model if ema else model, cfg=cfg, epoch=epoch,
                        best_metric=final.get("val_mean_dice"), best_epoch=epoch, split=split,
                        **({"val_dice": final["val_dice"]} if "val_dice" in final else {}))
        if tc.keep == "last":
            best, best_epoch = final.get("val_mean_dice", -1.0), epoch
    return TrainResult(out, best_path, last_path, best, best_epoch, epoch - start_epoch + 1,
                       time.time() - t_start, history)
