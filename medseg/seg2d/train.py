"""Training loop for 2D image segmentation (``task: image2d``): random crops in, checkpoints out.

Images are RGB, scaled to [0, 1] and normalised with ImageNet's mean and std. Training
samples are random crops of ``patch.size`` after a random rescale (``augment.scale``), with
flips along ``augment.flip_axes`` (0 up-down, 1 left-right) and brightness/contrast jitter.
Validation runs on whole images and reports per-class IoU pooled over the validation set;
``best.pt`` keeps the weights with the best mean IoU. Checkpoints are the same format as
for volumes (weights, resolved config, labels), so ``medseg predict`` needs only the file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medseg.core.config import Config, to_dict
from medseg.models.checkpoint import save_config
from medseg.seg2d.images import (
    Image2DData,
    Sample,
    discover_images2d,
    read_image,
    read_mask,
    to_tensor,
)
from medseg.core.errors import CheckpointError, DataError
from medseg.seg2d.evaluation import confusion_matrix, iou_per_class
from medseg.core.runtime import autocast, resolve_device
from medseg.io.volume import atomic_write
from medseg.models.registry import build_model
from medseg.models.checkpoint import load_checkpoint, member_states, save_checkpoint
from medseg.training.trainer import TrainResult, grad_scaler, make_optimizer, train_step


TrainResult2D = TrainResult  # same fields as a volume training run


DEFAULT_LABELS = {0: "background", 1: "foreground"}


def adopt_dataset_classes(cfg: Config, data: Image2DData) -> bool:
    """A config that leaves ``labels`` at the default takes the dataset's classes and colours."""
    if data.classes and dict(cfg.labels) == DEFAULT_LABELS and data.classes != DEFAULT_LABELS:
        cfg.labels = dict(data.classes)
        if cfg.colors is None and data.colors:
            cfg.colors = {k: list(v) for k, v in data.colors.items()}
        return True
    if cfg.colors is None and data.colors and set(data.colors) >= set(cfg.labels):
        cfg.colors = {k: list(v) for k, v in data.colors.items() if k in cfg.labels}
    return False


class ImagePairs(torch.utils.data.Dataset):
    """(image, mask) tensors; random crops and augmentation when ``train`` is true."""

    def __init__(self, samples: list[Sample], data: Image2DData, cfg: Config, train: bool) -> None:
        self.samples, self.data, self.cfg, self.train = samples, data, cfg, train

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[i]
        img, mask = read_image(s.image), read_mask(s.mask, self.data)
        if img.shape[:2] != mask.shape:
            from medseg.core.errors import GeometryError

            raise GeometryError("image and mask sizes differ", path=s.mask,
                                expected=f"{img.shape[1]}x{img.shape[0]} pixels like {s.image.name}",
                                found=f"{mask.shape[1]}x{mask.shape[0]}", fix="re-export the mask at the image's size")
        bad = (mask != self.data.ignore_index) & ((mask < 0) | (mask >= self.cfg.num_classes))
        if bad.any():
            vals = sorted(set(np.unique(mask[bad]).tolist()))[:5]
            raise DataError("mask values outside the configured labels", path=s.mask,
                            expected=f"0..{self.cfg.num_classes - 1} or {self.data.ignore_index} (ignored)",
                            found=f"values {vals}", fix="fix the 'labels' mapping in the config, or the mask")
        return img, mask

    def __getitem__(self, i: int):
        img, mask = self.load(i)
        x, y = to_tensor(img), torch.from_numpy(mask)
        if self.train:
            x, y = augment(x, y, self.cfg, self.data.ignore_index)
        return x, y


def augment(x: torch.Tensor, y: torch.Tensor, cfg: Config, ignore: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rescale, crop (padding with ignore where the image is smaller), flips, brightness/contrast."""
    aug = cfg.augment
    ph, pw = cfg.patch.size
    if aug.enabled and aug.scale > 0 and torch.rand(()) < max(aug.affine_prob, 0.5):
        s = float(torch.empty(()).uniform_(1 - aug.scale, 1 + aug.scale))
        h, w = max(1, round(x.shape[1] * s)), max(1, round(x.shape[2] * s))
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        y = F.interpolate(y[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    h, w = x.shape[1:]
    if h < ph or w < pw:
        pad = (0, max(0, pw - w), 0, max(0, ph - h))
        x = F.pad(x, pad, value=0.0)
        y = F.pad(y, pad, value=ignore)
        h, w = x.shape[1:]
    top, left = int(torch.randint(0, h - ph + 1, ())), int(torch.randint(0, w - pw + 1, ()))
    x, y = x[:, top:top + ph, left:left + pw], y[top:top + ph, left:left + pw]
    if aug.enabled:
        for axis in aug.flip_axes:
            if torch.rand(()) < aug.flip_prob:
                x, y = x.flip(1 + axis), y.flip(axis)
        if torch.rand(()) < aug.intensity_prob:
            x = x * (1 + float(torch.empty(()).uniform_(-aug.intensity_scale, aug.intensity_scale))) \
                + float(torch.empty(()).uniform_(-aug.intensity_shift, aug.intensity_shift)) / 0.226
        if torch.rand(()) < aug.noise_prob:
            x = x + torch.randn_like(x) * aug.noise_std / 0.226
    return x.contiguous(), y.contiguous()


def segmentation_loss(logits: torch.Tensor, y: torch.Tensor, kind: str, ignore: int) -> torch.Tensor:
    """Cross-entropy (ignoring ``ignore``), soft Dice over the classes present, or their sum (``dicece``)."""
    loss = logits.new_zeros(())
    if kind in ("ce", "dicece"):
        loss = loss + F.cross_entropy(logits.float(), y, ignore_index=ignore)
    if kind in ("dice", "dicece"):
        valid = (y != ignore).unsqueeze(1)
        probs = logits.float().softmax(1) * valid
        onehot = F.one_hot(torch.where(valid[:, 0], y, 0), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
        inter = (probs * onehot).sum((0, 2, 3))
        denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        present = onehot.sum((0, 2, 3)) > 0
        dice = (2 * inter + 1e-5) / (denom + 1e-5)
        loss = loss + (1 - dice[present]).mean() if present.any() else loss
    return loss


def pad_to(x: torch.Tensor, multiple: int = 32) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) on the bottom/right to a multiple of ``multiple`` (edge values, no new content)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


@torch.no_grad()
def logits_2d(model: torch.nn.Module, x: torch.Tensor, device: torch.device, amp: bool = True,
              amp_dtype: str | None = None) -> torch.Tensor:
    """Whole-image logits (B, C, H, W) on the CPU, for inputs of any size."""
    xp, (h, w) = pad_to(x.to(device))
    with autocast(device, amp, amp_dtype):
        out = model(xp)
    return out[..., :h, :w].float().cpu()


def validate_2d(model, ds: ImagePairs, cfg: Config, device) -> np.ndarray:
    model.eval()
    n = cfg.num_classes
    cm = np.zeros((n, n), np.int64)
    for i in range(len(ds)):
        x, y = ds[i]
        pred = logits_2d(model, x[None], device, cfg.train.amp, cfg.train.amp_dtype)[0].argmax(0).numpy()
        cm += confusion_matrix(pred, y.numpy(), n, ds.data.ignore_index)
    model.train()
    return iou_per_class(cm)


def train_2d(cfg: Config, *, resume: bool = False, progress: bool = True, log=None) -> TrainResult2D:
    """Train a 2D image model on ``cfg.data`` and write ``best.pt``/``last.pt`` to ``cfg.train.output_dir``."""
    from rich.console import Console

    from medseg.models.nets2d import load_weights
    from medseg.core.progress import progress_bar

    console = Console(stderr=True)
    say = log or (lambda msg: console.print(msg, highlight=False, markup=False))
    tc = cfg.train
    data = discover_images2d(cfg.data, cfg.colors)
    if adopt_dataset_classes(cfg, data):
        say(f"{data.layout} layout: {len(cfg.labels)} classes from the dataset ({', '.join(list(cfg.labels.values())[:6])}"
            + (", ..." if len(cfg.labels) > 6 else "") + ")")
    out = Path(tc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    device = resolve_device(tc.device)
    split = {"train": [s.name for s in data.train], "validation": [s.name for s in data.val]}
    atomic_write(out / "split.json", lambda p: Path(p).write_text(json.dumps(split, indent=1)))
    save_config(cfg, out / "config.yaml")

    model = build_model(cfg.model, 3, cfg.num_classes).to(device)
    opt = make_optimizer(model, tc)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=max(1, tc.epochs), power=0.9)
    scaler = grad_scaler(device, tc, say)
    start_epoch, best, best_epoch, history = 1, -1.0, 0, []
    if resume:
        if not last_path.is_file():
            raise CheckpointError("nothing to resume", path=last_path, expected="a last.pt from an earlier run",
                                  fix="run without --resume, or point train.output_dir at the earlier run")
        ck = load_checkpoint(last_path)
        if ck["config"]["model"] != to_dict(cfg.model) or ck["config"]["labels"] != dict(cfg.labels):
            raise CheckpointError("cannot resume: the model or labels in the config changed", path=last_path,
                                  expected=str(ck["config"]["model"]), found=str(to_dict(cfg.model)),
                                  fix="resume with the same config, or train into a new train.output_dir")
        model.load_state_dict(member_states(ck)[0])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch = int(ck["epoch"]) + 1
        best, best_epoch = float(ck.get("best_metric") or -1.0), int(ck.get("best_epoch", 0))
        history = list(ck.get("history", []))
        say(f"resuming at epoch {start_epoch} of {tc.epochs} (best mean IoU so far {best:.4f})")
    elif cfg.model.weights:
        what = load_weights(model, cfg.model.weights)
        say(f"loaded {what} weights from {cfg.model.weights}")

    train_ds = ImagePairs(data.train, data, cfg, train=True)
    val_ds = ImagePairs(data.val, data, cfg, train=False) if data.val else None
    gen = torch.Generator().manual_seed(tc.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=tc.batch_size, shuffle=True, generator=gen,
                                         num_workers=tc.num_workers, drop_last=len(train_ds) > tc.batch_size,
                                         pin_memory=device.type == "cuda")
    say(f"{len(data.train)} training / {len(data.val)} validation images ({data.layout} layout); device {device}; "
        f"model {cfg.model.name} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    names = {c: cfg.labels.get(c, str(c)) for c in range(cfg.num_classes)}
    t_start = time.time() - (history[-1]["elapsed_s"] if history else 0.0)
    epoch = start_epoch - 1
    with progress_bar("train", total=tc.epochs, enabled=progress, completed=start_epoch - 1) as advance:
        model.train()
        for epoch in range(start_epoch, tc.epochs + 1):
            losses = []
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                losses.append(train_step(model, opt, scaler, device, tc.amp,
                                         lambda: segmentation_loss(model(x), y, tc.loss,  # noqa: B023 - called at once
                                                                   data.ignore_index), amp_dtype=tc.amp_dtype))
            sched.step()
            record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                      "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t_start, 1)}
            if val_ds is not None and (epoch % tc.val_every == 0 or epoch == tc.epochs):
                iou = validate_2d(model, val_ds, cfg, device)
                record["val_iou"] = {names[c]: (None if np.isnan(v) else round(float(v), 4)) for c, v in enumerate(iou)}
                record["val_mean_iou"] = round(float(np.nanmean(iou)), 4) if np.isfinite(iou).any() else 0.0
                if record["val_mean_iou"] > best:
                    best, best_epoch = record["val_mean_iou"], epoch
                    save_checkpoint(best_path, model=model, cfg=cfg, epoch=epoch, best_metric=best,
                                    best_epoch=best_epoch, split=split, val_iou=record["val_iou"])
            history.append(record)
            save_checkpoint(last_path, model=model, cfg=cfg, epoch=epoch, best_metric=best, best_epoch=best_epoch,
                            optimizer=opt.state_dict(), scheduler=sched.state_dict(), history=history, split=split)
            atomic_write(out / "history.json", lambda p: Path(p).write_text(json.dumps(history, indent=1)))
            desc = f"loss {record['loss']:.4f}"
            if "val_mean_iou" in record:
                desc += f" · val mIoU {record['val_mean_iou']:.4f} (best {best:.4f} @ {best_epoch})"
            advance(desc)
            if "val_mean_iou" in record:
                say(f"epoch {epoch}/{tc.epochs} {desc} · {record['elapsed_s']:.0f} s")
    if val_ds is None:  # no validation images: the last weights are the best we know
        save_checkpoint(best_path, model=model, cfg=cfg, epoch=epoch, best_metric=None, split=split)
    return TrainResult2D(out, best_path, last_path, best, best_epoch, epoch - start_epoch + 1,
                         time.time() - t_start, history)
